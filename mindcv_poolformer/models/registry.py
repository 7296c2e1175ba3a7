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


def create_model(name: str, num_classes: int | None = None, in_channels: int = 3, **overrides) -> nn.Cell:
    """Build a registered model as the paper writes it, with fresh weights.
    Loading weights is ``mindcv_poolformer.create_model``'s job (the factory sits above the checkpoint
    readers, which read this registry's facts), so this module imports nothing of the package above it.

    Args:
        name: a name from ``list_models()``.
        num_classes: classifier outputs; None: the model's own (1000 ImageNet classes for classifiers,
            150 ADE20K classes for segmentation).
        in_channels: input image channels.
        **overrides: constructor arguments, e.g. ``drop_path_rate=0.1``.
    """
    _check_name(name)
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    return _BUILDERS[name](in_channels=in_channels, **overrides)
