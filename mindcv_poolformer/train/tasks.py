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
from ..data.ade20k import (
    IGNORE_INDEX,
    SegmentationList,
    SegPreprocess,
    ade20k_palette,
    list_ade20k,
    load_sample,
    warn_skipped,
)
from ..data.listing import shard_indices
from ..data.seg_train import build_segmentation_train_dataset
from ..data.texture_mosaics import ensure_texture_mosaics
from ..distributed import all_reduce_sum, raise_on_every_rank
from ..evaluation.classification import evaluate
from ..evaluation.segmentation import evaluate_segmentation, predict_map
from ..transforms import Preprocess
from .data import (
    DataError,
    SegTrainDataSettings,
    TrainDataSettings,
    build_train_dataset,
    build_val_dataset,
    prepare_data_dir,
)
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
        # listed once: every epoch and validation use it
        self.listing = prepare_data_dir(cfg["data_dir"], cfg["train_split"], cfg["val_split"], dataset=cfg["dataset"],
                                        num_classes=cfg["num_classes"], with_val=cfg["val_while_train"])
        self.eval_data = None

    def num_classes(self) -> int:
        return self.cfg["num_classes"] or len(self.listing.train.classes)

    def num_train(self) -> int:
        n_train = len(self.listing.train.files)
        return min(n_train, int(self.cfg["num_samples"])) if self.cfg["num_samples"] else n_train

    def loss(self):
        return create_loss(self.cfg["loss"])

    def check_data(self, rank: int, world: int) -> None:
        """Nothing to read up front: the listing is checked when made, unreadable images when loaded
        (skipped, or a stop under ``strict_data``)."""

    def prepare_validation(self, rank: int, world: int) -> None:
        if self.cfg["val_while_train"]:
            cfg = self.cfg
            self.eval_data = build_val_dataset(self.listing.val, Preprocess.from_config(cfg), cfg["batch_size"], rank,
                                               world, num_parallel_workers=cfg["num_parallel_workers"],
                                               strict=cfg["strict_data"])  # labels: training classes

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


def _label_top(path: str, reduce_zero_label: bool) -> int | str:
    """The largest class id of one label PNG (-1: only ignored pixels), or why it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            values = np.unique(np.asarray(img))
    except (OSError, ValueError, SyntaxError) as exc:
        return str(exc)
    values = values.astype(np.int64)
    if reduce_zero_label:
        values = np.where(values == 0, 256, values) - 1
        values = values[(values != 254) & (values != 255)]
    else:
        values = values[values != 255]
    return int(values.max()) if values.size else -1


def _label_error(path: str, found: int | str, num_classes: int, reduce_zero_label: bool) -> str:
    """The one-line message for a label PNG that is unreadable (``found`` the reason) or out of range."""
    if isinstance(found, str):
        return f"data: {path} is not a readable PNG ({found})"
    return (f"data: {path} has label value {found + int(reduce_zero_label)} (class {found} after "
            f"reduce_zero_label={reduce_zero_label}), out of range for num_classes {num_classes}; accepted: class ids "
            f"0..{num_classes - 1} and 255 (ignored); pass the dataset's --num_classes")


def _first_bad_label(labels: list[str], num_classes: int, reduce_zero_label: bool,
                     workers: int) -> tuple[int, int | str] | None:
    """(position, largest class or unreadable reason) of the first label in ``labels`` that fails; None if all pass.

    Threads, as PIL releases the GIL while decoding; the reads still queued after the first failure are dropped.
    """
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        for position, found in enumerate(pool.map(lambda p: _label_top(p, reduce_zero_label), labels)):
            if isinstance(found, str) or found >= num_classes:
                return position, found
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return None


# A rank's finding in the all-reduce: its slot of 3 float32 (index + 1 as 12-bit high and low parts, then the code:
# 1 unreadable, 2 + the class out of range). Each slot has one writer, so the float32 sum is exact for any count.
_SLOT = 3
_LOW_BITS = 12


def check_segmentation_labels(labels: list[str], num_classes: int, reduce_zero_label: bool,
                              workers: int = 4, rank: int = 0, world: int = 1) -> None:
    """Decode every label PNG once and refuse a value out of range (or an unreadable file), naming the file.

    Done before the run writes anything: a wrong ``num_classes`` or dataset must not cost a run directory or
    surface hours into training. With ``world`` ranks each decodes its strided share ``labels[rank::world]``
    (8 ranks on ADE20K: 2.7k PNGs each instead of 22k) and the findings are all-reduced, so every rank raises
    the same error, naming the lowest failing index of the whole list, as one process would.
    """
    bad = _first_bad_label(labels[rank::world], num_classes, reduce_zero_label, workers)
    if world == 1:
        if bad is not None:
            raise ConfigError(_label_error(labels[bad[0]], bad[1], num_classes, reduce_zero_label))
        return
    slots = np.zeros((world, _SLOT), np.float32)
    if bad is not None:
        index = rank + bad[0] * world + 1
        code = 1 if isinstance(bad[1], str) else 2 + bad[1]
        slots[rank] = (index >> _LOW_BITS, index & ((1 << _LOW_BITS) - 1), code)
    found = np.rint(all_reduce_sum(slots.reshape(-1))).astype(np.int64).reshape(world, _SLOT)
    indices = (found[:, 0] << _LOW_BITS) + found[:, 1]
    if not indices.any():
        return
    owner = int(np.argmin(np.where(indices > 0, indices, np.iinfo(np.int64).max)))
    path, code = labels[int(indices[owner]) - 1], int(found[owner, 2])
    if code >= 2:
        reason: int | str = code - 2
    elif owner == rank:
        reason = bad[1]
    else:  # the reason text is the owner's; reading the one file again gives the same text here
        reason = _label_top(path, reduce_zero_label)
        if not isinstance(reason, str):
            reason = f"unreadable on rank {owner}, readable on rank {rank}: changed during the check?"
    raise_on_every_rank(ConfigError(_label_error(path, reason, num_classes, reduce_zero_label)))


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
        self.preprocess = SegPreprocess.from_config(cfg)  # validation and the prediction grid
        self.train_settings = SegTrainDataSettings.from_config(cfg)
        self.rank, self.world = 0, 1

    def check_data(self, rank: int, world: int) -> None:
        """Every label PNG of train and val in range (each rank reads its share; all raise the same error).

        The trainer calls it once communication is up and before the run directory exists.
        """
        cfg = self.cfg
        labels = self.train_pairs.labels + (self.val_pairs.labels if self.val_pairs else [])
        check_segmentation_labels(labels, int(cfg["num_classes"]), bool(cfg["reduce_zero_label"]),
                                  int(cfg["num_parallel_workers"]), rank, world)

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
        return _segmentation_train_dataset(self.train_settings, self.train_pairs, self.num_train(), epoch, rank,
                                           world, num_classes)

    def _val_rows(self) -> np.ndarray:
        rows = np.arange(len(self.val_pairs.images))
        return shard_indices(rows, self.rank, self.world, even=False) if self.world > 1 else rows

    def evaluate(self, net, distributed: bool) -> tuple[dict[str, float], float] | None:
        if self.val_pairs is None:
            return None
        cfg, rows = self.cfg, self._val_rows()
        hist, skipped = evaluate_segmentation(
            net, [self.val_pairs.images[i] for i in rows], [self.val_pairs.labels[i] for i in rows],
            self.num_classes(), preprocess=self.preprocess, reduce_zero_label=cfg["reduce_zero_label"],
            strict=cfg["strict_data"], distributed=distributed)
        metrics = hist.compute()
        if metrics.skipped and self.rank == 0:
            warn_skipped(skipped or ["(on another rank)"], f"unreadable validation pair(s) of {metrics.skipped}")
        columns = {"val_miou": 100 * metrics.miou, "val_aacc": 100 * metrics.aacc, "val_macc": 100 * metrics.macc}
        return columns, columns["val_miou"]

    def finish(self, net, run_dir: Path, count: int = 6) -> None:
        """``predictions.png``: image / ground truth / prediction of the first ``count`` validation images."""
        if self.val_pairs is None or self.rank != 0:
            return
        write_prediction_grid(net, self.val_pairs, self.num_classes(), bool(self.cfg["reduce_zero_label"]),
                              self.preprocess, run_dir / "predictions.png", count)


def write_prediction_grid(net, pairs: SegmentationList, num_classes: int, reduce_zero_label: bool,
                          preprocess: SegPreprocess, path: Path, count: int = 6) -> None:
    """A grid a person can look at: one row per validation image, columns image | ground truth | prediction."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _LOG.info("matplotlib is not installed: %s not written", path)
        return

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
        sample = load_sample(pairs.images[r], pairs.labels[r], num_classes, reduce_zero_label)
        pred = predict_map(net, sample.image, preprocess)
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


def _segmentation_train_dataset(s: SegTrainDataSettings, pairs: SegmentationList, n_train: int, epoch: int, rank: int,
                                world: int, num_classes: int):
    """The rank's training batches of one data epoch: (image float32 NCHW, label int32 NHW, 255 ignored)."""
    if n_train < len(pairs.images):  # num_samples: the first n pairs of the sorted listing
        pairs = SegmentationList(pairs.root, pairs.images[:n_train], pairs.labels[:n_train])
    return build_segmentation_train_dataset(
        pairs, batch_size=int(s.batch_size), crop_size=tuple(int(v) for v in s.seg_crop_size),
        scale=tuple(int(v) for v in s.seg_scale), ratio_range=tuple(s.seg_ratio_range),
        cat_max_ratio=float(s.cat_max_ratio), flip_prob=float(s.hflip), photometric=bool(s.seg_photometric),
        mean=s.mean, std=s.std, reduce_zero_label=bool(s.reduce_zero_label), ignore_index=255,
        num_classes=num_classes, seed=int(s.seed), rank=rank, world=world, epoch=epoch,
        num_workers=int(s.num_parallel_workers), shuffle=bool(s.shuffle), strict=bool(s.strict_data))


def make_task(cfg: Mapping[str, Any]) -> ClassificationTask | SegmentationTask:
    """The task object of ``cfg.task`` (already resolved from the model by ``load_config``)."""
    if cfg["task"] == "segmentation":
        return SegmentationTask(cfg)
    return ClassificationTask(cfg)
