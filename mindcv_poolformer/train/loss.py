"""Losses on soft targets: label smoothing and mixup/cutmix both arrive as probability vectors."""

from __future__ import annotations

from mindspore import Tensor, nn, ops

__all__ = ["SoftTargetCrossEntropy", "SoftTargetBCE", "create_loss"]


class SoftTargetCrossEntropy(nn.Cell):
    """Mean over the batch of ``-sum_c target_c * log_softmax(logits)_c``, computed in float32.

    Equal to cross entropy with label smoothing when the targets are smoothed one-hot vectors.
    """

    def construct(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.astype("float32")
        return (-targets.astype("float32") * ops.log_softmax(logits, axis=-1)).sum(axis=-1).mean()


class SoftTargetBCE(nn.Cell):
    """Binary cross entropy with logits on soft targets (per class), float32."""

    def construct(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.astype("float32")
        return ops.binary_cross_entropy_with_logits(logits, targets.astype("float32"), reduction="mean")


def create_loss(name: str) -> nn.Cell:
    """``CE`` (default) or ``BCE``; label smoothing is applied to the targets by the data pipeline."""
    return SoftTargetBCE() if name == "BCE" else SoftTargetCrossEntropy()
