"""Parameter groups and the optimizer factory.

``weight_decay_filter`` chooses the parameters that are not decayed:

- ``all_1d`` (ours, the default): every parameter with at most one dimension (GroupNorm
  scales/shifts, biases, LayerScale vectors), as the official PoolFormer recipe (timm's
  ``create_optimizer`` with ``filter_bias_and_bn``) does;
- ``norm_and_bias``: MindCV's, by name: every parameter whose name holds ``beta``, ``gamma`` or
  ``bias`` (LayerScale vectors are decayed);
- ``auto``: MindCV hands the ungrouped parameters to MindSpore, whose optimizer skips names holding
  ``beta`` or ``gamma`` (biases and LayerScale vectors are decayed);
- ``disable``: MindCV's default, every parameter is decayed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from mindspore import Parameter, Tensor, nn

from ..config import settings_from

__all__ = ["WEIGHT_DECAY_FILTERS", "OptimizerSettings", "is_decayed", "split_decay", "param_groups",
           "create_optimizer"]

WEIGHT_DECAY_FILTERS = ("all_1d", "norm_and_bias", "auto", "disable")


def is_decayed(param: Parameter, weight_decay_filter: str = "all_1d") -> bool:
    """Whether ``weight_decay_filter`` leaves ``param`` decayed (see the module doc)."""
    name = param.name
    if weight_decay_filter == "all_1d":
        return not (len(param.shape) <= 1 or name.endswith(".bias") or name.endswith(".beta"))
    if weight_decay_filter == "norm_and_bias":
        return not any(word in name for word in ("beta", "gamma", "bias"))
    if weight_decay_filter == "auto":
        return "beta" not in name and "gamma" not in name
    if weight_decay_filter == "disable":
        return True
    raise ValueError(f"weight_decay_filter: {weight_decay_filter!r} is not one of {', '.join(WEIGHT_DECAY_FILTERS)}")


def split_decay(net: nn.Cell, weight_decay_filter: str = "all_1d") -> tuple[list, list]:
    """(decayed, not decayed) trainable parameters under ``weight_decay_filter``."""
    decay, no_decay = [], []
    for param in net.trainable_params():
        (decay if is_decayed(param, weight_decay_filter) else no_decay).append(param)
    return decay, no_decay


def param_groups(net: nn.Cell, weight_decay: float, weight_decay_filter: str = "all_1d") -> list[dict]:
    """MindSpore group-parameter list with per-group weight decay."""
    if weight_decay_filter == "disable" or weight_decay == 0:
        return [{"params": net.trainable_params(), "weight_decay": weight_decay}]
    decay, no_decay = split_decay(net, weight_decay_filter)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


@dataclass(frozen=True)
class OptimizerSettings:
    """The config keys the optimizer factory reads (their meaning: ``config.SCHEMA``), and no others."""
    opt: str
    weight_decay: float
    weight_decay_filter: str
    momentum: float
    beta2: float
    eps: float
    use_nesterov: bool

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> OptimizerSettings:
        """The optimizer's keys of a parsed config."""
        return settings_from(cls, cfg)


def create_optimizer(net: nn.Cell, settings: OptimizerSettings, lr: np.ndarray | float) -> nn.Optimizer:
    """Build ``settings.opt`` over ``net`` with a per-step learning-rate array (indexed by global_step).

    ``adamw`` is ``nn.AdamWeightDecay`` (decoupled decay), which runs on CPU, Ascend and GPU;
    ``ms.mint.optim.AdamW`` has no CPU kernel.
    """
    learning_rate = Tensor(np.asarray(lr, dtype=np.float32)) if np.ndim(lr) else float(lr)
    groups = param_groups(net, float(settings.weight_decay), settings.weight_decay_filter)
    name = settings.opt
    if name == "adamw":
        return nn.AdamWeightDecay(groups, learning_rate=learning_rate, beta1=float(settings.momentum),
                                  beta2=float(settings.beta2), eps=float(settings.eps))
    if name == "adam":
        return nn.Adam(groups, learning_rate=learning_rate, beta1=float(settings.momentum), beta2=float(settings.beta2),
                       eps=float(settings.eps))
    momentum = float(settings.momentum) if name == "momentum" or settings.momentum else 0.0
    return nn.Momentum(groups, learning_rate=learning_rate, momentum=momentum,
                       use_nesterov=bool(settings.use_nesterov) and momentum > 0)
