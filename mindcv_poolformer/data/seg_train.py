"""The segmentation training batches: mmseg's train pipeline over an ADE20K-layout listing, one rank, one epoch.

Order and augmentation depend only on ``(seed, rank, epoch)``: the epoch's order is
``train.data.epoch_order`` (the same on every rank) cut by ``shard_indices``, and sample ``i`` of
a rank's epoch draws all its augmentation from ``np.random.default_rng([augmentation_seed(seed,
rank, epoch), i])``. No draw depends on another sample or on MindSpore's unrestorable kernel RNG,
so map workers may run in any order and a resumed run sees the same batches.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..config import ConfigError
from .ade20k import ADE20K_MEAN, ADE20K_STD, IGNORE_INDEX, CorruptFileError, SegmentationList, load_sample
from .seg_transforms import SegTrainTransform

__all__ = ["SegTrainSource", "build_segmentation_train_dataset", "num_train_batches"]


def num_train_batches(listing: SegmentationList, batch_size: int, world: int = 1) -> int:
    """Batches per rank and epoch (every rank gets as many samples; the remainder batch is dropped)."""
    return (len(listing.images) // int(world)) // int(batch_size)


class SegTrainSource:
    """Random-access source of one rank's epoch: sample ``i`` -> (CHW float32 image, HW int32 label).

    A file that does not decode is a ``CorruptFileError`` (raised with ``strict``); otherwise it is
    replaced by the next pair of the listing that decodes, with one stderr warning (so a batch
    stays full and every rank keeps the same number of steps). Any other problem (sizes differ, a
    label value out of range) is a ``ConfigError``, as ``load_sample`` says.
    """

    def __init__(self, listing: SegmentationList, rows: np.ndarray, transform: SegTrainTransform, num_classes: int,
                 reduce_zero_label: bool, seed: int, strict: bool = True) -> None:
        self.listing, self.rows, self.transform = listing, np.asarray(rows, np.int64), transform
        self.num_classes, self.reduce_zero_label = int(num_classes), bool(reduce_zero_label)
        self.seed, self.strict = int(seed), bool(strict)
        self._warned = False

    def __len__(self) -> int:
        return len(self.rows)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        total = len(self.listing.images)
        for step in range(total):
            k = (index + step) % total
            try:
                sample = load_sample(self.listing.images[k], self.listing.labels[k], self.num_classes,
                                     self.reduce_zero_label)
                return sample.image, sample.label
            except CorruptFileError as exc:
                if self.strict:
                    raise
                if not self._warned:
                    self._warned = True
                    print(f"warning: {exc}; replaced by the next readable pair (--strict_data True makes this "
                          "an error)", file=sys.stderr)
        raise CorruptFileError(f"data: none of the {total} pairs under {self.listing.root} decodes")

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = self._load(int(self.rows[i]))
        return self.transform(image, label, np.random.default_rng([self.seed, int(i)]))


def build_segmentation_train_dataset(listing: SegmentationList, *, batch_size: int, crop_size: int | Sequence[int],
                                     scale: Sequence[int], ratio_range: Sequence[float], cat_max_ratio: float,
                                     flip_prob: float = 0.5, photometric: bool = True,
                                     mean: Sequence[float] = ADE20K_MEAN, std: Sequence[float] = ADE20K_STD,
                                     reduce_zero_label: bool = True, ignore_index: int = IGNORE_INDEX,
                                     num_classes: int, seed: int, rank: int = 0, world: int = 1, epoch: int = 0,
                                     num_workers: int = 2, shuffle: bool = True, strict: bool = True) -> Any:
    """Rank ``rank``'s batches of ``epoch``: (image float32 N,3,H,W normalised, label int32 N,H,W; 255 ignored).

    ``drop_remainder`` batches of a strided share of the epoch's order (``shard_indices`` trims it
    so every rank runs as many steps). A rank with fewer samples than ``batch_size`` is an error.
    """
    import mindspore.dataset as ds

    # imported here: ``train/__init__`` imports the trainer, which imports this module
    from ..train.data import augmentation_seed, epoch_order, shard_indices

    order = epoch_order(len(listing.images), seed, epoch, shuffle)
    mine = shard_indices(order, rank, world)
    if len(mine) < int(batch_size):
        raise ConfigError(f"batch_size: {batch_size} is more than the {len(mine)} training images per rank under "
                          f"{listing.root} ({world} rank(s)); accepted: at most {len(mine)}")
    transform = SegTrainTransform(crop_size, scale, ratio_range, cat_max_ratio, flip_prob, photometric, mean, std,
                                  ignore_index)
    source = SegTrainSource(listing, mine, transform, num_classes, reduce_zero_label,
                            augmentation_seed(seed, rank, epoch), strict)
    # Python threads, not processes: each sample is a few numpy/C++ calls that release the GIL, and
    # worker processes would copy the listing and double the memory on a small host.
    dataset = ds.GeneratorDataset(source, column_names=["image", "label"], shuffle=False,
                                  num_parallel_workers=max(1, int(num_workers)), python_multiprocessing=False)
    return dataset.batch(int(batch_size), drop_remainder=True)
