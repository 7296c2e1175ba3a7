"""Loading what training and export wrote: a checkpoint into its network for inference, a MINDIR, a sidecar.

Inference loads strictly (a head whose shape differs from the checkpoint's is an error, never a
re-initialisation), which is what validate.py, export.py and predict.py share.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from .._runtime import native_stderr_only_on_success
from ..checkpoint import check_architecture, load_checkpoint_into, read_state_dict, split_model_state, to_canonical
from ..errors import CheckpointError, ConfigError, ScriptError
from ..factory import create_model

__all__ = ["load_mindir", "load_network", "load_segmentation_network", "read_labels", "read_sidecar", "sidecar_path"]


def load_network(model: str, ckpt_path: str, num_classes: int | None = None):
    """Build ``model`` with the checkpoint's class count (or ``num_classes``) and load it strictly.

    Unlike fine-tuning, inference must not re-initialise a head whose shape differs: that is an error.
    Returns ``(net, num_classes)``.
    """
    if not ckpt_path:
        raise ConfigError("ckpt_path: no checkpoint given (pass --ckpt_path FILE)")
    if not os.path.isfile(ckpt_path):
        raise CheckpointError(f"ckpt_path: {ckpt_path!r} does not exist")
    state, _ = to_canonical(read_state_dict(ckpt_path))
    state, _ = split_model_state(state)
    check_architecture(state, model, ckpt_path)
    head = state.get("head.weight")
    ckpt_classes = int(head.shape[0]) if head is not None else None
    if num_classes and ckpt_classes and num_classes != ckpt_classes:
        raise CheckpointError(f"num_classes: {ckpt_path} has a {ckpt_classes}-class head but num_classes is "
                              f"{num_classes}; drop --num_classes (or set it to {ckpt_classes}) to use the "
                              "checkpoint's head (training with another num_classes fine-tunes a new head)")
    classes = num_classes or ckpt_classes
    if not classes:
        raise CheckpointError(f"{ckpt_path}: the checkpoint has no classifier head; pass --num_classes")
    net = create_model(model, num_classes=classes)
    load_checkpoint_into(net, state)
    net.set_train(False)
    return net, classes


def load_mindir(path: str, dynamic_shape: Sequence[int | None] | None = None):
    """An exported MINDIR as a callable ``GraphCell``; a damaged file is a one-line ``CheckpointError``.

    ``dynamic_shape`` (``None`` for a dynamic axis) compiles the graph once for every shape it admits;
    without it MindSpore 2.10 reuses the first call's output shape when a dynamic axis changes.
    """
    import mindspore as ms

    try:
        with native_stderr_only_on_success():
            graph = ms.load(path)
    except Exception as exc:  # MindSpore raises RuntimeError/ValueError (and logs a C++ error) for a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a loadable MINDIR ({first})") from None
    cell = ms.nn.GraphCell(graph)
    if dynamic_shape is not None:
        cell.set_inputs(ms.Tensor(shape=list(dynamic_shape), dtype=ms.float32))
    return cell


def load_segmentation_network(model: str, ckpt_path: str, num_classes: int | None = None):
    """Build the Semantic FPN ``model`` with the checkpoint's class count and load it strictly; ``(net, classes)``."""
    state, _ = to_canonical(read_state_dict(ckpt_path))
    state, _ = split_model_state(state)
    head = state.get("decode_head.conv_seg.weight")
    if head is None:
        raise CheckpointError(f"{ckpt_path}: not a Semantic FPN checkpoint (no decode_head.conv_seg); {model} needs "
                              "a segmentation checkpoint")
    classes = int(head.shape[0])
    if num_classes and num_classes != classes:
        raise CheckpointError(f"num_classes: {ckpt_path} has {classes} classes but num_classes is {num_classes}; drop "
                              "--num_classes")
    net = create_model(model, num_classes=classes)
    load_checkpoint_into(net, state)
    net.set_train(False)
    return net, classes


def sidecar_path(artifact: str) -> str:
    """``model.onnx`` -> ``model.onnx.json``."""
    return f"{artifact}.json"


def read_sidecar(artifact: str) -> dict:
    """The JSON written next to an exported artifact; ScriptError if absent or unreadable."""
    path = sidecar_path(artifact)
    if not os.path.isfile(path):
        raise ScriptError(f"{path} not found: it is written by export.py next to {artifact} and holds its "
                          "preprocessing and labels")
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ScriptError(f"{path}: not a readable JSON sidecar ({exc})") from None
    for key in ("image_size", "num_classes", "mean", "std", "crop_pct", "interpolation"):
        if key not in meta:
            raise ScriptError(f"{path}: key {key!r} is missing")
    return meta


def read_labels(path: str, num_classes: int | None = None) -> list[str]:
    """One class name per line (blank lines ignored); the count must match ``num_classes`` if given."""
    if not os.path.isfile(path):
        raise ConfigError(f"labels: {path!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        labels = [line.strip() for line in fh if line.strip()]
    if num_classes is not None and len(labels) != num_classes:
        raise ConfigError(f"labels: {path} has {len(labels)} names but the model has {num_classes} classes")
    return labels
