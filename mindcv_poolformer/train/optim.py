"""Parameter groups and the optimizer factory.

The official PoolFormer recipe (timm's ``create_optimizer`` with ``filter_bias_and_bn``) applies
weight decay only to parameters with more than one dimension: GroupNorm scales/shifts, biases and
LayerScale vectors are not decayed. MindCV decays everything; ``filter_bias_and_bn: False`` gets
that behaviour back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from mindspore import Tensor, nn

__all__ = ["split_decay", "param_groups", "create_optimizer"]


def split_decay(net: nn.Cell) -> tuple[list, list]:
    """(decayed, not decayed) trainable parameters: every 1-D parameter and every bias is not decayed."""
    decay, no_decay = [], []
    for param in net.trainable_params():
        if len(param.shape) <= 1 or param.name.endswith(".bias") or param.name.endswith(".beta"):
            no_decay.append(param)
        else:
            decay.append(param)
    return decay, no_decay


def param_groups(net: nn.Cell, weight_decay: float, filter_bias_and_bn: bool = True) -> list[dict]:
    """MindSpore group-parameter list with per-group weight decay."""
    if not filter_bias_and_bn or weight_decay == 0:
        return [{"params": net.trainable_params(), "weight_decay": weight_decay}]
    decay, no_decay = split_decay(net)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def create_optimizer(net: nn.Cell, cfg: Mapping[str, Any], lr: np.ndarray | float) -> nn.Optimizer:
    """Build ``cfg.opt`` over ``net`` with a per-step learning-rate array (indexed by global_step).

    ``adamw`` is ``nn.AdamWeightDecay`` (decoupled decay), which runs on CPU, Ascend and GPU;
    ``ms.mint.optim.AdamW`` has no CPU kernel.
    """
    learning_rate = Tensor(np.asarray(lr, dtype=np.float32)) if np.ndim(lr) else float(lr)
    groups = param_groups(net, float(cfg["weight_decay"]), bool(cfg["filter_bias_and_bn"]))
    name = cfg["opt"]
    if name == "adamw":
        return nn.AdamWeightDecay(groups, learning_rate=learning_rate, beta1=float(cfg["momentum"]),
                                  beta2=float(cfg["beta2"]), eps=float(cfg["eps"]))
    if name == "adam":
        return nn.Adam(groups, learning_rate=learning_rate, beta1=float(cfg["momentum"]), beta2=float(cfg["beta2"]),
                       eps=float(cfg["eps"]))
    momentum = float(cfg["momentum"]) if name == "momentum" or cfg["momentum"] else 0.0
    return nn.Momentum(groups, learning_rate=learning_rate, momentum=momentum,
                       use_nesterov=bool(cfg["use_nesterov"]) and momentum > 0)
