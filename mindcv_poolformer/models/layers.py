"""Small building blocks of the MetaFormer family, written to be exact and portable.

Each block is expressed with ops whose semantics do not depend on the backend: GroupNorm(1) as a
LayerNorm over each sample's flattened (C*H*W) row plus a per-channel affine, and the PoolFormer
token mixer as a zero-padded window average divided by the true window count. (ONNX export swaps a
few cells for equal exportable forms: see ``mindcv_poolformer.export.make_onnx_exportable``.)
"""

from __future__ import annotations

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common import dtype as mstype
from mindspore.common import initializer as init


class _AffineNorm(nn.Cell):
    """Normalisation over ``axes`` followed by a per-channel affine (``gamma``/``beta``, MindSpore's names)."""

    axes: tuple[int, ...] = (1,)

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.gamma = Parameter(init.initializer("ones", (num_channels,)), name="gamma")
        self.beta = Parameter(init.initializer("zeros", (num_channels,)), name="beta")

    def statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and 1/std over ``axes`` (kept as size-1 dims); two-pass for accuracy."""
        mean = x.mean(axis=self.axes, keep_dims=True)
        centered = x - mean
        var = (centered * centered).mean(axis=self.axes, keep_dims=True)
        return mean, ops.div(ops.ones_like(var), ops.sqrt(var + self.eps))

    def extend_repr(self) -> str:
        return f"num_channels={self.num_channels}, eps={self.eps}"


class GroupNorm1(_AffineNorm):
    """GroupNorm with one group: normalise each sample over (C, H, W), then a per-channel affine.

    This is the paper's "modified layer norm". Parameter names ``gamma``/``beta`` follow
    ``mindspore.nn.GroupNorm`` so MindCV checkpoints load unchanged. The normalisation is
    MindSpore's fused LayerNorm kernel over the flattened (C*H*W) row of each sample, without its
    affine: one kernel instead of the five passes of explicit mean/variance reductions (80 -> 52 ms
    on a 32x64x56x56 map, bench/ops.py), with a backward kernel of its own too. The row is the last
    axis because that is the only LayerNorm ONNX export accepts; the per-channel affine follows as
    a multiply-add.
    """

    axes = (1, 2, 3)

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(num_channels, eps)
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def normalize(self, x: Tensor) -> Tensor:
        """``(x - mean) / std`` per sample over (C, H, W), without the affine."""
        flat = x.reshape((x.shape[0], -1))
        ones = ops.ones((flat.shape[1],), x.dtype)
        return self.layer_norm(flat, ones, ops.zeros_like(ones))[0].reshape(x.shape)

    def construct(self, x: Tensor) -> Tensor:
        return self.normalize(x) * self.gamma.reshape((1, -1, 1, 1)) + self.beta.reshape((1, -1, 1, 1))


class Pooling(nn.Cell):
    """PoolFormer token mixer: ``AvgPool(k, stride 1, pad k//2, count_include_pad=False)(x) - x``.

    Computed as the zero-padded window mean (``count_include_pad=True``) divided by the padded
    window mean of ones, i.e. sum / true count at every border position. That is exact by
    construction on any backend, unlike relying on a ``count_include_pad=False``/``pad_mode="same"``
    convention that differs between frameworks and devices; the reciprocal map is (1, 1, H, W), so
    the division costs one multiply over the tensor (4x faster than padding + 'valid' pooling on
    CPU, see bench/ops.py). ONNX export swaps in ``pad_mode="same"`` pooling and checks the result
    in onnxruntime. Because the result averages valid pixels only, ``pool(a*x + b) - (a*x + b) =
    a * (pool(x) - x)`` for per-channel ``a, b``: MetaFormerBlock uses that to drop GroupNorm's beta
    and apply its gamma together with LayerScale.
    """

    def __init__(self, pool_size: int = 3) -> None:
        super().__init__()
        if pool_size < 1 or pool_size % 2 == 0:
            raise ValueError(f"pool_size must be an odd positive integer, got {pool_size}")
        self.pool_size = pool_size
        self.pool = nn.AvgPool2d(pool_size, stride=1, pad_mode="pad", padding=pool_size // 2,
                                 count_include_pad=True)

    def construct(self, x: Tensor) -> Tensor:
        valid_fraction = self.pool(ops.ones((1, 1, x.shape[2], x.shape[3]), x.dtype))
        return self.pool(x) * ops.div(ops.ones_like(valid_fraction), valid_fraction) - x

    def extend_repr(self) -> str:
        return f"pool_size={self.pool_size}"


class DropPath(nn.Cell):
    """Stochastic depth: drop the whole residual branch per sample while training.

    By default the masks come from MindSpore's kernel RNG. That RNG's state cannot be saved or
    restored on CPU, so a resumed run would draw different masks; ``DropPathNoise`` switches the
    layer to a noise buffer that the caller refills before every step from a key it checkpoints.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob
        self.keep_prob = 1.0 - drop_prob
        self.external_noise = False  # a compile-time switch, set by DropPathNoise

    def construct(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * self.sample_scale(x.shape[0], x.dtype).reshape(shape)

    def sample_scale(self, batch: int, dtype) -> Tensor:
        """The per-sample factor ``mask / keep_prob``, shape (batch,); the fused CPU blocks take it as is."""
        if not self.training or self.drop_prob == 0.0:
            return ops.ones((batch,), dtype)
        if self.external_noise:
            noise = ops.cast(self.noise[:batch], dtype)
        else:
            noise = ops.rand((batch,), dtype=dtype)
        return ops.floor(noise + self.keep_prob) / self.keep_prob

    def extend_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class DropPathNoise:
    """Keyed, reproducible masks for every ``DropPath`` of a network (what exact resume needs).

    Before each (micro-)step the trainer calls ``refill(step, micro)``: the uniform noise of all
    layers is drawn on the host from ``SeedSequence((seed, rank, step, micro))``, so the masks are a
    function of checkpointed counters, differ across ranks and do not depend on how many steps this
    process has run. The buffers are non-trainable parameters named ``drop_path_noise.*``
    (``is_noise_name``); they are scratch state and are left out of checkpoints.
    """

    PREFIX = "drop_path_noise."

    def __init__(self, network: nn.Cell, batch_size: int, seed: int, rank: int = 0) -> None:
        self.layers = [cell for _, cell in network.cells_and_names() if isinstance(cell, DropPath)]
        self.batch_size = int(batch_size)
        self.key = (int(seed), int(rank))
        for index, layer in enumerate(self.layers):
            layer.noise = Parameter(Tensor(np.zeros(self.batch_size, np.float32)), name=f"{self.PREFIX}{index}",
                                    requires_grad=False)
            layer.external_noise = True

    @classmethod
    def is_noise_name(cls, name: str) -> bool:
        return name.startswith(cls.PREFIX)

    def draw(self, step: int, micro: int = 0) -> np.ndarray:
        """The noise of every layer for one micro-batch, shape (layers, batch), in [0, 1)."""
        seq = np.random.SeedSequence([*self.key, int(step), int(micro)])
        return np.random.Generator(np.random.PCG64(seq)).random((len(self.layers), self.batch_size), np.float32)

    def refill(self, step: int, micro: int = 0) -> None:
        for layer, row in zip(self.layers, self.draw(step, micro)):
            layer.noise.set_data(Tensor(row))


class Conv1x1(nn.Conv2d):
    """A biased 1x1 conv that can fold per-channel affine maps of its input and output into its weights.

    ``conv(x * in_scale + in_shift) * weight_scale`` (with the bias scaled by ``bias_scale``) is
    computed by rewriting the small weight and bias instead of passing over the large activations:
    that is how a preceding GroupNorm affine, the GELU constants and LayerScale cost nothing. Same
    parameters (``weight``, ``bias``) as ``nn.Conv2d``; scales are per channel or scalar tensors.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 1, has_bias=True, weight_init=init.TruncatedNormal(0.02),
                         bias_init="zeros")

    def construct(self, x: Tensor, weight_scale: Tensor | None = None, bias_scale: Tensor | None = None,
                  in_scale: Tensor | None = None, in_shift: Tensor | None = None) -> Tensor:
        weight, bias = self.folded(x.dtype, weight_scale, bias_scale, in_scale, in_shift)
        return self.bias_add(self.conv2d(x, weight), bias)

    def folded(self, dtype, weight_scale: Tensor | None = None, bias_scale: Tensor | None = None,
               in_scale: Tensor | None = None, in_shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The weight and bias with the folds applied, in ``dtype`` (what ``construct`` convolves with)."""
        # everything in the activation's dtype: under AMP the cell's input is fp16 while the
        # parameters stay fp32 (the folds then run in the precision the conv itself uses)
        weight = ops.cast(self.weight, dtype)
        bias = ops.cast(self.bias, dtype)
        if in_shift is not None:  # W (x + shift) = W x + W shift
            w2d = weight.reshape((weight.shape[0], weight.shape[1]))
            bias = bias + ops.matmul(w2d, ops.cast(in_shift, dtype).reshape((-1, 1))).reshape((-1,))
        if in_scale is not None:
            weight = weight * ops.cast(in_scale, dtype).reshape((1, -1, 1, 1))
        if weight_scale is not None:
            weight = weight * ops.cast(weight_scale, dtype).reshape((-1, 1, 1, 1))
            bias = bias * ops.cast(bias_scale, dtype)
        return weight, bias


_INV_SQRT2 = 0.7071067811865476


class ConvMlp(nn.Cell):
    """Channel MLP as two 1x1 convs (keeps the NCHW layout): fc1 -> act -> drop -> fc2 -> drop.

    ``out_scale`` (the block's LayerScale) multiplies the output and ``in_scale``/``in_shift`` (the
    preceding GroupNorm's affine) apply to the input, both folded into the conv weights (Conv1x1).
    With the exact GELU the constants
    are folded into the convs' weights: fc1 computes z = h/sqrt2 directly, ``z * (1 + erf(z))`` is
    sqrt2 * GELU(h), and fc2's weight absorbs 1/sqrt2 and the LayerScale. That turns the five
    elementwise passes of ``0.5*h*(1+erf(h/sqrt2))`` plus the LayerScale multiply into three passes
    over the 4x-wide hidden map (exact up to float rounding). Any other activation (or the
    ``ErfFreeGELU`` that ONNX export swaps in) runs as a cell in the plain order.
    """

    def __init__(self, dim: int, hidden_dim: int, act: nn.Cell, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = Conv1x1(dim, hidden_dim)
        self.act = act
        self.drop = nn.Dropout(p=drop) if drop > 0 else nn.Identity()
        self.fc2 = Conv1x1(hidden_dim, dim)
        self.inv_sqrt2 = Tensor(_INV_SQRT2, mstype.float32)
        self.one = Tensor(1.0, mstype.float32)

    @property
    def folds_gelu(self) -> bool:
        """Whether ``act`` is the exact GELU (read at graph compile time, so a swapped ``act`` is seen)."""
        return isinstance(self.act, nn.GELU) and str(self.act.approximate).lower() in ("none", "false")

    def construct(self, x: Tensor, out_scale: Tensor | None = None, in_scale: Tensor | None = None,
                  in_shift: Tensor | None = None) -> Tensor:
        if self.folds_gelu:
            z = self.fc1(x, self.inv_sqrt2, self.inv_sqrt2, in_scale, in_shift)
            hidden = self.drop(z * (ops.erf(z) + 1.0))
            if out_scale is None:
                return self.drop(self.fc2(hidden, self.inv_sqrt2, self.one))
            return self.drop(self.fc2(hidden, out_scale * self.inv_sqrt2, out_scale))
        out = self.drop(self.fc2(self.drop(self.act(self.fc1(x, None, None, in_scale, in_shift)))))
        if out_scale is None:
            return out
        return out * out_scale.reshape((-1, 1, 1))


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


class LayerNormChannel(_AffineNorm):
    """LayerNorm over the channel axis only of an NCHW map (each pixel normalised on its own).

    The paper's ``LN`` ablation (and the norm of the official hybrid models). Written as explicit
    reductions over axis 1 so no transpose to NHWC is needed and it exports like ``GroupNorm1``.
    """

    axes = (1,)

    def construct(self, x: Tensor) -> Tensor:
        mean, inv_std = self.statistics(x)
        return (x - mean) * inv_std * self.gamma.reshape((1, -1, 1, 1)) + self.beta.reshape((1, -1, 1, 1))


class _FixedTokens(nn.Cell):
    """Base of the mixers whose weights are tied to one token count (random matrix, spatial MLP)."""

    def __init__(self, spatial_shape: tuple[int, int]) -> None:
        super().__init__()
        self.height, self.width = int(spatial_shape[0]), int(spatial_shape[1])
        self.num_tokens = self.height * self.width

    def check_size(self, x: Tensor) -> None:
        if x.shape[2] != self.height or x.shape[3] != self.width:
            raise ValueError(
                f"{type(self).__name__} was built for a {self.height}x{self.width} token map, got "
                f"{x.shape[2]}x{x.shape[3]}; build the model with image_size= set to the input size"
            )

    def extend_repr(self) -> str:
        return f"spatial_shape=({self.height}, {self.width})"


class RandomMixing(_FixedTokens):
    """The paper's "global random matrix" mixer: ``y[:, :, m] = sum_n R[m, n] x[:, :, n]``.

    ``R`` is a row-softmax of uniform noise (each output token is a convex mix of all tokens, as in
    the official RandFormer) and is a frozen Parameter (``requires_grad=False``): it is saved in
    checkpoints but is never in ``trainable_params()``, so no optimizer touches it.
    """

    def __init__(self, spatial_shape: tuple[int, int], seed: int | None = None) -> None:
        super().__init__(spatial_shape)
        noise = np.random.default_rng(seed).random((self.num_tokens, self.num_tokens))
        rows = np.exp(noise - noise.max(axis=1, keepdims=True))
        matrix = (rows / rows.sum(axis=1, keepdims=True)).astype(np.float32)
        self.matrix = Parameter(Tensor(matrix), name="matrix", requires_grad=False)

    def construct(self, x: Tensor) -> Tensor:
        self.check_size(x)
        b, c, h, w = x.shape
        mixed = ops.matmul(x.reshape((b, c, h * w)), self.matrix.transpose(1, 0))
        return mixed.reshape((b, c, h, w))


class SpatialMlp(_FixedTokens):
    """Spatial MLP token mixer (MLP-Mixer style): one bias-free Dense over the H*W tokens per channel."""

    def __init__(self, spatial_shape: tuple[int, int]) -> None:
        super().__init__(spatial_shape)
        self.fc = nn.Dense(self.num_tokens, self.num_tokens, has_bias=False, weight_init=init.TruncatedNormal(0.02))

    def construct(self, x: Tensor) -> Tensor:
        self.check_size(x)
        b, c, h, w = x.shape
        return self.fc(x.reshape((b, c, h * w))).reshape((b, c, h, w))


class Attention(nn.Cell):
    """Multi-head self-attention over the flattened H*W tokens of an NCHW map.

    As in the paper's hybrid models: ``dim // head_dim`` heads, no qkv bias, a biased output
    projection, no dropout. Works at any input size (no position-dependent weights).
    """

    def __init__(self, dim: int, head_dim: int = 32, qkv_bias: bool = False) -> None:
        super().__init__()
        if head_dim < 1 or dim % head_dim:
            raise ValueError(f"attention head_dim must divide the width {dim}, got {head_dim}")
        self.dim = dim
        self.head_dim = head_dim
        self.num_heads = dim // head_dim
        self.scale = head_dim**-0.5
        self.qkv = nn.Dense(dim, dim * 3, has_bias=qkv_bias, weight_init=init.TruncatedNormal(0.02),
                            bias_init="zeros")
        self.proj = nn.Dense(dim, dim, weight_init=init.TruncatedNormal(0.02), bias_init="zeros")

    def construct(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = h * w
        tokens = x.reshape((b, c, n)).transpose(0, 2, 1)
        qkv = self.qkv(tokens).reshape((b, n, 3, self.num_heads, self.head_dim)).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ops.softmax(ops.matmul(q * self.scale, k.transpose(0, 1, 3, 2)), axis=-1)
        out = ops.matmul(attn, v).transpose(0, 2, 1, 3).reshape((b, n, c))
        return self.proj(out).transpose(0, 2, 1).reshape((b, c, h, w))

    def extend_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"


TOKEN_MIXERS = ("pooling", "identity", "random", "dwconv", "attention", "mlp")
NORMS = ("gn1", "ln", "bn")
ACTIVATIONS = ("gelu", "relu", "silu")
FIXED_SIZE_MIXERS = ("random", "mlp")


def make_token_mixer(name: str, dim: int, spatial_shape: tuple[int, int] | None = None, **kwargs) -> nn.Cell:
    """Build one token mixer by name; ``kwargs`` are that mixer's options (pool_size, kernel_size, head_dim)."""
    accepted = {"pooling": {"pool_size"}, "identity": set(), "random": {"seed"}, "dwconv": {"kernel_size"},
                "attention": {"head_dim", "qkv_bias"}, "mlp": set()}
    if name not in accepted:
        raise ValueError(f"unknown token mixer {name!r}; accepted: {', '.join(TOKEN_MIXERS)}")
    unknown = sorted(set(kwargs) - accepted[name])
    if unknown:
        options = ", ".join(sorted(accepted[name])) or "none"
        raise ValueError(f"token mixer {name!r} got unknown option(s) {', '.join(unknown)}; accepted: {options}")
    if name in FIXED_SIZE_MIXERS and spatial_shape is None:
        raise ValueError(f"token mixer {name!r} mixes a fixed number of tokens: build the model with image_size=")
    if name == "pooling":
        return Pooling(kwargs.get("pool_size", 3))
    if name == "identity":
        return nn.Identity()
    if name == "random":
        return RandomMixing(spatial_shape, kwargs.get("seed"))
    if name == "mlp":
        return SpatialMlp(spatial_shape)
    if name == "attention":
        return Attention(dim, kwargs.get("head_dim", 32), kwargs.get("qkv_bias", False))
    kernel = kwargs.get("kernel_size", 3)
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"dwconv kernel_size must be an odd positive integer, got {kernel}")
    return nn.Conv2d(dim, dim, kernel, pad_mode="pad", padding=kernel // 2, group=dim, has_bias=True)


def make_norm(name: str, dim: int) -> nn.Cell:
    """``gn1`` (GroupNorm(1), the PoolFormer default), ``ln`` (channels-only LayerNorm) or ``bn`` (BatchNorm2d)."""
    if name == "gn1":
        return GroupNorm1(dim)
    if name == "ln":
        return LayerNormChannel(dim)
    if name == "bn":
        return nn.BatchNorm2d(dim)
    raise ValueError(f"unknown norm {name!r}; accepted: {', '.join(NORMS)}")


def make_activation(name: str) -> nn.Cell:
    """``gelu`` (exact erf form, as the official code), ``relu`` or ``silu``."""
    if name == "gelu":
        return nn.GELU(approximate=False)
    if name == "relu":
        return nn.ReLU()
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"unknown activation {name!r}; accepted: {', '.join(ACTIVATIONS)}")
