"""Shared entry-point behaviour of every script: user errors are one line on stderr, exit 2."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence

from .errors import CheckpointError, ConfigError, ScriptError

__all__ = ["ScriptError", "USER_ERRORS", "run_script", "user_error_message", "wants_debug"]


USER_ERRORS = (ConfigError, CheckpointError, ScriptError, FileNotFoundError)

# MindSpore's dataset pipeline re-raises an exception from a Python op as a RuntimeError whose text
# holds the original traceback, ending in a line "package.module.ExceptionName: message".
_PIPELINE_ERROR = "Exception thrown from user defined Python function in dataset"
_EXCEPTION_LINE = re.compile(r"^(?:\w+\.)*(\w+): (.+)$")


def wants_debug(argv: Sequence[str]) -> bool:
    """``--debug`` / ``--debug true`` / ``--debug=true`` on the command line (read before config parsing)."""
    for i, token in enumerate(argv):
        if token.startswith("--debug="):
            return token.split("=", 1)[1].lower() in ("true", "1", "yes", "on")
        if token == "--debug":
            nxt = argv[i + 1] if i + 1 < len(argv) else "true"
            return nxt.startswith("--") or nxt.lower() in ("true", "1", "yes", "on")
    return False


def _user_error_names() -> set[str]:
    names: set[str] = set()
    pending = list(USER_ERRORS)
    while pending:
        cls = pending.pop()
        if cls.__name__ not in names:
            names.add(cls.__name__)
            pending += cls.__subclasses__()
    return names


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message of a user error, also when a dataset pipeline wrapped it; None for anything else."""
    if isinstance(exc, USER_ERRORS):
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, RuntimeError) and _PIPELINE_ERROR in str(exc):
        names = _user_error_names()
        found = None
        for line in str(exc).splitlines():
            match = _EXCEPTION_LINE.match(line.strip())
            if match and match[1] in names and not match[2].startswith("Traceback"):
                found = match[2].strip()
        return found
    return None


def run_script(main: Callable[[list[str]], int], prog: str, argv: Sequence[str] | None = None,
               debug: bool | None = None) -> int:
    """Run ``main(argv)``; a user error becomes ``prog: error: <first line>`` and exit code 2.

    ``debug`` (default: ``--debug`` on the command line) re-raises instead, with the traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except (*USER_ERRORS, RuntimeError) as exc:
        message = user_error_message(exc)
        if message is None or (wants_debug(argv) if debug is None else debug):
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
