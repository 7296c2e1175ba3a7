"""Deployable artifacts: MINDIR (dynamic batch), ONNX (an export-only but numerically equal graph), AIR.

Every artifact is checked after writing against the checkpointed network on a random batch and
gets a JSON sidecar (``OUT.json``) with what a predictor needs: model, classes, preprocessing.

ONNX: MindSpore 2.10 cannot export ``PadV3`` (``ops.pad``) or ``Erf`` (nor Rsqrt/Reciprocal, which
GroupNorm1 avoids itself). ``make_onnx_exportable`` swaps the cells that use them for equal
formulations with the same parameter names: the token mixer uses ``AvgPool2d(pad_mode="same")``,
which MindSpore and ONNX (``count_include_pad=0``) both average over the valid window only, as the
reference does; the exact GELU becomes ``relu(x) - |x| * erfc(|x|/sqrt2) / 2`` with erfc from
Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), an identity that needs no sign op.

Segmentation (``fpn_*``): the MINDIR takes ``[N, 3, H, W]`` with all three dynamic and returns the
network's stride-4 logits; the FPN's resizes read their sizes from runtime shapes (``DynamicResize``,
the same primitives ``ops.interpolate`` calls, without its constant-size check). A reloaded graph
must be given dynamic inputs (``load_mindir(dynamic_shape=)``): a plain ``GraphCell`` returns the
first call's output shape for every later shape.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.common import dtype as mstype

from .._atomic import atomic_write_json
from .._runtime import configure_device
from .._script import run_script
from ..backends import apply_backend
from ..config import model_defaults, parse_cli
from ..data.ade20k import SegPreprocess, ade20k_classes, ade20k_palette
from ..data.listing import scan_image_folder
from ..errors import CheckpointError, ConfigError, ScriptError
from ..models.fpn import Resize
from ..models.layers import Pooling
from ..models.registry import model_info
from ..transforms import Preprocess
from .artifacts import load_mindir, load_network, load_segmentation_network, read_labels, sidecar_path

__all__ = [
    "DynamicResize",
    "ExportResult",
    "ErfFreeGELU",
    "SamePadPooling",
    "export_model",
    "export_segmentation",
    "make_dynamic_resizable",
    "make_onnx_exportable",
]

_LOG = logging.getLogger("mindcv_poolformer")

SUFFIXES = {"MINDIR": ".mindir", "ONNX": ".onnx", "AIR": ".air"}
MINDIR_TOLERANCE = 1e-4  # absolute, on the logits
ONNX_TOLERANCE = 1e-4  # times max(1, max |logit|)


def _erfc_as(a: Tensor) -> Tensor:
    """erfc(a) for a >= 0 by Abramowitz & Stegun 7.1.26, from ops ONNX export accepts (no Reciprocal)."""
    t = ops.div(ops.ones_like(a), 1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return poly * ops.exp(-a * a)


class ErfFreeGELU(nn.Cell):
    """Exact-erf GELU without Erf: ``x*Phi(x) = relu(x) - |x| * erfc(|x|/sqrt(2)) / 2`` holds for either sign."""

    def construct(self, x: Tensor) -> Tensor:
        magnitude = ops.abs(x)
        return ops.relu(x) - 0.5 * magnitude * _erfc_as(magnitude * 0.7071067811865476)


class SamePadPooling(nn.Cell):
    """Token mixer via ``AvgPool2d(pad_mode='same')``: averages the valid window only, like the reference."""

    def __init__(self, pool_size: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, pad_mode="same")

    def construct(self, x: Tensor) -> Tensor:
        return self.pool(x) - x


def make_onnx_exportable(net):
    """Swap, in place, the cells ONNX export rejects for equal formulations; parameter names are kept."""
    apply_backend(net, "none")
    for _, cell in list(net.cells_and_names()):
        for attr, sub in list(cell.name_cells().items()):
            if isinstance(sub, nn.GELU):
                if str(getattr(sub, "approximate", "none")).lower() in ("tanh", "true"):
                    continue  # tanh GELU exports as is
                setattr(cell, attr, ErfFreeGELU())
            elif isinstance(sub, Pooling):
                setattr(cell, attr, SamePadPooling(sub.pool_size))
    # Fresh cells carry short parameter names ("gamma"); graph compilation needs unique full names.
    for name, param in net.parameters_and_names():
        param.name = name
    return net


class DynamicResize(nn.Cell):
    """``models.fpn.Resize`` with sizes that may be runtime values: the primitives of ``ops.interpolate``.

    ``ResizeNearestNeighborV2`` (no half-pixel centres) and ``ResizeBilinearV2(half_pixel_centers=True)``
    are what ``ops.interpolate`` runs for these modes, so the values are the same; only its check that
    ``size`` is a constant, which a dynamic-H/W export cannot pass, is left out.
    """

    def __init__(self, mode: str, scale_factor: int | None = None) -> None:
        super().__init__()
        from mindspore.ops.operations import _sequence_ops

        self.mode = mode
        self.scale_factor = scale_factor
        self.to_tensor = _sequence_ops.TupleToTensor()
        self.nearest = ops.ResizeNearestNeighborV2()
        self.bilinear = ops.ResizeBilinearV2(align_corners=False, half_pixel_centers=True)

    def construct(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            size = (x.shape[2] * self.scale_factor, x.shape[3] * self.scale_factor)
        if self.mode == "nearest":
            return self.nearest(x, self.to_tensor(size, mstype.int32))
        return self.bilinear(x, size)


def make_dynamic_resizable(net):
    """Swap, in place, every ``Resize`` (inside ``SequentialCell`` too) for a ``DynamicResize``."""
    for _, cell in list(net.cells_and_names()):
        for attr, sub in list(cell.name_cells().items()):
            if isinstance(sub, Resize):
                new = DynamicResize(sub.mode, sub.scale_factor)
                if isinstance(cell, nn.SequentialCell):
                    cell[int(attr)] = new  # setattr would leave the cell list running the old one
                else:
                    setattr(cell, attr, new)
    return net


@dataclass
class ExportResult:
    """Where the artifact went and how closely it reproduces the checkpointed network."""
    path: str
    sidecar: str
    file_format: str
    batch: int | None
    max_abs_diff: float | None
    note: str


def _max_diff(got: np.ndarray, want: np.ndarray) -> float:
    """Max |difference|; a shape mismatch is infinite (broadcasting would hide a wrong output shape)."""
    return float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")


def _output_path(file_name: str, model: str, file_format: str) -> str:
    suffix = SUFFIXES[file_format]
    path = file_name or model
    return path if path.lower().endswith(suffix) else path + suffix


def _check_backend(file_format: str) -> None:
    import mindspore as ms

    if file_format == "AIR":
        target = ms.get_context("device_target")
        if target != "Ascend":
            raise ScriptError(f"AIR export needs the Ascend backend (MindSpore only writes AIR there); this run uses "
                              f"{target}. Export MINDIR or ONNX here, or run with --device_target Ascend on Ascend")


def _prepare_paths(file_name: str, model: str, file_format: str, overwrite: bool) -> tuple[str, str]:
    """The artifact and sidecar paths, refused if they exist (unless ``overwrite``); their folder is created."""
    path = _output_path(file_name, model, file_format)
    meta_path = sidecar_path(path)
    for existing in (path, meta_path):
        if os.path.exists(existing) and not overwrite:
            raise ScriptError(f"{existing} already exists; pass --overwrite True to replace it")
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return path, meta_path


SEGMENTATION_OUTPUT = ("logits at stride 4, [N, classes, H/4, W/4] float32 for H, W multiples of 32 (the "
                       "network's own output); resize them bilinearly (align_corners=False, half-pixel centres) "
                       "to the original image size and take the argmax over classes, as mmseg does")


def _finish(path: str, meta_path: str, meta: dict, ckpt_path: str, diff: float | None, tolerance: float,
            note: str) -> ExportResult:
    """Write the sidecar (with the reload check's outcome), then refuse an artifact that failed the check.

    The sidecar is written first so that a failed check still leaves the numbers to look at.
    """
    meta.update({"checkpoint": os.path.abspath(ckpt_path), "max_abs_diff": diff,
                 "tolerance": tolerance if math.isfinite(tolerance) else None, "note": note})
    atomic_write_json(meta_path, meta)
    if diff is not None and not diff <= tolerance:
        raise ScriptError(f"{path}: outputs differ from the checkpointed network by {diff:.3g} "
                          f"(tolerance {tolerance:g})")
    return ExportResult(path, meta_path, meta["file_format"], meta["batch"], diff, note)


def export_segmentation(
    model: str,
    ckpt_path: str,
    file_format: str = "MINDIR",
    file_name: str = "",
    batch_size: int = 1,
    image_size: int = 224,
    num_classes: int | None = None,
    preprocess: SegPreprocess | None = None,
    labels: list[str] | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> ExportResult:
    """Export a Semantic FPN: MINDIR with dynamic N, H and W, checked at two input sizes; AIR at one size.

    The graph returns stride-4 logits, not logits at the input size: 16x less output (150 channels at
    2048x512 would be 630 MB per image), and the predictor's single bilinear resize to the original
    image size is then mmseg's own order (resizing input-size logits again would be a second,
    different interpolation). ``image_size`` is the side of the check inputs, not a fixed input size.
    ``preprocess`` is the test preprocessing the sidecar records (default: the model record's
    normalisation with mmseg's ADE20K test resize).
    """
    import mindspore as ms

    preprocess = preprocess or SegPreprocess.for_model(model)

    if file_format == "ONNX":
        raise ScriptError(f"ONNX export of the segmentation model {model} is not supported; export MINDIR")
    if image_size % 32:
        raise ConfigError(f"image_resize: {image_size} must be a multiple of 32 (the network downsamples by 32)")
    if not ckpt_path:
        raise ConfigError("ckpt_path: no checkpoint given (pass --ckpt_path FILE)")
    if not os.path.isfile(ckpt_path):
        raise CheckpointError(f"ckpt_path: {ckpt_path!r} does not exist")
    net, classes = load_segmentation_network(model, ckpt_path, num_classes)
    if labels is None and classes == 150:
        labels = ade20k_classes()
    if labels is not None and len(labels) != classes:
        raise ConfigError(f"labels: {len(labels)} names given but the model has {classes} classes")
    path, meta_path = _prepare_paths(file_name, model, file_format, overwrite)
    apply_backend(net, "none")
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(seed)
    shapes = [(batch_size, 3, image_size, image_size), (1, 3, image_size + 32, image_size + 64)]
    inputs = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    references = [net(ms.Tensor(x)).asnumpy() for x in inputs]

    diff: float | None = None
    if file_format == "MINDIR":
        export_net, _ = load_segmentation_network(model, ckpt_path, classes)
        apply_backend(export_net, "none")
        make_dynamic_resizable(export_net)
        dynamic = [None, 3, None, None]
        ms.export(export_net, ms.Tensor(shape=dynamic, dtype=ms.float32), file_name=path, file_format="MINDIR")
        graph = load_mindir(path, dynamic)
        diffs = [_max_diff(graph(ms.Tensor(x)).asnumpy(), ref) for x, ref in zip(inputs, references)]
        diff = max(diffs)
        sizes = " and ".join(f"{n}x3x{h}x{w}" for n, _, h, w in shapes)
        note = (f"dynamic batch, height and width; reloaded with ms.load + nn.GraphCell, max |diff| {diff:.3g} "
                f"on {sizes}")
        tolerance = MINDIR_TOLERANCE
        batch, hw = None, None
    else:
        ms.export(net, ms.Tensor(inputs[0]), file_name=path, file_format="AIR")
        note = f"fixed input {batch_size}x3x{image_size}x{image_size}"
        tolerance = float("inf")
        batch, hw = batch_size, [image_size, image_size]

    meta = {
        "model": model,
        "task": "segmentation",
        "num_classes": classes,
        "labels": labels,
        "palette": ade20k_palette().tolist() if classes == 150 else None,
        "palette_source": "ADE20K, mmseg's ADE20KDataset palette (mindcv_poolformer.data.ade20k.ade20k_palette)"
                          if classes == 150 else None,
        "input": "[N, 3, H, W] float32 RGB, normalised; " + ("N, H and W dynamic (H, W multiples of the size "
                                                              "divisor)" if hw is None else f"fixed {batch}x3x{hw}"),
        "output": SEGMENTATION_OUTPUT,
        "preprocessing": {"resize": "keep the aspect ratio to fit seg_scale (long, short), then resize each "
                                    "side up to a multiple of size_divisor; bilinear (mmseg's test pipeline)",
                          **preprocess.to_sidecar()},
        "image_size": hw,
        **preprocess.to_sidecar(),  # the flat keys predict reads (SegPreprocess.from_sidecar)
        "crop_pct": None,
        "interpolation": "bilinear",
        "file_format": file_format,
        "batch": batch,
        "checked_shapes": [list(s) for s in shapes] if diff is not None else None,
    }
    return _finish(path, meta_path, meta, ckpt_path, diff, tolerance, note)


def export_model(
    model: str,
    ckpt_path: str,
    file_format: str = "MINDIR",
    file_name: str = "",
    batch_size: int = 1,
    image_size: int = 224,
    num_classes: int | None = None,
    preprocess: Preprocess | SegPreprocess | None = None,
    labels: list[str] | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> ExportResult:
    """Export ``model`` + ``ckpt_path`` and verify the artifact (MINDIR reloaded, ONNX in onnxruntime).

    MINDIR gets a dynamic batch dimension; ONNX has a fixed ``batch_size`` (MindSpore 2.10 refuses
    dynamic shapes for ONNX). Raises ScriptError if the artifact's outputs differ from the network
    by more than the tolerance, leaving the file for inspection. ``preprocess`` is the eval
    preprocessing the sidecar records (default: the model record's at ``image_size``): a classifier's
    ``Preprocess``, whose ``size`` is the graph's input side, or a segmentation model's
    ``SegPreprocess``, for ``export_segmentation`` (checked at ``image_size``).
    """
    import mindspore as ms

    file_format = file_format.upper()
    if file_format not in SUFFIXES:
        raise ConfigError(f"file_format: {file_format!r} is not one of {', '.join(SUFFIXES)}")
    _check_backend(file_format)
    segmentation = model_info(model).task == "segmentation"
    kind = SegPreprocess if segmentation else Preprocess
    if preprocess is not None and not isinstance(preprocess, kind):
        raise TypeError(f"preprocess: {model} takes a {kind.__name__}, not a {type(preprocess).__name__}")
    if segmentation:
        return export_segmentation(model, ckpt_path, file_format, file_name, batch_size, image_size, num_classes,
                                   preprocess, labels, overwrite, seed)
    preprocess = preprocess or Preprocess.for_model(model, image_size)
    image_size = preprocess.size
    if image_size % 32:
        raise ConfigError(f"image_resize: {image_size} must be a multiple of 32 (the network downsamples by 32)")
    path, meta_path = _prepare_paths(file_name, model, file_format, overwrite)
    net, classes = load_network(model, ckpt_path, num_classes)
    apply_backend(net, "none")  # an exported graph is device-neutral: never this machine's kernel library
    if labels is not None and len(labels) != classes:
        raise ConfigError(f"labels: {len(labels)} names given but the model has {classes} classes")
    ms.set_context(mode=ms.GRAPH_MODE)
    x = np.random.default_rng(seed).standard_normal((batch_size, 3, image_size, image_size)).astype(np.float32)
    reference = net(ms.Tensor(x)).asnumpy()

    diff: float | None = None
    batch: int | None = batch_size
    if file_format == "MINDIR":
        ms.export(net, ms.Tensor(shape=[None, 3, image_size, image_size], dtype=ms.float32),
                  file_name=path, file_format="MINDIR")
        batch = None
        graph = load_mindir(path, [None, 3, image_size, image_size])
        diff = _max_diff(graph(ms.Tensor(x)).asnumpy(), reference)
        diff = max(diff, _max_diff(graph(ms.Tensor(x[:1])).asnumpy(), reference[:1]))
        note = f"dynamic batch; reloaded with ms.load + nn.GraphCell, max |diff| {diff:.3g} on batch {batch_size} and 1"
        tolerance = MINDIR_TOLERANCE
    elif file_format == "ONNX":
        export_net, _ = load_network(model, ckpt_path, classes)
        make_onnx_exportable(export_net)
        swapped = float(np.abs(export_net(ms.Tensor(x)).asnumpy() - reference).max())
        ms.export(export_net, ms.Tensor(x), file_name=path, file_format="ONNX")
        note = (f"fixed batch {batch_size}; erf-free exact GELU (A&S 7.1.26), max |diff| of the export graph "
                f"in MindSpore {swapped:.3g}")
        try:
            import onnxruntime as ort
        except ImportError:
            note += "; not checked in onnxruntime (not installed)"
        else:
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            out = session.run(None, {session.get_inputs()[0].name: x})[0]
            diff = float(np.abs(out - reference).max())
            note += f"; onnxruntime vs MindSpore max |diff| {diff:.3g}"
        # float32 rounding of the reformulated ops grows with the logits' size: relative tolerance.
        tolerance = ONNX_TOLERANCE * max(1.0, float(np.abs(reference).max()))
    else:
        ms.export(net, ms.Tensor(x), file_name=path, file_format="AIR")
        note = f"fixed batch {batch_size}"
        tolerance = float("inf")

    meta = {
        "model": model,
        "num_classes": classes,
        **preprocess.to_sidecar(),
        "labels": labels,
        "file_format": file_format,
        "batch": batch,
    }
    return _finish(path, meta_path, meta, ckpt_path, diff, tolerance, note)


def main(argv: list[str] | None = None) -> int:
    """``python export.py --model NAME --ckpt_path CKPT --file_format MINDIR|AIR|ONNX --file_name OUT``."""
    import sys

    import mindspore as ms

    def _main(args: list[str]) -> int:
        first = parse_cli(args, prog="export.py", defaults={"batch_size": 1})
        cfg = parse_cli(args, prog="export.py",
                        defaults={"batch_size": 1, **model_defaults(first.model)})
        print(configure_device(cfg, mode=ms.GRAPH_MODE), flush=True)
        labels = None
        if cfg.labels:
            labels = read_labels(cfg.labels)
        elif cfg.data_dir:
            _, labels, _ = scan_image_folder(cfg.data_dir, cfg.val_split)
        segmentation = model_info(cfg.model).task == "segmentation"
        preprocess = SegPreprocess.from_config(cfg) if segmentation else Preprocess.from_config(cfg)
        result = export_model(cfg.model, cfg.ckpt_path, cfg.file_format, cfg.file_name, cfg.batch_size,
                              image_size=cfg.image_resize, num_classes=cfg.num_classes, preprocess=preprocess,
                              labels=labels, overwrite=cfg.overwrite, seed=cfg.seed)
        print(f"wrote {result.path} ({result.file_format}); {result.note}")
        print(f"wrote {result.sidecar}")
        return 0

    return run_script(_main, "export.py", sys.argv[1:] if argv is None else argv)
