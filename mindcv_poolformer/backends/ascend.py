"""The Ascend backend: op forms that MindSpore 2.10 supports on each Ascend SoC, with the reference semantics.

- **Pooling mixer.** On the SoCs that MindSpore marks with the feature
  ``avg_pool2d_pad_constraint_train_successor`` (Atlas A2 / 910B and 910_93), ``nn.AvgPool2d``
  refuses any padding (``nn/layer/pooling.py``), while the native aclnn average pooling
  (``mint.nn.functional.avg_pool2d``, primitive ``AvgPool2D``) takes ``count_include_pad=False``
  directly: one kernel with exactly the reference's border semantics. On 910A that op is not
  offered, and the model's own form (zero padding, then a 'valid' AvgPool, over the valid count)
  stays: it uses no padding convention of the device at all.
- Everything else is the model as written: no ``Custom`` op ever enters an Ascend graph.

What stays unverified without an NPU: the numerical equality of aclnn ``AvgPool2D`` with
``count_include_pad=False`` to the reference (it has no CPU kernel here; the CPU tests pin the
model's form), and kernel availability beyond what MindSpore's source declares
(``backends/ascend_primitives.json``).
"""

from __future__ import annotations

from mindspore import Tensor, mint, nn

from ..models.layers import AvgPoolExcludePad, Pooling

__all__ = ["AscendAvgPoolExcludePad", "apply", "native_pooling", "remove"]

SUCCESSOR_FEATURE = "avg_pool2d_pad_constraint_train_successor"


def native_pooling() -> bool:
    """Whether this Ascend SoC is one on which MindSpore refuses padded AvgPool2d and offers aclnn pooling."""
    from mindspore._c_expression import MSContext

    return bool(MSContext.get_instance().ascend_soc_supports_feature(SUCCESSOR_FEATURE))


class AscendAvgPoolExcludePad(nn.Cell):
    """``count_include_pad=False`` average through the native aclnn op (Atlas A2 and later)."""

    def __init__(self, pool_size: int) -> None:
        super().__init__()
        self.pool_size = pool_size
        self.padding = pool_size // 2

    def construct(self, x: Tensor) -> Tensor:
        return mint.nn.functional.avg_pool2d(x, self.pool_size, 1, self.padding, False, False)


def apply(net: nn.Cell) -> int:
    """Apply the Ascend op forms to ``net`` in place; returns how many pooling mixers changed."""
    if not native_pooling():
        return 0
    changed = 0
    for _, cell in list(net.cells_and_names()):
        if isinstance(cell, Pooling) and type(cell.pool) is AvgPoolExcludePad:
            cell.pool = AscendAvgPoolExcludePad(cell.pool_size)
            changed += 1
    return changed


def remove(net: nn.Cell) -> None:
    """Undo ``apply``."""
    for _, cell in list(net.cells_and_names()):
        if isinstance(cell, Pooling) and isinstance(cell.pool, AscendAvgPoolExcludePad):
            cell.pool = AvgPoolExcludePad(cell.pool_size)
