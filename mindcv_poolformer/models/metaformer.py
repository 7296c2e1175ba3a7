"""MetaFormer and PoolFormer (Yu et al., "MetaFormer Is Actually What You Need for Vision", CVPR 2022).

One generic MetaFormer: 4 stages of blocks, each block being
``x + drop_path(ls1 * mixer(norm1(x)))`` then ``x + drop_path(ls2 * mlp(norm2(x)))``.
The five PoolFormers are rows of a table (``POOLFORMER_VARIANTS``) fed to that one class.

Parameter names follow the official sail-sg code with MindSpore's GroupNorm names (``gamma``/
``beta``), which is also MindCV's layout, so MindCV-released checkpoints load unchanged:
``patch_embed.proj``, ``network.{0,2,4,6}.{j}.{norm1,norm2,mlp.fc1,mlp.fc2,layer_scale_1,
layer_scale_2}``, ``network.{1,3,5}.proj``, ``norm``, ``head``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mindspore import Tensor, nn
from mindspore.common import initializer as init

from .layers import ConvMlp, DropPath, GroupNorm1, PatchEmbed, Pooling, layer_scale_parameter
from .registry import ModelInfo, register_model

__all__ = ["MetaFormer", "MetaFormerBlock", "PoolFormerVariant", "POOLFORMER_VARIANTS"]


class MetaFormerBlock(nn.Cell):
    """norm -> token mixer -> LayerScale -> drop path -> residual; norm -> MLP -> LayerScale -> ..."""

    def __init__(
        self,
        dim: int,
        pool_size: int = 3,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale_init: float | None = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = GroupNorm1(dim)
        self.token_mixer = Pooling(pool_size)
        self.norm2 = GroupNorm1(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), nn.GELU(approximate=False), drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.use_layer_scale = bool(layer_scale_init)
        if self.use_layer_scale:
            self.layer_scale_1 = layer_scale_parameter(layer_scale_init, dim)
            self.layer_scale_2 = layer_scale_parameter(layer_scale_init, dim)

    def construct(self, x: Tensor) -> Tensor:
        mixed = self.token_mixer(self.norm1(x))
        if self.use_layer_scale:
            mixed = self.layer_scale_1.reshape((-1, 1, 1)) * mixed
        x = x + self.drop_path(mixed)
        mlp_out = self.mlp(self.norm2(x))
        if self.use_layer_scale:
            mlp_out = self.layer_scale_2.reshape((-1, 1, 1)) * mlp_out
        return x + self.drop_path(mlp_out)


class MetaFormer(nn.Cell):
    """A 4-stage MetaFormer image classifier.

    Args:
        depths: blocks per stage.
        widths: channels per stage.
        num_classes: classifier outputs; 0 keeps the pooled features (no head).
        in_channels: input image channels.
        pool_size: token-mixer window.
        mlp_ratio: hidden/in channels of the channel MLP.
        layer_scale_init: initial LayerScale value; ``None`` or 0 disables LayerScale.
        drop_rate: dropout in the MLP and before the classifier (0 in every official recipe).
        drop_path_rate: stochastic depth of the last block; block ``i`` of ``n`` gets ``rate*i/(n-1)``.
        stem: (kernel, stride, padding) of the patch-embedding conv.
        downsample: (kernel, stride, padding) of the convs between stages.
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
    ) -> None:
        super().__init__()
        if len(depths) != len(widths):
            raise ValueError(f"depths {tuple(depths)} and widths {tuple(widths)} must have the same length")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.depths = tuple(depths)
        self.widths = tuple(widths)
        self.num_classes = num_classes
        self.num_features = widths[-1]

        self.patch_embed = PatchEmbed(in_channels, widths[0], *stem)
        total = sum(depths)
        layers: list[nn.Cell] = []
        block_index = 0
        for stage, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for _ in range(depth):
                rate = drop_path_rate * block_index / (total - 1) if total > 1 else drop_path_rate
                blocks.append(MetaFormerBlock(width, pool_size, mlp_ratio, drop_rate, rate, layer_scale_init))
                block_index += 1
            layers.append(nn.SequentialCell(blocks))
            if stage < len(depths) - 1:
                layers.append(PatchEmbed(width, widths[stage + 1], *downsample))
        self.network = nn.SequentialCell(layers)
        self.norm = GroupNorm1(widths[-1])
        self.head_drop = nn.Dropout(p=drop_rate) if drop_rate > 0 else nn.Identity()
        self.head = self._make_head(num_classes)

    def _make_head(self, num_classes: int) -> nn.Cell:
        if num_classes == 0:
            return nn.Identity()
        return nn.Dense(self.num_features, num_classes, weight_init=init.TruncatedNormal(0.02), bias_init="zeros")

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one (fine-tuning to another label set)."""
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """The normalised last feature map, (N, C, H/32, W/32)."""
        x = self.network(self.patch_embed(x))
        return self.norm(x)

    def forward_head(self, x: Tensor) -> Tensor:
        """Spatial mean of the normalised map (the official order: norm, then pool), then the classifier."""
        return self.head(self.head_drop(x.mean(axis=(2, 3))))

    def construct(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@dataclass(frozen=True)
class PoolFormerVariant:
    """One row of the PoolFormer model table (architecture plus the facts reported for it)."""

    depths: tuple[int, int, int, int]
    widths: tuple[int, int, int, int]
    layer_scale_init: float
    crop_pct: float
    drop_path_rate: float
    params: int
    macs: float
    top1: float


_S_WIDTHS = (64, 128, 320, 512)
_M_WIDTHS = (96, 192, 384, 768)

POOLFORMER_VARIANTS: dict[str, PoolFormerVariant] = {
    "poolformer_s12": PoolFormerVariant((2, 2, 6, 2), _S_WIDTHS, 1e-5, 0.90, 0.1, 11_915_176, 1.823e9, 77.2),
    "poolformer_s24": PoolFormerVariant((4, 4, 12, 4), _S_WIDTHS, 1e-5, 0.90, 0.1, 21_388_968, 3.413e9, 80.3),
    "poolformer_s36": PoolFormerVariant((6, 6, 18, 6), _S_WIDTHS, 1e-6, 0.90, 0.2, 30_862_760, 5.003e9, 81.4),
    "poolformer_m36": PoolFormerVariant((6, 6, 18, 6), _M_WIDTHS, 1e-6, 0.95, 0.3, 56_172_520, 8.802e9, 82.1),
    "poolformer_m48": PoolFormerVariant((8, 8, 24, 8), _M_WIDTHS, 1e-6, 0.95, 0.4, 73_473_448, 11.591e9, 82.5),
}

_OFFICIAL_URL = "https://github.com/sail-sg/poolformer/releases/download/v1.0/{name}.pth.tar"


def _register_variant(name: str, variant: PoolFormerVariant) -> None:
    def build(num_classes: int = 1000, in_channels: int = 3, **overrides) -> MetaFormer:
        kwargs = dict(depths=variant.depths, widths=variant.widths, layer_scale_init=variant.layer_scale_init)
        kwargs.update(overrides)
        return MetaFormer(num_classes=num_classes, in_channels=in_channels, **kwargs)

    info = ModelInfo(
        name=name,
        crop_pct=variant.crop_pct,
        drop_path_rate=variant.drop_path_rate,
        params=variant.params,
        macs=variant.macs,
        top1=variant.top1,
        url=_OFFICIAL_URL.format(name=name),
    )
    register_model(name, build, info)


for _name, _variant in POOLFORMER_VARIANTS.items():
    _register_variant(_name, _variant)
