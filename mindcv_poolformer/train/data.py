"""Training/validation data: the ImageFolder pipeline, the digits demo set, mixup/cutmix.

Reproducibility is designed in rather than hoped for: every epoch's sample order is a permutation
drawn from ``(seed, epoch)`` (the same on every rank, then sharded by rank, so shards stay
disjoint), and every epoch's augmentation RNG is seeded from ``(seed, rank, epoch)``. So ranks
draw different augmentations (MindCV seeds every rank alike) and epoch k+1 after a resume sees
exactly the batches an uninterrupted run would have seen.

The split folders are listed once per process (``prepare_data_dir`` returns the listing); every
epoch's shard and the validation set are cut from it, never from a fresh listing.

Files are read inside the pipeline's parallel workers by ``transforms.ImageReader`` and decoded
by MindSpore's C++ ``RandomCropDecodeResize`` (only the crop's rows of a JPEG), each JPEG checked
once first (the C++ decoder crashes on some damaged headers): a marker scan for baseline JPEGs,
a 1/8-scale PIL decode for the rest (``transforms._decodes_in_cpp``). An unreadable file is
replaced by the next image of the rank's epoch order (deterministic, and the epoch keeps its
length on every rank) and reported, or with ``strict_data`` stops the run.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import settings_from
from ..data.listing import ImageList, augmentation_seed, epoch_order, list_image_folder, shard_indices
from ..errors import ConfigError
from ..transforms import ImageReader, Preprocess, create_transforms

__all__ = [
    "DataError",
    "DataListing",
    "build_val_dataset",
    "materialize_digits",
    "prepare_data_dir",
    "SoftTargetMixer",
    "build_train_dataset",
    "SegTrainDataSettings",
    "TrainData",
    "TrainDataSettings",
]

_LOG = logging.getLogger("mindcv_poolformer")


class DataError(ConfigError):
    """A dataset directory that is missing or unusable; the message names the path."""


# ---------------------------------------------------------------------------------------------- digits


def materialize_digits(root: str | os.PathLike, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write scikit-learn's 1,797 handwritten digits as an ImageFolder (``train/``, ``val/``) under ``root``.

    Real data for an offline demo: 8x8 grey images (values 0-16) upscaled with bicubic resampling
    to ``size`` x ``size`` RGB PNGs, split once by a fixed stratified split. Nothing is written if
    both splits already exist; a partial write never leaves a half-populated folder behind.
    """
    from PIL import Image

    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DataError("dataset 'digits' needs scikit-learn, which is not installed (pip install scikit-learn)") \
            from None

    root = Path(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    labels = digits.target
    idx_train, idx_val = train_test_split(np.arange(len(labels)), test_size=val_fraction, random_state=seed,
                                          stratify=labels)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".digits-", dir=root))
    try:
        for split, indices in (("train", idx_train), ("val", idx_val)):
            for i in indices:
                folder = staging / split / str(int(labels[i]))
                folder.mkdir(parents=True, exist_ok=True)
                img = Image.fromarray(images[i], mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
                img.save(folder / f"{int(i):04d}.png")
        for split in ("train", "val"):
            if not (root / split).exists():
                os.replace(staging / split, root / split)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _LOG.info("wrote the digits dataset (%d train, %d val) to %s", len(idx_train), len(idx_val), root)
    return root


@dataclass
class DataListing:
    """The run's file listing, made once: the training split, the validation split (or None), the root.

    ``verified`` holds one byte per training file: set once ``ImageReader`` has checked that JPEG,
    so later epochs hand it to the C++ decoder unchecked.
    """
    root: Path
    train: ImageList
    val: ImageList | None = None
    verified: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        if len(self.verified) != len(self.train.files):
            self.verified = bytearray(len(self.train.files))


def prepare_data_dir(data_dir: str | os.PathLike | None, train_split: str = "train", val_split: str = "val", *,
                     dataset: str = "imagenet", num_classes: int | None = None, with_val: bool = True) -> DataListing:
    """Check (or, for ``dataset="digits"``, create) ``data_dir`` before a run writes anything; list it once.

    The training split must have class folders that all hold images, at least as many classes
    as ``num_classes``; the validation split (when ``with_val``: the config's ``val_while_train``)
    likewise, with no class the training split lacks. Raises ConfigError naming the path (and the
    config key) and what is expected. The listing returned is the one every epoch and the
    validation set use.
    """
    if not data_dir:
        raise DataError("data_dir: no dataset directory given (pass --data_dir DIR, the folder holding "
                        f"{train_split}/ and {val_split}/)")
    root = Path(data_dir)
    if dataset == "digits":
        materialize_digits(root)
    train = list_image_folder(str(root), train_split, split_key="train_split")
    if num_classes and num_classes < len(train.classes):
        raise DataError(f"num_classes: {num_classes} is fewer than the {len(train.classes)} class folders of "
                        f"{train.path}; pass --num_classes {len(train.classes)} (or more), or leave it unset")
    val = None
    if with_val:
        val = list_image_folder(str(root), val_split, class_names=train.classes, split_key="val_split")
    return DataListing(root, train, val)


# ---------------------------------------------------------------------------------------------- mixing


class SoftTargetMixer:
    """Batch op: integer labels -> smoothed one-hot targets, then mixup or cutmix (timm's batch mode).

    With probability ``prob`` a batch is mixed with its reverse; when both alphas are set, cutmix is
    chosen with probability ``switch_prob``. ``__call__`` draws from the mixer's own generator,
    seeded per (seed, rank, epoch); ``mix_batch`` from one seeded by (that seed, batch number), so
    batches can be mixed in parallel workers and a resumed epoch still mixes exactly like the original.
    """

    def __init__(self, num_classes: int, smoothing: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0,
                 prob: float = 1.0, switch_prob: float = 0.5, seed: int = 0) -> None:
        self.num_classes = num_classes
        self.smoothing = smoothing
        self.mixup = mixup
        self.cutmix = cutmix
        self.prob = prob
        self.switch_prob = switch_prob
        self.seed = int(seed)
        self.rng = np.random.default_rng(seed)

    def targets(self, labels: np.ndarray) -> np.ndarray:
        off = self.smoothing / self.num_classes
        out = np.full((len(labels), self.num_classes), off, dtype=np.float32)
        out[np.arange(len(labels)), labels.astype(np.int64)] = 1.0 - self.smoothing + off
        return out

    @staticmethod
    def _cutmix_box(rng: np.random.Generator, lam: float, height: int, width: int) -> tuple[int, int, int, int]:
        cut = np.sqrt(1.0 - lam)
        ch, cw = int(height * cut), int(width * cut)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        y0, y1 = np.clip(cy - ch // 2, 0, height), np.clip(cy + ch // 2, 0, height)
        x0, x1 = np.clip(cx - cw // 2, 0, width), np.clip(cx + cw // 2, 0, width)
        return int(y0), int(y1), int(x0), int(x1)

    def _mix(self, rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, in_place: bool = False
             ) -> tuple[np.ndarray, np.ndarray]:
        images = np.asarray(images, dtype=np.float32)
        if not (in_place and images.flags.writeable and images.flags.c_contiguous):
            images = images.copy()
        targets = self.targets(np.asarray(labels).reshape(-1))
        if not (self.mixup > 0 or self.cutmix > 0) or rng.random() >= self.prob:
            return images, targets
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = float(rng.beta(alpha, alpha))
        n = len(images)
        if use_cutmix:
            y0, y1, x0, x1 = self._cutmix_box(rng, lam, images.shape[2], images.shape[3])
            box = images[:, :, y0:y1, x0:x1]
            box[...] = box[::-1].copy()
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(images.shape[2] * images.shape[3])
        elif n > 1:
            # image i and image n-1-i swap a share 1 - lam: a' = b + lam (a - b), b' = a - lam (a - b);
            # one pair at a time: two image-sized temporaries, not three batch-sized (77 MB) ones
            delta, scratch = np.empty_like(images[0]), np.empty_like(images[0])
            for i in range(n // 2):
                a, b = images[i], images[n - 1 - i]
                np.subtract(a, b, out=delta)
                delta *= np.float32(lam)
                np.add(b, delta, out=scratch)
                np.subtract(a, delta, out=b)
                a[...] = scratch
        return images, (lam * targets + (1.0 - lam) * targets[::-1]).astype(np.float32)

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mix an (N, C, H, W) float batch; return it with (N, num_classes) float32 targets."""
        return self._mix(self.rng, images, labels)

    def mix_batch(self, images: np.ndarray, labels: np.ndarray, batch_number: int, in_place: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
        """``__call__`` with the draws of batch ``batch_number`` of the epoch (any worker, any order).

        ``in_place``: mix ``images`` where it is (the pipeline's own copy of the batch), not a copy.
        """
        return self._mix(np.random.default_rng([self.seed, int(batch_number), 0x313]), images, labels, in_place)


# ---------------------------------------------------------------------------------------------- pipelines


@dataclass(frozen=True)
class TrainDataSettings:
    """The config keys the training pipeline reads (their meaning: ``config.SCHEMA``), and no others."""
    data_dir: str
    train_split: str
    seed: int
    shuffle: bool
    batch_size: int
    num_parallel_workers: int
    image_resize: int
    interpolation: str
    mean: Sequence[float]
    std: Sequence[float]
    scale: Sequence[float]
    ratio: Sequence[float]
    hflip: float
    vflip: float
    color_jitter: Any
    auto_augment: str | None
    re_prob: float
    re_mode: str
    re_scale: Sequence[float]
    re_ratio: Sequence[float]
    re_value: float
    re_max_attempts: int
    label_smoothing: float
    mixup: float
    cutmix: float
    cutmix_prob: float
    mixup_switch_prob: float
    mixup_off_epoch: int
    num_classes: int | None = None
    num_samples: int | None = None
    strict_data: bool = False
    deterministic_augment: bool = True
    train_interpolation: str | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> TrainDataSettings:
        """The pipeline's keys of a parsed config (``num_classes``, ``num_samples``, ``strict_data``,
        ``deterministic_augment``, ``train_interpolation`` may be absent)."""
        return settings_from(cls, cfg)


@dataclass(frozen=True)
class SegTrainDataSettings:
    """The config keys the segmentation training pipeline reads (``data/seg_train.py``; meaning: ``config.SCHEMA``)."""
    batch_size: int
    seg_crop_size: Sequence[int]
    seg_scale: Sequence[int]
    seg_ratio_range: Sequence[float]
    cat_max_ratio: float
    hflip: float
    seg_photometric: bool
    mean: Sequence[float]
    std: Sequence[float]
    reduce_zero_label: bool
    seed: int
    num_parallel_workers: int
    shuffle: bool
    strict_data: bool

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SegTrainDataSettings:
        """The segmentation pipeline's keys of a parsed config (all required)."""
        return settings_from(cls, cfg)


def _train_transforms(s: TrainDataSettings, fused_decode: bool = False) -> list:
    # crop_pct is an eval setting: the training crop is RandomResizedCrop's. Interpolation is split as in
    # timm's train.py (--train-interpolation, default random; --interpolation serves eval): null = one for both.
    interpolation = s.train_interpolation or s.interpolation
    return create_transforms(True, s.image_resize, interpolation=interpolation, mean=s.mean, std=s.std,
                             decode=fused_decode, fused_decode=fused_decode, scale=s.scale, ratio=s.ratio,
                             hflip=s.hflip, vflip=s.vflip, color_jitter=s.color_jitter, auto_augment=s.auto_augment,
                             re_prob=s.re_prob, re_mode=s.re_mode, re_scale=s.re_scale, re_ratio=s.re_ratio,
                             re_value=s.re_value, re_max_attempts=s.re_max_attempts)


@dataclass
class TrainData:
    """One epoch of one rank: the dataset and how many batches it yields."""
    dataset: Any
    num_batches: int


def _workers(num_parallel_workers: int) -> int:
    return max(1, min(int(num_parallel_workers), os.cpu_count() or 1))  # MindSpore refuses more


def _cores() -> int:
    """The cores this process may run on (a rank bound by msrun/mpirun sees its own share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _map_stages(ops: list, s: TrainDataSettings, workers: int) -> list[list]:
    """The training ops as one map stage, or two (decode + crop + flips | the rest; a stage's random ops keep
    their own draws) where the cores allow twice the workers.

    A map worker runs each image through all of its stage's ops in series, so with fewer workers than
    cores the C++ decode of one image and the Python RandAugment of the previous one overlap only across
    two stages (S12 recipe, 1 worker on 2 cores: 404-412 -> 537-562 img/s, bench/input_pipeline.py). With
    no spare cores the second stage only adds a hand-over (2 workers on 2 cores: 0.95-0.99x), so it is not made.
    """
    cut = 1 + (float(s.hflip) > 0) + (float(s.vflip) > 0)
    if 2 * workers > _cores() or len(ops) <= cut:
        return [ops]
    return [ops[:cut], ops[cut:]]


def build_train_dataset(s: TrainDataSettings, epoch: int, rank: int = 0, world: int = 1,
                        num_classes: int | None = None, listing: DataListing | None = None) -> TrainData:
    """The training batches of ``rank`` in ``epoch``: (images float32 NCHW, soft targets float32).

    ``listing`` is the run's (``prepare_data_dir``); without one the training split is listed here.
    """
    import mindspore.dataset as ds

    if listing is None:
        train = list_image_folder(str(s.data_dir), s.train_split, split_key="train_split")
        listing = DataListing(Path(s.data_dir), train)
    images = listing.train
    folder, total = images.path, len(images.files)
    num_classes = num_classes or s.num_classes or len(images.classes)
    base = np.arange(total)
    if s.num_samples:
        subset = np.random.default_rng([int(s.seed), 0x5AB5E7]).permutation(total)  # fixed for the run
        base = np.sort(subset[: int(s.num_samples)])
    order = base[epoch_order(len(base), s.seed, epoch, s.shuffle)]
    mine = shard_indices(order, rank, world)
    batch = int(s.batch_size)
    if len(mine) < batch:
        raise DataError(f"{folder}: {len(mine)} images per rank is fewer than batch_size {batch}")
    ds.config.set_seed(augmentation_seed(s.seed, rank, epoch))  # C++ ops, and Python's random / np.random
    workers = _workers(s.num_parallel_workers)
    reader = ImageReader([images.files[i] for i in mine], images.labels[mine], strict=bool(s.strict_data),
                         substitute=True, encoded=True, verified=listing.verified, index=mine)
    rows = np.arange(len(mine), dtype=np.int64)
    dataset = ds.NumpySlicesDataset({"image": rows, "row": rows}, shuffle=False)
    dataset = dataset.map(reader, input_columns="image", output_columns=["image", "label"],
                          num_parallel_workers=workers)
    if s.deterministic_augment:
        # Random ops in several map workers draw in a nondeterministic order: decoding is not random
        # and stays parallel, the augmentation runs in one worker.
        from mindspore.dataset import vision

        dataset = dataset.map([vision.Decode()], input_columns="image", num_parallel_workers=workers)
        for stage in _map_stages(_train_transforms(s), s, 1):
            dataset = dataset.map(stage, input_columns="image", num_parallel_workers=1)
    else:
        for stage in _map_stages(_train_transforms(s, fused_decode=True), s, workers):
            dataset = dataset.map(stage, input_columns="image", num_parallel_workers=workers)
    off = int(s.mixup_off_epoch)
    mixing = off == 0 or epoch < off
    mixer = SoftTargetMixer(num_classes, float(s.label_smoothing),
                            float(s.mixup) if mixing else 0.0, float(s.cutmix) if mixing else 0.0,
                            float(s.cutmix_prob), float(s.mixup_switch_prob),
                            seed=augmentation_seed(s.seed, rank, epoch))

    def mix(images: np.ndarray, labels: np.ndarray, batch_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return mixer.mix_batch(images, labels, int(batch_rows[0]) // batch, in_place=True)

    dataset = dataset.batch(batch, drop_remainder=True)  # stacked in C++
    dataset = dataset.map(mix, input_columns=["image", "label", "row"], output_columns=["image", "label"],
                          num_parallel_workers=workers)
    return TrainData(dataset, len(mine) // batch)


def build_val_dataset(images: ImageList, preprocess: Preprocess, batch_size: int, rank: int = 0, world: int = 1, *,
                      num_parallel_workers: int = 1, strict: bool = False) -> Any:
    """The validation batches of ``rank`` from the run's listing, in ``preprocess`` (the eval pipeline of
    ``evaluation.classification.create_eval_dataset``).

    Returns None for an empty shard (more ranks than images). Unreadable images come out with label
    -1, or raise with ``strict`` (the config's ``strict_data``).
    """
    rows = np.arange(len(images.files))
    if world > 1:
        rows = shard_indices(rows, rank, world, even=False)
        if not len(rows):
            return None
    reader = ImageReader([images.files[i] for i in rows], images.labels[rows], strict=bool(strict), substitute=False)
    workers = _workers(num_parallel_workers)
    dataset = reader.dataset(workers).map(preprocess.transforms(decode=False), input_columns="image",
                                          num_parallel_workers=workers)
    return dataset.batch(int(batch_size), drop_remainder=False)
