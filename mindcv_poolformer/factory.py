"""``create_model``: a registered model, built device-neutral, its weights loaded, then put into a backend.

``mindcv_poolformer.models.create_model`` builds the network as the paper writes it, with fresh weights;
this one also loads a checkpoint (``checkpoint.py``, any layout) and applies ``mindcv_poolformer.backends``
(the fused CPU kernels on the CPU, native pooling on Atlas A2). It is what the scripts and a user of
``mindcv_poolformer.create_model`` get.
"""

from __future__ import annotations

from mindspore import nn

from .backends import apply_backend
from .checkpoint import load_checkpoint_into, resolve_pretrained
from .models import registry

__all__ = ["create_model"]


def create_model(name: str, pretrained: bool | str = False, num_classes: int | None = None, in_channels: int = 3,
                 checkpoint_path: str | None = None, backend: str = "auto", **overrides) -> nn.Cell:
    """Build ``name``, load weights into it, and apply ``backend``.
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
        backend: ``auto`` (the backend of MindSpore's device target), ``cpu``, ``ascend`` or ``none``
            (the model as written).
        **overrides: constructor arguments, e.g. ``drop_path_rate=0.1``.
    """
    net = registry.create_model(name, num_classes=num_classes, in_channels=in_channels, **overrides)
    source = checkpoint_path
    if source is None and pretrained:
        source = resolve_pretrained(name, pretrained)
    if source is not None:
        load_checkpoint_into(net, source)
    apply_backend(net, backend)
    return net
