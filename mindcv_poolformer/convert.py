"""Convert any known PoolFormer checkpoint to MindSpore ``.ckpt`` / ``.safetensors``.

    python -m mindcv_poolformer.convert SRC DST [--arch NAME] [--overwrite]

SRC: official sail-sg ``.pth``/``.pth.tar`` (bare or wrapped in ``state_dict``/``model``), timm
``metaformer.py``, HF transformers, MindCV/MindSpore ``.ckpt``, or a ``.safetensors`` of any of them.
DST: ``.safetensors`` (recommended: no pickle, readable everywhere) or ``.ckpt``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass

from .checkpoint import (
    CheckpointError,
    infer_architecture,
    load_checkpoint_into,
    match_variant,
    read_state_dict,
    save_state_dict,
    split_model_state,
    to_canonical,
)

__all__ = ["ConvertResult", "convert_checkpoint", "main"]

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


def convert_checkpoint(src: str, dst: str, arch: str | None = None, overwrite: bool = False) -> ConvertResult:
    """Convert ``src`` (any known layout/file type) to our names and write ``dst``.

    The architecture is inferred from the tensors (depths and widths) and, with ``arch``, checked
    against it; the result is verified by loading it into a freshly built model before writing.
    An existing ``dst`` is never replaced unless ``overwrite`` is set.
    """
    from .models.registry import model_info

    if os.path.exists(dst) and not overwrite:
        raise CheckpointError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    state, layout = to_canonical(read_state_dict(src))
    state, _ = split_model_state(state)
    found = infer_architecture(state)
    detected = match_variant(found)
    if arch is not None:
        model_info(arch)  # unknown names fail here with the list of valid ones
        if detected is not None and detected != arch:
            raise CheckpointError(
                f"{src} holds a {detected} (depths {found.depths}, widths {found.widths}), not {arch}"
            )
    name = arch or detected
    if name is None:
        raise CheckpointError(
            f"{src}: depths {found.depths} / widths {found.widths} match no registered PoolFormer; pass --arch"
        )
    from .models.registry import create_model

    net = create_model(name, num_classes=found.num_classes, in_channels=found.in_channels)
    load_checkpoint_into(net, state)
    if layout == "timm":
        _LOG.warning(TIMM_HEAD_NOTE)
    save_state_dict(state, dst)
    return ConvertResult(name, layout, found.num_classes, len(state), dst)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mindcv_poolformer.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="input checkpoint (.pth, .pth.tar, .ckpt, .safetensors, ...)")
    parser.add_argument("dst", help="output file, .safetensors or .ckpt")
    parser.add_argument("--arch", default=None, help="expected model name (checked against the weights)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = convert_checkpoint(args.src, args.dst, arch=args.arch, overwrite=args.overwrite)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result.dst}: {result.arch}, {result.num_classes} classes, {result.num_tensors} tensors "
          f"(from {result.layout} layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
