"""What a training task supplies to the one trainer loop: data, loss, validation metric, run-end artefacts.

The loop, the compiled step, checkpointing, resume, signals and overflow handling are the trainer's
and the same for every task; a task only answers "which batches", "which loss", "how good is it".
``classification`` is the ImageFolder pipeline with top-1/top-5; ``segmentation`` is ADE20K-layout
data, mmseg's per-pixel cross-entropy and mIoU (``evaluation/segmentation.py``, histograms summed
exactly over ranks). ``make_task`` picks one from ``cfg.task`` (resolved from the model by the config).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError
from ..data.ade20k import IGNORE_INDEX, SegmentationList, ade20k_palette, list_ade20k, load_sample, warn_skipped
from ..data.listing import shard_indices
from ..data.seg_train import build_segmentation_train_dataset
from ..data.texture_mosaics import ensure_texture_mosaics
from ..evaluation.classification import evaluate
from ..evaluation.segmentation import evaluate_segmentation, predict_map
from .data import DataError, TrainDataSettings, build_train_dataset, build_val_dataset, prepare_data_dir
from .loss import SegmentationCrossEntropy, create_loss

__all__ = ["ClassificationTask", "SegmentationTask", "make_task", "check_segmentation_labels"]

_LOG = logging.getLogger("mindcv_poolformer")


@dataclass
class Validation:
    """One validation: the metric columns of ``metrics.csv`` and the score that picks the best checkpoint (%)."""
    columns: dict[str, float | None]
    score: float
    ema_score: float | None = None


class ClassificationTask:
    """ImageFolder (or the digits demo), soft-target cross-entropy, top-1/top-5."""
    name = "classification"
    metric_columns = ("val_top1", "val_top5")
    score_name = "top-1"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg = cfg
        self.listing = prepare_data_dir(cfg)  # listed once: every epoch and validation use it
        self.eval_data = None

    def num_classes(self) -> int:
        return self.cfg["num_classes"] or len(self.listing.train.classes)

    def num_train(self) -> int:
        n_train = len(self.listing.train.files)
        return min(n_train, int(self.cfg["num_samples"])) if self.cfg["num_samples"] else n_train

    def loss(self):
        return create_loss(self.cfg["loss"])

    def prepare_validation(self, rank: int, world: int) -> None:
        if self.cfg["val_while_train"]:
            self.eval_data = build_val_dataset(self.cfg, self.listing.val, rank, world)  # labels: training classes

    def train_dataset(self, epoch: int, rank: int, world: int, num_classes: int):
        return build_train_dataset(TrainDataSettings.from_config(self.cfg), epoch, rank, world, num_classes,
                                   self.listing).dataset

    def evaluate(self, net, distributed: bool) -> tuple[dict[str, float], float] | None:
        """(columns, score) of one pass over the validation split; None when there is nothing to evaluate."""
        if self.eval_data is None and not distributed:
            return None
        metrics = evaluate(net, self.eval_data, distributed=distributed)
        if metrics.skipped:
            _LOG.warning("validation: %d unreadable image(s) left out of top-1/top-5 (strict_data stops instead)",
                         metrics.skipped)
        return {"val_top1": metrics.top1, "val_top5": metrics.top5}, metrics.top1

    def finish(self, net, run_dir: Path) -> None:
        """Nothing beyond metrics.csv and curves.png for classification."""


def check_segmentation_labels(labels: list[str], num_classes: int, reduce_zero_label: bool,
                              workers: int = 4) -> None:
    """Decode every label PNG once (threads: PIL releases the GIL) and refuse a value out of range, naming the file.

    Done before the run writes anything: a wrong ``num_classes`` or dataset must not cost a run directory or
    surface hours into training.
    """
    from PIL import Image

    def peak(path: str) -> tuple[str, int]:
        try:
            with Image.open(path) as img:
                values = np.unique(np.asarray(img))
        except (OSError, ValueError, SyntaxError) as exc:
            raise ConfigError(f"data: {path} is not a readable PNG ({exc})") from None
        values = values.astype(np.int64)
        if reduce_zero_label:
            values = np.where(values == 0, 256, values) - 1
            values = values[(values != 254) & (values != 255)]
        else:
            values = values[values != 255]
        return path, int(values.max()) if values.size else -1

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for path, top in pool.map(peak, labels):
            if top >= num_classes:
                raise ConfigError(f"data: {path} has label value {top + int(reduce_zero_label)} (class {top} after "
                                  f"reduce_zero_label={reduce_zero_label}), out of range for num_classes "
                                  f"{num_classes}; accepted: class ids 0..{num_classes - 1} and 255 (ignored); "
                                  "pass the dataset's --num_classes")


class SegmentationTask:
    """ADE20K layout (or the texture-mosaics demo), mmseg's pixel cross-entropy, mIoU on the whole validation split."""
    name = "segmentation"
    metric_columns = ("val_miou", "val_aacc", "val_macc")
    score_name = "mIoU"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg = cfg
        if not cfg["data_dir"]:
            raise DataError("data_dir: no dataset directory given (pass --data_dir DIR, an ADE20K root holding "
                            "images/ and annotations/)")
        if cfg["dataset"] == "texture_mosaics":
            start = time.perf_counter()
            # the generator's own set size (1000 training, 200 validation mosaics) at the crop size
            ensure_texture_mosaics(cfg["data_dir"], size=int(cfg["seg_crop_size"][0]), seed=int(cfg["seed"]))
            _LOG.info("texture_mosaics in %s: ready in %.1f s (written on the first run)", cfg["data_dir"],
                      time.perf_counter() - start)
        self.train_pairs = list_ade20k(cfg["data_dir"], cfg["train_split"])
        self.val_pairs = list_ade20k(cfg["data_dir"], cfg["val_split"]) if cfg["val_while_train"] else None
        if not cfg["num_classes"]:
            raise ConfigError(f"num_classes: a segmentation run needs the dataset's class count (150 for ADE20K); "
                              f"pass --num_classes N for {cfg['data_dir']}")
        labels = self.train_pairs.labels + (self.val_pairs.labels if self.val_pairs else [])
        check_segmentation_labels(labels, int(cfg["num_classes"]), bool(cfg["reduce_zero_label"]),
                                  int(cfg["num_parallel_workers"]))
        self.rank, self.world = 0, 1

    def num_classes(self) -> int:
        return int(self.cfg["num_classes"])

    def num_train(self) -> int:
        n_train = len(self.train_pairs.images)
        return min(n_train, int(self.cfg["num_samples"])) if self.cfg["num_samples"] else n_train

    def loss(self):
        return SegmentationCrossEntropy(IGNORE_INDEX)

    def prepare_validation(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def train_dataset(self, epoch: int, rank: int, world: int, num_classes: int):
        return _segmentation_train_dataset(self.cfg, self.train_pairs, self.num_train(), epoch, rank, world,
                                           num_classes)

    def _val_rows(self) -> np.ndarray:
        rows = np.arange(len(self.val_pairs.images))
        return shard_indices(rows, self.rank, self.world, even=False) if self.world > 1 else rows

    def evaluate(self, net, distributed: bool) -> tuple[dict[str, float], float] | None:
        if self.val_pairs is None:
            return None
        cfg, rows = self.cfg, self._val_rows()
        hist, skipped = evaluate_segmentation(
            net, [self.val_pairs.images[i] for i in rows], [self.val_pairs.labels[i] for i in rows],
            self.num_classes(), reduce_zero_label=cfg["reduce_zero_label"], scale=cfg["seg_scale"],
            divisor=cfg["seg_size_divisor"], mean=cfg["mean"], std=cfg["std"], strict=cfg["strict_data"],
            distributed=distributed)
        metrics = hist.compute()
        if metrics.skipped and self.rank == 0:
            warn_skipped(skipped or ["(on another rank)"], f"unreadable validation pair(s) of {metrics.skipped}")
        columns = {"val_miou": 100 * metrics.miou, "val_aacc": 100 * metrics.aacc, "val_macc": 100 * metrics.macc}
        return columns, columns["val_miou"]

    def finish(self, net, run_dir: Path, count: int = 6) -> None:
        """``predictions.png``: image / ground truth / prediction of the first ``count`` validation images."""
        if self.val_pairs is None or self.rank != 0:
            return
        write_prediction_grid(net, self.val_pairs, self.cfg, run_dir / "predictions.png", count)


def write_prediction_grid(net, pairs, cfg: Mapping[str, Any], path: Path, count: int = 6) -> None:
    """A grid a person can look at: one row per validation image, columns image | ground truth | prediction."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _LOG.info("matplotlib is not installed: %s not written", path)
        return

    num_classes = int(cfg["num_classes"])
    palette = ade20k_palette()
    if num_classes > len(palette):
        palette = np.random.default_rng(0).integers(0, 256, (num_classes, 3), dtype=np.uint8)

    def colour(classes: np.ndarray) -> np.ndarray:
        known = classes != IGNORE_INDEX
        return np.where(known[..., None], palette[np.where(known, classes, 0)], 0).astype(np.uint8)

    net.set_train(False)
    rows = min(count, len(pairs.images))
    fig, axes = plt.subplots(rows, 3, figsize=(6, 2 * rows), squeeze=False)
    for r in range(rows):
        sample = load_sample(pairs.images[r], pairs.labels[r], num_classes, cfg["reduce_zero_label"])
        pred = predict_map(net, sample.image, cfg["seg_scale"], cfg["seg_size_divisor"], cfg["mean"], cfg["std"])
        for c, (img, title) in enumerate(((sample.image, "image"), (colour(sample.label), "ground truth"),
                                          (colour(pred.astype(np.int64)), "prediction"))):
            axes[r][c].imshow(img, interpolation="nearest")
            axes[r][c].set_axis_off()
            if r == 0:
                axes[r][c].set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def _segmentation_train_dataset(cfg: Mapping[str, Any], pairs, n_train: int, epoch: int, rank: int, world: int,
                                num_classes: int):
    """The rank's training batches of one data epoch: (image float32 NCHW, label int32 NHW, 255 ignored)."""
    if n_train < len(pairs.images):  # num_samples: the first n pairs of the sorted listing
        pairs = SegmentationList(pairs.root, pairs.images[:n_train], pairs.labels[:n_train])
    return build_segmentation_train_dataset(
        pairs, batch_size=int(cfg["batch_size"]), crop_size=tuple(int(v) for v in cfg["seg_crop_size"]),
        scale=tuple(int(v) for v in cfg["seg_scale"]), ratio_range=tuple(cfg["seg_ratio_range"]),
        cat_max_ratio=float(cfg["cat_max_ratio"]), flip_prob=float(cfg["hflip"]),
        photometric=bool(cfg["seg_photometric"]), mean=cfg["mean"], std=cfg["std"],
        reduce_zero_label=bool(cfg["reduce_zero_label"]), ignore_index=255, num_classes=num_classes,
        seed=int(cfg["seed"]), rank=rank, world=world, epoch=epoch, num_workers=int(cfg["num_parallel_workers"]),
        shuffle=bool(cfg["shuffle"]), strict=bool(cfg["strict_data"]))


def make_task(cfg: Mapping[str, Any]) -> ClassificationTask | SegmentationTask:
    """The task object of ``cfg.task`` (already resolved from the model by ``load_config``)."""
    if cfg["task"] == "segmentation":
        return SegmentationTask(cfg)
    return ClassificationTask(cfg)
