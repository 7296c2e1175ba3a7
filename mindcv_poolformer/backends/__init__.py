"""Device backends: how a built, device-neutral model computes on one kind of device.

The model (``mindcv_poolformer.models``) reads like the paper and imports nothing device-specific.
A backend is applied to a built network in place and shares its Parameters, so names, checkpoint
keys and the optimizer are unchanged; it only swaps op forms (``cpu``: the fused C++ kernels of the
PoolFormer block, the FPN's 3x3 convs on their GEMM and a faster pooling form; ``ascend``: native
pooling on Atlas A2) or nothing (``none``: the model as written, which is also what export writes).

``apply_backend(net)`` picks the backend of MindSpore's current device target (``auto``), and first
undoes any backend applied before, so it can switch a model back before its first run.
"""

from __future__ import annotations

from collections.abc import Callable

from mindspore import nn

from ..kernels import cpu_kernels
from . import ascend, cpu

__all__ = ["BACKENDS", "applied_backend", "apply_backend", "backend_all_finite", "backend_resized_pixel_nll",
           "resolve_backend"]

BACKENDS = ("auto", "cpu", "ascend", "none")
_FOR_TARGET = {"CPU": "cpu", "Ascend": "ascend", "GPU": "none"}


def resolve_backend(backend: str = "auto") -> str:
    """``auto`` -> the backend of MindSpore's device target; the other names are returned as they are."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    import mindspore as ms

    return _FOR_TARGET.get(ms.get_context("device_target"), "none")


def apply_backend(net: nn.Cell, backend: str = "auto") -> str:
    """Put ``net`` into the form of ``backend`` (after undoing any earlier one); returns the backend applied.

    Call before the network's first run: the op forms are compiled into its graph.
    """
    name = resolve_backend(backend)
    cpu.remove(net)
    ascend.remove(net)
    if name == "cpu":
        cpu.apply(net, cpu_kernels())
    elif name == "ascend":
        ascend.apply(net)
    return name


def applied_backend(net: nn.Cell) -> str:
    """The backend ``net`` is in, read from its cells: ``cpu``, ``ascend`` or ``none``."""
    for _, cell in net.cells_and_names():
        if isinstance(cell, (cpu.FoldedPoolFormerBlock, cpu.CpuAvgPoolExcludePad, cpu.CpuConv3x3, cpu.CpuFPN)):
            return "cpu"
        if isinstance(cell, ascend.AscendAvgPoolExcludePad):
            return "ascend"
    return "none"


def backend_all_finite(backend: str = "auto") -> Callable | None:
    """The backend's fused check that all gradients are finite (for the training step), or None for MindSpore's."""
    if resolve_backend(backend) != "cpu":
        return None
    kernels = cpu_kernels()
    return kernels.all_finite if kernels is not None else None


def backend_resized_pixel_nll(backend: str = "auto") -> Callable | None:
    """The backend's fused segmentation NLL, or None for MindSpore's ops.

    ``fn(logits (B,C,h,w) float32, labels (B,H,W) int32, ignore_index (1,) int32)`` returns each image's NLL
    summed over its labelled pixels (logits resized bilinearly to the label size, align_corners=False) and
    the per-pixel log-sum-exp; CPU kernels only.
    """
    if resolve_backend(backend) != "cpu":
        return None
    kernels = cpu_kernels()
    return kernels.resized_pixel_nll if kernels is not None else None
