"""Training/validation data: the ImageFolder pipeline, the digits demo set, mixup/cutmix.

Reproducibility is designed in rather than hoped for: every epoch's sample order is a permutation
drawn from ``(seed, epoch)`` (the same on every rank, then sharded by rank, so shards stay
disjoint), and every epoch's augmentation RNG is seeded from ``(seed, rank, epoch)``. So ranks
draw different augmentations (MindCV seeds every rank alike) and epoch k+1 after a resume sees
exactly the batches an uninterrupted run would have seen.

Images are decoded inside the pipeline's parallel workers by ``transforms.ImageReader``: an
unreadable file is replaced by the next image of the rank's epoch order (deterministic, and the
epoch keeps its length on every rank) and reported, or with ``strict_data`` stops the run.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError

__all__ = [
    "DataError",
    "augmentation_seed",
    "epoch_order",
    "shard_indices",
    "materialize_digits",
    "prepare_data_dir",
    "SoftTargetMixer",
    "build_train_dataset",
    "TrainData",
]

_LOG = logging.getLogger("mindcv_poolformer")


class DataError(ConfigError):
    """A dataset directory that is missing or unusable; the message names the path."""


def augmentation_seed(seed: int, rank: int, epoch: int) -> int:
    """The dataset RNG seed of one rank in one epoch (distinct per rank and per epoch)."""
    return (int(seed) + 1_000_003 * int(epoch) + 7919 * int(rank)) % (2**31 - 1)


def epoch_order(num_items: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Sample order of one epoch: the same on every rank, reproducible from (seed, epoch) alone."""
    if not shuffle:
        return np.arange(num_items)
    return np.random.default_rng([int(seed), int(epoch), 0x5EED]).permutation(num_items)


def shard_indices(order: np.ndarray, rank: int, world: int, even: bool = True) -> np.ndarray:
    """Rank ``rank``'s strided share of ``order``; ``even`` trims so every rank gets as many items.

    With ``even=False`` every item belongs to exactly one rank (validation counts each sample once).
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    if even:
        order = order[: (len(order) // world) * world]
    return order[rank::world]


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


def prepare_data_dir(cfg: Mapping[str, Any]) -> Path:
    """Check (or, for ``dataset: digits``, create) ``data_dir`` before a run writes anything.

    The training split must have class folders that all hold images, at least as many classes
    as ``num_classes``; the validation split (when ``val_while_train``) likewise, with no class
    the training split lacks. Raises ConfigError naming the path and what is expected.
    """
    from ..evaluate import list_image_folder

    if not cfg["data_dir"]:
        raise DataError("data_dir: no dataset directory given (pass --data_dir DIR, the folder holding "
                        f"{cfg['train_split']}/ and {cfg['val_split']}/)")
    root = Path(cfg["data_dir"])
    if cfg["dataset"] == "digits":
        materialize_digits(root)
    train = list_image_folder(str(root), cfg["train_split"], split_key="train_split")
    num_classes = cfg.get("num_classes")
    if num_classes and num_classes < len(train.classes):
        raise DataError(f"num_classes: {num_classes} is fewer than the {len(train.classes)} class folders of "
                        f"{train.path}; pass --num_classes {len(train.classes)} (or more), or leave it unset")
    if cfg.get("val_while_train", True):
        list_image_folder(str(root), cfg["val_split"], class_names=train.classes, split_key="val_split")
    return root


# ---------------------------------------------------------------------------------------------- mixing


class SoftTargetMixer:
    """Batch op: integer labels -> smoothed one-hot targets, then mixup or cutmix (timm's batch mode).

    With probability ``prob`` a batch is mixed with its reverse; when both alphas are set, cutmix is
    chosen with probability ``switch_prob``. The RNG is owned here and seeded per (seed, rank,
    epoch), so a resumed epoch mixes exactly like the original.
    """

    def __init__(self, num_classes: int, smoothing: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0,
                 prob: float = 1.0, switch_prob: float = 0.5, seed: int = 0) -> None:
        self.num_classes = num_classes
        self.smoothing = smoothing
        self.mixup = mixup
        self.cutmix = cutmix
        self.prob = prob
        self.switch_prob = switch_prob
        self.rng = np.random.default_rng(seed)

    def targets(self, labels: np.ndarray) -> np.ndarray:
        off = self.smoothing / self.num_classes
        out = np.full((len(labels), self.num_classes), off, dtype=np.float32)
        out[np.arange(len(labels)), labels.astype(np.int64)] = 1.0 - self.smoothing + off
        return out

    def _cutmix_box(self, lam: float, height: int, width: int) -> tuple[int, int, int, int]:
        cut = np.sqrt(1.0 - lam)
        ch, cw = int(height * cut), int(width * cut)
        cy, cx = int(self.rng.integers(0, height)), int(self.rng.integers(0, width))
        y0, y1 = np.clip(cy - ch // 2, 0, height), np.clip(cy + ch // 2, 0, height)
        x0, x1 = np.clip(cx - cw // 2, 0, width), np.clip(cx + cw // 2, 0, width)
        return int(y0), int(y1), int(x0), int(x1)

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mix an (N, C, H, W) float batch; return it with (N, num_classes) float32 targets."""
        images = np.asarray(images, dtype=np.float32)
        targets = self.targets(np.asarray(labels))
        if not (self.mixup > 0 or self.cutmix > 0) or self.rng.random() >= self.prob:
            return images, targets
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or self.rng.random() < self.switch_prob)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = float(self.rng.beta(alpha, alpha))
        flipped = images[::-1]
        if use_cutmix:
            y0, y1, x0, x1 = self._cutmix_box(lam, images.shape[2], images.shape[3])
            images = images.copy()
            images[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(images.shape[2] * images.shape[3])
        else:
            images = lam * images + (1.0 - lam) * flipped
        return images.astype(np.float32), (lam * targets + (1.0 - lam) * targets[::-1]).astype(np.float32)


# ---------------------------------------------------------------------------------------------- pipelines


def _transform_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("scale", "ratio", "hflip", "vflip", "color_jitter", "auto_augment", "re_prob", "re_mode", "re_scale",
            "re_ratio", "re_value", "re_max_attempts")
    return {k: cfg[k] for k in keys}


def _transforms(cfg: Mapping[str, Any], is_training: bool) -> list:
    from ..transforms import create_transforms

    kwargs = _transform_kwargs(cfg) if is_training else {}
    return create_transforms(is_training, cfg["image_resize"], cfg["crop_pct"], cfg["interpolation"],
                             cfg["mean"], cfg["std"], decode=False, **kwargs)


@dataclass
class TrainData:
    """One epoch of one rank: the dataset and how many batches it yields."""

    dataset: Any
    num_batches: int


def build_train_dataset(cfg: Mapping[str, Any], epoch: int, rank: int = 0, world: int = 1,
                        num_classes: int | None = None) -> TrainData:
    """The training batches of ``rank`` in ``epoch``: (images float32 NCHW, soft targets float32)."""
    import mindspore.dataset as ds

    from ..evaluate import list_image_folder
    from ..transforms import ImageReader

    images = list_image_folder(str(cfg["data_dir"]), cfg["train_split"], split_key="train_split")
    folder, total = images.path, len(images.files)
    num_classes = num_classes or cfg.get("num_classes") or len(images.classes)
    base = np.arange(total)
    if cfg.get("num_samples"):
        subset = np.random.default_rng([int(cfg["seed"]), 0x5AB5E7]).permutation(total)  # fixed for the run
        base = np.sort(subset[: int(cfg["num_samples"])])
    order = base[epoch_order(len(base), cfg["seed"], epoch, cfg["shuffle"])]
    mine = shard_indices(order, rank, world)
    batch = int(cfg["batch_size"])
    if len(mine) < batch:
        raise DataError(f"{folder}: {len(mine)} images per rank is fewer than batch_size {batch}")
    ds.config.set_seed(augmentation_seed(cfg["seed"], rank, epoch))
    workers = max(1, min(int(cfg["num_parallel_workers"]), os.cpu_count() or 1))  # MindSpore refuses more
    # Random ops in several map workers draw in a nondeterministic order; decoding is not random and
    # stays parallel, so only the augmentation runs in one worker when exact reproducibility is asked.
    reader = ImageReader([images.files[i] for i in mine], images.labels[mine], strict=bool(cfg.get("strict_data")),
                         substitute=True)
    dataset = reader.dataset(workers)
    aug_workers = 1 if cfg.get("deterministic_augment", True) else workers
    dataset = dataset.map(operations=_transforms(cfg, True), input_columns="image", num_parallel_workers=aug_workers)
    off = int(cfg["mixup_off_epoch"])
    mixing = off == 0 or epoch < off
    mixer = SoftTargetMixer(num_classes, float(cfg["label_smoothing"]),
                            float(cfg["mixup"]) if mixing else 0.0, float(cfg["cutmix"]) if mixing else 0.0,
                            float(cfg["cutmix_prob"]), float(cfg["mixup_switch_prob"]),
                            seed=augmentation_seed(cfg["seed"], rank, epoch))

    def mix(images, labels, _info):
        out_images, targets = mixer(np.stack(images), np.stack(labels))
        return out_images, targets

    dataset = dataset.batch(batch, drop_remainder=True, per_batch_map=mix, input_columns=["image", "label"],
                            output_columns=["image", "label"], num_parallel_workers=1)
    return TrainData(dataset, len(mine) // batch)
