"""Shared pieces of the segmentation training tests: a tiny learnable ADE20K-layout folder and a small config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from train_helpers import TEST_MODE

# per-class RGB means: the classes differ in colour, so a few dozen steps separate them
COLOURS = np.array([[200, 40, 40], [40, 180, 60], [50, 60, 210]], np.float32)


def _pair(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An image of 2-4 axis-aligned class regions (colour + noise) and its label PNG (ids 1..3; 0 on a border)."""
    label = np.full((size, size), rng.integers(1, 4), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        y0, x0 = rng.integers(0, size - 8, 2)
        h, w = rng.integers(8, size // 2 + 1, 2)
        label[y0:y0 + h, x0:x0 + w] = rng.integers(1, 4)
    image = COLOURS[label - 1] + rng.normal(0, 25, (size, size, 3))
    label[0, :] = 0  # "other": ignored after reduce_zero_label
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_tiny_ade(root: Path, n_train: int = 16, n_val: int = 4, size: int = 32, seed: int = 0) -> Path:
    """``root`` in the ADE20K layout (images/*.jpg, annotations/*.png as ``load_sample`` reads them), 3 classes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, label = _pair(rng, size)
            stem = f"ADE_{split[:5]}_{i:08d}"
            Image.fromarray(image).save(root / "images" / split / f"{stem}.jpg", quality=95)
            Image.fromarray(label).save(root / "annotations" / split / f"{stem}.png")
    return root


def seg_overrides(data_dir: Path, run_dir: Path, **extra) -> dict:
    """A small deterministic CPU segmentation run: FPN S12 on 32x32 crops, 3 classes, iteration-based."""
    cfg = {
        "mode": TEST_MODE, "device_target": "CPU", "model": "fpn_poolformer_s12", "dataset": "ade20k",
        "data_dir": str(data_dir), "train_split": "training", "val_split": "validation", "num_classes": 3,
        "num_parallel_workers": 1, "seg_crop_size": [32, 32], "seg_scale": [128, 32], "seg_ratio_range": [1.0, 1.0],
        "seg_size_divisor": 32, "seg_photometric": False, "hflip": 0.0, "batch_size": 4, "opt": "adamw",
        "lr": 2e-3, "weight_decay": 1e-4, "weight_decay_filter": "disable", "scheduler": "poly", "min_lr": 0.0,
        "warmup_epochs": 0, "max_iters": 8, "val_interval": 4, "ckpt_save_interval": 4, "ckpt_save_dir": str(run_dir),
        "log_interval": 1, "keep_checkpoint_max": 5, "drop_path_rate": 0.0,
    }
    cfg.update(extra)
    return cfg
