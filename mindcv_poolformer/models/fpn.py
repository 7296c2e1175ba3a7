"""Semantic FPN (Kirillov et al., "Panoptic Feature Pyramid Networks", 2019) on a PoolFormer backbone.

Built as mmsegmentation 1.2.2 builds ``configs/poolformer/fpn_poolformer_*_8xb4-40k_ade20k-512x512.py``
(the paper's ADE20K models), so its checkpoints load by name and its logits are reproduced:

- backbone: ``MetaFormer(features_only=True)``, the four stage maps through ``norm0/2/4/6``;
- neck (mmseg ``FPN``): a biased 1x1 lateral conv per level, the top-down sum
  ``lateral[i-1] += nearest_resize(lateral[i], size of lateral[i-1])``, a biased 3x3 conv per level;
- head (mmseg ``FPNHead``): per level ``max(1, log2(stride/4))`` blocks of conv3x3 + BN + ReLU, each
  followed by a x2 bilinear upsample when stride > 4; the levels are summed after resizing each to
  the stride-4 map; Dropout2d(0.1) and a 1x1 ``conv_seg``.

Names follow mmseg's (mmcv ``ConvModule``: ``conv``/``bn``) with MindSpore's BatchNorm names
(``gamma/beta/moving_mean/moving_variance``): ``backbone.*``, ``neck.lateral_convs.{i}.conv``,
``neck.fpn_convs.{i}.conv``, ``decode_head.scale_heads.{i}.{j}.{conv,bn}``, ``decode_head.conv_seg``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mindspore import Tensor, nn, ops
from mindspore.common import initializer as init

from .metaformer import POOLFORMER_VARIANTS, MetaFormer
from .registry import ADE20K_MEAN, ADE20K_STD, ModelInfo, register_record

__all__ = ["FPN", "FPNHead", "ConvModule", "Resize", "SemanticFPN", "SEGMENTATION_VARIANTS"]


class Resize(nn.Cell):
    """``torch.nn.functional.interpolate(x, size, mode, align_corners=False)``, the op of mmseg's ``resize``.

    MindSpore's ``ops.interpolate`` has PyTorch's coordinate rules for both modes used here (measured
    equal, and pinned by a test): ``bilinear`` is ``ResizeBilinearV2(half_pixel_centers=True)``, i.e.
    source ``(dst + 0.5) * in / out - 0.5`` clamped at the borders; ``nearest`` is
    ``ResizeNearestNeighborV2`` without half-pixel centres, i.e. source ``floor(dst * in / out)``
    (PyTorch's ``nearest``, not ``nearest-exact``). Ascend: both primitives have op adapters in the
    MindSpore 2.10 wheel's Ascend plugin and ``ops.interpolate`` lists Ascend for both modes (not run
    on an NPU here); ``mint``'s bilinear (UpsampleBilinear2D, aclnn) is not used: no CPU kernel. With
    ``scale_factor`` and no ``size`` the output is ``scale * input size``, as mmseg's ``Upsample``.
    """

    def __init__(self, mode: str, scale_factor: int | None = None) -> None:
        super().__init__()
        if mode not in ("bilinear", "nearest"):
            raise ValueError(f"Resize mode must be 'bilinear' or 'nearest', got {mode!r}")
        self.mode = mode
        self.scale_factor = scale_factor

    def construct(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            size = (x.shape[2] * self.scale_factor, x.shape[3] * self.scale_factor)
        if tuple(size) == tuple(x.shape[2:]):  # both rules map every pixel to itself: skip the pass
            return x
        if self.mode == "nearest":
            return ops.interpolate(x, size=size, mode="nearest")
        return ops.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def extend_repr(self) -> str:
        return f"mode={self.mode}, scale_factor={self.scale_factor}"


class ConvModule(nn.Cell):
    """mmcv's ``ConvModule``: conv, then optionally BatchNorm and ReLU; the conv has a bias only without BN.

    ``sync_bn`` makes the norm a ``SyncBatchNorm`` (same parameter names), which reads the rank and
    group size when built: call ``mindspore.communication.init()`` first.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: bool = False,
                 act: bool = False, weight_init: init.Initializer | str | None = None, sync_bn: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, pad_mode="pad", padding=kernel_size // 2,
                              has_bias=not norm, weight_init=weight_init, bias_init="zeros")
        if norm:
            # PyTorch's momentum 0.1 is MindSpore's 0.9 (the weight of the old moving statistic)
            bn = nn.SyncBatchNorm if sync_bn else nn.BatchNorm2d
            self.bn = bn(out_channels, eps=1e-5, momentum=0.9)
        self.with_norm = norm
        self.activate = nn.ReLU() if act else nn.Identity()

    def construct(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.with_norm:
            x = self.bn(x)
        return self.activate(x)


class FPN(nn.Cell):
    """mmseg's ``FPN`` neck (no norm, no activation, no extra levels): one output per input level.

    Convs are Xavier-uniform with zero bias: mmseg's ``init_cfg`` for this neck (mmcv's ConvModule
    would otherwise use Kaiming).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.lateral_convs = nn.CellList([ConvModule(c, out_channels, 1, weight_init=init.XavierUniform())
                                          for c in in_channels])
        self.fpn_convs = nn.CellList([ConvModule(out_channels, out_channels, 3, weight_init=init.XavierUniform())
                                      for _ in in_channels])
        self.upsample = Resize("nearest")

    def construct(self, features: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = self.add_top_down(laterals[i - 1], laterals[i])
        return tuple(conv(x) for conv, x in zip(self.fpn_convs, laterals))

    def add_top_down(self, fine: Tensor, coarse: Tensor) -> Tensor:
        """One top-down step: the coarser level, nearest-upsampled to the finer one's size, added to it."""
        return fine + self.upsample(coarse, fine.shape[2:])


def scale_head(in_channels: int, channels: int, stride: int, base_stride: int, sync_bn: bool = False) -> nn.Cell:
    """``max(1, log2(stride / base_stride))`` conv3x3-BN-ReLU blocks, each then x2 upsampled if stride > base.

    Kaiming-normal (fan_out, ReLU) convs: mmcv ConvModule's own init, which mmseg keeps for this head.
    """
    layers: list[nn.Cell] = []
    for k in range(max(1, int(math.log2(stride) - math.log2(base_stride)))):
        layers.append(ConvModule(in_channels if k == 0 else channels, channels, 3, norm=True, act=True,
                                 weight_init=init.HeNormal(mode="fan_out", nonlinearity="relu"), sync_bn=sync_bn))
        if stride != base_stride:
            layers.append(Resize("bilinear", scale_factor=2))
    return nn.SequentialCell(layers)


class FPNHead(nn.Cell):
    """mmseg's ``FPNHead``: per-level scale heads summed at the finest stride, dropout, 1x1 classifier.

    Every level is resized (bilinear) to the first level's map before the sum, as mmseg does: for
    inputs not divisible by 32 the x2 upsampled maps are a pixel larger or smaller than it.
    ``conv_seg`` is N(0, 0.01) with zero bias (mmseg's ``init_cfg``).
    """

    def __init__(self, in_channels: Sequence[int], feature_strides: Sequence[int], channels: int = 128,
                 num_classes: int = 150, dropout: float = 0.1, sync_bn: bool = False) -> None:
        super().__init__()
        if len(in_channels) != len(feature_strides) or min(feature_strides) != feature_strides[0]:
            raise ValueError(f"FPNHead needs one stride per input, the first the smallest; got channels "
                             f"{tuple(in_channels)}, strides {tuple(feature_strides)}")
        self.feature_strides = tuple(feature_strides)
        self.scale_heads = nn.CellList([scale_head(c, channels, s, feature_strides[0], sync_bn)
                                        for c, s in zip(in_channels, feature_strides)])
        self.resize = Resize("bilinear")
        self.dropout = nn.Dropout2d(p=dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1, has_bias=True, weight_init=init.Normal(0.01),
                                  bias_init="zeros")

    def construct(self, features: tuple[Tensor, ...]) -> Tensor:
        output = self.scale_heads[0](features[0])
        for i in range(1, len(self.feature_strides)):
            output = output + self.resize(self.scale_heads[i](features[i]), output.shape[2:])
        return self.conv_seg(self.dropout(output))


class SemanticFPN(nn.Cell):
    """PoolFormer backbone + FPN neck + FPNHead: ``construct`` gives per-class logits at stride 4.

    Args:
        depths, widths, layer_scale_init: the PoolFormer backbone (see ``MetaFormer``).
        num_classes: segmentation classes (150 for ADE20K).
        in_channels: input image channels.
        neck_channels: FPN output channels.
        head_channels: channels of the scale heads.
        dropout: Dropout2d rate before ``conv_seg``.
        frozen_stages: mmpretrain's ``PoolFormer(frozen_stages=)``, which mmseg's configs set to 0:
            0 freezes the 7x7 stem (``patch_embed``: ``requires_grad=False``, so no gradient and no
            weight decay); k > 0 also freezes network entries 0..k-1 (blocks and downsamples, with
            their ``normK``); -1 trains everything, as the official sail-sg code does. mmpretrain
            also keeps these cells in eval mode, which changes nothing here: they hold no BatchNorm
            or dropout (only a non-zero ``drop_path_rate`` would still act in frozen blocks).
        sync_bn: BatchNorm of the head as ``SyncBatchNorm`` (mmseg's SyncBN), for data-parallel
            training on Ascend; build the model after ``mindspore.communication.init()``. With one
            device it computes as BatchNorm. Off by default: MindSpore's SyncBatchNorm is Ascend-only.
        **backbone_kwargs: other ``MetaFormer`` arguments (``drop_path_rate`` defaults to 0, as mmseg's).
    """

    def __init__(self, depths: Sequence[int], widths: Sequence[int], num_classes: int = 150,
                 in_channels: int = 3, layer_scale_init: float | None = 1e-5, neck_channels: int = 256,
                 head_channels: int = 128, dropout: float = 0.1, frozen_stages: int = 0, sync_bn: bool = False,
                 **backbone_kwargs) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"a segmentation model needs num_classes >= 1, got {num_classes}")
        backbone_kwargs.setdefault("features_only", True)
        self.backbone = MetaFormer(depths, widths, in_channels=in_channels, layer_scale_init=layer_scale_init,
                                   **backbone_kwargs)
        if not self.backbone.features_only:
            raise ValueError("the FPN backbone returns feature maps: features_only cannot be False")
        channels = self.backbone.feature_channels
        self.neck = FPN(channels, neck_channels)
        self.decode_head = FPNHead((neck_channels,) * len(channels), self.backbone.feature_strides, head_channels,
                                   num_classes, dropout, sync_bn)
        self.num_classes = num_classes
        self.frozen_stages = frozen_stages
        self.freeze_stages(frozen_stages)

    def frozen_cells(self) -> list[nn.Cell]:
        """The backbone cells that ``frozen_stages`` freezes (mmpretrain ``PoolFormer._freeze_stages``)."""
        if self.frozen_stages < 0:
            return []
        cells = [self.backbone.patch_embed]
        for index in range(self.frozen_stages):
            cells.append(self.backbone.network[index])
            if index in self.backbone.out_layers:
                cells.append(getattr(self.backbone, f"norm{index}"))
        return cells

    def freeze_stages(self, frozen_stages: int) -> None:
        """Freeze the stem (and the first ``frozen_stages`` network entries); -1 unfreezes all of the backbone."""
        if frozen_stages > len(self.backbone.network):
            raise ValueError(f"frozen_stages must be in -1..{len(self.backbone.network)}, got {frozen_stages}")
        for param in self.backbone.get_parameters():
            param.requires_grad = True
        self.frozen_stages = frozen_stages
        for cell in self.frozen_cells():
            for param in cell.get_parameters():
                param.requires_grad = False

    def construct(self, x: Tensor) -> Tensor:
        return self.decode_head(self.neck(self.backbone(x)))

    def predict_logits(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Logits resized (bilinear, align_corners=False) to ``size`` (default: the input's), as mmseg predicts."""
        size = tuple(x.shape[2:]) if size is None else tuple(size)
        return ops.interpolate(self(x), size=size, mode="bilinear", align_corners=False)


_MMSEG_URL = ("https://download.openmmlab.com/mmsegmentation/v0.5/poolformer/fpn_poolformer_{0}_8x4_512x512_40k_"
              "ade20k/fpn_poolformer_{0}_8x4_512x512_40k_ade20k_{1}.pth")


def _segmentation(arch: str, params: int, macs: float, miou: float, stamp: str) -> ModelInfo:
    """The Semantic FPN on ``poolformer_{arch}``: mmseg's ADE20K facts (512x512 crops, 40k iterations, 150 classes)."""
    return POOLFORMER_VARIANTS[f"poolformer_{arch}"].derived(
        f"fpn_poolformer_{arch}", params=params, macs=macs, miou=miou, url=_MMSEG_URL.format(arch, stamp),
        task="segmentation", crop_size=512, num_classes=150, mean=ADE20K_MEAN, std=ADE20K_STD,
        interpolation="bilinear")


# mmseg's configs/poolformer/metafile.yaml (mIoU, weights). ``params`` is mmseg's count with 150 classes
# (PyTorch parameters: BatchNorm statistics excluded); ``macs`` is ``count_macs(net, 512)`` of the
# stride-4 logits, which equals mmengine's fvcore-style FlopAnalyzer on mmseg's own model (a test checks it).
SEGMENTATION_VARIANTS: dict[str, ModelInfo] = {record.name: record for record in (
    _segmentation("s12", 15_669_846, 31_043_354_624, 36.68, "20220501_115154-b5aa2f49"),
    _segmentation("s24", 25_143_638, 39_351_484_416, 40.12, "20220503_222049-394a7cf7"),
    _segmentation("s36", 34_617_430, 47_659_614_208, 41.61, "20220501_151122-b47e607d"),
    _segmentation("m36", 59_778_006, 67_743_907_840, 41.95, "20220501_164230-3dc83921"),
    _segmentation("m48", 77_078_934, 82_314_133_504, 42.43, "20220504_003923-64168d3b"),
)}

for _record in SEGMENTATION_VARIANTS.values():
    register_record(_record, SemanticFPN)
