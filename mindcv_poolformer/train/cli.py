"""``train.py`` entry point: parse the one config schema, train, report user errors in one line."""

from __future__ import annotations

import logging
import os
import sys

from .._runtime import configure_device
from .._script import run_script
from ..checkpoint import check_checkpoint, resolve_pretrained
from ..config import Config, ConfigError, model_defaults, parse_cli
from ..distributed import init_distributed
from .trainer import apply_mindcv_resume, train

__all__ = ["main", "model_defaults", "preflight"]

_LOG = logging.getLogger("mindcv_poolformer")

DESCRIPTION = ("Train or fine-tune a PoolFormer: a YAML recipe (--config) plus --key value overrides. "
               "Distributed: launch with msrun or mpirun and pass --distribute True.")


def preflight(cfg: Config) -> None:
    """Checks of the initial weights that need no model, run before the trainer starts.

    The trainer clears (``--overwrite``) and writes the run directory before it builds the model;
    an unusable ``--ckpt_path`` must fail before that, in one line, not cost the user a previous
    run. Reading the checkpoint creates Parameters, so on a distributed run this comes after
    ``init_distributed`` (the device is set up before either; data and run-directory checks come
    first in the trainer itself). MindCV's resume form (``--ckpt_path CKPT --resume_opt True``)
    becomes ``--resume CKPT`` here, or a one-line error for a checkpoint that is not ours.
    """
    apply_mindcv_resume(cfg)
    source = cfg["ckpt_path"]
    if source and not os.path.isfile(source):
        raise ConfigError(f"ckpt_path: {source} does not exist (a .ckpt, .safetensors or .pth(.tar) file of weights)")
    if not source and cfg["pretrained"]:
        source = resolve_pretrained(cfg["model"], True)
    if source:
        check_checkpoint(source, cfg["model"])


def _main(argv: list[str]) -> int:
    first = parse_cli(argv, prog="train.py", description=DESCRIPTION)
    cfg = parse_cli(argv, prog="train.py", defaults=model_defaults(first.model))
    _LOG.info("%s", configure_device(cfg))
    # communication before the first Tensor/Parameter (MindSpore's rule on Ascend); the trainer reuses it
    init_distributed(cfg["distribute"], cfg["device_target"])
    preflight(cfg)
    train(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run training; errors in the user's input exit with code 2 and one line on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    return run_script(_main, "train.py", argv)
