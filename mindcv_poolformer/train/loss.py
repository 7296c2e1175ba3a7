"""Losses: on soft targets for classification (label smoothing and mixup/cutmix both arrive as probability
vectors), and per-pixel cross-entropy for segmentation."""

from __future__ import annotations

from mindspore import Tensor, nn, ops
from mindspore.common import dtype as mstype

from ..backends import backend_resized_pixel_nll

__all__ = ["SoftTargetCrossEntropy", "SoftTargetBCE", "SegmentationCrossEntropy", "create_loss"]


class SoftTargetCrossEntropy(nn.Cell):
    """Mean over the batch of ``-sum_c target_c * log_softmax(logits)_c``, computed in float32.

    Equal to cross entropy with label smoothing when the targets are smoothed one-hot vectors.
    """

    def construct(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.astype("float32")
        return (-targets.astype("float32") * ops.log_softmax(logits, axis=-1)).sum(axis=-1).mean()


class SoftTargetBCE(nn.Cell):
    """Binary cross entropy with logits on soft targets (per class), float32."""

    def construct(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.astype("float32")
        return ops.binary_cross_entropy_with_logits(logits, targets.astype("float32"), reduction="mean")


class SegmentationCrossEntropy(nn.Cell):
    """mmseg's decode-head loss: logits resized bilinearly to the label size, cross-entropy without ``ignore_index``.

    mmseg's ``CrossEntropyLoss(avg_non_ignore=False)`` (its default, and the PoolFormer recipe's) divides
    the sum over the non-ignored pixels by *all* pixels of the batch, ignored ones included; so does this.
    Written from MindSpore ops rather than ``ops.cross_entropy``, whose ``ignore_index`` mean divides by
    the non-ignored pixels only. Computed in float32. Where the backend has a fused kernel for the whole
    loss (``backend``: ``auto`` follows MindSpore's device target; the CPU kernels have one), it runs
    instead: the label-size class maps (1.26 GB each for FPN-S12 at 512x512, batch 8) are never written,
    and MindSpore's CPU resize gradient and class-axis log_softmax were the slowest kernels of the step.
    """

    def __init__(self, ignore_index: int = 255, backend: str = "auto") -> None:
        super().__init__()
        self.ignore_index = ignore_index
        fused = backend_resized_pixel_nll(backend)
        self.use_fused = fused is not None
        if fused is not None:
            self.fused_nll = fused
            self.ignore_tensor = Tensor([ignore_index], mstype.int32)

    def construct(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.use_fused:
            sums = self.fused_nll(logits.astype("float32"), labels.astype("int32"), self.ignore_tensor)[0]
            return sums.sum() / labels.size  # the mean over every pixel: avg_non_ignore=False
        logits = ops.interpolate(logits.astype("float32"), size=labels.shape[-2:], mode="bilinear",
                                 align_corners=False)
        labels = labels.astype("int32")
        keep = labels != self.ignore_index
        safe = ops.where(keep, labels, ops.zeros_like(labels))
        picked = ops.gather_elements(ops.log_softmax(logits, axis=1), 1, safe.expand_dims(1)).squeeze(1)
        return -(picked * keep.astype("float32")).mean()  # the mean over every pixel: avg_non_ignore=False


def create_loss(name: str) -> nn.Cell:
    """``CE`` (default) or ``BCE``; label smoothing is applied to the targets by the data pipeline."""
    return SoftTargetBCE() if name == "BCE" else SoftTargetCrossEntropy()
