"""Classify (or segment) image files with a checkpoint, an exported MINDIR or an ONNX file; print top-k labels.

    python -m mindcv_poolformer.predict IMAGES... (--ckpt_path CKPT [--model NAME] | --mindir FILE | --onnx FILE)
        [--labels FILE] [--topk 5] [--json OUT]

A segmentation model (``--model fpn_*`` with a checkpoint, or a MINDIR whose sidecar says
``task: segmentation``) writes ``<stem>_classes.png`` (class ids, uint8) and ``<stem>_overlay.png``
(palette 50% over the image) per image into ``--output_dir`` and prints the top-k classes by area;
the pipeline is mmseg's test one (``data.ade20k.SegPreprocess``, ``evaluation.segmentation.predict_map``), at the
original size, with the sidecar's resize and normalisation (MINDIR) or the config's (checkpoint).

The eval transform is the reference one (``transforms.Preprocess``, ``eval_transform_pil``); its
settings come from the artifact's JSON sidecar (MINDIR/ONNX) or from the model's record and the
config (checkpoint). A missing or unreadable image is reported on one line and skipped; the exit code is
then 1. Usage errors exit with 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .._atomic import atomic_path, atomic_write_json
from .._runtime import configure_device
from .._script import run_script
from ..config import SCHEMA, model_defaults, parse_cli
from ..data.ade20k import SegPreprocess, ade20k_classes, ade20k_palette, overlay_classes
from ..errors import ConfigError, ScriptError
from ..evaluation.segmentation import logits_to_map
from ..models.registry import model_info
from ..transforms import Preprocess
from .artifacts import load_mindir, load_network, load_segmentation_network, read_labels, read_sidecar, sidecar_path

__all__ = ["Predictor", "SegPredictor", "load_predictor", "load_seg_predictor", "main", "predict_segmentation",
           "softmax"]

_TRUE_FALSE = {"true", "false", "yes", "no", "1", "0", "on", "off"}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class Predictor:
    """A batch function ``NCHW float32 -> logits`` plus the preprocessing and labels that go with it."""
    run: Callable[[np.ndarray], np.ndarray]
    batch: int  # images per call; smaller chunks are zero-padded to it
    preprocess: Preprocess  # a PIL image -> its CHW float32 input
    labels: list[str] | None
    source: str

    def logits(self, images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch):
            chunk = images[start:start + self.batch]
            n = len(chunk)
            if n < self.batch:
                chunk = np.concatenate([chunk, np.zeros((self.batch - n,) + chunk.shape[1:], np.float32)])
            out.append(np.asarray(self.run(chunk))[:n])
        return np.concatenate(out)

    def label(self, index: int) -> str:
        return self.labels[index] if self.labels and index < len(self.labels) else f"class_{index}"


def _ms_runner(net) -> Callable[[np.ndarray], np.ndarray]:
    import mindspore as ms

    return lambda x: net(ms.Tensor(x)).asnumpy()


def _one_source(cfg, allowed: Sequence[str], usage: str, why: str = "") -> tuple[str, str]:
    """The one model source given (``ckpt_path``, ``mindir`` or ``onnx``) and its path, which must exist."""
    given = [k for k in ("ckpt_path", "mindir", "onnx") if cfg[k]]
    if len(given) != 1 or given[0] not in allowed:
        raise ConfigError(f"{usage} (got {', '.join('--' + k for k in given) or 'none'}{why})")
    kind = given[0]
    if not os.path.isfile(cfg[kind]):
        raise ConfigError(f"{kind}: {cfg[kind]!r} does not exist")
    return kind, cfg[kind]


def load_predictor(cfg) -> Predictor:
    """Pick the backend from ``cfg.onnx`` / ``cfg.mindir`` / ``cfg.ckpt_path`` (exactly one)."""
    kind, path = _one_source(cfg, ("ckpt_path", "mindir", "onnx"),
                             "give exactly one of --ckpt_path CKPT, --mindir FILE, --onnx FILE")
    if kind == "onnx":
        print("device: CPU (onnxruntime; device_target is not used)", flush=True)
    else:
        import mindspore as ms

        print(configure_device(cfg, mode=cfg.mode if kind == "ckpt_path" else ms.GRAPH_MODE), flush=True)
    if kind == "ckpt_path":
        net, classes = load_network(cfg.model, path, cfg.num_classes)
        labels = read_labels(cfg.labels, classes) if cfg.labels else None
        return Predictor(_ms_runner(net), cfg.batch_size, Preprocess.from_config(cfg), labels, path)
    meta = read_sidecar(path)
    labels = read_labels(cfg.labels, meta["num_classes"]) if cfg.labels else meta.get("labels")
    if kind == "mindir":
        run = _ms_runner(load_mindir(path))
        batch = int(meta.get("batch") or cfg.batch_size)
    else:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ScriptError("onnx: running an ONNX file needs onnxruntime (pip install onnxruntime)") from None
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        run = lambda x: session.run(None, {input_name: x})[0]  # noqa: E731
        batch = int(meta.get("batch") or 1)
    return Predictor(run, batch, Preprocess.from_sidecar(meta), labels, path)


@dataclass
class SegPredictor:
    """``1CHW float32 -> stride-4 logits`` plus the test pipeline, class names and palette of a segmentation model."""
    run: Callable[[np.ndarray], object]
    preprocess: SegPreprocess  # an HWC uint8 image -> its 1CHW float32 input
    labels: list[str]
    palette: np.ndarray
    source: str

    def classes(self, image: np.ndarray) -> np.ndarray:
        """Class ids ``(H, W)`` of an HWC uint8 RGB image, at its size (the ops of ``predict_map``)."""
        return logits_to_map(self.run(self.preprocess(image)), image.shape[:2])


def _seg_palette(classes: int, given: list | None) -> np.ndarray:
    """The sidecar's (or ADE20K's) palette; other class counts get fixed pseudo-random colours."""
    if given is not None and len(given) == classes:
        return np.asarray(given, np.uint8)
    if classes == 150:
        return ade20k_palette()
    return np.random.default_rng(0).integers(0, 256, (classes, 3), dtype=np.uint8)


def _is_segmentation(model: str, mindir: str | None, onnx: str | None) -> bool:
    """Segmentation if the MINDIR's sidecar says so, or (checkpoint) if the model's registry entry does."""
    if mindir and os.path.isfile(mindir):
        return read_sidecar(mindir).get("task") == "segmentation"
    return not onnx and model_info(model).task == "segmentation"


def load_seg_predictor(cfg) -> SegPredictor:
    """A segmentation predictor from ``cfg.ckpt_path`` (with ``cfg.model``) or ``cfg.mindir`` (exactly one)."""
    import mindspore as ms

    kind, path = _one_source(cfg, ("ckpt_path", "mindir"), "segmentation: give exactly one of --ckpt_path CKPT "
                             "(with --model fpn_*) or --mindir FILE", "; ONNX export is MINDIR-only here")
    meta = read_sidecar(path) if kind == "mindir" else {}
    preprocess = (SegPreprocess.from_config(cfg) if kind == "ckpt_path"
                  else SegPreprocess.from_sidecar(meta, sidecar_path(path)))
    print(configure_device(cfg, mode=cfg.mode if kind == "ckpt_path" else ms.GRAPH_MODE), flush=True)
    if kind == "ckpt_path":
        net, classes = load_segmentation_network(cfg.model, path, cfg.num_classes)
        run = lambda x: net(ms.Tensor(x))  # noqa: E731
    else:
        graph = load_mindir(path, [None, 3, None, None])
        run = lambda x: graph(ms.Tensor(x))  # noqa: E731
        classes = int(meta["num_classes"])
    if classes > 255:
        raise ConfigError(f"segmentation: {classes} classes do not fit the uint8 class PNG (255 means none)")
    if cfg.labels:
        labels = read_labels(cfg.labels, classes)
    elif meta.get("labels"):
        labels = list(meta["labels"])
    else:
        labels = ade20k_classes() if classes == 150 else [f"class_{i}" for i in range(classes)]
    return SegPredictor(run, preprocess, labels, _seg_palette(classes, meta.get("palette")), path)


def predict_segmentation(predictor: SegPredictor, files: Sequence[str], output_dir: str,
                         topk: int) -> tuple[list[dict], list[str]]:
    """Write both PNGs per readable file; the top-k class areas per image, and one error line per unreadable one."""
    results, errors = [], []
    for path in files:
        try:
            image = np.asarray(_read_image(path))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            errors.append(f"{path}: cannot read image ({reason})")
            continue
        classes = predictor.classes(image).astype(np.uint8)
        os.makedirs(output_dir, exist_ok=True)
        stem = os.path.splitext(os.path.basename(path))[0]
        class_png = os.path.join(output_dir, f"{stem}_classes.png")
        overlay_png = os.path.join(output_dir, f"{stem}_overlay.png")
        with atomic_path(class_png) as tmp:
            Image.fromarray(classes, mode="L").save(tmp, format="PNG")
        with atomic_path(overlay_png) as tmp:
            Image.fromarray(overlay_classes(image, classes, predictor.palette)).save(tmp, format="PNG")
        counts = np.bincount(classes.ravel(), minlength=len(predictor.labels))
        order = np.argsort(-counts, kind="stable")[:topk]
        areas = [{"index": int(i), "label": predictor.labels[i], "share": float(counts[i] / classes.size)}
                 for i in order if counts[i]]
        results.append({"image": path, "width": int(image.shape[1]), "height": int(image.shape[0]),
                        "classes_png": class_png, "overlay_png": overlay_png, "areas": areas})
    return results, errors


def _split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate image paths (positional) from ``--key value`` options."""
    images, options = [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--"):
            options.append(token)
            key = token[2:].partition("=")[0].replace("-", "_")
            has_value = "=" in token or key not in SCHEMA and key not in ("config", "c")
            if not has_value and i + 1 < len(argv):
                nxt = argv[i + 1]
                is_bool = key in SCHEMA and SCHEMA[key].type is bool
                if not is_bool or nxt.lower() in _TRUE_FALSE:
                    options.append(nxt)
                    i += 1
        else:
            images.append(token)
        i += 1
    return images, options


def _read_image(path: str) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def predict_files(predictor: Predictor, files: Sequence[str], topk: int) -> tuple[list[dict], list[str]]:
    """Top-k predictions for each readable file, and one error line per unreadable one."""
    arrays, good, errors = [], [], []
    for path in files:
        try:
            arrays.append(predictor.preprocess(_read_image(path)))
            good.append(path)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            errors.append(f"{path}: cannot read image ({reason})")
    results = []
    if arrays:
        probs = softmax(predictor.logits(np.stack(arrays)))
        k = min(topk, probs.shape[1])
        for path, row in zip(good, probs):
            order = np.argsort(-row, kind="stable")[:k]
            results.append({"image": path, "topk": [{"index": int(i), "label": predictor.label(int(i)),
                                                     "prob": float(row[i])} for i in order]})
    return results, errors


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mindcv_poolformer.predict``."""

    def _main(args: list[str]) -> int:
        files, options = _split_argv(args)
        first = parse_cli(options, prog="predict", defaults={"batch_size": 8})
        cfg = parse_cli(options, prog="predict",
                        defaults={"batch_size": 8, **model_defaults(first.model)})
        if not files:
            raise ConfigError("no images given (usage: python -m mindcv_poolformer.predict IMG... --ckpt_path CKPT)")
        if _is_segmentation(cfg.model, cfg.mindir, cfg.onnx):
            return _main_segmentation(cfg, files)
        predictor = load_predictor(cfg)
        results, errors = predict_files(predictor, files, cfg.topk)
        for line in errors:
            print(f"predict: error: {line}", file=sys.stderr)
        for item in results:
            print(item["image"])
            for rank, entry in enumerate(item["topk"], 1):
                print(f"  {rank}. {entry['prob']:.4f}  {entry['label']}")
        if cfg.json:
            atomic_write_json(cfg.json, {"source": predictor.source, "predictions": results, "errors": errors})
        return 1 if errors else 0

    def _main_segmentation(cfg, files: list[str]) -> int:
        predictor = load_seg_predictor(cfg)
        results, errors = predict_segmentation(predictor, files, cfg.output_dir or ".", cfg.topk)
        for line in errors:
            print(f"predict: error: {line}", file=sys.stderr)
        for item in results:
            print(f"{item['image']} ({item['width']}x{item['height']}): {item['classes_png']}, {item['overlay_png']}")
            for rank, entry in enumerate(item["areas"], 1):
                print(f"  {rank}. {100 * entry['share']:6.2f}%  {entry['label']}")
        if cfg.json:
            atomic_write_json(cfg.json, {"source": predictor.source, "predictions": results, "errors": errors})
        return 1 if errors else 0

    return run_script(_main, "predict", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
