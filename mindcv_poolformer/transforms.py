"""Image transforms: one factory for the training and evaluation pipelines, plus a single-image eval.

Evaluation reproduces the reference (timm / HF ``PoolFormerImageProcessorPil``) pixel for pixel:
PIL resize of the short side to ``int(image_size / crop_pct)`` with the long side
``int(new_short * long / short)``, center crop with offsets ``(size - crop) // 2``, then
``(x - mean) / std`` on the 0-255 scale and HWC -> CHW. MindSpore's own ``vision.Resize(int)``
rounds the long side as ``int(size / (w / h))`` (off by one pixel for some aspect ratios, e.g. a
1996x940 image at 235) and ``vision.CenterCrop`` rounds its offset half-to-even, so the geometric
part is done here with PIL directly; normalisation and layout use MindSpore's C++ ops.

Note: torchvision's ``CenterCrop`` (timm's pipeline) uses ``round((size - crop) / 2)``, HF uses
floor; they differ by one pixel when ``size - crop`` is 3 mod 4. We follow HF, as the reference.

Training follows the official recipe with MindSpore ops: RandomResizedCrop (``interpolation='random'``
picks bilinear or bicubic per image, like timm), flips, RandAugment or colour jitter (colour jitter
only when no auto-augment is set, as in timm), normalisation, HWC -> CHW, random erasing.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .config import ConfigError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CorruptImageError",
    "ImageReader",
    "ResizeCenterCrop",
    "create_transforms",
    "eval_resize_size",
    "eval_transform_pil",
    "parse_auto_augment",
    "read_rgb",
    "resize_center_crop",
    "unreadable_images",
]

_LOG = logging.getLogger("mindcv_poolformer")

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# 'area' has no PIL name: PIL's BOX filter is the area-average resampler.
_PIL_INTERP = {
    "bicubic": Image.BICUBIC,
    "bilinear": Image.BILINEAR,
    "nearest": Image.NEAREST,
    "area": Image.BOX,
    "random": Image.BICUBIC,  # random interpolation is a training augmentation; eval uses bicubic (timm too)
}


def _check_interpolation(interpolation: str) -> str:
    key = str(interpolation).lower()
    if key not in _PIL_INTERP:
        raise ConfigError(f"interpolation: {interpolation!r} is not one of {', '.join(_PIL_INTERP)}")
    return key


def eval_resize_size(image_size: int, crop_pct: float) -> int:
    """Short side before the center crop: ``int(image_size / crop_pct)`` (248 for S, 235 for M at 224)."""
    if not 0 < crop_pct <= 1:
        raise ConfigError(f"crop_pct: {crop_pct!r} is out of range (must be in (0, 1])")
    return int(image_size / crop_pct)


def resize_center_crop(img: Image.Image, image_size: int, crop_pct: float, interpolation: str = "bicubic"
                       ) -> Image.Image:
    """Resize the short side to ``int(image_size / crop_pct)`` keeping the aspect ratio, then center crop.

    Rounding follows HF/torchvision: long side ``int(short_new * long / short)``, crop offset
    ``(size - crop) // 2``.
    """
    resample = _PIL_INTERP[_check_interpolation(interpolation)]
    short_new = eval_resize_size(image_size, crop_pct)
    width, height = img.size
    if width <= height:
        new_w, new_h = short_new, int(short_new * height / width)
    else:
        new_w, new_h = int(short_new * width / height), short_new
    img = img.resize((new_w, new_h), resample)
    top = (new_h - image_size) // 2
    left = (new_w - image_size) // 2
    return img.crop((left, top, left + image_size, top + image_size))


class CorruptImageError(ConfigError):
    """An image file of the dataset that cannot be decoded, with ``strict_data`` on; the message names the file."""


def read_rgb(path: str) -> np.ndarray:
    """Decode an image file with PIL into an HWC uint8 RGB array (any mode: grey, palette, RGBA, CMYK).

    PIL is what the eval reference uses, and it raises on truncated files instead of padding them.
    """
    with Image.open(path) as img:
        return np.array(img.convert("RGB"))  # an owned copy: MindSpore takes it ~1.5x faster than a PIL view


# Unreadable files met by this process (path -> reason), so each is reported once and not re-decoded every epoch.
_UNREADABLE: dict[str, str] = {}
_UNREADABLE_LOCK = threading.Lock()
# More consecutive unreadable training images than this means a broken dataset, not a few bad files.
MAX_CONSECUTIVE_UNREADABLE = 64


def unreadable_images() -> dict[str, str]:
    """The unreadable image files this process has skipped so far, with the reason for each."""
    with _UNREADABLE_LOCK:
        return dict(_UNREADABLE)


class ImageReader:
    """Dataset op ``row -> (HWC uint8 RGB image, label)`` that decodes ``files[row]``, guarded.

    Decoding happens here, inside the parallel map workers, instead of up front: one corrupt JPEG
    among ImageNet's 1.28M must neither cost a pre-pass over the data nor stop a 30-hour run with a
    pipeline traceback. An unreadable file is, with ``strict``, a ``CorruptImageError`` naming it;
    otherwise it is reported once (with the running count) and

    - ``substitute=True`` (training): replaced by the next readable row (wrapping around), so every
      rank keeps its number of steps and the substitute depends only on the row order, which is a
      function of (seed, rank, epoch): a resumed epoch is the same;
    - ``substitute=False`` (evaluation): replaced by a blank placeholder with label -1, which
      ``evaluate`` leaves out of every metric and counts as skipped.
    """

    def __init__(self, files: Sequence[str], labels: Sequence[int], strict: bool = False,
                 substitute: bool = True) -> None:
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.files = list(files)
        self.labels = np.asarray(labels, dtype=np.int32)
        self.strict = strict
        self.substitute = substitute

    def _unreadable(self, path: str, exc: Exception) -> None:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = reason.replace(f" {path!r}", "")  # PIL repeats the path: "cannot identify image file '...'"
        if self.strict:
            raise CorruptImageError(f"strict_data: cannot read image {path} ({reason}); remove or replace the file, "
                                    "or pass --strict_data False to skip unreadable images with a warning")
        with _UNREADABLE_LOCK:
            new = path not in _UNREADABLE
            _UNREADABLE[path] = reason
            count = len(_UNREADABLE)
        if new:
            action = "replaced by the next image of the epoch" if self.substitute else "left out of the metrics"
            _LOG.warning("skipping unreadable image %s (%s): %s; %d unreadable image(s) so far", path, reason, action,
                         count)

    @staticmethod
    def _known_bad(path: str) -> bool:
        with _UNREADABLE_LOCK:
            return path in _UNREADABLE

    def dataset(self, num_parallel_workers: int):
        """The rows ``0..len(files)-1`` through this op: columns ``image`` (HWC uint8) and ``label`` (int32)."""
        import mindspore.dataset as ds

        rows = ds.NumpySlicesDataset({"image": np.arange(len(self.files), dtype=np.int64)}, shuffle=False)
        return rows.map(self, input_columns="image", output_columns=["image", "label"],
                        num_parallel_workers=num_parallel_workers)

    def __call__(self, row: Any) -> tuple[np.ndarray, np.ndarray]:
        row = int(row)
        attempts = min(len(self.files), MAX_CONSECUTIVE_UNREADABLE + 1) if self.substitute else 1
        for k in range(attempts):
            index = (row + k) % len(self.files)
            path = self.files[index]
            if not self._known_bad(path):
                try:
                    return read_rgb(path), self.labels[index]
                except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
                    self._unreadable(path, exc)
        if self.substitute:
            raise CorruptImageError(f"data_dir: {attempts} consecutive images from {self.files[row]} on are unreadable "
                                    "(the dataset looks damaged; see the warnings above)")
        return np.zeros((8, 8, 3), np.uint8), np.int32(-1)


class ResizeCenterCrop:
    """Dataset-pipeline op: PIL image in, the resized + center-cropped HWC uint8 RGB array out."""

    def __init__(self, image_size: int, crop_pct: float, interpolation: str = "bicubic") -> None:
        self.image_size = image_size
        self.crop_pct = crop_pct
        self.interpolation = _check_interpolation(interpolation)
        eval_resize_size(image_size, crop_pct)

    def __call__(self, img: Image.Image) -> np.ndarray:
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(resize_center_crop(img, self.image_size, self.crop_pct, self.interpolation))


def eval_transform_pil(img: Image.Image, image_size: int = 224, crop_pct: float = 0.9, interpolation: str = "bicubic",
                       mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """One PIL image (any mode) -> the CHW float32 array the eval pipeline produces for it.

    ``mean``/``std`` are on the 0-255 scale, like the config keys.
    """
    arr = ResizeCenterCrop(image_size, crop_pct, interpolation)(img).astype(np.float32)
    mean_a = np.asarray(mean, dtype=np.float32).reshape(1, 1, -1)
    std_a = np.asarray(std, dtype=np.float32).reshape(1, 1, -1)
    return np.ascontiguousarray(((arr - mean_a) / std_a).transpose(2, 0, 1))


_AA_TOKEN = re.compile(r"^(mstd|mmax|inc|m|n|w|p)([\d.]+)$")


def parse_auto_augment(spec: str) -> dict[str, Any]:
    """Parse a MindCV/timm auto-augment string into ``{"kind", "magnitude", "num_ops", ...}``.

    Accepted: ``randaug-m9-mstd0.5-inc1`` (MindCV), ``rand-m9-n2-mstd0.5-inc1`` (timm),
    ``autoaug`` / ``autoaugment`` (ImageNet AutoAugment policy), ``trivialaugwide``.
    ``m``: magnitude on timm's 0-10 scale; ``n``: ops per image (default 2). ``mstd``/``mmax``/``inc``
    are parsed but have no MindSpore equivalent (see ``create_transforms``).
    """
    parts = [p for p in str(spec).strip().lower().split("-") if p]
    if not parts:
        raise ConfigError(f"auto_augment: empty value {spec!r}")
    head = parts[0]
    if head in ("autoaug", "autoaugment", "trivialaugwide"):
        if len(parts) > 1 and head == "trivialaugwide":
            raise ConfigError(f"auto_augment: {spec!r}: trivialaugwide takes no options")
        return {"kind": "trivialaugwide" if head == "trivialaugwide" else "autoaug"}
    if head not in ("rand", "randaug"):
        raise ConfigError(f"auto_augment: {spec!r} is not understood (accepted: randaug-m9-mstd0.5-inc1, "
                          "rand-m9-n2-mstd0.5-inc1, autoaug, trivialaugwide)")
    out: dict[str, Any] = {"kind": "randaug", "magnitude": 9.0, "num_ops": 2, "mstd": 0.0, "inc": 0}
    for token in parts[1:]:
        match = _AA_TOKEN.match(token)
        if not match:
            raise ConfigError(f"auto_augment: unknown option {token!r} in {spec!r} (accepted: m, n, mstd, mmax, inc)")
        key, value = match.groups()
        if key in ("w", "p"):
            raise ConfigError(f"auto_augment: option {token!r} in {spec!r} is not supported (accepted: m, n, mstd, "
                              "mmax, inc)")
        if key == "m":
            out["magnitude"] = float(value)
        elif key == "n":
            out["num_ops"] = int(float(value))
        elif key == "inc":
            out["inc"] = int(float(value))
        else:
            out[key] = float(value)
    if not 0 <= out["magnitude"] <= 10:
        raise ConfigError(f"auto_augment: magnitude m{out['magnitude']:g} in {spec!r} must be in [0, 10]")
    if out["num_ops"] < 1:
        raise ConfigError(f"auto_augment: n{out['num_ops']} in {spec!r} must be >= 1")
    return out


def _ms_inter(name: str):
    from mindspore.dataset.vision import Inter

    return {"bicubic": Inter.BICUBIC, "bilinear": Inter.BILINEAR, "nearest": Inter.NEAREST,
            "area": Inter.AREA}[name]


def _random_resized_crop(image_size: int, scale: Sequence[float], ratio: Sequence[float], interpolation: str):
    from mindspore.dataset import transforms as dt
    from mindspore.dataset import vision

    interpolation = _check_interpolation(interpolation)
    scale, ratio = tuple(float(v) for v in scale), tuple(float(v) for v in ratio)
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ConfigError(f"scale: {list(scale)} must satisfy 0 < low <= high <= 1")
    if not (0 < ratio[0] <= ratio[1]):
        raise ConfigError(f"ratio: {list(ratio)} must satisfy 0 < low <= high")
    if interpolation == "random":
        # timm's 'random' draws bilinear or bicubic per image.
        return dt.RandomChoice([vision.RandomResizedCrop(image_size, scale, ratio, _ms_inter(name))
                                for name in ("bilinear", "bicubic")])
    return vision.RandomResizedCrop(image_size, scale, ratio, _ms_inter(interpolation))


def _auto_augment_op(spec: str, mean: Sequence[float]):
    from mindspore.dataset import vision

    parsed = parse_auto_augment(spec)
    fill = tuple(int(round(m)) for m in mean)  # timm fills with the mean pixel
    if parsed["kind"] == "autoaug":
        return vision.AutoAugment(vision.AutoAugmentPolicy.IMAGENET, vision.Inter.BILINEAR, fill)
    if parsed["kind"] == "trivialaugwide":
        return vision.TrivialAugmentWide(fill_value=fill)
    if parsed["mstd"] or "mmax" in parsed:
        _LOG.info("auto_augment %s: MindSpore's RandAugment has no magnitude noise (mstd) or cap (mmax); "
                  "a fixed magnitude m%g/10 is used", spec, parsed["magnitude"])
    # magnitude m of timm's 10 levels == bin m of 11 bins in MindSpore's (torchvision-style) RandAugment,
    # whose ops already grow stronger with the magnitude (timm's "inc1" variants).
    magnitude = int(round(parsed["magnitude"]))
    return vision.RandAugment(num_ops=parsed["num_ops"], magnitude=magnitude, num_magnitude_bins=11,
                              interpolation=vision.Inter.BILINEAR, fill_value=fill)


def _color_jitter(value: Any):
    from mindspore.dataset import vision

    values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if len(values) == 1:
        values *= 3
    if len(values) not in (3, 4) or any(v < 0 for v in values):
        raise ConfigError(f"color_jitter: {value!r} must be one non-negative number or 3-4 "
                          "(brightness, contrast, saturation[, hue])")
    b, c, s = values[:3]
    hue = values[3] if len(values) == 4 else 0.0
    return vision.RandomColorAdjust((max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c),
                                    (max(0.0, 1 - s), 1 + s), (-hue, hue))


def _random_erasing(prob: float, mode: str, scale: Sequence[float], ratio: Sequence[float], value: float,
                    max_attempts: int):
    from mindspore.dataset import vision

    if mode == "const":
        fill: Any = int(value)
    elif mode in ("pixel", "rand"):
        # 'random' = an independent standard-normal value per erased pixel and channel: timm's 'pixel'.
        # timm's 'rand' (one normal value per channel) has no MindSpore op; 'pixel' is the closest.
        if mode == "rand":
            _LOG.info("re_mode 'rand' (per-channel noise) is not available in MindSpore; using per-pixel noise")
        fill = "random"
    else:
        raise ConfigError(f"re_mode: {mode!r} is not one of pixel, rand, const")
    return vision.RandomErasing(prob, tuple(scale), tuple(ratio), fill, False, max_attempts)


def create_transforms(
    is_training: bool,
    image_size: int = 224,
    crop_pct: float = 0.9,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (0.75, 4 / 3),
    hflip: float = 0.5,
    vflip: float = 0.0,
    color_jitter: Any = None,
    auto_augment: str | None = None,
    re_prob: float = 0.0,
    re_mode: str = "pixel",
    re_scale: Sequence[float] = (0.02, 0.33),
    re_ratio: Sequence[float] = (0.3, 3.3),
    re_value: float = 0.0,
    re_max_attempts: int = 10,
    decode: bool = True,
) -> list:
    """The op list for ``dataset.map(operations=..., input_columns="image")``; output is CHW float32.

    ``mean``/``std`` are on the 0-255 scale (config convention). ``decode=False`` expects decoded
    images (PIL for eval, HWC uint8 for training) instead of encoded bytes. Eval ignores the training
    keyword arguments. Mixup/cutmix are batch ops and live in the training pipeline.
    """
    from mindspore.dataset import vision

    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ConfigError(f"mean/std: expected 3 values each with std > 0, got mean={list(mean)} std={list(std)}")
    normalize = vision.Normalize(mean=[float(m) for m in mean], std=[float(s) for s in std])
    if not is_training:
        ops: list = [vision.Decode(to_pil=True)] if decode else []
        return ops + [ResizeCenterCrop(image_size, crop_pct, interpolation), normalize, vision.HWC2CHW()]

    ops = [vision.Decode()] if decode else []
    ops.append(_random_resized_crop(image_size, scale, ratio, interpolation))
    if hflip > 0:
        ops.append(vision.RandomHorizontalFlip(hflip))
    if vflip > 0:
        ops.append(vision.RandomVerticalFlip(vflip))
    if auto_augment:
        ops.append(_auto_augment_op(auto_augment, mean))
    elif color_jitter:
        ops.append(_color_jitter(color_jitter))
    ops += [normalize, vision.HWC2CHW()]
    if re_prob > 0:
        ops.append(_random_erasing(re_prob, re_mode, re_scale, re_ratio, re_value, re_max_attempts))
    return ops
