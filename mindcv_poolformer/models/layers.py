"""Small building blocks of the MetaFormer family, written to be exact and portable.

Each block is expressed with primitive ops whose semantics do not depend on the backend or the
exporter (CPU, Ascend, MINDIR, ONNX): GroupNorm(1) as explicit mean/variance reductions, and the
PoolFormer token mixer as a zero-padded window average divided by the true window count.
"""

from __future__ import annotations

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common import initializer as init


class GroupNorm1(nn.Cell):
    """GroupNorm with one group: normalise each sample over (C, H, W), then a per-channel affine.

    This is the paper's "modified layer norm". Parameter names ``gamma``/``beta`` follow
    ``mindspore.nn.GroupNorm`` so MindCV checkpoints load unchanged. Written as reductions rather
    than ``nn.GroupNorm`` because those export to ONNX and behave identically on every backend.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.gamma = Parameter(init.initializer("ones", (num_channels,)), name="gamma")
        self.beta = Parameter(init.initializer("zeros", (num_channels,)), name="beta")

    def construct(self, x: Tensor) -> Tensor:
        mean = x.mean(axis=(1, 2, 3), keep_dims=True)
        centered = x - mean
        var = (centered * centered).mean(axis=(1, 2, 3), keep_dims=True)
        y = centered * ops.rsqrt(var + self.eps)
        return y * self.gamma.reshape((1, -1, 1, 1)) + self.beta.reshape((1, -1, 1, 1))

    def extend_repr(self) -> str:
        return f"num_channels={self.num_channels}, eps={self.eps}"


class Pooling(nn.Cell):
    """PoolFormer token mixer: ``AvgPool(k, stride 1, pad k//2, count_include_pad=False)(x) - x``.

    The average over the valid part of each window is computed as a zero-padded window mean
    divided by the (zero-padded) window mean of ones, i.e. sum/count with the true border count.
    That is exact by construction on any backend, unlike relying on a ``pad_mode`` whose border
    convention differs between frameworks, and it exports to ONNX (MindSpore lowers the
    ``count_include_pad=False`` form to AvgPool3D, which ONNX export rejects).
    """

    def __init__(self, pool_size: int = 3) -> None:
        super().__init__()
        if pool_size < 1 or pool_size % 2 == 0:
            raise ValueError(f"pool_size must be an odd positive integer, got {pool_size}")
        self.pool_size = pool_size
        self.padding = (pool_size // 2,) * 4
        self.pool = nn.AvgPool2d(pool_size, stride=1, pad_mode="valid")

    def construct(self, x: Tensor) -> Tensor:
        window_mean = self.pool(ops.pad(x, self.padding))
        ones = ops.ones((1, 1, x.shape[2], x.shape[3]), x.dtype)
        valid_fraction = self.pool(ops.pad(ones, self.padding))
        return window_mean / valid_fraction - x

    def extend_repr(self) -> str:
        return f"pool_size={self.pool_size}"


class DropPath(nn.Cell):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob
        self.keep_prob = 1.0 - drop_prob

    def construct(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        noise = ops.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype)
        mask = ops.floor(noise + self.keep_prob)
        return x / self.keep_prob * mask

    def extend_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class ConvMlp(nn.Cell):
    """Channel MLP as two 1x1 convs (keeps the NCHW layout): fc1 -> act -> drop -> fc2 -> drop."""

    def __init__(self, dim: int, hidden_dim: int, act: nn.Cell, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1, has_bias=True, weight_init=init.TruncatedNormal(0.02),
                             bias_init="zeros")
        self.act = act
        self.drop = nn.Dropout(p=drop) if drop > 0 else nn.Identity()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1, has_bias=True, weight_init=init.TruncatedNormal(0.02),
                             bias_init="zeros")

    def construct(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class PatchEmbed(nn.Cell):
    """Strided conv that embeds patches (the stem) or downsamples between stages."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad",
                              padding=padding, has_bias=True)

    def construct(self, x: Tensor) -> Tensor:
        return self.proj(x)


def layer_scale_parameter(value: float, dim: int) -> Parameter:
    """A per-channel residual scale, initialised to ``value``."""
    return Parameter(Tensor(np.full((dim,), value, dtype=np.float32)))
