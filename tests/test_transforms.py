"""Eval preprocessing equals the reference (HF PoolFormerImageProcessorPil) on real photographs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import mindcv_poolformer  # noqa: F401  (sets the runtime before MindSpore runs anything)
from mindcv_poolformer.config import ConfigError
from mindcv_poolformer.transforms import create_transforms, eval_transform_pil, parse_auto_augment

from conftest import require


def _photos() -> dict[str, Image.Image]:
    """Real photographs of many shapes: square, landscape, portrait, smaller than the crop, gray, RGBA."""
    skdata = require("skimage.data")
    datasets = require("sklearn.datasets")
    china, flower = datasets.load_sample_images().images
    chelsea = skdata.chelsea()
    return {
        "astronaut": Image.fromarray(skdata.astronaut()),  # 512x512
        "coffee": Image.fromarray(skdata.coffee()),  # 600x400
        "rocket": Image.fromarray(skdata.rocket()),  # 640x427: crop offset 147 // 2 (HF) != round (timm)
        "chelsea_portrait": Image.fromarray(np.ascontiguousarray(chelsea.transpose(1, 0, 2))),  # 300x451
        "china": Image.fromarray(china),
        "flower": Image.fromarray(flower),
        "camera_gray": Image.fromarray(skdata.camera()),  # mode L
        "text_small_gray": Image.fromarray(skdata.text()),  # 448x172: upsampled
        "logo_rgba": Image.fromarray(skdata.logo()),  # mode RGBA
        # 1996x940: MindSpore's vision.Resize(235) makes the long side 498, the reference 499.
        "hubble_wide": Image.fromarray(skdata.hubble_deep_field()).resize((1996, 940), Image.BILINEAR),
    }


def _reference(img: Image.Image, crop_pct: float, size: int) -> np.ndarray:
    transformers = require("transformers")
    proc = transformers.PoolFormerImageProcessorPil(size={"shortest_edge": size},
                                                    crop_size={"height": size, "width": size}, crop_pct=crop_pct)
    return proc(img.convert("RGB"), return_tensors="np")["pixel_values"][0]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """An ImageFolder with one class per photo (PNG, plus one JPEG) so labels identify the files."""
    root = tmp_path_factory.mktemp("photos")
    files = {}
    for i, (name, img) in enumerate(sorted(_photos().items())):
        folder = root / f"c{i:02d}_{name}"
        folder.mkdir()
        ext = ".jpg" if name == "coffee" else ".png"
        path = folder / f"{name}{ext}"
        img.save(path, quality=90) if ext == ".jpg" else img.save(path)
        files[i] = path
    return root, files


@pytest.mark.parametrize("crop_pct", [0.9, 0.95])
def test_eval_pipeline_and_single_image_match_reference(photo_folder, crop_pct):
    import mindspore.dataset as ds

    root, files = photo_folder
    size = 224
    dataset = ds.ImageFolderDataset(str(root), shuffle=False, num_parallel_workers=1)
    dataset = dataset.map(create_transforms(False, size, crop_pct), input_columns="image", num_parallel_workers=1)
    seen = set()
    worst_pipe = worst_single = scale = 0.0
    for image, label in dataset.create_tuple_iterator(output_numpy=True):
        label = int(label)
        seen.add(label)
        with Image.open(files[label]) as opened:
            img = opened.convert("RGB")
        ref = _reference(img, crop_pct, size)
        assert image.shape == ref.shape == (3, size, size) and image.dtype == np.float32
        single = eval_transform_pil(Image.open(files[label]), size, crop_pct)
        scale = max(scale, float(np.abs(ref).max()))
        worst_pipe = max(worst_pipe, float(np.abs(image - ref).max()))
        worst_single = max(worst_single, float(np.abs(single - ref).max()))
    assert seen == set(files)
    print(f"crop_pct {crop_pct}: max |pipeline - HF| = {worst_pipe:.2e}, max |single - HF| = {worst_single:.2e}, "
          f"value scale {scale:.2f}")
    # measured: 4.8e-7 for both, one float32 ulp of values in [2, 4) (the normalised scale is ~2.6): 10x,
    # relative to that scale
    assert scale > 2, f"normalised pixels of at most {scale:.2f}: not ImageNet-normalised images"
    assert worst_pipe <= 2e-6 * scale
    assert worst_single <= 2e-6 * scale


def test_reference_resize_is_not_mindspores(photo_folder):
    """Pins why the geometry is our own: MindSpore's Resize(int) rounds the long side differently."""
    from mindspore.dataset import vision

    img = _photos()["hubble_wide"]
    ms_resized = vision.Resize(235, vision.Inter.BICUBIC)(img)
    assert ms_resized.size == (498, 235)  # the reference (HF, torchvision) gives 499
    assert int(235 * 1996 / 940) == 499


def test_parse_auto_augment_forms():
    assert parse_auto_augment("randaug-m9-mstd0.5-inc1") == {"kind": "randaug", "magnitude": 9.0, "num_ops": 2,
                                                              "mstd": 0.5, "inc": 1}
    assert parse_auto_augment("rand-m7-n3")["num_ops"] == 3
    assert parse_auto_augment("autoaug")["kind"] == "autoaug"
    for bad in ("randaug-x9", "rand-m12", "cutout", "rand-w0"):
        with pytest.raises(ConfigError, match="auto_augment"):
            parse_auto_augment(bad)


@pytest.mark.parametrize("interp", ["random", "bicubic"])
def test_training_pipeline_runs(photo_folder, interp):
    import mindspore.dataset as ds

    root, _ = photo_folder
    ops = create_transforms(True, 64, interpolation=interp, auto_augment="randaug-m9-mstd0.5-inc1", re_prob=1.0,
                            re_mode="pixel", vflip=0.5, scale=(0.08, 1.0), ratio=(0.75, 4 / 3))
    dataset = ds.ImageFolderDataset(str(root), shuffle=False, num_parallel_workers=1).map(
        ops, input_columns="image", num_parallel_workers=1)
    shapes = {image.shape for image, _ in dataset.create_tuple_iterator(output_numpy=True)}
    assert shapes == {(3, 64, 64)}
    jitter = create_transforms(True, 64, color_jitter=0.4, re_prob=0.25, re_mode="const")
    assert len(jitter) == 7  # decode, crop, hflip, jitter, normalize, hwc2chw, erasing


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match="interpolation: 'lanczos'"):
        create_transforms(False, 224, 0.9, interpolation="lanczos")
    with pytest.raises(ConfigError, match="crop_pct"):
        eval_transform_pil(Image.new("RGB", (10, 10)), 224, 1.5)
    with pytest.raises(ConfigError, match="color_jitter"):
        create_transforms(True, 64, color_jitter=[0.1, 0.2])
