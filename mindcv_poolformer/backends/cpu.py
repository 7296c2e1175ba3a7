"""The CPU backend: PoolFormer blocks on the fused C++ kernels, and a faster pooling op form.

``apply(net)`` changes how a built model computes on the CPU, never what it holds:
- every eligible ``MetaFormerBlock`` (GroupNorm(1), pooling mixer, exact GELU, residuals: the
  PoolFormer block) becomes a ``FusedPoolFormerBlock`` (on the kernels) or, where the kernel library
  is unavailable, a ``FoldedPoolFormerBlock`` (the same folds on MindSpore's ops). It stays the same
  object with the same Parameters and names, only its class (hence its ``construct``) changes, so
  checkpoints, the optimizer and exported keys are untouched and ``remove`` switches it back;
- every 3x3, stride-1, zero-padded ``nn.Conv2d`` (Semantic FPN's neck and head) becomes a
  ``CpuConv3x3`` on the kernels' AVX-512 GEMM, again by class only;
- Semantic FPN's neck becomes a ``CpuFPN``, whose top-down step adds each coarse pixel to its 2x2 block
  through a broadcast instead of writing the nearest x2 upsampled map first (exact);
- every pooling mixer's ``count_include_pad=False`` average runs as MindSpore's padded
  ``AvgPool2d`` divided by the valid count: exact, and 4x faster on the CPU than padding the input
  first (bench/ops.py), but refused by MindSpore on Ascend 910B, so it lives here and not in the model.

The kernels are float32 only: a block whose input is float16 (AMP O3) runs the folded ops form.
Exported graphs never use this backend (``mindcv_poolformer.deploy.export``).
"""

from __future__ import annotations

from mindspore import Tensor, nn, ops
from mindspore.common import dtype as mstype

from ..kernels import CpuKernels
from ..models.fpn import FPN
from ..models.layers import AvgPoolExcludePad, DropPath, GroupNorm1, Pooling
from ..models.metaformer import MetaFormerBlock

__all__ = ["CpuAvgPoolExcludePad", "CpuConv3x3", "CpuFPN", "FoldedPoolFormerBlock", "FusedPoolFormerBlock", "apply",
           "conv3x3_eligible", "eligible", "remove"]


class CpuAvgPoolExcludePad(nn.Cell):
    """``count_include_pad=False`` average as MindSpore's zero-padded window mean over the valid fraction.

    The padded ``nn.AvgPool2d`` (``count_include_pad=True``) is an AvgPool3D on the CPU; dividing by
    the same pooling of a map of ones makes the result independent of that convention.
    """

    def __init__(self, pool_size: int) -> None:
        super().__init__()
        self.pool_size = pool_size
        self.pool = nn.AvgPool2d(pool_size, stride=1, pad_mode="pad", padding=pool_size // 2, count_include_pad=True)

    def construct(self, x: Tensor) -> Tensor:
        valid_fraction = self.pool(ops.ones((1, 1, x.shape[2], x.shape[3]), x.dtype))
        return self.pool(x) * ops.div(ops.ones_like(valid_fraction), valid_fraction)


class CpuConv3x3(nn.Conv2d):
    """A 3x3, stride-1, zero-padded conv on the kernels' GEMM (an implicit im2col), forward and gradients.

    MindSpore's oneDNN, capped at AVX2 on this package's CPUs (``_runtime.py``), runs these convs at
    a third of the CPU's peak; they are two thirds of an FPN-S12's MACs. Float16 inputs (AMP) take
    MindSpore's conv. Instances are made by ``apply`` from built convs (``conv3x3_eligible``).
    """

    def construct(self, x: Tensor) -> Tensor:
        if x.dtype != mstype.float32 or self.weight.dtype != mstype.float32:
            return super().construct(x)
        output = self.k_conv3x3(x, self.weight)
        if self.has_bias:
            output = self.bias_add(output, self.bias)
        return output


def add_nearest_upsampled(fine: Tensor, coarse: Tensor, upsample: nn.Cell) -> Tensor:
    """``fine + upsample(coarse, fine's size)`` (nearest); one broadcast add where ``fine`` is exactly 2x ``coarse``.

    Nearest x2 maps output pixel (y, x) to (y // 2, x // 2), so viewing ``fine`` as (B, C, H, 2, W, 2) and
    ``coarse`` as (B, C, H, 1, W, 1) gives the same sums without the upsampled map: one pass over the fine
    map instead of two (FPN-S12 at 512x512, batch 8: that map is 134 MB at stride 4). Other ratios (an input
    not divisible by 32) take the upsample.
    """
    b, c, h, w = coarse.shape
    if tuple(fine.shape) != (b, c, 2 * h, 2 * w):
        return fine + upsample(coarse, fine.shape[2:])
    return (fine.reshape((b, c, h, 2, w, 2)) + coarse.reshape((b, c, h, 1, w, 1))).reshape(fine.shape)


class CpuFPN(FPN):
    """mmseg's FPN neck with its top-down sums as ``add_nearest_upsampled``: the same values, one pass less.

    On the CPU's broadcast add this halves the top-down step's time; on Ascend a 6-D broadcast may not beat
    ResizeNearestNeighborV2, so it lives here and not in the model.
    """

    def add_top_down(self, fine: Tensor, coarse: Tensor) -> Tensor:
        return add_nearest_upsampled(fine, coarse, self.upsample)


def conv3x3_eligible(conv: nn.Cell) -> bool:
    """Whether ``conv`` is the conv ``CpuConv3x3`` computes (the GEMM tiles channels 8 at a time)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.group == 1 and conv.pad_mode == "pad"
            and conv.padding in (1, (1, 1, 1, 1)) and conv.data_format == "NCHW"
            and conv.in_channels % 8 == 0 and conv.out_channels % 8 == 0)


def _exact_gelu(act: nn.Cell) -> bool:
    return isinstance(act, nn.GELU) and str(act.approximate).lower() in ("none", "false")


def eligible(block: MetaFormerBlock) -> bool:
    """Whether ``block`` is the PoolFormer block that the fused kernels implement."""
    return (type(block) is MetaFormerBlock and block.use_residual and block.use_mlp
            and isinstance(block.norm1, GroupNorm1) and isinstance(block.norm2, GroupNorm1)
            and block.norm1.eps == 1e-5 and block.norm2.eps == 1e-5
            and isinstance(block.token_mixer, Pooling) and _exact_gelu(block.mlp.act))


_INV_SQRT2 = 0.7071067811865476


def _normalize(norm: GroupNorm1, x: Tensor) -> Tensor:
    """GroupNorm(1)'s normalisation without its affine (which the folds apply elsewhere)."""
    flat = x.reshape((x.shape[0], -1))
    ones = ops.ones((flat.shape[1],), x.dtype)
    return norm.layer_norm(flat, ones, ops.zeros_like(ones))[0].reshape(x.shape)


def _folded_conv(conv: nn.Conv2d, x: Tensor, weight_scale: Tensor, bias_scale: Tensor,
                 in_scale: Tensor | None = None, in_shift: Tensor | None = None) -> Tensor:
    """``conv(x * in_scale + in_shift) * weight_scale`` (bias times ``bias_scale``) by rewriting the small weights.

    Everything in the activation's dtype: under AMP the input is float16 while the parameters stay float32.
    """
    dtype = x.dtype
    weight = ops.cast(conv.weight, dtype)
    bias = ops.cast(conv.bias, dtype)
    if in_shift is not None:  # W (x + shift) = W x + W shift
        w2d = weight.reshape(weight.shape[:2])
        bias = bias + ops.matmul(w2d, ops.cast(in_shift, dtype).reshape((-1, 1))).reshape((-1,))
    if in_scale is not None:
        weight = weight * ops.cast(in_scale, dtype).reshape((1, -1, 1, 1))
    weight = weight * ops.cast(weight_scale, dtype).reshape((-1, 1, 1, 1))
    return conv.bias_add(conv.conv2d(x, weight), bias * ops.cast(bias_scale, dtype))


class FoldedPoolFormerBlock(MetaFormerBlock):
    """The PoolFormer block on MindSpore's CPU ops, rearranged for fewer passes over the activations.

    MindSpore's CPU backend runs one memory pass per elementwise op and keeps many intermediates alive
    in a graph (S12 eval at batch 32: 6.7 GB written as the model is, 2.3 GB this way), so:
    - GroupNorm's affine and normalisation commute with the valid-pixel average, so
      ``mixer(norm1(x)) = gamma * (pool(n) - n)`` for the normalised map ``n``; gamma joins LayerScale;
    - norm2's affine, the exact GELU's 1/sqrt2 constants and LayerScale are folded into fc1's and
      fc2's weights, so GELU is ``z * (erf(z) + 1)`` on fc1's output (sqrt2 * GELU(h) for z = h/sqrt2).
    Exact up to float rounding; used where the kernel library is unavailable and for float16 inputs.
    """

    def construct(self, x: Tensor) -> Tensor:
        scale = self.norm1.gamma * self.layer_scale_1 if self.use_layer_scale else self.norm1.gamma
        mixed = self.token_mixer(_normalize(self.norm1, x)) * ops.cast(scale, x.dtype).reshape((-1, 1, 1))
        x = x + self.drop_path1(mixed)
        inv_sqrt2 = ops.cast(Tensor(_INV_SQRT2, mstype.float32), x.dtype)
        z = _folded_conv(self.mlp.fc1, _normalize(self.norm2, x), inv_sqrt2, inv_sqrt2, self.norm2.gamma,
                         self.norm2.beta)
        hidden = self.mlp.drop(z * (ops.erf(z) + 1.0))
        layer_scale = self.layer_scale_2 if self.use_layer_scale else ops.ones_like(self.mlp.fc2.bias)
        return x + self.drop_path2(self.mlp.drop(_folded_conv(self.mlp.fc2, hidden, layer_scale * _INV_SQRT2,
                                                              layer_scale)))


class FusedPoolFormerBlock(FoldedPoolFormerBlock):
    """The PoolFormer block on the fused float32 CPU kernels (see ``mindcv_poolformer.kernels``).

    The folds of ``FoldedPoolFormerBlock``, in kernels that make one memory pass per step: the mixer
    kernel never builds the normalised map; ``FoldMlp`` folds the weights in one kernel; with the
    AVX-512 GEMM the MLP is two GEMMs whose stores do the bias, GELU, drop path and residual, and at
    inference fc1 also normalises its input as it packs it. Instances are made by ``apply`` from built
    blocks; the kernel primitives are attached there. Float16 inputs take the folded ops form.
    """

    def construct(self, x: Tensor) -> Tensor:
        if x.dtype != mstype.float32:
            return super().construct(x)
        batch = x.shape[0]
        scale = self.norm1.gamma
        if self.use_layer_scale:
            scale = scale * self.layer_scale_1
        y = self.k_pool_mixer(x, scale, self._drop_scale(self.drop_path1, batch), self.pool_size_tensor)[0]
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        layer_scale = self.layer_scale_2 if self.use_layer_scale else ops.ones_like(fc2.bias)
        w1, b1, w2, b2 = self.k_fold_mlp(fc1.weight.reshape(fc1.weight.shape[:2]), fc1.bias, self.norm2.gamma,
                                         self.norm2.beta, fc2.weight.reshape(fc2.weight.shape[:2]), fc2.bias,
                                         layer_scale)
        if self.fuse_mlp:
            if not self.training:  # the normalised map and fc1's sums are never stored
                mean, rstd = self.k_moments(y)
                return self.k_mlp_inference(y, w1, b1, mean, rstd, w2, b2)[0]
            return self.k_mlp(self.k_normalize(y)[0], w1, b1, w2, b2, y, self._drop_scale(self.drop_path2, batch))[0]
        hidden = self.mlp.drop(self.k_gelu_bias(self._conv1x1(fc1, self.k_normalize(y)[0], w1), b1))
        return self.k_residual_bias(y, self._conv1x1(fc2, hidden, w2), b2, self._drop_scale(self.drop_path2, batch))

    def _drop_scale(self, drop_path: nn.Cell, batch: int) -> Tensor:
        if isinstance(drop_path, DropPath):
            return drop_path.sample_scale(batch, mstype.float32)
        return ops.ones((batch,), mstype.float32)

    def _conv1x1(self, conv: nn.Conv2d, x: Tensor, weight: Tensor) -> Tensor:
        if self.use_fast_gemm:
            return self.k_conv1x1(x, weight)
        return conv.conv2d(x, weight.reshape(weight.shape + (1, 1)))


_KERNEL_ATTRS = ("k_pool_mixer", "k_normalize", "k_gelu_bias", "k_residual_bias", "k_fold_mlp", "k_conv1x1",
                 "k_moments", "k_mlp", "k_mlp_inference", "pool_size_tensor", "use_fast_gemm", "fuse_mlp")


def _fuse(block: MetaFormerBlock, kernels: CpuKernels) -> None:
    block.__class__ = FusedPoolFormerBlock
    block.k_pool_mixer = kernels.pool_mixer
    block.k_normalize = kernels.normalize
    block.k_gelu_bias = kernels.gelu_bias
    block.k_residual_bias = kernels.residual_bias
    block.k_fold_mlp = kernels.fold_mlp
    # fc1 and fc2 on the AVX-512 GEMM where there is one (it tiles 8 output channels at a time)
    block.use_fast_gemm = (kernels.conv1x1 is not None and block.mlp.fc1.out_channels % 8 == 0
                           and block.mlp.fc2.out_channels % 8 == 0)
    if block.use_fast_gemm:
        block.k_conv1x1 = kernels.conv1x1
        block.k_moments = kernels.moments
        block.k_mlp = kernels.mlp
        block.k_mlp_inference = kernels.mlp_inference
    # the whole MLP in two GEMMs (no dropout between them: drop_rate is 0 in every recipe)
    block.fuse_mlp = block.use_fast_gemm and isinstance(block.mlp.drop, nn.Identity)
    block.pool_size_tensor = Tensor([block.token_mixer.pool_size], mstype.int32)


def apply(net: nn.Cell, kernels: CpuKernels | None) -> int:
    """Apply the CPU backend to ``net`` in place; returns how many blocks run on the fused kernels.

    3x3 convs move to the GEMM where the kernels have one (``kernels.conv3x3``).

    ``kernels`` is the kernel library (``mindcv_poolformer.kernels.cpu_kernels()``, built on first use);
    with None (no compiler, switched off) only the pooling op form changes. Call before the network's
    first run: the choice is compiled into its graph.
    """
    fused = 0
    for _, cell in list(net.cells_and_names()):
        if isinstance(cell, Pooling) and type(cell.pool) is AvgPoolExcludePad:
            cell.pool = CpuAvgPoolExcludePad(cell.pool_size)
        if type(cell) is FPN:
            cell.__class__ = CpuFPN
        if kernels is not None and kernels.conv3x3 is not None and conv3x3_eligible(cell):
            cell.__class__ = CpuConv3x3
            cell.k_conv3x3 = kernels.conv3x3
        if isinstance(cell, MetaFormerBlock) and eligible(cell):
            if kernels is None:
                cell.__class__ = FoldedPoolFormerBlock
            else:
                _fuse(cell, kernels)
                fused += 1
    return fused


def remove(net: nn.Cell) -> None:
    """Undo ``apply``: every block and pooling mixer back to the model's own form."""
    for _, cell in list(net.cells_and_names()):
        if isinstance(cell, Pooling) and isinstance(cell.pool, CpuAvgPoolExcludePad):
            cell.pool = AvgPoolExcludePad(cell.pool_size)
        if isinstance(cell, CpuConv3x3):
            del cell.k_conv3x3
            cell.__class__ = nn.Conv2d
        if type(cell) is CpuFPN:
            cell.__class__ = FPN
        if isinstance(cell, FoldedPoolFormerBlock):
            for attr in _KERNEL_ATTRS:
                if hasattr(cell, attr):
                    delattr(cell, attr)
            cell.__class__ = MetaFormerBlock
