"""Parameter and MAC counting, with fvcore's conventions so numbers compare with the paper.

Counted: convolutions (output elements x input channels per group x kernel area), dense layers
(output elements x input features) and normalisation layers (5 ops per input element with an
affine, 4 without: fvcore's ``norm_flop_counter``; BatchNorm in eval mode 2 per element, fvcore's
``batchnorm_flop_jit``) and matrix products (``b*n*k*m`` for a (b,n,k)x(k,m) product: attention's
QK^T and AV, the random token-mixing matrix; the spatial MLP is a Dense over tokens) and resizes (1 per
output element for nearest, 4 for bilinear: fvcore's ``upsample_nearest2d``/``upsample_bilinear2d``).
Not counted, as in fvcore: pooling, softmax, activations, residual additions and the final spatial mean.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from mindspore import nn

from .backends import applied_backend, apply_backend
from .models.fpn import Resize
from .models.layers import Attention, GroupNorm1, LayerNormChannel, RandomMixing

__all__ = ["count_params", "count_macs"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def count_params(net: nn.Cell, trainable_only: bool = False, buffers: bool = True) -> int:
    """Number of scalar parameters (all of them unless ``trainable_only``).

    ``buffers=False`` leaves out BatchNorm's moving mean/variance: MindSpore holds them as
    Parameters, PyTorch as buffers, so counts reported from PyTorch (mmseg's, fvcore's) exclude them.
    """
    params = net.trainable_params() if trainable_only else net.get_parameters()
    if not buffers:
        statistics = {id(p) for _, cell in net.cells_and_names() if isinstance(cell, _BATCH_NORMS)
                      for p in (cell.moving_mean, cell.moving_variance)}
        params = [p for p in params if id(p) not in statistics]
    return int(sum(int(np.prod(p.shape)) for p in params))


def _conv_macs(cell: nn.Conv2d, inputs, output) -> int:
    kh, kw = cell.kernel_size
    return int(np.prod(output.shape)) * (cell.in_channels // cell.group) * kh * kw


def _dense_macs(cell: nn.Dense, inputs, output) -> int:
    return int(np.prod(output.shape)) * cell.in_channels


def _norm_macs(cell: nn.Cell, inputs, output) -> int:
    return 5 * int(np.prod(inputs[0].shape))


def _batchnorm_eval_macs(cell: nn.Cell, inputs, output) -> int:
    return 2 * int(np.prod(inputs[0].shape))


def _resize_macs(cell: Resize, inputs, output) -> int:
    return (4 if cell.mode == "bilinear" else 1) * int(np.prod(output.shape))


def _attention_macs(cell: Attention, inputs, output) -> int:
    # The two matrix products only; qkv and proj are Dense cells counted by their own rule.
    batch, _, height, width = inputs[0].shape
    tokens = height * width
    return 2 * batch * cell.num_heads * tokens * tokens * cell.head_dim


def _random_mixing_macs(cell: RandomMixing, inputs, output) -> int:
    batch, channels, height, width = inputs[0].shape
    return batch * channels * (height * width) ** 2


_RULES: list[tuple[type, Callable[..., int]]] = [
    (nn.Conv2d, _conv_macs),
    (nn.Dense, _dense_macs),
    (GroupNorm1, _norm_macs),
    (LayerNormChannel, _norm_macs),
    (nn.GroupNorm, _norm_macs),
    (nn.LayerNorm, _norm_macs),
    (nn.BatchNorm2d, _batchnorm_eval_macs),
    (nn.SyncBatchNorm, _batchnorm_eval_macs),
    (Attention, _attention_macs),
    (RandomMixing, _random_mixing_macs),
    (Resize, _resize_macs),
]


def register_mac_rule(cell_type: type, rule: Callable[..., int]) -> None:
    """Count ``cell_type`` with ``rule(cell, inputs, output) -> MACs`` (for new layer types)."""
    _RULES.insert(0, (cell_type, rule))


def count_macs(net: nn.Cell, image_size: int | tuple[int, int] = 224, in_channels: int = 3) -> int:
    """MACs of one forward pass on a single ``image_size`` image.

    Runs one PyNative forward with hooks on the counted layer types; the global execution mode is
    restored afterwards.
    """
    import mindspore as ms

    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    total = [0]
    handles = []
    for _, cell in net.cells_and_names():
        for cell_type, rule in _RULES:
            if isinstance(cell, cell_type):
                def hook(_cell, inputs, output, cell=cell, rule=rule):
                    total[0] += rule(cell, inputs, output)

                handles.append(cell.register_forward_hook(hook))
                break
    # a backend's fused forms bypass the hooked cells: count on the model as written, then restore it
    backend = applied_backend(net)
    apply_backend(net, "none")
    mode = ms.get_context("mode")
    was_training = net.training
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        net.set_train(False)
        net(ms.Tensor(np.zeros((1, in_channels, height, width), np.float32)))
    finally:
        for handle in handles:
            handle.remove()
        net.set_train(was_training)
        ms.set_context(mode=mode)
        apply_backend(net, backend)
    return total[0]
