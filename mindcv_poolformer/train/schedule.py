"""Per-step learning-rate schedules, precomputed as one array indexed by the optimizer step.

A precomputed array makes the schedule position part of the optimizer's ``global_step``, which is
saved in every checkpoint, so a resumed run continues the schedule exactly where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import settings_from

__all__ = ["ScheduleSettings", "scaled_lr", "build_lr_schedule"]

@dataclass(frozen=True)
class ScheduleSettings:
    """The config keys the learning-rate schedule reads (their meaning: ``config.SCHEMA``), and no others."""
    lr: float
    scheduler: str
    epoch_size: int
    warmup_epochs: int
    warmup_lr: float
    min_lr: float
    cooldown_epochs: int
    decay_epochs: int
    decay_rate: float
    multi_step_decay_milestones: Sequence[int]
    lr_power: float
    num_cycles: int
    cycle_decay: float
    lr_scale_batch: int | None = None
    max_iters: int | None = None
    lr_epoch_stair: bool = False

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ScheduleSettings:
        """The schedule's keys of a parsed config (``lr_scale_batch``, ``max_iters``, ``lr_epoch_stair``: optional)."""
        return settings_from(cls, cfg)


def scaled_lr(lr: float, global_batch: int, lr_scale_batch: int | None) -> float:
    """Linear scaling rule: ``lr`` is given for ``lr_scale_batch`` images per step (if set)."""
    if not lr_scale_batch:
        return float(lr)
    return float(lr) * global_batch / lr_scale_batch


def _decay_value(kind: str, s: ScheduleSettings, peak: float, t: float, length: float, epoch: float) -> float:
    """Value after warmup; ``t`` in [0, length] counts decay progress, ``epoch`` is the absolute epoch."""
    min_lr = float(s.min_lr)
    if kind == "constant":
        return peak
    if kind == "step_decay":
        period = max(int(s.decay_epochs) or 1, 1)
        return peak * float(s.decay_rate) ** int(epoch // period)
    if kind == "multi_step_decay":
        passed = sum(1 for m in s.multi_step_decay_milestones if epoch >= m)
        return peak * float(s.decay_rate) ** passed
    if kind == "poly":
        # mmengine's PolyLR: eta_min + (base - eta_min) * (1 - t / T) ** power with T = end - begin - 1, so the
        # last of the decay's steps runs at eta_min (mmseg's 40k-iteration recipe ends at 0)
        span = max(length - 1, 1)
        return min_lr + (peak - min_lr) * max(1.0 - t / span, 0.0) ** float(s.lr_power)
    cycles = int(s.num_cycles)
    cycle_len = length / cycles
    cycle = min(int(t // cycle_len), cycles - 1) if cycle_len > 0 else 0
    local = (t - cycle * cycle_len) / cycle_len if cycle_len > 0 else 1.0
    top = peak * float(s.cycle_decay) ** cycle
    return min_lr + 0.5 * (top - min_lr) * (1.0 + math.cos(math.pi * min(local, 1.0)))


def build_lr_schedule(s: ScheduleSettings, steps_per_epoch: int, global_batch: int) -> np.ndarray:
    """Learning rate of every optimizer step of the run (warmup, decay, cooldown), float32.

    Warmup rises linearly from ``warmup_lr`` to the (scaled) peak over ``warmup_epochs``; cosine
    then decays from the peak to ``min_lr`` at the end of ``epoch_size`` (or over ``decay_epochs``
    if set), and ``cooldown_epochs`` more epochs run at ``min_lr``. ``lr_epoch_stair`` holds each
    epoch's first value for the whole epoch. ``poly`` decays as mmseg's PolyLR. An iteration-based
    run (``max_iters``) has ``max_iters`` steps and no cooldown; its decay ends at the last step.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    peak = scaled_lr(s.lr, global_batch, s.lr_scale_batch)
    epochs = int(s.epoch_size)
    cooldown = int(s.cooldown_epochs)
    warmup_steps = int(s.warmup_epochs) * steps_per_epoch
    main_steps = epochs * steps_per_epoch
    if s.max_iters:
        main_steps, cooldown = int(s.max_iters), 0
    kind = s.scheduler
    decay_epochs = int(s.decay_epochs) if kind == "cosine_decay" and s.decay_epochs else 0
    decay_len = decay_epochs * steps_per_epoch if decay_epochs else max(main_steps - warmup_steps, 1)
    total = main_steps + cooldown * steps_per_epoch
    warmup_lr = float(s.warmup_lr)
    min_lr = float(s.min_lr)
    out = np.empty(total, dtype=np.float64)
    for step in range(total):
        pos = (step // steps_per_epoch) * steps_per_epoch if s.lr_epoch_stair else step
        epoch = pos / steps_per_epoch
        if pos < warmup_steps:
            out[step] = warmup_lr + (peak - warmup_lr) * pos / warmup_steps
        elif pos >= main_steps:
            out[step] = min_lr if kind == "cosine_decay" else _decay_value(kind, s, peak, decay_len, decay_len,
                                                                            epoch)
        else:
            t = min(pos - warmup_steps, decay_len)
            out[step] = _decay_value(kind, s, peak, t, decay_len, epoch)
    return out.astype(np.float32)
