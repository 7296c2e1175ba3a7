"""The affine image kernel (``kernels/pil_affine.cc``) against Pillow itself, the reference timm's RandAugment uses.

The kernel is checked here directly, not through ``affine_rgb``: that one refuses a library which
differs from Pillow on its check image and falls back to Pillow, which would hide a broken kernel
from the RandAugment tests. So this file also pins that the library is in use on a host with a
compiler, and that the start-up check refuses a kernel that is off by one pixel value.
"""

from __future__ import annotations

import ctypes
import logging
import random

import numpy as np
import pytest
from PIL import Image

from mindcv_poolformer.kernels import image as image_kernels

from conftest import in_ci, require

FILL = (124, 116, 104)


@pytest.fixture(scope="module")
def library() -> ctypes.CDLL:
    """The kernel library as built from the source, without the start-up check."""
    path = image_kernels._build(image_kernels.SOURCE, image_kernels.FLAGS, "test")
    if path is None:
        message = "the image kernel did not build (no working C++ compiler: install g++)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return ctypes.CDLL(path)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Real photos at odd, non-square sizes (edges and rounding differ from a 224x224 crop)."""
    data = require("skimage.data")
    sizes = [(224, 224), (131, 97), (97, 163), (250, 201)]
    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    return [Image.fromarray(src).convert("RGB").resize(size, Image.BICUBIC) for src, size in zip(sources, sizes)]


def _cases(seed: int, count: int) -> list[tuple[str, float]]:
    rng = random.Random(seed)
    kinds = ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "Rotate")
    values = {"ShearX": 0.3, "ShearY": 0.3, "TranslateXRel": 0.45, "TranslateYRel": 0.45, "Rotate": 30.0}
    cases = [(kind, rng.uniform(-1, 1) * values[kind]) for _ in range(count) for kind in kinds]
    return cases + [("ShearX", 0.0), ("TranslateXRel", 0.5), ("Rotate", 90.0 + 1e-9), ("TranslateYRel", -1.2)]


def test_kernel_equals_pillow_on_photos(library, photos):
    """Every RandAugment geometric op at random magnitudes, both filters, 4 photo sizes: Pillow's pixels."""
    bad = []
    for img in photos:
        array = np.ascontiguousarray(np.asarray(img))
        width, height = img.size
        for kind, value in _cases(width, 6):
            if kind == "Rotate":
                matrix = image_kernels.pil_rotate_matrix(value, width, height)
            else:
                scale = {"TranslateXRel": width, "TranslateYRel": height}.get(kind, 1)
                matrix = {"ShearX": (1, value, 0, 0, 1, 0), "ShearY": (1, 0, 0, value, 1, 0),
                          "TranslateXRel": (1, 0, value * scale, 0, 1, 0),
                          "TranslateYRel": (1, 0, 0, 0, 1, value * scale)}[kind]
            for resample in (Image.BILINEAR, Image.BICUBIC):
                if kind == "Rotate":
                    want = img.rotate(value, resample=resample, fillcolor=FILL)
                else:
                    want = img.transform(img.size, Image.AFFINE, matrix, resample=resample, fillcolor=FILL)
                got = image_kernels._call(library, array, matrix, resample, FILL)
                if not np.array_equal(got, np.asarray(want)):
                    bad.append((img.size, kind, value, resample))
    assert bad == []


def test_rotate_matrix_is_pillows_and_fast_paths_are_left_to_it():
    assert image_kernels.pil_rotate_matrix(0.0, 10, 8) is None
    assert image_kernels.pil_rotate_matrix(-180.0, 10, 8) is None
    assert image_kernels.pil_rotate_matrix(90.0, 8, 8) is None
    assert image_kernels.pil_rotate_matrix(90.0, 10, 8) is not None  # not square: Pillow transforms


def test_the_library_is_in_use_where_it_builds(library):
    """With a compiler the pipeline uses the kernel; a wrong kernel would have been refused at start-up."""
    image_kernels._library.cache_clear()
    try:
        assert image_kernels.image_kernels_enabled()
        array = np.zeros((5, 6, 3), np.uint8)
        assert image_kernels.affine_rgb(array, (1, 0, 0, 0, 1, 0), Image.BICUBIC, FILL) is not None
        assert image_kernels.affine_rgb(array[:, :, :2].copy(), (1, 0, 0, 0, 1, 0), Image.BICUBIC, FILL) is None
        assert image_kernels.affine_rgb(array[:, ::-1], (1, 0, 0, 0, 1, 0), Image.BICUBIC, FILL) is None
        assert image_kernels.affine_rgb(array, (1, 0, 0, 0, 1, 0), Image.NEAREST, FILL) is None
    finally:
        image_kernels._library.cache_clear()


def test_a_kernel_that_differs_from_pillow_is_refused(library, monkeypatch, caplog):
    """The start-up check has teeth: one pixel value off and the library is not used (Pillow runs)."""
    exact = image_kernels._call

    def off_by_one(*args):
        out = exact(*args)
        out[3, 4, 1] ^= 1
        return out

    monkeypatch.setattr(image_kernels, "_call", off_by_one)
    image_kernels._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="mindcv_poolformer"):
            assert not image_kernels.image_kernels_enabled()
        assert "differs from Pillow" in caplog.text
        assert image_kernels.affine_rgb(np.zeros((5, 6, 3), np.uint8), (1, 0, 0, 0, 1, 0), Image.BICUBIC,
                                        FILL) is None
    finally:
        image_kernels._library.cache_clear()


def test_switched_off_randaugment_gives_the_same_images(monkeypatch, photos):
    """``MINDCV_POOLFORMER_IMAGE_KERNELS=0``: Pillow for every op, and the same images as with the kernel."""
    from mindcv_poolformer.transforms import RandAugment

    ra = RandAugment(9, 2, 0.5, increasing=True, fill=FILL, transforms=("ShearX", "TranslateYRel", "Rotate"))
    arrays = [np.ascontiguousarray(np.asarray(img)) for img in photos]

    def run() -> list[np.ndarray]:
        out = []
        for seed in range(24):
            random.seed(seed)
            np.random.seed(seed)
            out.append(np.asarray(ra(arrays[seed % len(arrays)])))
        return out

    image_kernels._library.cache_clear()
    try:
        with_kernel = run()
        monkeypatch.setenv(image_kernels.ENV_SWITCH, "0")
        image_kernels._library.cache_clear()
        assert not image_kernels.image_kernels_enabled()
        assert all(np.array_equal(a, b) for a, b in zip(with_kernel, run()))
        assert sum(not np.array_equal(a, arrays[k % len(arrays)]) for k, a in enumerate(with_kernel)) >= 12
    finally:
        image_kernels._library.cache_clear()
