"""Mixed precision: the one policy that training (``train/trainer.py``) and inference (``evaluate.py``) apply.

``O2`` is MindSpore's O2 (every cell cast to float16, the logits cast back to float32) plus what
its black list misses, since that list names only MindSpore's own ``BatchNorm*``/``LayerNorm``:

- every normalisation cell (ours and MindSpore's) computes in float32;
- every softmax *cell* computes in float32 and hands float16 on, so the matmul after it stays
  float16 (MindSpore's O2 treats its black-listed cells the same way);
- on the CPU only, every MetaFormer block stays float32 too (``_cpu_float32_cells`` says why).

``Cell.to_float`` casts where a cell is *called*: in GRAPH mode the inputs and Parameters at the
entry of the cell's graph, in PYNATIVE mode the inputs of every op run during the call, which also
undoes an explicit ``astype(float32)`` written inside a float16 cell. So a norm or softmax is float32
only when the model calls it as a cell (``self.norm1(x)``), never through a method or a bare op
such as ``ops.softmax`` inside a float16 cell; a cell's flag also overrides MindSpore's per-primitive
``auto`` lists below it. The loss is outside this network: ``train.step.WithLoss`` casts the logits
to float32 and the loss cells compute in float32.
"""

from __future__ import annotations

from mindspore import nn, ops
from mindspore.common import dtype as mstype

from .config import ConfigError
from .models.layers import GroupNorm1, LayerNormChannel
from .models.metaformer import MetaFormerBlock, PositionEmbeddedStage

__all__ = ["AMP_LEVELS", "apply_amp", "float32_cells"]

AMP_LEVELS = ("O0", "O1", "O2", "O3")


class _Float16Output(nn.Cell):
    """A float32 cell inside a float16 network: its result is cast to float16 for the cells after it."""

    def __init__(self, cell: nn.Cell) -> None:
        super().__init__(auto_prefix=False)
        self.cell = cell

    def construct(self, *args):
        return ops.cast(self.cell(*args), mstype.float16)


def _norm_cells() -> tuple[type, ...]:

    return (GroupNorm1, LayerNormChannel, nn.GroupNorm, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d,
            nn.BatchNorm3d)


def _softmax_cells() -> tuple[type, ...]:
    return (nn.Softmax, nn.LogSoftmax)


def _cpu_float32_cells() -> tuple[type, ...]:
    """The cells O2 keeps float32 on the CPU only: the blocks, whose work is elementwise between 1x1 convs.

    A CPU-only choice, for memory and speed, measured with MindSpore 2.10 (bench/amp_memory.py):
    - Conv2D, BiasAdd, MatMul, BatchMatMul and StridedSlice have no float16 CPU kernel: the backend
      wraps each in casts and computes it in float32, so float16 saves no compute there;
    - every float16 binary elementwise kernel (Add/Sub/Mul/Div with a same-shape or scalar operand)
      keeps ~15 bytes per output element for the life of a GRAPH-mode graph, where float32 ones
      reuse their memory, and runs 3-10x slower. A PoolFormer block runs a dozen of them (the GELU,
      the pooling mixer's ``pool(x) - x``, the residual adds), so an S12 eval under O2 held ~0.4 GB
      per image: 13.7 GB at batch 32 against 0.8 GB at O0, and batch 128 went out of memory;
    - float32 blocks run on the fused CPU kernels (``backends/cpu.py``), which are float32 only.
    The stem/downsampling convs and the classifier stay float16, as on Ascend, whose O2 keeps the
    blocks' convs and matmuls in float16.
    """
    return (MetaFormerBlock, PositionEmbeddedStage)


def float32_cells(amp_level: str, device_target: str) -> tuple[type, ...]:
    """The cell classes that ``apply_amp`` keeps in float32 at ``amp_level`` on ``device_target``."""
    if amp_level != "O2":
        return ()
    cpu = _cpu_float32_cells() if device_target == "CPU" else ()
    return _norm_cells() + _softmax_cells() + cpu


def _keep_float32(net: nn.Cell, keep: tuple[type, ...]) -> None:
    """Cast every ``keep`` cell of ``net`` back to float32; softmax cells hand float16 on (see the module doc)."""
    softmax = _softmax_cells()
    for _, cell in list(net.cells_and_names()):
        if isinstance(cell, keep):
            cell.to_float(mstype.float32)
        if isinstance(cell, _Float16Output):
            continue
        wrapped = False
        for name, child in list(cell.name_cells().items()):
            if isinstance(child, softmax):
                setattr(cell, name, _Float16Output(child.to_float(mstype.float32)))
                wrapped = True
        if wrapped and isinstance(cell, nn.SequentialCell):
            cell.cell_list = list(cell.cells())


def apply_amp(net: nn.Cell, amp_level: str = "O0", device_target: str | None = None) -> nn.Cell:
    """Mixed precision for training and inference: O0 float32, O2 float16 except norms/softmax, O3 all float16.

    ``device_target`` selects the device's O2 policy (default: MindSpore's current device target);
    ``"Ascend"`` builds the Ascend policy on any machine. The returned network gives float32 logits.
    """
    import mindspore as ms

    if amp_level == "O0":
        return net
    if amp_level not in AMP_LEVELS:
        raise ConfigError(f"amp_level: {amp_level!r} is not one of {', '.join(AMP_LEVELS)}")
    if amp_level == "O1":  # its rewrite fails on subclassed cells (NameError: Conv2dOpt) with a long trace
        raise ConfigError("amp_level: O1 is not supported (MindSpore's O1 network rewrite cannot handle these "
                          "models); use O2 (fp16 except norms) or O3")
    keep = float32_cells(amp_level, device_target or ms.get_context("device_target"))
    net = ms.amp.auto_mixed_precision(net, amp_level)
    if keep:
        _keep_float32(net, keep)
    return net
