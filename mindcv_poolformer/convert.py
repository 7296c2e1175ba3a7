"""Convert any known PoolFormer checkpoint to MindSpore ``.ckpt`` / ``.safetensors``.

    python -m mindcv_poolformer.convert SRC DST [--arch NAME] [--overwrite]

SRC: official sail-sg ``.pth``/``.pth.tar`` (bare or wrapped in ``state_dict``/``model``), timm
``metaformer.py``, HF transformers, MindCV/MindSpore ``.ckpt``, an mmsegmentation 0.x/1.x Semantic FPN
``.pth`` (``fpn_poolformer_*``; the official sail-sg segmentation files are of this kind), or a
``.safetensors`` of any of them.
``.pth`` files are read with torch's ``weights_only=True``: no pickled code runs.
DST: a ``.safetensors`` (the default: no pickle, readable everywhere) or ``.ckpt`` file; a DST
without a suffix gets ``.safetensors``, and an existing directory receives ``<SRC name>.safetensors``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass

from ._script import run_script
from .checkpoint import (
    CheckpointError,
    infer_architecture,
    load_checkpoint_into,
    model_name,
    read_state_dict,
    save_state_dict,
    split_model_state,
    to_canonical,
)
from .config import ConfigError
from .models.registry import create_model, list_models, model_info

__all__ = ["ConvertResult", "convert_checkpoint", "main", "output_path"]

_LOG = logging.getLogger("mindcv_poolformer")

TIMM_HEAD_NOTE = (
    "timm >= 0.9 applies its head norm AFTER pooling (LayerNorm, eps 1e-6); the converted model uses the "
    "official order (GroupNorm on the feature map, then pooling), so logits differ from timm's by ~1e-2"
)


@dataclass(frozen=True)
class ConvertResult:
    """What was converted: the architecture, the source layout and where it was written."""
    arch: str
    layout: str
    num_classes: int
    num_tensors: int
    dst: str


def output_path(src: str, dst: str) -> str:
    """Where ``dst`` puts the converted weights: ``.safetensors`` unless it names ``.ckpt``.

    A directory (existing, or spelled with a trailing slash) receives ``<src name>.safetensors``;
    a name without a suffix gets ``.safetensors``; ``.ckpt``/``.safetensors`` are kept as given.
    """
    if os.path.isdir(dst) or dst.endswith(("/", os.sep)):
        name = os.path.basename(src)
        for suffix in (".pth.tar", ".pth", ".pt", ".bin", ".tar", ".ckpt", ".safetensors"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        return os.path.join(dst, name + ".safetensors")
    if not os.path.splitext(os.path.basename(dst))[1]:
        return dst + ".safetensors"
    return dst


def convert_checkpoint(src: str, dst: str, arch: str | None = None, overwrite: bool = False) -> ConvertResult:
    """Convert ``src`` (any known layout/file type) to our names and write it to ``output_path(src, dst)``.

    The architecture is inferred from the tensors (depths and widths; a Semantic FPN from its
    ``backbone.``/``neck.``/``decode_head.`` keys) and, with ``arch``, checked against it; the result
    is verified by loading it into a freshly built model before writing.
    An existing output is never replaced unless ``overwrite`` is set.
    """
    dst = output_path(src, dst)
    if not dst.lower().endswith((".safetensors", ".ckpt")):
        raise CheckpointError(f"{dst}: the output must be a .safetensors (default) or .ckpt file")
    if os.path.exists(dst) and not overwrite:
        raise CheckpointError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    state, layout = to_canonical(read_state_dict(src))
    state, _ = split_model_state(state)
    found = infer_architecture(state)
    detected = model_name(found)
    if arch is not None:
        if arch not in list_models():
            try:
                model_info(arch)
            except ValueError as exc:  # names the closest registered models
                raise ConfigError(f"arch: {exc}") from None

        if detected is not None and detected != arch:
            backbone = "backbone " if found.task == "segmentation" else ""
            raise CheckpointError(
                f"{src} holds a {detected} ({backbone}depths {found.depths}, widths {found.widths}), not {arch}"
            )
    name = arch or detected
    if name is None:
        raise CheckpointError(
            f"{src}: depths {found.depths} / widths {found.widths} match no registered PoolFormer"
            + (" Semantic FPN" if found.task == "segmentation" else "") + "; pass --arch"
        )

    net = create_model(name, num_classes=found.num_classes, in_channels=found.in_channels)
    load_checkpoint_into(net, state)
    if layout == "timm":
        _LOG.warning(TIMM_HEAD_NOTE)
    save_state_dict(state, dst)
    return ConvertResult(name, layout, found.num_classes, len(state), dst)


def main(argv: list[str] | None = None) -> int:
    """``python -m mindcv_poolformer.convert SRC DST``; user errors exit with code 2 and one line on stderr."""
    parser = argparse.ArgumentParser(prog="python -m mindcv_poolformer.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="input checkpoint (.pth, .pth.tar, .ckpt, .safetensors, ...)")
    parser.add_argument("dst", help="output: a .safetensors (default when DST has no suffix; a directory gets "
                                    "<SRC name>.safetensors) or .ckpt file")
    parser.add_argument("--arch", default=None, help="expected model name (checked against the weights)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def _main(_: list[str]) -> int:
        result = convert_checkpoint(args.src, args.dst, arch=args.arch, overwrite=args.overwrite)
        print(f"wrote {result.dst}: {result.arch}, {result.num_classes} classes, {result.num_tensors} tensors "
              f"(from {result.layout} layout)")
        return 0

    return run_script(_main, "convert", [], debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
