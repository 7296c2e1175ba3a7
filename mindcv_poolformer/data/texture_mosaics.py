"""Texture mosaics: a small real-photo segmentation set in the ADE20K layout, for the offline demo.

The classic texture-segmentation benchmark (Randen & Husøy's mosaics), built from the photos
scikit-image ships: each image is a Voronoi mosaic of 3-6 regions, each region cut from one of 8
source photos (``SOURCES``, in label order). Label PNGs hold ``1 + source index`` (0 is never
used), so ``reduce_zero_label`` gives 8 classes. Training crops come only from the top half of
each photo and validation crops only from the bottom half: no validation pixel is ever seen in
training. Images are PNG (lossless, so a region's pixels are exactly its source's, which the
tests check, and no JPEG ringing crosses region borders). ``mosaics.json`` records every crop.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..config import ConfigError

__all__ = ["SOURCES", "SPLITS", "load_sources", "half_rows", "make_mosaic", "ensure_texture_mosaics"]

SOURCES = ("brick", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "chelsea", "coffee", "rocket")
SPLITS = ("training", "validation")
_PARTS = ("images", "annotations")
MANIFEST = "mosaics.json"


def load_sources() -> list[np.ndarray]:
    """The 8 source photos as HWC uint8 RGB (grey ones repeated to 3 channels), in ``SOURCES`` order."""
    try:
        import skimage.data
    except ImportError:
        raise ConfigError("dataset: texture_mosaics needs scikit-image (pip install scikit-image), which ships "
                          "its source photos") from None
    photos = []
    for name in SOURCES:
        photo = np.asarray(getattr(skimage.data, name)())
        photos.append(np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo[..., :3])
    return photos


def half_rows(height: int, split: str) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a photo that ``split`` crops from: top half for training, bottom for validation."""
    middle = height // 2
    return (0, middle) if split == "training" else (middle, height)


def make_mosaic(photos: list[np.ndarray], rng: np.random.Generator, size: int, split: str
                ) -> tuple[np.ndarray, np.ndarray, list[dict[str, int | str]]]:
    """One mosaic: (HWC uint8 image, HW uint8 label ``1 + source``, the crops ``{source, label, y0, x0}``).

    3-6 seed points give the Voronoi regions (re-drawn until each region covers at least 4% of
    the image, so every region is visible); each region takes a distinct source, cropped at a
    random place inside the split's half of that photo.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    while True:
        k = int(rng.integers(3, 7))
        points = rng.uniform(0, size, (k, 2))
        owner = np.argmin((yy[..., None] - points[:, 0]) ** 2 + (xx[..., None] - points[:, 1]) ** 2, axis=-1)
        if np.bincount(owner.ravel(), minlength=k).min() >= 0.04 * size * size:
            break
    sources = rng.choice(len(photos), size=k, replace=False)
    image = np.zeros((size, size, 3), np.uint8)
    label = np.zeros((size, size), np.uint8)
    crops: list[dict[str, int | str]] = []
    for region, src in enumerate(sources):
        photo = photos[int(src)]
        start, stop = half_rows(photo.shape[0], split)
        y0 = int(rng.integers(start, stop - size + 1))
        x0 = int(rng.integers(0, photo.shape[1] - size + 1))
        mask = owner == region
        image[mask] = photo[y0:y0 + size, x0:x0 + size][mask]
        label[mask] = int(src) + 1
        crops.append({"source": SOURCES[int(src)], "label": int(src) + 1, "y0": y0, "x0": x0})
    return image, label, crops


def _dataset_state(root: Path) -> str:
    """'none' (nothing of a dataset), 'complete' (all four split folders) or a description of what is missing."""
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    wanted = [root / part / split for part in _PARTS for split in SPLITS]
    present = [p for p in wanted if p.is_dir()]
    if not present and not any((root / part).exists() for part in _PARTS):
        return "none"
    if len(present) == len(wanted):
        return "complete"
    missing = ", ".join(str(p.relative_to(root)) for p in wanted if not p.is_dir())
    return f"has no {missing}"


def _write(root: Path, size: int, counts: dict[str, int], seed: int) -> None:
    from PIL import Image

    photos = load_sources()
    for photo, name in zip(photos, SOURCES):
        if photo.shape[0] // 2 < size or photo.shape[1] < size:
            raise ConfigError(f"size: {size} is larger than half of the {name} photo ({photo.shape[1]}x"
                              f"{photo.shape[0]}); accepted: up to {min(p.shape[0] // 2 for p in photos)}")
    manifest: dict[str, object] = {"sources": list(SOURCES), "size": size, "seed": seed, "crops": {}}
    for split_id, split in enumerate(SPLITS):
        rng = np.random.default_rng([int(seed), split_id, 0x7E57])
        for part in _PARTS:
            (root / part / split).mkdir(parents=True)
        crops = {}
        for i in range(counts[split]):
            image, label, regions = make_mosaic(photos, rng, size, split)
            stem = f"mosaic_{split}_{i:05d}"
            Image.fromarray(image).save(root / "images" / split / f"{stem}.png", compress_level=1)
            Image.fromarray(label, mode="L").save(root / "annotations" / split / f"{stem}.png", compress_level=1)
            crops[stem] = regions
        manifest["crops"][split] = crops  # type: ignore[index]
    (root / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")


def ensure_texture_mosaics(data_dir: str | os.PathLike, *, size: int = 64, num_train: int = 1000, num_val: int = 200,
                           seed: int = 0) -> Path:
    """Write the mosaics under ``data_dir`` once and return it; an existing ADE20K-layout dataset is kept as it is.

    A ``data_dir`` holding part of a dataset (e.g. ``images/training`` without its annotations)
    is a one-line ``ConfigError``: it is never completed or overwritten. The set is built in a
    temporary sibling folder and renamed into place, so a killed generation leaves no dataset
    behind (and two ranks generating at once both end with the same complete one).
    """
    root = Path(data_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"data_dir: {root} is a file; texture_mosaics needs a folder (new or empty) to write into")
    state = _dataset_state(root) if root.is_dir() else "none"
    if state == "complete":
        return root
    if state != "none":
        raise ConfigError(f"data_dir: {root} holds a half-written dataset ({state}); delete it to regenerate "
                          "texture_mosaics or complete the ADE20K layout images|annotations/training|validation")
    if size < 8 or num_train < 1 or num_val < 1:
        raise ConfigError(f"texture_mosaics: size {size}, num_train {num_train}, num_val {num_val}; accepted: "
                          "size >= 8 and at least one image per split")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        _write(tmp, int(size), {"training": int(num_train), "validation": int(num_val)}, int(seed))
        if not root.exists() or not any(root.iterdir()):
            try:
                os.replace(tmp, root)  # atomic; replaces an empty folder
            except OSError:
                if _dataset_state(root) != "complete":  # not another rank's finished copy
                    raise
        else:
            # data_dir holds other files: move the parts in, annotations first, so a kill in between
            # leaves annotations without images, which the check above reports as half-written
            for part in ("annotations", "images", MANIFEST):
                os.replace(tmp / part, root / part)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
