"""mmseg's ``IoUMetric``: dataset-level intersection/union histograms, exact in int64, reduced exactly across ranks.

Per image (label 255 ignored, predictions there too): ``intersect``, ``pred`` and ``label`` areas per
class; ``union = pred + label - intersect``. Summed over the dataset, ``IoU = I / U`` and
``Acc = I / label`` per class (NaN where the class is absent from both / from the labels),
``mIoU``/``mAcc`` their nanmeans, ``aAcc = sum I / sum label``. mmseg sums float32 histograms
(exact below 2**24 pixels a class, which ADE20K's 2000 validation images exceed); here the counts
are int64. MindSpore's CPU AllReduce sums float16/float32 only, so ``all_reduce_counts`` splits
each count into 12-bit limbs: a float32 sum of limbs < 2**12 over up to 4096 ranks stays below
2**24, hence exact, and the limbs are recombined in int64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["IoUHistogram", "SegMetrics", "intersect_and_union", "all_reduce_counts", "LIMB_BITS", "LIMBS"]

LIMB_BITS = 12
LIMBS = 4  # 48 bits: 2.8e14 pixels a class
_MAX_RANKS = 2 ** (24 - LIMB_BITS)


def intersect_and_union(pred: np.ndarray, label: np.ndarray, num_classes: int,
                        ignore_index: int = 255) -> np.ndarray:
    """``(4, num_classes)`` int64: intersect, union, pred and label areas of one map (mmseg's order)."""
    mask = label != ignore_index
    pred, label = pred[mask].astype(np.int64), label[mask].astype(np.int64)
    # torch.histc over [0, num_classes - 1] drops values outside it; so does this
    keep_pred = (pred >= 0) & (pred < num_classes)
    inter = np.bincount(pred[(pred == label) & keep_pred], minlength=num_classes)[:num_classes]
    area_pred = np.bincount(pred[keep_pred], minlength=num_classes)[:num_classes]
    area_label = np.bincount(label[(label >= 0) & (label < num_classes)], minlength=num_classes)[:num_classes]
    return np.stack([inter, area_pred + area_label - inter, area_pred, area_label]).astype(np.int64)


def all_reduce_counts(counts: np.ndarray, reduce=None) -> np.ndarray:
    """Exact SUM of non-negative int64 ``counts`` over ranks with a float32 AllReduce (see the module doc).

    ``reduce`` maps a float32 array to its sum over ranks (default: MindSpore's ``ops.AllReduce``).
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size and (counts.min() < 0 or counts.max() >= 1 << (LIMB_BITS * LIMBS)):
        raise ValueError(f"counts must be in [0, 2**{LIMB_BITS * LIMBS}) for an exact reduction")
    if reduce is None:
        import mindspore as ms
        from mindspore import ops
        from mindspore.communication import get_group_size

        if get_group_size() > _MAX_RANKS:
            raise ValueError(f"an exact float32 reduction of 12-bit limbs needs at most {_MAX_RANKS} ranks")

        def reduce(values: np.ndarray) -> np.ndarray:
            return ops.AllReduce()(ms.Tensor(values)).asnumpy()

    mask = (1 << LIMB_BITS) - 1
    limbs = np.stack([(counts >> (LIMB_BITS * k)) & mask for k in range(LIMBS)]).astype(np.float32)
    summed = np.asarray(reduce(limbs)).astype(np.float64)
    if not np.array_equal(summed, np.round(summed)) or summed.max(initial=0) >= 2 ** 24:
        raise RuntimeError("the float32 limb reduction was not exact")
    summed = summed.astype(np.int64)
    return sum(summed[k] << (LIMB_BITS * k) for k in range(LIMBS))


@dataclass
class SegMetrics:
    """Dataset metrics as fractions (mmseg prints them x100): per-class IoU/Acc (NaN: absent) and summaries."""

    miou: float
    aacc: float
    macc: float
    iou: np.ndarray
    acc: np.ndarray
    num_images: int
    skipped: int = 0


class IoUHistogram:
    """Accumulates ``intersect_and_union`` over images; ``compute`` gives mmseg's ``IoUMetric`` numbers."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.areas = np.zeros((4, num_classes), dtype=np.int64)
        self.num_images = 0
        self.skipped = 0

    def update(self, pred: np.ndarray, label: np.ndarray) -> None:
        """Add one ``(H, W)`` prediction/label pair (same shape)."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in shape")
        self.areas += intersect_and_union(pred, label, self.num_classes, self.ignore_index)
        self.num_images += 1

    def all_reduce(self, reduce=None) -> None:
        """Sum the histograms and image/skip counts over ranks, exactly."""
        flat = np.concatenate([self.areas.reshape(-1), [self.num_images, self.skipped]])
        total = all_reduce_counts(flat, reduce)
        self.areas = total[:-2].reshape(4, self.num_classes)
        self.num_images, self.skipped = int(total[-2]), int(total[-1])

    def compute(self) -> SegMetrics:
        """IoU, Acc per class; mIoU, mAcc (nanmean) and aAcc, from the summed histograms."""
        inter, union, _, label = self.areas.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou, acc = inter / union, inter / label
            aacc = float(inter.sum() / label.sum()) if label.sum() else float("nan")
        return SegMetrics(_nanmean(iou), aacc, _nanmean(acc), iou, acc, self.num_images, self.skipped)


def _nanmean(values: Sequence[float]) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
