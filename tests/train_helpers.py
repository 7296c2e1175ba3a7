"""Shared pieces of the training tests: a tiny real ImageFolder and small configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# GRAPH_MODE (the default of every recipe); TRAIN_TEST_MODE=1 runs the training tests in PYNATIVE_MODE.
TEST_MODE = int(os.environ.get("TRAIN_TEST_MODE", "0"))


def make_tiny_folder(root: Path, per_class_train: int = 4, per_class_val: int = 2, size: int = 32) -> Path:
    """A 10-class ImageFolder of real digits (scikit-learn), ``per_class_*`` images per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    counts: dict[tuple[str, int], int] = {}
    for i, label in enumerate(int(v) for v in digits.target):
        for split, limit in (("train", per_class_train), ("val", per_class_val)):
            if counts.get((split, label), 0) < limit:
                folder = root / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                img = Image.fromarray(images[i], mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
                img.save(folder / f"{i:04d}.png")
                counts[(split, label)] = counts.get((split, label), 0) + 1
                break
    return root


def tiny_overrides(data_dir: Path, run_dir: Path, **extra) -> dict:
    """A small deterministic CPU training config (no random crop/flip/mixup, no drop path)."""
    cfg = {
        "mode": TEST_MODE, "device_target": "CPU", "dataset": "imagenet", "data_dir": str(data_dir),
        "num_parallel_workers": 1, "image_resize": 32, "crop_pct": 1.0, "scale": [1.0, 1.0], "ratio": [1.0, 1.0],
        "hflip": 0.0, "interpolation": "bilinear", "model": "poolformer_s12", "num_classes": 10,
        "drop_path_rate": 0.0, "batch_size": 8, "lr": 2e-3, "warmup_epochs": 0, "epoch_size": 2, "min_lr": 1e-5,
        "weight_decay": 0.05, "ckpt_save_dir": str(run_dir), "log_interval": 1, "val_while_train": False,
        "keep_checkpoint_max": 3,
    }
    cfg.update(extra)
    return cfg


def run_python(args: list[str], env: dict | None = None, timeout: int = 300, cwd: Path | None = None
               ) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(REPO), GLOG_v="3")
    full_env.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=cwd or REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
