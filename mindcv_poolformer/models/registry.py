"""The one model registry: names -> builders plus one record of each model's facts (``ModelInfo``)."""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

from mindspore import nn

__all__ = ["ADE20K_MEAN", "ADE20K_STD", "IMAGENET_MEAN", "IMAGENET_STD", "ModelInfo", "create_model", "list_models",
           "model_info", "register_model", "register_record"]

# The normalisation of each family's training data, 0-255 scale: timm's ImageNet constants, and the
# rounded values mmseg's ADE20K configs write. Here, below every reader, so a model record can hold them.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
ADE20K_MEAN = (123.675, 116.28, 103.53)
ADE20K_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ModelInfo:
    """Everything known about one model: its architecture, its preprocessing and the figures reported for it.

    The one record of a model's facts: the builder reads its architecture (``build_kwargs``), the
    scripts take their defaults from it (``config.model_defaults``), checkpoint matching reads its
    depths and widths. ``task`` is ``classification`` or ``segmentation``; a segmentation model
    reports its single-scale ``miou`` instead of ``top1``, and ``crop_size`` is the side of its
    training crops. An ablation or a segmentation model names its ``base`` PoolFormer, whose
    architecture it shares, and the constructor arguments (``overrides``) in which it differs.
    ``drop_path_rate`` is the training recipe's, not the built default (a built model has none).
    """
    name: str
    depths: tuple[int, ...] = ()
    widths: tuple[int, ...] = ()
    layer_scale_init: float | None = 1e-5
    drop_path_rate: float = 0.0
    crop_pct: float = 0.9
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bicubic"
    num_classes: int = 1000
    params: int | None = None
    macs: float | None = None
    top1: float | None = None
    url: str | None = None
    task: str = "classification"
    miou: float | None = None
    crop_size: int | None = None
    base: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def build_kwargs(self) -> dict[str, Any]:
        """The constructor arguments this record fixes: the architecture, then the ablation's overrides."""
        kwargs: dict[str, Any] = {}
        if self.depths:
            kwargs.update(depths=self.depths, widths=self.widths, layer_scale_init=self.layer_scale_init)
        kwargs.update(copy.deepcopy(dict(self.overrides)))  # a builder may not change the table through them
        return kwargs

    def derived(self, name: str, **facts: Any) -> ModelInfo:
        """A record ``name`` built on this one: its architecture and ``base`` this model, every other fact its own."""
        return ModelInfo(name=name, depths=self.depths, widths=self.widths, layer_scale_init=self.layer_scale_init,
                         base=self.name, **facts)


_BUILDERS: dict[str, Callable[..., nn.Cell]] = {}
_INFO: dict[str, ModelInfo] = {}


def register_model(name: str, builder: Callable[..., nn.Cell], info: ModelInfo | None = None) -> None:
    """Add a builder ``builder(num_classes=, in_channels=, **overrides) -> Cell`` under ``name``."""
    if name in _BUILDERS:
        raise ValueError(f"model {name!r} is already registered")
    _BUILDERS[name] = builder
    _INFO[name] = info or ModelInfo(name=name)


def register_record(record: ModelInfo, network: Callable[..., nn.Cell]) -> None:
    """Register ``record.name``: ``network(num_classes=, in_channels=, **record.build_kwargs(), **overrides)``."""
    def build(num_classes: int = record.num_classes, in_channels: int = 3, **overrides) -> nn.Cell:
        kwargs = record.build_kwargs()
        kwargs.update(overrides)
        return network(num_classes=num_classes, in_channels=in_channels, **kwargs)

    register_model(record.name, build, record)


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
