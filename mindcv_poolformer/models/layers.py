"""Small building blocks of the MetaFormer family, written to be exact and portable.

Each block is expressed with ops whose semantics do not depend on the device: GroupNorm(1) as a
LayerNorm over each sample's flattened (C*H*W) row plus a per-channel affine, and the PoolFormer
token mixer's ``count_include_pad=False`` average as a window sum over the zero-padded input divided
by the true window count. Faster device-specific forms with the same semantics (the fused CPU kernels,
Ascend's native pooling) live in ``mindcv_poolformer.backends`` and are applied to a built model;
ONNX export swaps a few cells for exportable forms (``mindcv_poolformer.deploy.export.make_onnx_exportable``).
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

    def construct(self, x: Tensor) -> Tensor:
        flat = x.reshape((x.shape[0], -1))
        ones = ops.ones((flat.shape[1],), x.dtype)
        normalized = self.layer_norm(flat, ones, ops.zeros_like(ones))[0].reshape(x.shape)
        return normalized * self.gamma.reshape((1, -1, 1, 1)) + self.beta.reshape((1, -1, 1, 1))


class AvgPoolExcludePad(nn.Cell):
    """``AvgPool(k, stride 1, padding k//2, count_include_pad=False)``: each output is the mean of its valid pixels.

    Written as the 'valid' window mean of the zero-padded input divided by the same mean of a
    zero-padded map of ones (the valid fraction of each window). Neither op pads inside the pooling,
    so no framework's or device's padding convention enters, and both build on every Ascend SoC
    (MindSpore 2.10 refuses padded ``nn.AvgPool2d`` on 910B/910_93). The backends swap in faster
    forms with the same semantics (``mindcv_poolformer.backends``); a test pins the border values
    against an explicit loop.
    """

    def __init__(self, pool_size: int) -> None:
        super().__init__()
        self.pool_size = pool_size
        pad = pool_size // 2
        self.padding = (pad, pad, pad, pad)
        self.window_mean = ops.AvgPool(kernel_size=pool_size, strides=1, pad_mode="valid")

    def construct(self, x: Tensor) -> Tensor:
        ones = ops.ones((1, 1, x.shape[2], x.shape[3]), x.dtype)
        valid_fraction = self.window_mean(ops.pad(ones, self.padding))
        return self.window_mean(ops.pad(x, self.padding)) / valid_fraction

    def extend_repr(self) -> str:
        return f"pool_size={self.pool_size}"


class Pooling(nn.Cell):
    """PoolFormer token mixer: ``AvgPool(k, stride 1, pad k//2, count_include_pad=False)(x) - x``."""

    def __init__(self, pool_size: int = 3) -> None:
        super().__init__()
        if pool_size < 1 or pool_size % 2 == 0:
            raise ValueError(f"pool_size must be an odd positive integer, got {pool_size}")
        self.pool_size = pool_size
        self.pool = AvgPoolExcludePad(pool_size)

    def construct(self, x: Tensor) -> Tensor:
        return self.pool(x) - x

    def extend_repr(self) -> str:
        return f"pool_size={self.pool_size}"


# lowbias32 (C. Wellons' integer hash) multipliers, as int32: the graph computes in int32 with wrapping products
_HASH_MUL = (0x7FEB352D, 0x846CA68B - (1 << 32))


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int32 words (an arithmetic shift with the sign bits masked off)."""
    return ops.bitwise_and(ops.bitwise_right_shift(x, Tensor(bits, mstype.int32)),
                           Tensor((1 << (32 - bits)) - 1, mstype.int32))


def hash32(x: Tensor) -> Tensor:
    """lowbias32 on int32 words: a bijection of 32-bit words, each output bit flipping for ~1/2 of input changes."""
    x = ops.bitwise_xor(x, _shift_right(x, 16))
    x = x * Tensor(_HASH_MUL[0], mstype.int32)
    x = ops.bitwise_xor(x, _shift_right(x, 15))
    x = x * Tensor(_HASH_MUL[1], mstype.int32)
    return ops.bitwise_xor(x, _shift_right(x, 16))


_STREAM_SHIFT = 20  # word index = stream << 20 | sample: up to 2**20 samples, 2**11 streams in an int32


def counter_uniform(key: Tensor, counter: Tensor, stream: int, count: int) -> Tensor:
    """``count`` uniforms in [0, 1) (24 bits, float32): a pure function of (key, counter, stream, index).

    A counter-based generator (as Philox is): nothing is carried from one call to the next, so the
    values of any step can be drawn again from the checkpointed counter. Word ``i`` of ``stream`` is
    ``hash(base ^ (stream << 20 | i))`` with ``base = hash(hash(key) ^ counter)``: the words of one
    counter are distinct over all streams (a bijection), and ``base`` is the same for every stream, so
    the graph computes it once per step and each drop-path layer adds one hash, not three.
    """
    if not (0 <= stream < 1 << (31 - _STREAM_SHIFT) and 0 < count <= 1 << _STREAM_SHIFT):
        raise ValueError(f"counter_uniform: stream {stream} must be in [0, {1 << (31 - _STREAM_SHIFT)}) and count "
                         f"{count} in [1, {1 << _STREAM_SHIFT}]")
    base = hash32(ops.bitwise_xor(hash32(key), counter))
    first = stream << _STREAM_SHIFT
    words = hash32(ops.bitwise_xor(base, ops.arange(first, first + count, 1, dtype=mstype.int32)))
    return ops.cast(_shift_right(words, 8), mstype.float32) * (1.0 / (1 << 24))


class DropPath(nn.Cell):
    """Stochastic depth: drop the whole residual branch per sample while training.

    By default the masks come from MindSpore's kernel RNG. That RNG's state cannot be saved or
    restored on CPU, so a resumed run would draw different masks; ``DropPathKey`` gives the layer a
    run key, a micro-step counter (device Parameters) and its own stream number instead, and the
    mask of (counter, layer, sample) is drawn in the graph as a pure function of them (``counter_uniform``).
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob
        self.keep_prob = 1.0 - drop_prob
        self.keyed = False  # a compile-time switch, set by DropPathKey

    def construct(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * self.sample_scale(x.shape[0], x.dtype).reshape(shape)

    def sample_scale(self, batch: int, dtype) -> Tensor:
        """The per-sample factor ``mask / keep_prob``, shape (batch,); the fused CPU blocks take it as is."""
        if not self.training or self.drop_prob == 0.0:
            return ops.ones((batch,), dtype)
        if self.keyed:
            noise = ops.cast(counter_uniform(self.run_key, self.counter, self.stream, batch), dtype)
        else:
            noise = ops.rand((batch,), dtype=dtype)
        return ops.floor(noise + self.keep_prob) / self.keep_prob

    def extend_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class DropPathKey(nn.Cell):
    """Keyed, reproducible masks for every ``DropPath`` of a network (what exact resume needs).

    The run key (from seed and rank) and the micro-step counter are int32 Parameters shared by all
    layers; layer ``b`` draws stream ``b``. The training step calls ``advance`` in its graph after
    each micro-batch, so no step needs the host; the trainer sets the counter once from its
    checkpointed ``global_step`` (``set_counter``). The parameters are named ``drop_path_key.*``
    (``is_key_name``) and are left out of checkpoints: the counter follows from ``global_step``.
    """
    PREFIX = "drop_path_key."

    def __init__(self, network: nn.Cell, seed: int, rank: int = 0) -> None:
        super().__init__(auto_prefix=False)
        layers = [cell for _, cell in network.cells_and_names() if isinstance(cell, DropPath)]
        self.num_layers = len(layers)
        word = int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, np.uint32)[0])
        self.run_key = Parameter(Tensor(np.array(word, np.uint32).view(np.int32), mstype.int32),
                                 name=f"{self.PREFIX}run_key", requires_grad=False)
        self.counter = Parameter(Tensor(0, mstype.int32), name=f"{self.PREFIX}counter", requires_grad=False)
        for stream, layer in enumerate(layers):
            layer.run_key = self.run_key
            layer.counter = self.counter
            layer.stream = stream
            layer.keyed = True

    @classmethod
    def is_key_name(cls, name: str) -> bool:
        return name.startswith(cls.PREFIX)

    def set_counter(self, micro_steps: int) -> None:
        """Position the masks at ``micro_steps`` micro-batches into the run (on a start or a resume)."""
        self.counter.set_data(Tensor(int(micro_steps), mstype.int32))

    def advance(self) -> Tensor:
        """Move on to the next micro-batch's masks (in the graph, after the step has drawn this one's)."""
        return ops.assign_add(self.counter, Tensor(1, mstype.int32))


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A biased 1x1 conv initialised as the official MLP's (truncated normal std 0.02, zero bias)."""
    return nn.Conv2d(in_channels, out_channels, 1, has_bias=True, weight_init=init.TruncatedNormal(0.02),
                     bias_init="zeros")


class ConvMlp(nn.Cell):
    """Channel MLP as two 1x1 convs (keeps the NCHW layout): fc1 -> act -> drop -> fc2 -> drop."""

    def __init__(self, dim: int, hidden_dim: int, act: nn.Cell, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = conv1x1(dim, hidden_dim)
        self.act = act
        self.drop = nn.Dropout(p=drop) if drop > 0 else nn.Identity()
        self.fc2 = conv1x1(hidden_dim, dim)

    def construct(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


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
        # a cell, not ops.softmax: mixed precision keeps cells in float32 (an op inside a float16 cell runs float16)
        self.softmax = nn.Softmax(axis=-1)

    def construct(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = h * w
        tokens = x.reshape((b, c, n)).transpose(0, 2, 1)
        qkv = self.qkv(tokens).reshape((b, n, 3, self.num_heads, self.head_dim)).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.softmax(ops.matmul(q * self.scale, k.transpose(0, 1, 3, 2)))
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
