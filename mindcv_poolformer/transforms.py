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
picks bilinear or bicubic per image, like timm), flips, timm's RandAugment (PIL, ``RandAugment``
below) or colour jitter (colour jitter only when no auto-augment is set, as in timm),
normalisation, HWC -> CHW, random erasing.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .config import ConfigError
from .kernels.image import affine_rgb, image_kernels_enabled, pil_rotate_matrix
from .models.registry import IMAGENET_MEAN, IMAGENET_STD, ModelInfo, model_info

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CorruptImageError",
    "ImageReader",
    "Preprocess",
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


# A marker byte pair inside entropy-coded data that is not a stuffed 0xFF00, a restart marker or fill.
_SEGMENT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# (H, V) sampling of the luma component the scan admits (chroma 1x1): 4:4:4, 4:2:2, 4:4:0, 4:2:0.
_COMMON_SAMPLING = frozenset(((1, 1), (2, 1), (1, 2), (2, 2)))


def _plain_baseline_jpeg(data: bytes) -> bool:
    """Whether ``data`` is a well-formed baseline JPEG (one interleaved Huffman scan, grey or 3 components).

    A walk over the markers that checks what libjpeg checks on reading them (segment lengths,
    table indices, Huffman code counts and codes, SOF and SOS fields, tables defined before the
    scan) and that the entropy-coded data runs to EOI. About 20x cheaper than the 1/8-scale decode
    (it skips the Huffman decoding that dominates it), and stricter: anything it does not admit
    (progressive or arithmetic coding, more than one scan, restart intervals, unusual sampling,
    an MPO, a truncated or damaged file) goes to that decode, whose verdict stands. Corrupt
    entropy-coded data can only raise libjpeg warnings, as it does under PIL's check too.
    """
    end = len(data)
    if not data.startswith(b"\xff\xd8"):
        return False
    pos, quant, huff, frame = 2, set(), set(), None
    while True:
        while pos < end and data[pos] == 0xFF and pos + 1 < end and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes before a marker
        if pos + 4 > end or data[pos] != 0xFF:
            return False
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        body, pos = data[pos + 4:pos + 2 + length], pos + 2 + length
        if length < 2:  # a segment overrunning the file fails below: the walk or the scan meets its end
            return False
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:  # APPn, COM
            if marker == 0xE2 and body.startswith(b"MPF\x00"):
                return False  # a multi-picture file: PIL opens it as MPO
            continue
        if marker == 0xDB:  # DQT: (Pq, Tq) + 64 (or 128) values
            i = 0
            while i < len(body):
                pq, tq = body[i] >> 4, body[i] & 15
                if pq > 1 or tq > 3 or i + 1 + 64 * (pq + 1) > len(body):
                    return False
                quant.add(tq)
                i += 1 + 64 * (pq + 1)
            continue
        if marker == 0xC4:  # DHT: (Tc, Th) + 16 counts + symbols; the code must fit its lengths
            i = 0
            while i < len(body):
                if i + 17 > len(body):
                    return False
                tc, th, counts = body[i] >> 4, body[i] & 15, body[i + 1:i + 17]
                total = sum(counts)
                if tc > 1 or th > 3 or total > 256 or i + 17 + total > len(body):
                    return False
                if tc == 0 and max(body[i + 17:i + 17 + total], default=0) > 15:
                    return False  # a DC symbol is a bit count, 0..15 at 8-bit precision
                code = 0
                for bits, count in enumerate(counts, 1):
                    code += count
                    if code > (1 << bits):
                        return False
                    code <<= 1
                huff.add((tc, th))
                i += 17 + total
            continue
        if marker in (0xC0, 0xC1):  # SOF0 baseline / SOF1 extended sequential, Huffman
            if frame is not None or len(body) < 6:
                return False
            precision, height, width, nf = body[0], int.from_bytes(body[1:3], "big"), \
                int.from_bytes(body[3:5], "big"), body[5]
            if precision != 8 or not 0 < height <= 65500 or not 0 < width <= 65500 or nf not in (1, 3) \
                    or len(body) != 6 + 3 * nf:
                return False
            comps = [(body[6 + 3 * k], body[7 + 3 * k] >> 4, body[7 + 3 * k] & 15, body[8 + 3 * k]) for k in range(nf)]
            if len({c[0] for c in comps}) != nf or any(c[3] > 3 or c[3] not in quant for c in comps):
                return False
            if (comps[0][1], comps[0][2]) not in (_COMMON_SAMPLING if nf == 3 else {(1, 1), (2, 2), (2, 1), (1, 2)}) \
                    or any((c[1], c[2]) != (1, 1) for c in comps[1:]):
                return False
            frame = comps
            continue
        if marker == 0xDA:  # SOS: the one scan, all components, baseline spectral selection
            if frame is None or len(body) < 1:
                return False
            ns = body[0]
            if ns != len(frame) or len(body) != 4 + 2 * ns or tuple(body[1 + 2 * ns:]) != (0, 63, 0):
                return False
            selectors = [(body[1 + 2 * k], body[2 + 2 * k] >> 4, body[2 + 2 * k] & 15) for k in range(ns)]
            if [s[0] for s in selectors] != [c[0] for c in frame] \
                    or any((0, td) not in huff or (1, ta) not in huff for _, td, ta in selectors):
                return False
            found = _SEGMENT_MARKER.search(data, pos)
            return found is not None and data[found.start() + 1] == 0xD9  # the scan runs to EOI
        return False  # DRI, DNL, DAC, other SOFs, EOI before a scan, anything else: the decode decides


def _decodes_in_cpp(data: bytes) -> bool:
    """Whether ``data`` may go to MindSpore's C++ decoder: a JPEG (RGB or grey) that PIL decodes at 1/8 scale.

    MindSpore 2.10's JPEG decoder kills the process (SIGSEGV, SIGBUS, SIGFPE) on some damaged or
    truncated files instead of raising, so no file reaches it unchecked. A 1/8-scale decode runs
    libjpeg over every marker and the whole entropy-coded stream at ~40% of a full decode's cost; in
    a fuzz of 400 damaged JPEGs it refused every file the C++ decoder crashed (38) or failed (153)
    on. Checking the headers alone is not enough: that let 14 of 38 crashing files through. Baseline
    JPEGs (ImageNet's all but a few) pass ``_plain_baseline_jpeg`` instead, which admits only
    files that decode (tests/test_input_pipeline.py fuzzes it against this decode).
    """
    import io

    if not data.startswith(b"\xff\xd8\xff"):
        return False
    if _plain_baseline_jpeg(data):
        return True
    with Image.open(io.BytesIO(data)) as img:
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):
            return False  # CMYK / YCCK JPEGs: PIL converts them as the eval reference does
        img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
    return True


def _ppm(rgb: np.ndarray) -> np.ndarray:
    """An HWC uint8 RGB array as PPM bytes: lossless, and C++ ``Decode`` reads it back exactly."""
    height, width = rgb.shape[:2]
    header = np.frombuffer(b"P6\n%d %d\n255\n" % (width, height), np.uint8)
    return np.concatenate([header, np.ascontiguousarray(rgb, np.uint8).reshape(-1)])


class ImageReader:
    """Dataset op ``row -> (image, label)`` that reads ``files[row]``, guarded against unreadable files.

    Reading happens here, inside the parallel map workers, instead of up front: one corrupt JPEG
    among ImageNet's 1.28M must neither cost a pre-pass over the data nor stop a 30-hour run with a
    pipeline traceback. An unreadable file is, with ``strict``, a ``CorruptImageError`` naming it;
    otherwise it is reported once (with the running count) and

    - ``substitute=True`` (training): replaced by the next readable row (wrapping around), so every
      rank keeps its number of steps and the substitute depends only on the row order, which is a
      function of (seed, rank, epoch): a resumed epoch is the same;
    - ``substitute=False`` (evaluation): replaced by a blank placeholder with label -1, which
      ``evaluate`` leaves out of every metric and counts as skipped.

    With ``encoded=False`` the image is decoded here by PIL (HWC uint8 RGB). With ``encoded=True``
    it stays encoded (1-D uint8) for MindSpore's C++ ``Decode`` / ``RandomCropDecodeResize`` after
    it: a JPEG once ``_decodes_in_cpp`` has passed it, anything else (PNG, CMYK, a JPEG the check
    refused) decoded by PIL and handed on as lossless PPM. A file is readable exactly when PIL
    decodes it, as with ``encoded=False``. ``verified`` (one byte per ``index`` entry, kept by the
    caller across epochs) remembers the JPEGs already checked, so each is checked once per process.
    """

    def __init__(self, files: Sequence[str], labels: Sequence[int], strict: bool = False,
                 substitute: bool = True, *, encoded: bool = False, verified: bytearray | None = None,
                 index: Sequence[int] | None = None) -> None:
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.files = list(files)
        self.labels = np.asarray(labels, dtype=np.int32)
        self.strict = strict
        self.substitute = substitute
        self.encoded = encoded
        self.index = np.arange(len(self.files)) if index is None else np.asarray(index, dtype=np.int64)
        self.verified = verified if verified is not None else bytearray(int(self.index.max(initial=-1)) + 1)

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

    def _read_encoded(self, row: int, path: str) -> np.ndarray:
        key = int(self.index[row])
        with open(path, "rb") as handle:
            data = handle.read()
        if self.verified[key]:
            return np.frombuffer(data, np.uint8)
        try:
            safe = _decodes_in_cpp(data)
        except Exception:  # damaged: read_rgb below names the reason, or decodes what PIL can
            safe = False
        if safe:
            self.verified[key] = 1
            return np.frombuffer(data, np.uint8)
        return _ppm(read_rgb(path))

    def dataset(self, num_parallel_workers: int):
        """The rows ``0..len(files)-1`` through this op: columns ``image`` and ``label`` (int32)."""
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
                    image = self._read_encoded(index, path) if self.encoded else read_rgb(path)
                    return image, self.labels[index]
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


@dataclass(frozen=True)
class Preprocess:
    """A classifier's eval preprocessing: crop side, crop_pct, interpolation and mean/std (0-255 scale).

    One record shared by the eval transforms, the eval dataset, the export sidecar and the
    predictor, so those facts are derived once: from the model record (``for_model``), from a
    parsed config whose defaults are that record (``from_config``), or from a sidecar
    (``from_sidecar``, also the sidecars written before this record existed: same keys).
    """
    size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        object.__setattr__(self, "interpolation", _check_interpolation(self.interpolation))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        eval_resize_size(self.size, self.crop_pct)
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ConfigError(f"mean/std: expected 3 values each with std > 0, got mean={list(self.mean)} "
                              f"std={list(self.std)}")

    @classmethod
    def for_model(cls, model: str | ModelInfo, size: int = 224) -> Preprocess:
        """The model record's preprocessing at crop side ``size``."""
        info = model_info(model) if isinstance(model, str) else model
        return cls(size, info.crop_pct, info.interpolation, info.mean, info.std)

    @classmethod
    def from_config(cls, cfg: Any) -> Preprocess:
        """``image_resize``, ``crop_pct``, ``interpolation``, ``mean``, ``std`` of a parsed config."""
        return cls(cfg["image_resize"], cfg["crop_pct"], cfg["interpolation"], cfg["mean"], cfg["std"])

    @classmethod
    def from_sidecar(cls, meta: dict) -> Preprocess:
        """The preprocessing an export sidecar records (keys ``image_size``, ``crop_pct``, ... as ``to_sidecar``)."""
        return cls(meta["image_size"], meta["crop_pct"], meta["interpolation"], meta["mean"], meta["std"])

    def to_sidecar(self) -> dict:
        """The sidecar's keys for this record (the layout export.py has always written)."""
        return {"image_size": self.size, "crop_pct": self.crop_pct, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std)}

    def transforms(self, decode: bool = True) -> list:
        """The eval op list (``create_transforms(False, ...)``): decoded PIL images in when ``decode=False``."""
        return create_transforms(False, self.size, self.crop_pct, self.interpolation, self.mean, self.std,
                                 decode=decode)

    def __call__(self, img: Image.Image) -> np.ndarray:
        """One PIL image -> its CHW float32 array (``eval_transform_pil``)."""
        return eval_transform_pil(img, self.size, self.crop_pct, self.interpolation, self.mean, self.std)


_AA_TOKEN = re.compile(r"^(mstd|mmax|inc|m|n|w|p)([\d.]+)$")


def parse_auto_augment(spec: str) -> dict[str, Any]:
    """Parse a MindCV/timm auto-augment string into ``{"kind", "magnitude", "num_ops", ...}``.

    Accepted: ``randaug-m9-mstd0.5-inc1`` (MindCV), ``rand-m9-n2-mstd0.5-inc1`` (timm),
    ``autoaug`` / ``autoaugment`` (ImageNet AutoAugment policy), ``trivialaugwide``.
    ``m``: magnitude on timm's 0-10 scale; ``n``: ops per image (default 2); ``mstd``: magnitude noise
    (> 100: uniform); ``mmax``: magnitude cap (default 10); ``inc1``: the ops whose severity grows with
    ``m`` (see ``RandAugment``).
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


# ---------------------------------------------------------------------------------------------- RandAugment
#
# timm's ``rand_augment_transform`` (the recipe's ``rand-m9-mstd0.5-inc1``), op for op on PIL images.
# MindSpore's ``vision.RandAugment`` has another op set, applies every chosen op and has no magnitude
# noise; MindCV's port calls MindSpore ops whose arguments mean other things (shear in degrees, bits
# dropped instead of kept, another Equalize), lacks SolarizeAdd and ignores the string's mstd.

_LEVEL_DENOM = 10.0
RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                   "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                              "TranslateYRel")
_GEOMETRIC = frozenset(("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"))
_ENHANCE = frozenset(("Color", "Contrast", "Brightness", "Sharpness"))  # PIL.ImageEnhance classes


@dataclass(frozen=True)
class AugmentDraw:
    """One of RandAugment's layers for one image: the op, whether it fired, its magnitude and arguments."""

    name: str
    applied: bool
    magnitude: float = 0.0
    args: tuple = ()
    resample: int | None = None


def _level_args(name: str, magnitude: float, rng: Any, translate_pct: float) -> tuple:
    """timm's ``LEVEL_TO_ARG`` for ``name``; the sign draws (``rng.random() > 0.5``) happen in timm's order."""
    level = magnitude / _LEVEL_DENOM
    base = name.removesuffix("Increasing")
    if base in ("AutoContrast", "Equalize", "Invert"):
        return ()
    if base == "Posterize":  # bits kept: 0..4 (severity falls with m), 4..0 for the increasing variant
        bits = int(level * 4)
        return (4 - bits if name.endswith("Increasing") else bits,)
    if base == "Solarize":  # threshold: 0..256, 256..0 for the increasing variant
        thresh = int(level * 256)
        return (256 - thresh if name.endswith("Increasing") else thresh,)
    if base == "SolarizeAdd":
        return (int(level * 110),)
    if base in _ENHANCE:
        if name.endswith("Increasing"):  # 1 +- 0.9 level: stronger either way with m
            delta = level * 0.9
            return (max(0.1, 1.0 + (-delta if rng.random() > 0.5 else delta)),)
        return (level * 1.8 + 0.1,)
    scale = {"Rotate": 30.0, "ShearX": 0.3, "ShearY": 0.3, "TranslateXRel": translate_pct,
             "TranslateYRel": translate_pct}[base]
    value = level * scale
    return (-value if rng.random() > 0.5 else value,)


def _lut_op(img: Image.Image, lut: Sequence[int]) -> Image.Image:
    return img.point(list(lut) * len(img.getbands()))


def _apply_augment(img: Image.Image, draw: AugmentDraw, fill: tuple[int, ...]) -> Image.Image:
    """Apply one fired draw to a PIL image, with PIL's ops as timm calls them."""
    from PIL import ImageEnhance, ImageOps

    name, args = draw.name, draw.args
    base = name.removesuffix("Increasing")
    if base == "AutoContrast":
        return ImageOps.autocontrast(img)
    if base == "Equalize":
        return ImageOps.equalize(img)
    if base == "Invert":
        return ImageOps.invert(img)
    if base == "Posterize":
        bits = args[0]
        if bits >= 8:
            return img
        mask = ~(2 ** (8 - bits) - 1) & 0xFF  # 0 bits keeps nothing: a black image (PIL >= 10 refuses bits=0)
        return _lut_op(img, [i & mask for i in range(256)])
    if base == "Solarize":
        return ImageOps.solarize(img, args[0])
    if base == "SolarizeAdd":
        add = args[0]
        return _lut_op(img, [min(255, i + add) if i < 128 else i for i in range(256)])
    if base in _ENHANCE:
        return getattr(ImageEnhance, base)(img).enhance(args[0])
    if base == "Rotate":
        return img.rotate(args[0], resample=draw.resample, fillcolor=fill)
    return img.transform(img.size, Image.AFFINE, _affine_matrix(base, args[0], *img.size), resample=draw.resample,
                         fillcolor=fill)


def _affine_matrix(base: str, value: float, width: int, height: int) -> tuple[float, ...]:
    """The inverse map timm's shear / translate op hands to ``Image.transform`` (AFFINE)."""
    return {"ShearX": (1, value, 0, 0, 1, 0), "ShearY": (1, 0, 0, value, 1, 0),
            "TranslateXRel": (1, 0, value * width, 0, 1, 0),
            "TranslateYRel": (1, 0, 0, 0, 1, value * height)}[base]


def _affine_array(image: np.ndarray, draw: AugmentDraw, fill: tuple[int, ...]) -> np.ndarray | None:
    """A geometric draw on an HWC RGB array by the compiled kernel (Pillow's pixels); None: use Pillow."""
    height, width = image.shape[:2]
    if draw.name == "Rotate":
        matrix = pil_rotate_matrix(draw.args[0], width, height)
        if matrix is None:
            return None
    else:
        matrix = _affine_matrix(draw.name, draw.args[0], width, height)
    return affine_rgb(image, matrix, draw.resample, fill)


class RandAugment:
    """timm's RandAugment as a dataset op (HWC uint8 in and out); ``rand-m9-mstd0.5-inc1`` is the recipe's.

    Per image: ``num_layers`` ops drawn with replacement (``np.random.choice``), each fired with
    probability ``prob`` (``random.random() > prob`` skips), its magnitude drawn from
    N(magnitude, magnitude_std) (uniform on [0, magnitude] for an infinite std) and clipped to
    [0, magnitude_max or 10], then mapped to the op's argument as timm does. Geometric ops fill with
    ``fill`` (timm: the mean pixel) and resample with bilinear or bicubic at random for
    ``interpolation='random'``, else with that filter. The draws come from ``random`` and
    ``np.random`` in timm's order (``ds.config.set_seed`` seeds both), or from the generators given
    to ``sample``.
    """

    def __init__(self, magnitude: float = 10.0, num_layers: int = 2, magnitude_std: float = 0.0,
                 magnitude_max: float | None = None, increasing: bool = False, prob: float = 0.5,
                 fill: Sequence[int] = (128, 128, 128), interpolation: str = "random",
                 translate_pct: float = 0.45, transforms: Sequence[str] | None = None) -> None:
        self.names = tuple(transforms or (RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS))
        self.magnitude = float(magnitude)
        self.num_layers = int(num_layers)
        self.magnitude_std = float("inf") if magnitude_std > 100 else float(magnitude_std)
        self.magnitude_max = magnitude_max
        self.prob = float(prob)
        self.fill = tuple(int(v) for v in fill)
        interpolation = _check_interpolation(interpolation)
        self.resample: tuple[int, ...] = ((Image.BILINEAR, Image.BICUBIC) if interpolation == "random"
                                          else (_PIL_INTERP[interpolation],))
        self.translate_pct = float(translate_pct)
        image_kernels_enabled()  # build (or find) and check the kernel here, not in the first map worker

    @classmethod
    def from_parsed(cls, parsed: dict[str, Any], fill: Sequence[int], interpolation: str) -> RandAugment:
        """From ``parse_auto_augment``'s dict, with timm's hparams: the mean-pixel fill, the crop's filter."""
        return cls(parsed["magnitude"], parsed["num_ops"], parsed["mstd"], parsed.get("mmax"), bool(parsed["inc"]),
                   fill=fill, interpolation=interpolation)

    def sample(self, rng: Any = None, np_rng: Any = None) -> list[AugmentDraw]:
        """Draw one image's layers without touching pixels (no draw depends on the image)."""
        import random

        rng = rng or random
        np_rng = np_rng or np.random
        upper = self.magnitude_max or _LEVEL_DENOM
        draws = []
        for index in np_rng.choice(len(self.names), self.num_layers, replace=True):
            name = self.names[int(index)]
            if self.prob < 1.0 and rng.random() > self.prob:
                draws.append(AugmentDraw(name, False))
                continue
            magnitude = self.magnitude
            if self.magnitude_std == float("inf"):
                magnitude = rng.uniform(0, magnitude)
            elif self.magnitude_std > 0:
                magnitude = rng.gauss(magnitude, self.magnitude_std)
            magnitude = max(0.0, min(magnitude, upper))
            args = _level_args(name, magnitude, rng, self.translate_pct)
            resample = None
            if name in _GEOMETRIC:
                resample = rng.choice(self.resample) if len(self.resample) > 1 else self.resample[0]
            draws.append(AugmentDraw(name, True, magnitude, args, resample))
        return draws

    def apply(self, img: Image.Image | np.ndarray, draws: Sequence[AugmentDraw]) -> Image.Image | np.ndarray:
        """The image after the fired ``draws``, in order, of the type it came in (PIL or HWC uint8 array).

        Geometric ops run on arrays in ``kernels.image.affine_rgb`` (Pillow's pixels, 3x cheaper for
        translate and shear), the others in PIL; the image changes form only between the two.
        """
        current: Image.Image | np.ndarray = img
        kernel = image_kernels_enabled()
        for draw in draws:
            if not draw.applied:
                continue
            if kernel and draw.name in _GEOMETRIC:
                out = _affine_array(np.asarray(current), draw, self.fill)
                if out is not None:
                    current = out
                    continue
            pil = current if isinstance(current, Image.Image) else Image.fromarray(current)
            current = _apply_augment(pil, draw, self.fill)
        if isinstance(img, Image.Image):
            return current if isinstance(current, Image.Image) else Image.fromarray(current)
        return np.asarray(current)

    def __call__(self, img: Any) -> Any:
        draws = self.sample()
        if not any(d.applied for d in draws):
            return img
        return self.apply(img if isinstance(img, Image.Image) else np.asarray(img), draws)


def _ms_inter(name: str):
    from mindspore.dataset.vision import Inter

    return {"bicubic": Inter.BICUBIC, "bilinear": Inter.BILINEAR, "nearest": Inter.NEAREST,
            "area": Inter.AREA}[name]


def _random_resized_crop(image_size: int, scale: Sequence[float], ratio: Sequence[float], interpolation: str,
                         fused_decode: bool = False):
    from mindspore.dataset import transforms as dt
    from mindspore.dataset import vision

    interpolation = _check_interpolation(interpolation)
    scale, ratio = tuple(float(v) for v in scale), tuple(float(v) for v in ratio)
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ConfigError(f"scale: {list(scale)} must satisfy 0 < low <= high <= 1")
    if not (0 < ratio[0] <= ratio[1]):
        raise ConfigError(f"ratio: {list(ratio)} must satisfy 0 < low <= high")
    crop = vision.RandomCropDecodeResize if fused_decode else vision.RandomResizedCrop
    if interpolation == "random":
        # timm's 'random' draws bilinear or bicubic per image.
        return dt.RandomChoice([crop(image_size, scale, ratio, _ms_inter(name)) for name in ("bilinear", "bicubic")])
    return crop(image_size, scale, ratio, _ms_inter(interpolation))


def _auto_augment_op(spec: str, mean: Sequence[float], interpolation: str = "random"):
    from mindspore.dataset import vision

    parsed = parse_auto_augment(spec)
    fill = tuple(min(255, int(round(m))) for m in mean)  # timm fills with the mean pixel
    if parsed["kind"] == "autoaug":
        return vision.AutoAugment(vision.AutoAugmentPolicy.IMAGENET, vision.Inter.BILINEAR, fill)
    if parsed["kind"] == "trivialaugwide":
        return vision.TrivialAugmentWide(fill_value=fill)
    return RandAugment.from_parsed(parsed, fill, interpolation)


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
    fused_decode: bool = False,
) -> list:
    """The op list for ``dataset.map(operations=..., input_columns="image")``; output is CHW float32.

    ``mean``/``std`` are on the 0-255 scale (config convention). ``decode=False`` expects decoded
    images (PIL for eval, HWC uint8 for training) instead of encoded bytes; ``fused_decode=True``
    (training, encoded input) decodes and crops in one C++ op, ``RandomCropDecodeResize``, which
    decodes only the crop's rows of a JPEG. Eval ignores the training keyword arguments.
    Mixup/cutmix are batch ops and live in the training pipeline.
    """
    from mindspore.dataset import vision

    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ConfigError(f"mean/std: expected 3 values each with std > 0, got mean={list(mean)} std={list(std)}")
    normalize = vision.Normalize(mean=[float(m) for m in mean], std=[float(s) for s in std])
    if not is_training:
        ops: list = [vision.Decode(to_pil=True)] if decode else []
        return ops + [ResizeCenterCrop(image_size, crop_pct, interpolation), normalize, vision.HWC2CHW()]

    ops = [vision.Decode()] if decode and not fused_decode else []
    ops.append(_random_resized_crop(image_size, scale, ratio, interpolation, fused_decode))
    if hflip > 0:
        ops.append(vision.RandomHorizontalFlip(hflip))
    if vflip > 0:
        ops.append(vision.RandomVerticalFlip(vflip))
    if auto_augment:
        ops.append(_auto_augment_op(auto_augment, mean, interpolation))
    elif color_jitter:
        ops.append(_color_jitter(color_jitter))
    # transposed as uint8, then normalised: the same floats as normalise-then-transpose, 4x fewer bytes moved
    ops += [vision.HWC2CHW(), vision.Normalize(mean=[float(m) for m in mean], std=[float(s) for s in std],
                                               is_hwc=False)]
    if re_prob > 0:
        ops.append(_random_erasing(re_prob, re_mode, re_scale, re_ratio, re_value, re_max_attempts))
    return ops
