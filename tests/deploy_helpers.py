"""Small shared inputs for the validate/export/predict tests: a real-photo ImageFolder and a checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import require

REPO = Path(__file__).resolve().parents[1]
MODEL = "poolformer_s12"
IMAGE_SIZE = 64
NUM_CLASSES = 3
CLASS_NAMES = ("cat", "coffee", "space")


def _crops() -> dict[str, list[Image.Image]]:
    """13 images of 3 classes cut from real photographs, with several sizes and modes (one grayscale)."""
    skdata = require("skimage.data")
    cat, coffee, astro = skdata.chelsea(), skdata.coffee(), skdata.astronaut()
    out: dict[str, list[Image.Image]] = {name: [] for name in CLASS_NAMES}
    for i in range(5):
        out["cat"].append(Image.fromarray(cat[20 * i:220 + 10 * i, 30 * i:300]))
    for i in range(4):
        out["coffee"].append(Image.fromarray(coffee[10 * i:300, 40 * i:260 + 30 * i]))
    for i in range(4):
        out["space"].append(Image.fromarray(astro[30 * i:400 - 20 * i, 50 * i:350]))
    out["space"][3] = out["space"][3].convert("L")
    return out


def make_image_folder(root: Path) -> Path:
    """``root/val/<class>/*.png|jpg`` with 13 images (not a multiple of the test batch size 4)."""
    if (root / "val").is_dir():
        return root
    for cls, images in _crops().items():
        folder = root / "val" / cls
        folder.mkdir(parents=True)
        for j, img in enumerate(images):
            if j % 2:
                img.save(folder / f"{cls}_{j}.jpg", quality=92)
            else:
                img.save(folder / f"{cls}_{j}.png")
    return root


def make_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random PoolFormer-S12 (3 classes) whose blocks matter: LayerScales 0.5 instead of 1e-5."""
    if path.exists():
        return path
    import mindspore as ms

    import mindcv_poolformer as mp

    ms.set_seed(seed)
    net = mp.create_model(MODEL, num_classes=NUM_CLASSES)
    rng = np.random.default_rng(seed)
    for name, param in net.parameters_and_names():
        if "layer_scale" in name:
            param.set_data(ms.Tensor(np.full(param.shape, 0.5, np.float32)))
        elif name.startswith("head."):
            param.set_data(ms.Tensor(rng.normal(0, 0.5, param.shape).astype(np.float32)))
    ms.save_checkpoint(net, str(path), format="safetensors" if path.suffix == ".safetensors" else "ckpt")
    return path


@pytest.fixture(scope="session")
def deploy_assets(tmp_path_factory) -> dict[str, Path]:
    """The shared folder and checkpoint, built once per session."""
    base = tmp_path_factory.getbasetemp() / "deploy_assets"
    base.mkdir(exist_ok=True)
    data = make_image_folder(base / "data")
    ckpt = make_checkpoint(base / "s12_tiny.safetensors")
    labels = base / "labels.txt"
    labels.write_text("\n".join(CLASS_NAMES) + "\n")
    return {"data": data, "ckpt": ckpt, "labels": labels, "base": base}


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a script or module as a user would, from the repository root."""
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
