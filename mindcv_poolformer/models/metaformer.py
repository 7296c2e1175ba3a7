"""MetaFormer and PoolFormer (Yu et al., "MetaFormer Is Actually What You Need for Vision", CVPR 2022).

One generic MetaFormer: 4 stages of blocks, each block being
``x + drop_path(ls1 * mixer(norm1(x)))`` then ``x + drop_path(ls2 * mlp(norm2(x)))``.
The five PoolFormers are rows of a table of model records (``POOLFORMER_VARIANTS``, ``registry.ModelInfo``)
fed to that one class.

Parameter names follow the official sail-sg code with MindSpore's GroupNorm names (``gamma``/
``beta``), which is also MindCV's layout, so MindCV-released checkpoints load unchanged:
``patch_embed.proj``, ``network.{0,2,4,6}.{j}.{norm1,norm2,mlp.fc1,mlp.fc2,layer_scale_1,
layer_scale_2}``, ``network.{1,3,5}.proj``, ``norm``, ``head``.

The same class builds the paper's ablations and hybrids (``METAFORMER_VARIANTS``): token mixer per
stage (pooling, identity, frozen random matrix, depthwise conv, attention, spatial MLP), norm
(GroupNorm(1), channel LayerNorm, BatchNorm), activation, and the failure cases without residual or
without channel MLP. With ``features_only=True`` it is a dense-prediction backbone returning the four
stage outputs, each through its own norm named ``norm0/norm2/norm4/norm6`` (the official
``fork_feat`` names, suffix = network index).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

from mindspore import Parameter, Tensor, nn
from mindspore.common import initializer as init

from .layers import (
    FIXED_SIZE_MIXERS,
    TOKEN_MIXERS,
    ConvMlp,
    DropPath,
    PatchEmbed,
    Pooling,
    layer_scale_parameter,
    make_activation,
    make_norm,
    make_token_mixer,
)
from .registry import ModelInfo, register_record

__all__ = [
    "MetaFormer",
    "MetaFormerBlock",
    "METAFORMER_VARIANTS",
    "POOLFORMER_VARIANTS",
]

PerStage = Union[Any, Sequence[Any]]


class MetaFormerBlock(nn.Cell):
    """The MetaFormer block: ``x + drop_path(ls1 * mixer(norm1(x)))``, then ``x + drop_path(ls2 * mlp(norm2(x)))``.

    ``token_mixer`` defaults to PoolFormer's pooling. ``use_residual=False`` drops both skip
    connections and ``use_mlp=False`` drops the whole channel-MLP sub-block (norm2, mlp,
    layer_scale_2): the paper's two failure cases. Device-specific forms of this block (the fused
    CPU kernels) are applied by ``mindcv_poolformer.backends`` and read these same Parameters.
    """

    def __init__(
        self,
        dim: int,
        pool_size: int = 3,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale_init: float | None = 1e-5,
        token_mixer: nn.Cell | None = None,
        norm: str = "gn1",
        act: str = "gelu",
        use_residual: bool = True,
        use_mlp: bool = True,
    ) -> None:
        super().__init__()
        self.use_residual = use_residual
        self.use_mlp = use_mlp
        self.norm1 = make_norm(norm, dim)
        self.token_mixer = token_mixer if token_mixer is not None else Pooling(pool_size)
        if use_mlp:
            self.norm2 = make_norm(norm, dim)
            self.mlp = ConvMlp(dim, int(dim * mlp_ratio), make_activation(act), drop=drop)
        # one cell per residual branch: each draws its own per-sample mask
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 and use_mlp else nn.Identity()
        self.use_layer_scale = bool(layer_scale_init)
        if self.use_layer_scale:
            self.layer_scale_1 = layer_scale_parameter(layer_scale_init, dim)
            if use_mlp:
                self.layer_scale_2 = layer_scale_parameter(layer_scale_init, dim)

    def construct(self, x: Tensor) -> Tensor:
        x = self.residual(x, self.drop_path1(self.scaled(self.token_mixer(self.norm1(x)), 1)))
        if self.use_mlp:
            x = self.residual(x, self.drop_path2(self.scaled(self.mlp(self.norm2(x)), 2)))
        return x

    def scaled(self, branch: Tensor, index: int) -> Tensor:
        """LayerScale ``layer_scale_{index}`` times a branch's output (the branch itself without LayerScale)."""
        if not self.use_layer_scale:
            return branch
        scale = self.layer_scale_1 if index == 1 else self.layer_scale_2
        return scale.reshape((-1, 1, 1)) * branch

    def residual(self, x: Tensor, branch: Tensor) -> Tensor:
        return x + branch if self.use_residual else branch


class PositionEmbeddedStage(nn.SequentialCell):
    """A stage of blocks that first adds a learnt (1, C, H, W) position embedding (official hybrids).

    A SequentialCell subclass so its blocks keep the names ``network.{2i}.{j}``; the embedding is
    ``network.{2i}.pos_embed``. It fixes the stage's token map, so the input size is checked.
    """

    def __init__(self, blocks: list[nn.Cell], dim: int, spatial_shape: tuple[int, int]) -> None:
        super().__init__(blocks)
        self.spatial_shape = tuple(spatial_shape)
        self.pos_embed = Parameter(init.initializer("zeros", (1, dim) + self.spatial_shape), name="pos_embed")

    def construct(self, x: Tensor) -> Tensor:
        if x.shape[2] != self.spatial_shape[0] or x.shape[3] != self.spatial_shape[1]:
            raise ValueError(
                f"position embedding was built for a {self.spatial_shape[0]}x{self.spatial_shape[1]} token map, "
                f"got {x.shape[2]}x{x.shape[3]}; build the model with image_size= set to the input size"
            )
        x = x + self.pos_embed
        for cell in self.cell_list:
            x = cell(x)
        return x


def _per_stage(value: PerStage, stages: int, what: str, scalar_types: tuple[type, ...]) -> tuple:
    """Broadcast one setting to every stage, or check a per-stage sequence has one entry per stage."""
    if isinstance(value, scalar_types):
        return (value,) * stages
    values = tuple(value)
    if len(values) != stages:
        raise ValueError(f"{what} needs one entry per stage ({stages}), got {len(values)}: {values!r}")
    return values


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class MetaFormer(nn.Cell):
    """A 4-stage MetaFormer: image classifier, or with ``features_only`` a dense-prediction backbone.

    Args:
        depths: blocks per stage.
        widths: channels per stage.
        num_classes: classifier outputs; 0 keeps the pooled features (no head).
        in_channels: input image channels.
        pool_size: window of the ``pooling`` mixer unless ``mixer_kwargs`` sets it.
        mlp_ratio: hidden/in channels of the channel MLP.
        layer_scale_init: initial LayerScale value; ``None`` or 0 disables LayerScale.
        drop_rate: dropout in the MLP and before the classifier (0 in every official recipe).
        drop_path_rate: stochastic depth of the last block; block ``i`` of ``n`` gets ``rate*i/(n-1)``.
        stem: (kernel, stride, padding) of the patch-embedding conv.
        downsample: (kernel, stride, padding) of the convs between stages.
        token_mixers: one of ``pooling, identity, random, dwconv, attention, mlp``, or one per stage.
        mixer_kwargs: options of the mixers (``pool_size``, ``kernel_size``, ``head_dim``, ``qkv_bias``,
            ``seed``), one dict for all stages or one per stage.
        norm: ``gn1`` (GroupNorm(1)), ``ln`` (LayerNorm over channels) or ``bn`` (BatchNorm2d).
        act: MLP activation, ``gelu`` (exact), ``relu`` or ``silu``.
        use_residual: ``False`` removes both skip connections of every block.
        use_mlp: ``False`` removes the channel-MLP sub-block of every block.
        image_size: input (H, W) or side; required by the fixed-size ``random``/``mlp`` mixers and by
            ``pos_embed``, which are then tied to it.
        pos_embed: add a learnt position embedding at the start of a stage (bool, or one per stage).
        features_only: return the stage outputs (tuple of NCHW maps, strides 4/8/16/32) instead of logits.
        out_indices: which stages (0..3) to return; implies ``features_only``. Default all four.
    """

    def __init__(
        self,
        depths: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        pool_size: int = 3,
        mlp_ratio: float = 4.0,
        layer_scale_init: float | None = 1e-5,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        stem: tuple[int, int, int] = (7, 4, 2),
        downsample: tuple[int, int, int] = (3, 2, 1),
        token_mixers: PerStage = "pooling",
        mixer_kwargs: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        norm: str = "gn1",
        act: str = "gelu",
        use_residual: bool = True,
        use_mlp: bool = True,
        image_size: int | Sequence[int] | None = None,
        pos_embed: PerStage = False,
        features_only: bool = False,
        out_indices: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if len(depths) != len(widths):
            raise ValueError(f"depths {tuple(depths)} and widths {tuple(widths)} must have the same length")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        stages = len(depths)
        mixers = _per_stage(token_mixers, stages, "token_mixers", (str,))
        for name in mixers:
            if name not in TOKEN_MIXERS:
                raise ValueError(f"unknown token mixer {name!r}; accepted: {', '.join(TOKEN_MIXERS)}")
        stage_kwargs = _per_stage(mixer_kwargs or {}, stages, "mixer_kwargs", (Mapping,))
        pos_embeds = _per_stage(pos_embed, stages, "pos_embed", (bool,))
        shapes = self._stage_shapes(image_size, stages, stem, downsample)
        if shapes is None and (any(m in FIXED_SIZE_MIXERS for m in mixers) or any(pos_embeds)):
            needs = sorted({m for m in mixers if m in FIXED_SIZE_MIXERS})
            needs += ["pos_embed"] if any(pos_embeds) else []
            raise ValueError(f"{', '.join(needs)} tie weights to one token-map size: pass image_size= (e.g. 224)")
        if out_indices is not None:
            features_only = True
        self.features_only = features_only
        self.out_indices = tuple(range(stages)) if out_indices is None else tuple(out_indices)
        if features_only and (not self.out_indices or any(not 0 <= i < stages for i in self.out_indices)):
            raise ValueError(f"out_indices must be stage indices in 0..{stages - 1}, got {self.out_indices}")
        self.depths = tuple(depths)
        self.widths = tuple(widths)
        self.token_mixers = mixers
        self.num_classes = 0 if features_only else num_classes
        self.num_features = widths[-1]
        self.image_size = None if shapes is None else self._image_hw
        self.feature_channels = tuple(widths[i] for i in self.out_indices)
        self.feature_strides = tuple(stem[1] * downsample[1] ** i for i in self.out_indices)

        self.patch_embed = PatchEmbed(in_channels, widths[0], *stem)
        total = sum(depths)
        layers: list[nn.Cell] = []
        block_index = 0
        for stage, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for _ in range(depth):
                rate = drop_path_rate * block_index / (total - 1) if total > 1 else drop_path_rate
                options = dict(stage_kwargs[stage])
                if mixers[stage] == "pooling":
                    options.setdefault("pool_size", pool_size)
                if mixers[stage] == "random" and options.get("seed") is not None:
                    options["seed"] = options["seed"] + block_index  # one distinct matrix per block
                mixer = make_token_mixer(mixers[stage], width, shapes[stage] if shapes else None, **options)
                blocks.append(MetaFormerBlock(width, pool_size, mlp_ratio, drop_rate, rate, layer_scale_init,
                                              token_mixer=mixer, norm=norm, act=act, use_residual=use_residual,
                                              use_mlp=use_mlp))
                block_index += 1
            if pos_embeds[stage]:
                layers.append(PositionEmbeddedStage(blocks, width, shapes[stage]))
            else:
                layers.append(nn.SequentialCell(blocks))
            if stage < stages - 1:
                layers.append(PatchEmbed(width, widths[stage + 1], *downsample))
        self.network = nn.SequentialCell(layers)
        # Network index of each returned stage; its output norm is the attribute ``norm{index}``.
        self.out_layers = tuple(2 * i for i in self.out_indices)
        if features_only:
            for stage in self.out_indices:
                setattr(self, f"norm{2 * stage}", make_norm(norm, widths[stage]))
        else:
            self.norm = make_norm(norm, widths[-1])
            self.head_drop = nn.Dropout(p=drop_rate) if drop_rate > 0 else nn.Identity()
            self.head = self._make_head(num_classes)

    def _stage_shapes(self, image_size, stages: int, stem, downsample) -> list[tuple[int, int]] | None:
        """Token-map (H, W) of each stage for ``image_size``, or None when no size was given."""
        if image_size is None:
            self._image_hw = None
            return None
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(hw) != 2 or any(not isinstance(v, int) or v < 1 for v in hw):
            raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
        self._image_hw = hw
        shapes = [tuple(_conv_out(v, *stem) for v in hw)]
        for _ in range(stages - 1):
            shapes.append(tuple(_conv_out(v, *downsample) for v in shapes[-1]))
        return shapes

    def _make_head(self, num_classes: int) -> nn.Cell:
        if num_classes == 0:
            return nn.Identity()
        return nn.Dense(self.num_features, num_classes, weight_init=init.TruncatedNormal(0.02), bias_init="zeros")

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one (fine-tuning to another label set)."""
        if self.features_only:
            raise ValueError("a features_only backbone has no classifier to reset")
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """The normalised last feature map, (N, C, H/32, W/32)."""
        x = self.network(self.patch_embed(x))
        return self.norm(x)

    def forward_head(self, x: Tensor) -> Tensor:
        """Spatial mean of the normalised map (the official order: norm, then pool), then the classifier."""
        return self.head(self.head_drop(x.mean(axis=(2, 3))))

    def forward_pyramid(self, x: Tensor) -> tuple[Tensor, ...]:
        """The selected stage outputs, each through its own norm (official ``fork_feat`` behaviour)."""
        x = self.patch_embed(x)
        outs = ()
        for index, layer in enumerate(self.network):
            x = layer(x)
            if index in self.out_layers:
                outs += (getattr(self, "norm" + str(index))(x),)
        return outs

    def construct(self, x: Tensor):
        if self.features_only:
            return self.forward_pyramid(x)
        return self.forward_head(self.forward_features(x))


_S_WIDTHS = (64, 128, 320, 512)
_M_WIDTHS = (96, 192, 384, 768)
_OFFICIAL_URL = "https://github.com/sail-sg/poolformer/releases/download/v1.0/{name}.pth.tar"


def _poolformer(name: str, depths: tuple[int, ...], widths: tuple[int, ...], layer_scale_init: float,
                crop_pct: float, drop_path_rate: float, params: int, macs: float, top1: float) -> ModelInfo:
    return ModelInfo(name, depths, widths, layer_scale_init, drop_path_rate, crop_pct, params=params, macs=macs,
                     top1=top1, url=_OFFICIAL_URL.format(name=name))


# The paper's PoolFormers (ImageNet-1k, 224): depths, widths, LayerScale init, crop_pct, drop path, params, MACs, top-1
POOLFORMER_VARIANTS: dict[str, ModelInfo] = {record.name: record for record in (
    _poolformer("poolformer_s12", (2, 2, 6, 2), _S_WIDTHS, 1e-5, 0.90, 0.1, 11_915_176, 1.823e9, 77.2),
    _poolformer("poolformer_s24", (4, 4, 12, 4), _S_WIDTHS, 1e-5, 0.90, 0.1, 21_388_968, 3.413e9, 80.3),
    _poolformer("poolformer_s36", (6, 6, 18, 6), _S_WIDTHS, 1e-6, 0.90, 0.2, 30_862_760, 5.003e9, 81.4),
    _poolformer("poolformer_m36", (6, 6, 18, 6), _M_WIDTHS, 1e-6, 0.95, 0.3, 56_172_520, 8.802e9, 82.1),
    _poolformer("poolformer_m48", (8, 8, 24, 8), _M_WIDTHS, 1e-6, 0.95, 0.4, 73_473_448, 11.591e9, 82.5),
)}


def _ablation(name: str, overrides: Mapping[str, Any], **facts: Any) -> ModelInfo:
    """A PoolFormer-S12 with ``overrides``; its recipe's drop path 0.1 and crop 0.9 unless ``facts`` say otherwise."""
    facts = {"drop_path_rate": 0.1, "crop_pct": 0.9, **facts}
    return POOLFORMER_VARIANTS["poolformer_s12"].derived(name, overrides=overrides, **facts)


# Paper (Yu et al. 2022), Sec. 4.4 ablations on PoolFormer-S12 (77.2): top-1 kept only where the text
# states it: identity 74.3; GroupNorm beats LN/BN by 0.7/0.8 -> 76.5/76.4; ReLU drops 0.8 -> 76.4.
# Hybrid = official ``metaformer_ppaa_s12_224``: channel LayerNorm, a 14x14 position embedding
# before stage 3, attention with head_dim 32 and no qkv bias; Table 6: 16.5M, 2.5G MACs, 81.0.
METAFORMER_VARIANTS: dict[str, ModelInfo] = {record.name: record for record in (
    _ablation("metaformer_s12_identity", {"token_mixers": "identity"}, top1=74.3),
    _ablation("metaformer_s12_random", {"token_mixers": "random", "image_size": 224}),
    _ablation("metaformer_s12_dwconv", {"token_mixers": "dwconv", "mixer_kwargs": {"kernel_size": 3}}),
    _ablation("metaformer_s12_pool5", {"pool_size": 5}),
    _ablation("metaformer_s12_pool7", {"pool_size": 7}),
    _ablation("metaformer_s12_ln", {"norm": "ln"}, top1=76.5),
    _ablation("metaformer_s12_bn", {"norm": "bn"}, top1=76.4),
    _ablation("metaformer_s12_relu", {"act": "relu"}, top1=76.4),
    _ablation("metaformer_s12_silu", {"act": "silu"}),
    _ablation("metaformer_s12_no_residual", {"use_residual": False}),
    _ablation("metaformer_s12_no_mlp", {"use_mlp": False}),
    _ablation("poolformer_s12_pool_attn",
              {"token_mixers": ("pooling", "pooling", "attention", "attention"), "mixer_kwargs": {},
               "norm": "ln", "pos_embed": (False, False, True, False), "image_size": 224},
              crop_pct=0.95, params=16_500_000, macs=2.5e9, top1=81.0),
)}

for _record in (*POOLFORMER_VARIANTS.values(), *METAFORMER_VARIANTS.values()):
    register_record(_record, MetaFormer)
