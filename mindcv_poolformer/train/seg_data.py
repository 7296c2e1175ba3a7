"""The segmentation training batches the trainer uses until ``data/seg_train.py`` (issue 17's data side) lands.

Same signature and guarantees as that module's ``build_segmentation_train_dataset``: mmseg's ADE20K
train pipeline (``RandomResize`` of ``scale`` by a factor in ``ratio_range`` keeping the aspect
ratio, ``RandomCrop`` with ``cat_max_ratio``, ``RandomFlip``, a photometric distortion, padding
to the crop with 0 / ``ignore_index``), batches of ``(image float32 NCHW, label int32 NHW)``. The
order is ``epoch_order(seed, epoch)`` sharded by rank, and each sample draws from its own generator
keyed by ``(seed, rank, epoch, index)``, so parallel workers and a resumed epoch give the same
batches. Kept small: the photometric step is brightness and contrast only (mmseg's
``PhotoMetricDistortion`` also jitters saturation and hue), and resizes are PIL's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..data.ade20k import SegmentationList, load_sample
from .data import DataError, epoch_order, shard_indices

__all__ = ["build_segmentation_train_dataset", "num_train_batches", "SegmentationCrops"]


def num_train_batches(listing: SegmentationList, batch_size: int, world: int) -> int:
    """Full batches per rank in one epoch (the shards are cut to equal length)."""
    return (len(listing.images) // world) // batch_size


class SegmentationCrops:
    """Random-access source: the augmented crop of item ``i`` of this rank's epoch order."""

    def __init__(self, listing: SegmentationList, rows: np.ndarray, *, crop_size: Sequence[int], scale: Sequence[int],
                 ratio_range: Sequence[float], cat_max_ratio: float, flip_prob: float, photometric: bool,
                 mean: Sequence[float], std: Sequence[float], reduce_zero_label: bool, ignore_index: int,
                 num_classes: int, key: Sequence[int]) -> None:
        self.listing, self.rows = listing, rows
        self.crop = (int(crop_size[0]), int(crop_size[1]))
        self.scale, self.ratio_range = scale, ratio_range
        self.cat_max_ratio, self.flip_prob, self.photometric = cat_max_ratio, flip_prob, photometric
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.reduce_zero_label, self.ignore_index, self.num_classes = reduce_zero_label, ignore_index, num_classes
        self.key = [int(k) for k in key]

    def __len__(self) -> int:
        return len(self.rows)

    def _resize(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple:
        from PIL import Image

        ratio = rng.uniform(*self.ratio_range)
        long_edge, short_edge = max(self.scale) * ratio, min(self.scale) * ratio
        h, w = label.shape
        factor = min(long_edge / max(h, w), short_edge / min(h, w))
        size = (int(w * factor + 0.5), int(h * factor + 0.5))
        if size != (w, h):
            image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
            label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
        return image, label

    def _crop(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple:
        ch, cw = self.crop
        h, w = label.shape

        def box() -> tuple[int, int]:
            return int(rng.integers(0, max(h - ch, 0) + 1)), int(rng.integers(0, max(w - cw, 0) + 1))

        top, left = box()
        if self.cat_max_ratio < 1.0:  # mmseg: up to 10 tries for a crop no class dominates
            for _ in range(10):
                cut = label[top:top + ch, left:left + cw]
                _, counts = np.unique(cut[cut != self.ignore_index], return_counts=True)
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                top, left = box()
        return image[top:top + ch, left:left + cw], label[top:top + ch, left:left + cw]

    def _distort(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = image.astype(np.float32)
        if rng.integers(2):
            out = out + rng.uniform(-32, 32)
        if rng.integers(2):
            out = out * rng.uniform(0.5, 1.5)
        return np.clip(out, 0, 255)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        row = int(self.rows[i])
        rng = np.random.default_rng([*self.key, i])
        sample = load_sample(self.listing.images[row], self.listing.labels[row], self.num_classes,
                             self.reduce_zero_label)
        image, label = self._resize(sample.image, sample.label, rng)
        image, label = self._crop(image, label, rng)
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        image = self._distort(image, rng) if self.photometric else image.astype(np.float32)
        ch, cw = self.crop
        padded = np.zeros((ch, cw, 3), np.float32)  # mmseg pads the normalised image with 0
        padded_label = np.full((ch, cw), self.ignore_index, np.int32)
        padded[:image.shape[0], :image.shape[1]] = (image - self.mean) / self.std
        padded_label[:label.shape[0], :label.shape[1]] = label
        return np.ascontiguousarray(padded.transpose(2, 0, 1)), padded_label


def build_segmentation_train_dataset(listing: SegmentationList, *, batch_size: int, crop_size: Sequence[int],
                                     scale: Sequence[int], ratio_range: Sequence[float], cat_max_ratio: float,
                                     flip_prob: float = 0.5, photometric: bool = True, mean: Sequence[float],
                                     std: Sequence[float], reduce_zero_label: bool = True, ignore_index: int = 255,
                                     num_classes: int, seed: int, rank: int = 0, world: int = 1, epoch: int = 0,
                                     num_workers: int = 2):
    """This rank's batches of ``epoch``: ``(image float32 NCHW, label int32 NHW)``, ordered by (seed, rank, epoch)."""
    import mindspore.dataset as ds

    order = epoch_order(len(listing.images), seed, epoch)
    mine = shard_indices(order, rank, world)
    if len(mine) < batch_size:
        raise DataError(f"{listing.root}: {len(mine)} training images per rank is fewer than batch_size {batch_size}")
    source = SegmentationCrops(listing, mine, crop_size=crop_size, scale=scale, ratio_range=ratio_range,
                               cat_max_ratio=cat_max_ratio, flip_prob=flip_prob, photometric=photometric, mean=mean,
                               std=std, reduce_zero_label=reduce_zero_label, ignore_index=ignore_index,
                               num_classes=num_classes, key=(seed, rank, epoch, 0x5E6))
    # threads, not processes: decoding and resizing release the GIL, and the samples are keyed, not ordered
    dataset = ds.GeneratorDataset(source, ["image", "label"], shuffle=False, num_parallel_workers=max(1, num_workers),
                                  python_multiprocessing=False)
    return dataset.batch(batch_size, drop_remainder=True)
