"""``create_model``: a registered model, built device-neutral, then put into the current device's backend.

``mindcv_poolformer.models.create_model`` builds the network as the paper writes it; this one also
applies ``mindcv_poolformer.backends`` (the fused CPU kernels on the CPU, native pooling on Atlas A2),
which is what the scripts and a user of ``mindcv_poolformer.create_model`` get.
"""

from __future__ import annotations

from mindspore import nn

from .backends import apply_backend
from .models import registry

__all__ = ["create_model"]


def create_model(name: str, pretrained: bool | str = False, num_classes: int | None = None, in_channels: int = 3,
                 checkpoint_path: str | None = None, backend: str = "auto", **overrides) -> nn.Cell:
    """``models.create_model(...)`` (see there for the arguments), then ``apply_backend(net, backend)``.

    ``backend``: ``auto`` (the backend of MindSpore's device target), ``cpu``, ``ascend`` or ``none``
    (the model as written).
    """
    net = registry.create_model(name, pretrained=pretrained, num_classes=num_classes, in_channels=in_channels,
                                checkpoint_path=checkpoint_path, **overrides)
    apply_backend(net, backend)
    return net
