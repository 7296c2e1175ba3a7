"""The user-facing error types: each is reported by the scripts as one line on stderr with exit code 2.

They live at the bottom of the package so that every layer can raise them without importing the
layer that usually does (a config error from the data code, a checkpoint error from the factory).
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "ScriptError"]


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and what is accepted."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says which."""


class ScriptError(RuntimeError):
    """A problem with the user's input or environment (not a bug): reported without a traceback."""
