"""Host-side image kernels for the input pipeline: PIL's affine transform, pixel for pixel, without PIL's cost.

RandAugment's geometric ops (timm: ``Image.transform(AFFINE)`` / ``Image.rotate`` with bilinear or
bicubic) cost 1-2.4 ms per 224x224 crop in Pillow, most of RandAugment's time. ``pil_affine.cc``
does Pillow's arithmetic in Pillow's order (bit-identical) with the per-pixel indirection removed,
on the HWC arrays the pipeline already holds. The data pipeline runs on the host of every device
(Ascend too), so this library is built for the host CPU whatever the device target.

Before first use the library is checked against Pillow on a fixed image and matrices (both filters,
every op kind): any difference (another compiler contracting to FMA, another Pillow) disables it
with one warning, and callers keep Pillow. ``MINDCV_POOLFORMER_IMAGE_KERNELS=0`` disables it too.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from . import _build

__all__ = ["affine_rgb", "image_kernels_enabled", "pil_rotate_matrix"]

_LOG = logging.getLogger("mindcv_poolformer")
SOURCE = Path(__file__).with_name("pil_affine.cc")
# -ffp-contract=off: no fused multiply-add, whose single rounding would differ from Pillow's mul + add
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC")
ENV_SWITCH = "MINDCV_POOLFORMER_IMAGE_KERNELS"
_FILTERS = (Image.BILINEAR, Image.BICUBIC)


def pil_rotate_matrix(angle: float, width: int, height: int) -> tuple[float, ...] | None:
    """The inverse map ``Image.rotate(angle)`` (no expand, centre, translate) passes to ``transform``.

    None where Pillow takes a fast path instead (0, 180 degrees; 90/270 on a square): there it
    copies or transposes pixels, which ``affine_rgb`` does not reproduce.
    """
    angle = angle % 360.0
    if angle == 0 or angle == 180 or (angle in (90, 270) and width == height):
        return None
    cx, cy = width / 2, height / 2
    rad = -math.radians(angle)
    a, b, d, e = round(math.cos(rad), 15), round(math.sin(rad), 15), round(-math.sin(rad), 15), round(math.cos(rad), 15)
    c = a * -cx + b * -cy + 0.0
    f = d * -cx + e * -cy + 0.0
    return (a, b, c + cx, d, e, f + cy)


def _call(library: ctypes.CDLL, image: np.ndarray, matrix: Sequence[float], resample: int,
          fill: Sequence[int]) -> np.ndarray:
    out = np.empty_like(image)
    coeffs = (ctypes.c_double * 6)(*(float(v) for v in matrix))
    colour = (ctypes.c_uint8 * 3)(*(int(v) for v in fill))
    code = library.MindcvAffineRgb(image.ctypes.data_as(ctypes.c_void_p), image.shape[0], image.shape[1], coeffs,
                                   int(resample), colour, out.ctypes.data_as(ctypes.c_void_p))
    if code != 0:
        raise ValueError(f"resample {resample} is not bilinear ({Image.BILINEAR}) or bicubic ({Image.BICUBIC})")
    return out


def _agrees_with_pillow(library: ctypes.CDLL) -> bool:
    """The library on a fixed 37x29 image: every op kind of RandAugment, both filters, equal to Pillow's pixels."""
    rng = np.random.default_rng(0x5EED)
    image = rng.integers(0, 256, (29, 37, 3), dtype=np.uint8)
    image[5:20, 8:30] = np.linspace(0, 255, 22, dtype=np.uint8)[None, :, None]  # smooth ramps next to noise
    pil = Image.fromarray(image)
    fill = (124, 116, 104)
    matrices = [(1, 0.27, 0, 0, 1, 0), (1, 0, 0, -0.3, 1, 0), (1, 0, 37 * 0.41, 0, 1, 0), (1, 0, 0, 0, 1, -29 * 0.4),
                (1, 0, -3.0, 0, 1, 2.0), pil_rotate_matrix(23.5, 37, 29), pil_rotate_matrix(-29.0, 37, 29)]
    for matrix in matrices:
        for resample in _FILTERS:
            want = np.asarray(pil.transform(pil.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill))
            if not np.array_equal(_call(library, image, matrix, resample, fill), want):
                return False
    return True


@cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    path = _build(SOURCE, FLAGS, "RandAugment's geometric ops run in Pillow (the same pixels, slower)")
    if path is None:
        return None
    library = ctypes.CDLL(path)
    library.MindcvAffineRgb.restype = ctypes.c_int
    if not _agrees_with_pillow(library):
        _LOG.warning("the affine image kernel (%s) differs from Pillow %s on its check image: RandAugment's "
                     "geometric ops run in Pillow instead", path, Image.__version__)
        return None
    return library


def image_kernels_enabled() -> bool:
    """Whether ``affine_rgb`` runs the compiled kernel (built, checked against Pillow, not switched off)."""
    return _library() is not None


def affine_rgb(image: np.ndarray, matrix: Sequence[float], resample: int, fill: Sequence[int]) -> np.ndarray | None:
    """``Image.fromarray(image).transform(size, AFFINE, matrix, resample, fillcolor=fill)`` as an HWC array.

    ``image``: C-contiguous HWC uint8 with 3 channels; ``resample``: PIL's BILINEAR or BICUBIC. None
    (nothing done) where the kernel is unavailable or the input is not of that kind: use Pillow then.
    """
    library = _library()
    if library is None or resample not in _FILTERS or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3 or not image.flags.c_contiguous:
        return None
    return _call(library, image, matrix, resample, fill)
