"""Image lists and the sample order: what every rank reads, in which order, from one listing.

ImageFolder listing (``root/split/<class>/<image>``, checked once with errors naming the path), the
epoch order that every rank shares (a function of (seed, epoch) only), each rank's strided shard and
its augmentation seed. Training, validation and export read folders through these, so a run lists
its data once and a resumed run sees the same batches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

__all__ = ["IMAGE_EXTENSIONS", "ImageList", "augmentation_seed", "epoch_order", "list_image_folder",
           "scan_image_folder", "shard_indices"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


@dataclass(frozen=True)
class ImageList:
    """The images of one ImageFolder split: ``files[i]`` has label ``labels[i]``, an index into ``classes``."""
    path: str
    classes: list[str]
    files: list[str]
    labels: np.ndarray


def list_image_folder(root: str, split: str = "", class_names: Sequence[str] | None = None,
                      split_key: str = "data_dir") -> ImageList:
    """List ``root/split/<class>/<image>`` (classes and files sorted by name), checking it is usable.

    Raises ConfigError naming what is wrong: no ``root``, no ``split`` folder (``split_key`` is the
    config key that chose it), no class folders, a class folder without images, or, with
    ``class_names`` (the training classes, which also fix the labels), a class the model lacks.
    """
    if not root:
        raise ConfigError("data_dir: no dataset directory given (pass --data_dir DIR, the folder holding train/ and "
                          "val/)")
    if not os.path.exists(root):
        raise ConfigError(f"data_dir: {root} does not exist")
    if not os.path.isdir(root):
        raise ConfigError(f"data_dir: {root} is not a directory")
    path = os.path.join(root, split) if split else root
    if not os.path.isdir(path):
        found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        holds = f"it holds the folders {', '.join(found)}" if found else "it has no sub-folders"
        raise ConfigError(f"{split_key}: {path} does not exist ({holds}; expected {path}/<class>/<image>)")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise ConfigError(f"data_dir: {path} has no class folders (expected {path}/<class>/<image>)")
    index = {c: i for i, c in enumerate(class_names if class_names is not None else classes)}
    unknown = [c for c in classes if c not in index]
    if unknown:
        raise ConfigError(f"data_dir: {path} has {len(unknown)} class folder(s) that the training split lacks "
                          f"({', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}); the model has no output "
                          "for them")
    files: list[str] = []
    labels: list[int] = []
    for cls in classes:
        folder = os.path.join(path, cls)
        with os.scandir(folder) as entries:
            names = sorted(e.name for e in entries
                           if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file())
        if not names:
            raise ConfigError(f"data_dir: class folder {folder} has no images ({' '.join(IMAGE_EXTENSIONS)}); "
                              "add images or remove the folder")
        files += [os.path.join(folder, name) for name in names]
        labels += [index[cls]] * len(names)
    return ImageList(path, list(index), files, np.asarray(labels, dtype=np.int32))


def scan_image_folder(root: str, split: str = "", split_key: str = "data_dir") -> tuple[str, list[str], int]:
    """Check an ImageFolder (see ``list_image_folder``); return its path, class names and image count."""
    images = list_image_folder(root, split, split_key=split_key)
    return images.path, images.classes, len(images.files)


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
