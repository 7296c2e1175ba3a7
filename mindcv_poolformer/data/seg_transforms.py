"""mmseg 1.2.2's segmentation training transforms, each drawing from an explicit ``np.random.Generator``.

The ADE20K train pipeline of mmseg's ``configs/poolformer`` (after ``LoadAnnotations``):
``RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)``,
``RandomCrop(512, cat_max_ratio=0.75)``, ``RandomFlip(0.5)``, ``PhotoMetricDistortion()``, then
``SegDataPreProcessor``: normalise, pad bottom/right to the crop with 0 (label 255).

Every function here draws its random numbers in the order and from the ranges mmseg draws them
(``numpy.random``), but from the generator passed in, so a sample's augmentation is a function of
its seed alone (no global state, any worker order). Images are HWC uint8 RGB; mmseg works on BGR,
which changes nothing: brightness/contrast are per channel and mmseg's ``bgr2hsv`` of a BGR image
is ``rgb2hsv`` of the RGB one.

Resizing is MindSpore's C++ ``vision.Resize``: ``LINEAR`` equals OpenCV's ``INTER_LINEAR``
(mmcv's ``bilinear``) and ``NEAREST`` equals ``INTER_NEAREST`` (mmcv's label interpolation) with a
max difference of 0 (``tests/test_segmentation_pipeline.py`` measures both), so OpenCV is not a
runtime dependency. The HSV conversion is OpenCV's 8-bit one (H in [0, 180), integer tables for
RGB->HSV, float32 for HSV->RGB) written in numpy for the same reason: MindSpore's ``AdjustHue`` /
``AdjustSaturation`` and PIL use other formulas.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from .ade20k import ADE20K_MEAN, ADE20K_STD, IGNORE_INDEX, rescale_size

__all__ = ["rescale_to", "random_scale", "random_resize", "crop_bbox", "random_crop", "random_flip",
           "rgb_to_hsv", "hsv_to_rgb", "photometric_distortion", "pad_to", "SegTrainTransform"]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    a, b = size
    return int(a), int(b)


@functools.lru_cache(maxsize=512)
def _resize_op(width: int, height: int, nearest: bool) -> Any:
    """One C++ ``Resize`` per output size: building one (argument checks) costs more than a small resize."""
    import mindspore.dataset.vision as vision

    return vision.Resize((height, width), vision.Inter.NEAREST if nearest else vision.Inter.LINEAR)


def _resize(array: np.ndarray, width: int, height: int, nearest: bool) -> np.ndarray:
    if array.shape[:2] == (height, width):
        return array
    return np.ascontiguousarray(_resize_op(width, height, nearest)(array))


def rescale_to(image: np.ndarray, label: np.ndarray, scale: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """mmcv ``Resize(scale, keep_ratio=True)``: ``imrescale`` the image bilinearly and the label nearest."""
    height, width = image.shape[:2]
    new_w, new_h = rescale_size(width, height, scale)
    return _resize(image, new_w, new_h, nearest=False), _resize(label, new_w, new_h, nearest=True)


def random_scale(rng: np.random.Generator, scale: Sequence[int] = (2048, 512),
                 ratio_range: Sequence[float] = (0.5, 2.0)) -> tuple[int, int]:
    """mmcv ``RandomResize._random_sample_ratio``: one uniform ratio for both sides, truncated to int."""
    low, high = float(ratio_range[0]), float(ratio_range[1])
    if not 0 < low <= high:
        raise ValueError(f"ratio_range: {tuple(ratio_range)} must be 0 < low <= high")
    ratio = rng.random() * (high - low) + low
    return int(scale[0] * ratio), int(scale[1] * ratio)


def random_resize(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                  scale: Sequence[int] = (2048, 512), ratio_range: Sequence[float] = (0.5, 2.0)
                  ) -> tuple[np.ndarray, np.ndarray]:
    """mmcv ``RandomResize(scale, ratio_range, keep_ratio=True)``: a random target scale, then ``rescale_to``."""
    return rescale_to(image, label, random_scale(rng, scale, ratio_range))


def crop_bbox(label: np.ndarray, rng: np.random.Generator, crop_size: int | Sequence[int] = (512, 512),
              cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX) -> tuple[int, int, int, int]:
    """mmseg ``RandomCrop.crop_bbox``: ``(y1, y2, x1, x2)``; with ``cat_max_ratio < 1`` up to 10 re-draws.

    A box is kept when its crop holds at least two classes (ignoring ``ignore_index``) and none
    covers ``cat_max_ratio`` or more of the labelled pixels; after 10 rejected boxes mmseg keeps
    the 11th draw unchecked, and so does this.
    """
    crop_h, crop_w = _pair(crop_size)
    margin_h, margin_w = max(label.shape[0] - crop_h, 0), max(label.shape[1] - crop_w, 0)

    def draw() -> tuple[int, int, int, int]:
        y1 = int(rng.integers(0, margin_h + 1))
        x1 = int(rng.integers(0, margin_w + 1))
        return y1, y1 + crop_h, x1, x1 + crop_w

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y1, y2, x1, x2 = box
            crop = label[y1:y2, x1:x2]
            if crop.dtype == np.uint8:  # np.unique's counts, without its sort
                counts = np.bincount(crop.ravel(), minlength=256)
                if 0 <= ignore_index < 256:
                    counts[ignore_index] = 0
                counts = counts[counts > 0]
            else:
                values, counts = np.unique(crop, return_counts=True)
                counts = counts[values != ignore_index]
            if len(counts) > 1 and np.max(counts) / np.sum(counts) < cat_max_ratio:
                break
            box = draw()
    return box


def random_crop(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                crop_size: int | Sequence[int] = (512, 512), cat_max_ratio: float = 0.75,
                ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """mmseg ``RandomCrop(crop_size (h, w), cat_max_ratio)``: one box of image and label (smaller maps stay whole)."""
    y1, y2, x1, x2 = crop_bbox(label, rng, crop_size, cat_max_ratio, ignore_index)
    return image[y1:y2, x1:x2], label[y1:y2, x1:x2]


def random_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, prob: float = 0.5
                ) -> tuple[np.ndarray, np.ndarray]:
    """mmseg ``RandomFlip(prob, direction='horizontal')``: mirror image and label together with probability ``prob``."""
    if rng.random() < prob:
        return image[:, ::-1], label[:, ::-1]
    return image, label


# OpenCV's 8-bit RGB2HSV tables (color_hsv.simd.hpp): 12-bit fixed point, rounded with cvRound
_HSV_SHIFT = 12
_SDIV = np.concatenate([[0], np.rint((255 << _HSV_SHIFT) / np.arange(1, 256, dtype=np.float64))]).astype(np.int32)
_HDIV180 = np.concatenate([[0], np.rint((180 << _HSV_SHIFT) / (6.0 * np.arange(1, 256)))]).astype(np.int32)
# sector -> which of (v, v(1-s), v(1-sh), v(1-s(1-h))) is (b, g, r), as OpenCV's sector_data
_SECTORS = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])
# OpenCV's 8-bit HSV2RGB runs each row in SIMD blocks of 4 float vectors (32 pixels with AVX2, the
# x86 build's widest dispatch for this file) that truncate to uint8, and rounds the row's last
# ``width % 32`` pixels in its scalar loop; mmseg's 512-wide crops are all SIMD.
_CV_SIMD_PIXELS = 32


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """OpenCV ``cvtColor(RGB2HSV)`` of uint8 (mmcv ``bgr2hsv`` of the BGR image): H in [0, 180), S and V in [0, 255]."""
    rgb = image.astype(np.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    diff = v - rgb.min(axis=-1)
    out = np.empty(image.shape, np.uint8)
    out[..., 2] = v
    out[..., 1] = (diff * _SDIV[v] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV180[diff] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
    out[..., 0] = np.where(h < 0, h + 180, h)
    return out


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """OpenCV ``cvtColor(HSV2RGB)`` of uint8 (mmcv ``hsv2bgr``): float32 sectors, back to uint8 as OpenCV does."""
    h = hsv[..., 0].astype(np.float32) * np.float32(6.0 / 180.0)
    s = hsv[..., 1].astype(np.float32) * np.float32(1.0 / 255.0)
    v = hsv[..., 2].astype(np.float32) * np.float32(1.0 / 255.0)
    h = np.fmod(h, np.float32(6.0))
    sector = np.floor(h).astype(np.int64)
    frac = h - sector.astype(np.float32)
    bad = (sector < 0) | (sector >= 6)
    sector, frac = np.where(bad, 0, sector), np.where(bad, np.float32(0), frac)
    one = np.float32(1.0)
    wide = s.astype(np.float64)
    # OpenCV's build contracts ``1 - s * h`` into one FMA (a single rounding): the float64 product is
    # exact, so rounding ``1 - s * h`` once to float32 matches it (0 differences over all 8-bit HSV)
    tab2 = v * (1.0 - wide * frac.astype(np.float64)).astype(np.float32)
    tab3 = v * (1.0 - wide * (one - frac).astype(np.float64)).astype(np.float32)
    tab = np.stack([v, v * (one - s), tab2, tab3], axis=-1)
    bgr = np.take_along_axis(tab, _SECTORS[sector], axis=-1)
    bgr = np.where((s == 0)[..., None], v[..., None], bgr) * np.float32(255.0)
    width = hsv.shape[-2]
    vector = np.arange(width) < (width // _CV_SIMD_PIXELS) * _CV_SIMD_PIXELS
    out = np.where(vector[:, None], np.trunc(bgr), np.rint(bgr))
    return np.clip(out, 0, 255).astype(np.uint8)[..., ::-1].copy()


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion.convert``: float32 ``x * alpha + beta``, clipped, truncated to uint8."""
    out = values.astype(np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(out, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, brightness_delta: int = 32,
                           contrast_range: Sequence[float] = (0.5, 1.5),
                           saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion``: brightness, contrast (first or last), saturation, hue; each with p=0.5.

    Draw order as mmseg's ``transform``: brightness coin (+ delta), the mode coin (1: contrast
    first, 0: contrast last, as mmseg's code does, whose comment says the reverse), saturation coin
    (+ factor), hue coin (+ integer shift in ``[-hue_delta, hue_delta)``, numpy's ``randint``).
    """
    img = image
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = int(rng.integers(2))

    def contrast(x: np.ndarray) -> np.ndarray:
        if rng.integers(2):
            return _convert(x, alpha=rng.uniform(contrast_range[0], contrast_range[1]))
        return x

    if mode == 1:
        img = contrast(img)
    if rng.integers(2):
        hsv = rgb_to_hsv(img)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(saturation_range[0], saturation_range[1]))
        img = hsv_to_rgb(hsv)
    if rng.integers(2):
        hsv = rgb_to_hsv(img)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + int(rng.integers(-hue_delta, hue_delta))) % 180
        img = hsv_to_rgb(hsv)
    if mode == 0:
        img = contrast(img)
    return img


def pad_to(image: np.ndarray, label: np.ndarray, size: int | Sequence[int], pad_val: float = 0,
           seg_pad_val: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """mmseg ``SegDataPreProcessor`` padding: bottom and right up to ``size`` (h, w); larger maps are kept."""
    height, width = _pair(size)
    ph, pw = max(height - image.shape[0], 0), max(width - image.shape[1], 0)
    if ph or pw:
        extra = [(0, 0)] * (image.ndim - 2)
        image = np.pad(image, [(0, ph), (0, pw)] + extra, constant_values=pad_val)
        label = np.pad(label, [(0, ph), (0, pw)], constant_values=seg_pad_val)
    return image, label


class SegTrainTransform:
    """The whole mmseg train pipeline on one decoded sample: HWC uint8 + HW label -> CHW float32 + HW int32."""

    def __init__(self, crop_size: int | Sequence[int] = (512, 512), scale: Sequence[int] = (2048, 512),
                 ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75, flip_prob: float = 0.5,
                 photometric: bool = True, mean: Sequence[float] = ADE20K_MEAN, std: Sequence[float] = ADE20K_STD,
                 ignore_index: int = IGNORE_INDEX) -> None:
        self.crop_size = _pair(crop_size)
        self.scale = _pair(scale)
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip_prob = float(flip_prob)
        self.photometric = bool(photometric)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.ignore_index = int(ignore_index)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        image, label = random_resize(image, label, rng, self.scale, self.ratio_range)
        image, label = random_crop(image, label, rng, self.crop_size, self.cat_max_ratio, self.ignore_index)
        image, label = random_flip(image, label, rng, self.flip_prob)
        if self.photometric:
            image = photometric_distortion(image, rng)
        normed = (image.astype(np.float32) - self.mean) / self.std
        normed, label = pad_to(normed, label, self.crop_size, 0.0, self.ignore_index)
        return np.ascontiguousarray(normed.transpose(2, 0, 1)), np.ascontiguousarray(label, dtype=np.int32)
