"""The one model registry: names -> builders plus the facts (crop_pct, params, MACs, top-1 or mIoU) of each."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from mindspore import nn

__all__ = ["ModelInfo", "register_model", "list_models", "model_info", "create_model"]


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model besides how to build it.

    ``task`` is ``classification`` or ``segmentation``; a segmentation model reports its single-scale
    ``miou`` instead of ``top1``, and ``crop_size`` is the side of its training crops.
    """

    name: str
    crop_pct: float = 0.9
    drop_path_rate: float = 0.0
    params: int | None = None
    macs: float | None = None
    top1: float | None = None
    url: str | None = None
    task: str = "classification"
    miou: float | None = None
    crop_size: int | None = None


_BUILDERS: dict[str, Callable[..., nn.Cell]] = {}
_INFO: dict[str, ModelInfo] = {}


def register_model(name: str, builder: Callable[..., nn.Cell], info: ModelInfo | None = None) -> None:
    """Add a builder ``builder(num_classes=, in_channels=, **overrides) -> Cell`` under ``name``."""
    if name in _BUILDERS:
        raise ValueError(f"model {name!r} is already registered")
    _BUILDERS[name] = builder
    _INFO[name] = info or ModelInfo(name=name)


def list_models(pattern: str = "") -> list[str]:
    """Registered model names, sorted; only those containing ``pattern`` if given."""
    return sorted(name for name in _BUILDERS if pattern in name)


def _check_name(name: str) -> None:
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, _BUILDERS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (available: {', '.join(list_models())})")


def model_info(name: str) -> ModelInfo:
    """The registry's facts about ``name``."""
    _check_name(name)
    return _INFO[name]


def create_model(
    name: str,
    pretrained: bool | str = False,
    num_classes: int | None = None,
    in_channels: int = 3,
    checkpoint_path: str | None = None,
    **overrides,
) -> nn.Cell:
    """Build a registered model and optionally load weights into it.

    Args:
        name: a name from ``list_models()``.
        pretrained: ``True`` looks for ``<name>.{safetensors,ckpt,pth.tar,pth}`` in the weights cache
            (``$MINDCV_POOLFORMER_HOME``, default ``~/.cache/mindcv_poolformer``); a string is a file
            or a directory to look in. Nothing is downloaded.
        num_classes: classifier outputs; None: the model's own (1000 ImageNet classes for classifiers,
            150 ADE20K classes for segmentation). If it differs from the checkpoint's, the backbone is
            loaded and only the head is re-initialised (reported in the log).
        in_channels: input image channels.
        checkpoint_path: a checkpoint file to load (any format the converter reads); wins over
            ``pretrained``.
        **overrides: constructor arguments, e.g. ``drop_path_rate=0.1``.
    """
    _check_name(name)
    if num_classes is not None:  # else the builder's own default: 1000 ImageNet classes, 150 ADE20K ones
        overrides["num_classes"] = num_classes
    model = _BUILDERS[name](in_channels=in_channels, **overrides)
    source = checkpoint_path
    if source is None and pretrained:
        from ..checkpoint import resolve_pretrained

        source = resolve_pretrained(name, pretrained)
    if source is not None:
        from ..checkpoint import load_checkpoint_into

        load_checkpoint_into(model, source)
    return model
