"""validate.py for a Semantic FPN: mmseg's single-scale whole-image test on ADE20K, mIoU as ``IoUMetric``.

Each image goes through ``inference_resize`` (mmseg's test pipeline), the network's stride-4 logits
are resized bilinearly (align_corners=False) to the original size and arg-maxed, and the
histograms of the original-size label are accumulated. Sharding: rank ``r`` of ``g`` takes images
``r, r + g, ...`` (every image once), the histograms are summed exactly (``IoUHistogram.all_reduce``).
A file that does not decode is an error with ``strict_data``, else skipped and counted; an unpaired
file, a size mismatch or a label out of range is always an error (a wrong dataset or config).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from ..data.ade20k import (
    ADE20K_TEST,
    CorruptFileError,
    SegPreprocess,
    ade20k_classes,
    list_ade20k,
    load_sample,
    warn_skipped,
)
from ..data.listing import shard_indices
from ..deploy.artifacts import load_segmentation_network
from ..errors import ConfigError
from .miou import IoUHistogram

__all__ = ["predict_map", "logits_to_map", "evaluate_segmentation", "validate_segmentation",
           "format_segmentation_table"]


def predict_map(net, image: np.ndarray, preprocess: SegPreprocess = ADE20K_TEST) -> np.ndarray:
    """Class ids ``(H, W)`` int64 of an HWC uint8 RGB image at its own size (mmseg's whole-image test).

    ``preprocess`` is the test pipeline's input (the one every predict backend applies too).
    """
    import mindspore as ms

    return logits_to_map(net(ms.Tensor(preprocess(image))), image.shape[:2])


def logits_to_map(logits, size: Sequence[int]) -> np.ndarray:
    """Stride-4 logits ``1CHW`` (Tensor or array) -> class ids ``(H, W)`` int64 at ``size``: bilinear, then argmax.

    One resize straight to the original size, as mmseg does; exported graphs stop before it, so a
    checkpoint and a MINDIR give their maps through this same op.
    """
    import mindspore as ms
    from mindspore import ops

    if not isinstance(logits, ms.Tensor):
        logits = ms.Tensor(np.ascontiguousarray(logits, np.float32))
    logits = ops.interpolate(logits, size=tuple(int(v) for v in size), mode="bilinear", align_corners=False)
    return logits.argmax(axis=1).asnumpy()[0].astype(np.int64)


def evaluate_segmentation(net, images: Sequence[str], labels: Sequence[str], num_classes: int, *,
                          preprocess: SegPreprocess = ADE20K_TEST, reduce_zero_label: bool = True,
                          strict: bool = True, distributed: bool = False) -> tuple[IoUHistogram, list[str]]:
    """Accumulate the histograms of the given pairs (this rank's); returns them (reduced if ``distributed``) and
    the files skipped here."""
    if hasattr(net, "set_train"):
        net.set_train(False)
    hist = IoUHistogram(num_classes)
    skipped: list[str] = []
    for image_path, label_path in zip(images, labels):
        try:
            sample = load_sample(image_path, label_path, num_classes, reduce_zero_label)
        except CorruptFileError:
            if strict:
                raise
            skipped.append(image_path)
            hist.skipped += 1
            continue
        hist.update(predict_map(net, sample.image, preprocess), sample.label)
    if distributed:
        hist.all_reduce()
    return hist, skipped


def validate_segmentation(cfg, amp_level: str, rank: int = 0, group_size: int = 1,
                          apply_amp: Callable | None = None) -> dict:
    """``run_validation`` for a segmentation model: the record with mIoU/aAcc/mAcc and per-class IoU by name.

    ``apply_amp(net) -> net`` is the caller's mixed-precision wrapper for ``amp_level`` (none: float32).
    """
    if cfg.ckpt_path.lower().endswith(".mindir"):
        raise ConfigError("ckpt_path: validating an exported segmentation MINDIR is not supported; pass the "
                          ".safetensors/.ckpt/.pth checkpoint")
    preprocess = SegPreprocess.from_config(cfg)
    pairs = list_ade20k(cfg.data_dir, cfg.val_split)
    net, num_classes = load_segmentation_network(cfg.model, cfg.ckpt_path, cfg.num_classes)
    if apply_amp is not None:
        net = apply_amp(net)
    rows = np.arange(len(pairs.images))
    if group_size > 1:
        rows = shard_indices(rows, rank, group_size, even=False)
    start = time.perf_counter()
    hist, skipped = evaluate_segmentation(
        net, [pairs.images[i] for i in rows], [pairs.labels[i] for i in rows], num_classes, preprocess=preprocess,
        reduce_zero_label=cfg.reduce_zero_label, strict=cfg.strict_data, distributed=group_size > 1)
    seconds = time.perf_counter() - start
    metrics = hist.compute()
    if rank == 0:
        if metrics.skipped:
            warn_skipped(skipped or ["(on another rank)"], f"unreadable or invalid pair(s) of {metrics.skipped}")
    names = ade20k_classes() if num_classes == 150 else [str(i) for i in range(num_classes)]
    return {"task": "segmentation", "miou": 100 * metrics.miou, "aacc": 100 * metrics.aacc,
            "macc": 100 * metrics.macc,
            "per_class_iou": {n: (None if np.isnan(v) else 100 * float(v)) for n, v in zip(names, metrics.iou)},
            "per_class_acc": {n: (None if np.isnan(v) else 100 * float(v)) for n, v in zip(names, metrics.acc)},
            "num_samples": metrics.num_images, "skipped": metrics.skipped,
            "model": cfg.model, "ckpt": cfg.ckpt_path, "amp_level": amp_level, "seg_scale": list(preprocess.scale),
            "seg_size_divisor": preprocess.size_divisor, "reduce_zero_label": cfg.reduce_zero_label,
            "data": os.path.abspath(pairs.root), "ranks": group_size, "seconds": seconds}


def format_segmentation_table(record: dict) -> str:
    """The summary metrics and the five best/worst classes as a two-column text table."""
    ious = [(v, k) for k, v in record["per_class_iou"].items() if v is not None]
    rows = [("model", record["model"]), ("checkpoint", record["ckpt"]), ("images", record["num_samples"]),
            ("skipped", record["skipped"]), ("mIoU (%)", f"{record['miou']:.2f}"),
            ("aAcc (%)", f"{record['aacc']:.2f}"), ("mAcc (%)", f"{record['macc']:.2f}"),
            ("classes present", len(ious)), ("amp", record["amp_level"]),
            ("input", f"resize {tuple(record['seg_scale'])} keep ratio, multiple of {record['seg_size_divisor']}")]
    rows += [(f"IoU {name}", f"{value:.2f}") for value, name in sorted(ious, reverse=True)[:5]]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(str(v)) for _, v in rows))
    return "\n".join([line] + [f"{k:<{width}} | {v}" for k, v in rows] + [line])
