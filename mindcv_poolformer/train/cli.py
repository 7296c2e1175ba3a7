"""``train.py`` entry point: parse the one config schema, train, report user errors in one line."""

from __future__ import annotations

import logging
import sys

from .._script import run_script
from ..config import parse_cli

__all__ = ["main"]

DESCRIPTION = ("Train or fine-tune a PoolFormer: a YAML recipe (--config) plus --key value overrides. "
               "Distributed: launch with msrun or mpirun and pass --distribute True.")


def _main(argv: list[str]) -> int:
    from .trainer import train

    cfg = parse_cli(argv, prog="train.py", description=DESCRIPTION)
    train(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run training; errors in the user's input exit with code 2 and one line on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    return run_script(_main, "train.py", argv)
