"""ADE20K (``ADEChallengeData2016``) for semantic segmentation, read and resized as mmseg 1.2.2's test pipeline.

Layout: ``ROOT/images/<split>/*.jpg`` with ``ROOT/annotations/<split>/<same stem>.png`` (split
``validation`` or ``training``; ``val``/``train`` are accepted for them). ``ROOT`` may also be the
folder holding ``ADEChallengeData2016``.

Test pipeline (mmseg ``configs/poolformer`` ``test_pipeline``): ``Resize(scale=(2048, 512),
keep_ratio=True)`` is mmcv's ``imrescale``: factor ``min(2048 / long side, 512 / short side)``,
size ``int(w * f + 0.5), int(h * f + 0.5)``, bilinear; then ``ResizeToMultiple(32)`` *resizes*
(bilinear) to the next multiple of 32 of each side. Both resizes are MindSpore's C++
``vision.Resize(LINEAR)``, which equals OpenCV's ``INTER_LINEAR`` (mmcv's) exactly on real photos
(a test measures it), so OpenCV is not a runtime dependency. Labels are never resized: the logits
go to the original size. ``reduce_zero_label`` maps 0 (ADE20K's "other") to 255 (ignored) and the
other ids down by one, as mmseg's ``LoadAnnotations``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from ..config import ConfigError
from ..errors import ScriptError
from ..models.registry import ADE20K_MEAN, ADE20K_STD, ModelInfo, model_info

__all__ = ["CorruptFileError", "ADE20K_MEAN", "ADE20K_STD", "ADE20K_TEST", "IGNORE_INDEX", "SegPreprocess", "SegSample",
           "SegmentationList", "ade20k_classes", "ade20k_palette", "list_ade20k", "load_sample", "rescale_size",
           "multiple_size", "inference_resize", "normalise", "overlay_classes", "warn_skipped"]

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_SPLITS = {"val": "validation", "train": "training"}


class CorruptFileError(ConfigError):
    """A file that does not decode: skipped with ``strict_data: False`` (any other data problem is an error)."""


def _class_table() -> list[tuple[str, tuple[int, int, int]]]:
    text = resources.files(__package__).joinpath("ade20k_classes.txt").read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, rgb = line.split("\t")
            r, g, b = (int(v) for v in rgb.split())
            rows.append((name, (r, g, b)))
    return rows


def ade20k_classes() -> list[str]:
    """ADE20K's 150 class names in label order (mmseg's ``ADE20KDataset.METAINFO['classes']``)."""
    return [name for name, _ in _class_table()]


def ade20k_palette() -> np.ndarray:
    """mmseg's ADE20K palette, ``(150, 3)`` uint8 RGB, for colour overlays."""
    return np.asarray([rgb for _, rgb in _class_table()], dtype=np.uint8)


@dataclass
class SegmentationList:
    """The image/annotation pairs of one split; ``skipped`` names the files left out (non-strict)."""

    root: str
    images: list[str]
    labels: list[str]
    skipped: list[str] = field(default_factory=list)


def _resolve_root(data_dir: str) -> str:
    nested = os.path.join(data_dir, "ADEChallengeData2016")
    return nested if os.path.isdir(nested) else data_dir


def list_ade20k(data_dir: str, split: str = "validation", strict: bool = True) -> SegmentationList:
    """Pair ``images/<split>/X.jpg`` with ``annotations/<split>/X.png``; an unpaired file is an error or a skip.

    With ``strict`` (validate.py's choice: an unpaired file means a wrong or half-copied dataset, not
    a corrupt file) an image without its annotation (or the reverse) is a ``ConfigError`` naming the
    file; otherwise it is left out and listed in ``skipped``.
    """
    if not data_dir or not os.path.isdir(data_dir):
        raise ConfigError(f"data_dir: {data_dir!r} is not a directory (expected an ADE20K root holding "
                          "images/<split>/ and annotations/<split>/)")
    root = _resolve_root(data_dir)
    split = _SPLITS.get(split, split)
    image_dir, label_dir = os.path.join(root, "images", split), os.path.join(root, "annotations", split)
    for folder, what in ((image_dir, "images"), (label_dir, "annotations")):
        if not os.path.isdir(folder):
            raise ConfigError(f"data_dir: {folder} is missing (an ADE20K root has {what}/{split}/; split is "
                              "'validation' or 'training')")

    def stems(folder: str, exts: Sequence[str]) -> dict[str, str]:
        with os.scandir(folder) as entries:
            return {os.path.splitext(e.name)[0]: e.name for e in entries
                    if os.path.splitext(e.name)[1].lower() in exts and e.is_file()}

    images, labels = stems(image_dir, IMAGE_EXTENSIONS), stems(label_dir, (".png",))
    if not images:
        raise ConfigError(f"data_dir: {image_dir} has no images ({' '.join(IMAGE_EXTENSIONS)})")
    skipped = []
    for stem in sorted(set(images) ^ set(labels)):
        if stem in images:
            path, what = os.path.join(image_dir, images[stem]), f"has no annotation {label_dir}/{stem}.png"
        else:
            path, what = os.path.join(label_dir, labels[stem]), f"has no image {image_dir}/{stem}.jpg"
        if strict:
            raise ConfigError(f"data_dir: {path} {what} (every image needs its label PNG of the "
                              "same name)")
        skipped.append(path)
    both = sorted(set(images) & set(labels))
    return SegmentationList(root, [os.path.join(image_dir, images[s]) for s in both],
                            [os.path.join(label_dir, labels[s]) for s in both], skipped)


@dataclass
class SegSample:
    """One decoded pair: ``image`` HWC uint8 RGB, ``label`` HW uint8 class ids (255 ignored), reduced already."""

    image: np.ndarray
    label: np.ndarray


def load_sample(image_path: str, label_path: str, num_classes: int, reduce_zero_label: bool = True) -> SegSample:
    """Decode a pair and check it; a problem is a ``ConfigError`` naming the file (``CorruptFileError`` may be skipped).

    Checks: both files decode (PIL), the label is one channel, the sizes match, and every label
    value after the reduction is below ``num_classes`` or 255.
    """
    from PIL import Image

    try:
        with Image.open(image_path) as img:
            image = np.asarray(img.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as exc:
        raise CorruptFileError(f"data: {image_path} is not a readable image ({exc})") from None
    try:
        with Image.open(label_path) as img:
            if img.mode not in ("L", "P", "I;16", "I"):
                raise ConfigError(f"data: {label_path} is a {img.mode} image; a label map is one channel of "
                                  "class ids (mode L or P)")
            label = np.asarray(img)
    except (OSError, ValueError, SyntaxError) as exc:
        raise CorruptFileError(f"data: {label_path} is not a readable PNG ({exc})") from None
    if label.shape != image.shape[:2]:
        raise ConfigError(f"data: {label_path} is {label.shape[1]}x{label.shape[0]} but its image {image_path} is "
                          f"{image.shape[1]}x{image.shape[0]} (width x height); they must match")
    label = label.astype(np.int64)
    if reduce_zero_label:
        label = np.where(label == 0, 256, label) - 1  # 0 -> 255, k -> k - 1, 255 -> 254 -> 255 below
        label[label == 254] = IGNORE_INDEX
    bad = (label >= num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        value = int(label[bad].max())
        raise ConfigError(f"data: {label_path} has label value {value + int(reduce_zero_label)} (class {value} after "
                          f"reduce_zero_label={reduce_zero_label}); accepted: class ids 0..{num_classes - 1} and 255 "
                          "(ignored)")
    return SegSample(image, label.astype(np.uint8))


def rescale_size(width: int, height: int, scale: Sequence[int] = (2048, 512)) -> tuple[int, int]:
    """mmcv ``rescale_size(keep_ratio)``: ``(w, h)`` scaled by ``min(long/long side, short/short side)``, rounded."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(width, height), short_edge / min(width, height))
    return int(width * float(factor) + 0.5), int(height * float(factor) + 0.5)


def multiple_size(width: int, height: int, divisor: int = 32) -> tuple[int, int]:
    """mmcv ``imresize_to_multiple``'s size: each side up to the next multiple of ``divisor``."""
    return int(np.ceil(width / divisor)) * divisor, int(np.ceil(height / divisor)) * divisor


def inference_resize(image: np.ndarray, scale: Sequence[int] = (2048, 512), divisor: int = 32) -> np.ndarray:
    """mmseg's test-time ``Resize(scale, keep_ratio=True)`` then ``ResizeToMultiple(divisor)`` of an HWC uint8 image."""
    import mindspore.dataset.vision as vision

    height, width = image.shape[:2]
    new_w, new_h = rescale_size(width, height, scale)
    if (new_w, new_h) != (width, height):
        image = vision.Resize((new_h, new_w), vision.Inter.LINEAR)(image)
    if divisor > 1:
        mw, mh = multiple_size(new_w, new_h, divisor)
        if (mw, mh) != (new_w, new_h):
            image = vision.Resize((mh, mw), vision.Inter.LINEAR)(image)
    return np.ascontiguousarray(image)


def normalise(image: np.ndarray, mean: Sequence[float] = ADE20K_MEAN, std: Sequence[float] = ADE20K_STD) -> np.ndarray:
    """HWC uint8 RGB -> 1CHW float32 ``(x - mean) / std``, as mmseg's ``SegDataPreProcessor``."""
    x = (image.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def overlay_classes(image: np.ndarray, classes: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """Blend the palette 50% over an HWC uint8 image: ``floor((image + palette[class] + 1) / 2)``, exact in integers.

    Pixels of class 255 (none) keep the image; ids beyond the palette are an error, not a wrong colour.
    """
    palette = ade20k_palette() if palette is None else np.asarray(palette, np.uint8)
    if image.shape[:2] != classes.shape:
        raise ValueError(f"overlay: image {image.shape[:2]} and class map {classes.shape} differ in size")
    known = classes != IGNORE_INDEX
    if known.any() and int(classes[known].max()) >= len(palette):
        raise ValueError(f"overlay: class {int(classes[known].max())} has no colour (palette of {len(palette)})")
    colour = palette[np.where(known, classes, 0)].astype(np.uint16)
    blended = ((image.astype(np.uint16) + colour + 1) // 2).astype(np.uint8)
    return np.where(known[..., None], blended, image)


def warn_skipped(skipped: Sequence[str], what: str) -> None:
    """One stderr line for the files left out of the metrics."""
    if skipped:
        print(f"warning: {len(skipped)} {what} skipped (first: {skipped[0]}); --strict_data True makes this an "
              "error", file=sys.stderr)


@dataclass(frozen=True)
class SegPreprocess:
    """A Semantic FPN's test preprocessing: keep-ratio resize to fit ``scale``, sides up to ``size_divisor``, mean/std.

    The segmentation counterpart of ``transforms.Preprocess`` (a classifier's centre crop has no
    place in a whole-image test): one record shared by the eval loop, the training task's
    validation and prediction grid, the export sidecar and the predictor, built from the model
    record (``for_model``), a parsed config (``from_config``: ``seg_scale``, ``seg_size_divisor``,
    ``mean``, ``std``) or a sidecar (``from_sidecar``: the keys export.py has always written). The
    defaults are mmseg's ADE20K test pipeline; mean/std are on the 0-255 scale.
    """
    scale: tuple[int, ...] = (2048, 512)
    size_divisor: int = 32
    mean: tuple[float, ...] = ADE20K_MEAN
    std: tuple[float, ...] = ADE20K_STD

    SIDECAR_KEYS = ("seg_scale", "size_divisor", "mean", "std")

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(int(v) for v in self.scale))
        object.__setattr__(self, "size_divisor", int(self.size_divisor))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.scale) != 2 or min(self.scale) < 1:
            raise ConfigError(f"seg_scale: expected two positive sizes (long, short), got {list(self.scale)}")
        if self.size_divisor < 1:
            raise ConfigError(f"seg_size_divisor: expected an integer >= 1 (1 = off), got {self.size_divisor}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ConfigError(f"mean/std: expected 3 values each with std > 0, got mean={list(self.mean)} "
                              f"std={list(self.std)}")

    @classmethod
    def for_model(cls, model: str | ModelInfo, scale: Sequence[int] = (2048, 512), size_divisor: int = 32
                  ) -> SegPreprocess:
        """The model record's normalisation with the test resize ``scale`` / ``size_divisor`` (mmseg's ADE20K ones)."""
        info = model_info(model) if isinstance(model, str) else model
        return cls(scale, size_divisor, info.mean, info.std)

    @classmethod
    def from_config(cls, cfg) -> SegPreprocess:
        """``seg_scale``, ``seg_size_divisor``, ``mean``, ``std`` of a parsed config."""
        return cls(cfg["seg_scale"], cfg["seg_size_divisor"], cfg["mean"], cfg["std"])

    @classmethod
    def from_sidecar(cls, meta: dict, source: str = "sidecar") -> SegPreprocess:
        """The preprocessing a segmentation sidecar records (``to_sidecar``'s keys); a missing key is a
        ScriptError naming it and ``source`` (the sidecar's path)."""
        for key in cls.SIDECAR_KEYS:
            if key not in meta:
                raise ScriptError(f"{source}: key {key!r} is missing (a segmentation sidecar records "
                                  f"{', '.join(cls.SIDECAR_KEYS)})")
        return cls(meta["seg_scale"], meta["size_divisor"], meta["mean"], meta["std"])

    def to_sidecar(self) -> dict:
        """The sidecar's keys for this record (the layout export.py has always written)."""
        return {"seg_scale": list(self.scale), "size_divisor": self.size_divisor, "mean": list(self.mean),
                "std": list(self.std)}

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """An HWC uint8 RGB image -> the network input ``1CHW`` float32 (``inference_resize``, then ``normalise``)."""
        return normalise(inference_resize(image, self.scale, self.size_divisor), self.mean, self.std)


ADE20K_TEST = SegPreprocess()  # mmseg's ADE20K test pipeline (configs/poolformer): (2048, 512), 32, ADE20K mean/std
