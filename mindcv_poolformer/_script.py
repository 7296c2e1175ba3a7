"""Shared entry-point behaviour of validate/export/predict: user errors are one line on stderr, exit 2."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from .checkpoint import CheckpointError
from .config import ConfigError

__all__ = ["ScriptError", "USER_ERRORS", "run_script", "wants_debug"]


class ScriptError(RuntimeError):
    """A problem with the user's input or environment (not a bug): reported without a traceback."""


USER_ERRORS = (ConfigError, CheckpointError, ScriptError, FileNotFoundError)


def wants_debug(argv: Sequence[str]) -> bool:
    """``--debug`` / ``--debug true`` / ``--debug=true`` on the command line (read before config parsing)."""
    for i, token in enumerate(argv):
        if token.startswith("--debug="):
            return token.split("=", 1)[1].lower() in ("true", "1", "yes", "on")
        if token == "--debug":
            nxt = argv[i + 1] if i + 1 < len(argv) else "true"
            return nxt.startswith("--") or nxt.lower() in ("true", "1", "yes", "on")
    return False


def run_script(main: Callable[[list[str]], int], prog: str, argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a user error becomes ``prog: error: <first line>`` and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except USER_ERRORS as exc:
        if wants_debug(argv):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
