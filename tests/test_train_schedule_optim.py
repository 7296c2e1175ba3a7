"""LR schedule values and weight-decay grouping."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mindcv_poolformer.config import load_config
from mindcv_poolformer.models import create_model
from mindcv_poolformer.train.optim import OptimizerSettings, create_optimizer, param_groups, split_decay
from mindcv_poolformer.train.schedule import ScheduleSettings, build_lr_schedule, scaled_lr


def _cfg(**kw):
    base = {"lr": 1e-3, "lr_scale_batch": 1024, "warmup_epochs": 5, "warmup_lr": 1e-6, "min_lr": 1e-5,
            "epoch_size": 300, "cooldown_epochs": 10}
    base.update(kw)
    return ScheduleSettings.from_config(load_config(overrides=base))


def test_linear_lr_scaling():
    assert scaled_lr(1e-3, 1024, 1024) == pytest.approx(1e-3)
    assert scaled_lr(1e-3, 256, 1024) == pytest.approx(2.5e-4)
    assert scaled_lr(1e-3, 2048, None) == pytest.approx(1e-3)


def test_warmup_cosine_cooldown_values():
    spe = 10
    lrs = build_lr_schedule(_cfg(), spe, global_batch=512)  # peak 5e-4 after linear scaling
    peak = 5e-4
    assert len(lrs) == 310 * spe
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[5 * spe - 1] == pytest.approx(1e-6 + (peak - 1e-6) * (5 * spe - 1) / (5 * spe), rel=1e-5)
    assert lrs[5 * spe] == pytest.approx(peak, rel=1e-6) and lrs.max() == pytest.approx(peak, rel=1e-6)
    mid = 5 * spe + (295 * spe) // 2
    assert lrs[mid] == pytest.approx(1e-5 + 0.5 * (peak - 1e-5), rel=1e-4)
    assert lrs[300 * spe - 1] == pytest.approx(1e-5, rel=1e-3)
    assert np.all(lrs[300 * spe:] == np.float32(1e-5))
    assert np.all(np.diff(lrs[: 5 * spe + 1]) > 0) and np.all(np.diff(lrs[5 * spe: 300 * spe]) <= 0)


def test_epoch_stair_and_step_decay():
    lrs = build_lr_schedule(_cfg(lr_epoch_stair=True, lr_scale_batch=None), 4, 1)
    assert np.all(lrs[8:12] == lrs[8])
    step = build_lr_schedule(_cfg(scheduler="step_decay", decay_epochs=2, decay_rate=0.5, warmup_epochs=0,
                                  epoch_size=6, cooldown_epochs=0, lr_scale_batch=None), 1, 1)
    assert step.tolist() == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4])
    const = build_lr_schedule(_cfg(scheduler="constant", warmup_epochs=0, epoch_size=3, cooldown_epochs=0,
                                   lr_scale_batch=None), 2, 1)
    assert np.allclose(const, 1e-3)
    assert math.isclose(float(build_lr_schedule(_cfg(warmup_epochs=0), 1, 1024)[0]), 1e-3, rel_tol=1e-6)


def test_no_weight_decay_on_1d_parameters():
    net = create_model("poolformer_s12", num_classes=10)
    decay, no_decay = split_decay(net)
    assert all(len(p.shape) > 1 for p in decay)
    assert all(len(p.shape) <= 1 for p in no_decay)
    names = {p.name for p in no_decay}
    assert "network.0.0.layer_scale_1" in names and "network.0.0.norm1.gamma" in names and "head.bias" in names
    assert len(decay) + len(no_decay) == len(net.trainable_params())
    assert {p.name for p in decay} >= {"patch_embed.proj.weight", "head.weight", "network.0.0.mlp.fc1.weight"}
    groups = param_groups(net, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert len(param_groups(net, 0.05, weight_decay_filter="disable")) == 1
    assert len(param_groups(net, 0.0, weight_decay_filter="all_1d")) == 1
    opt = create_optimizer(net, OptimizerSettings.from_config(load_config(overrides={"weight_decay": 0.05})),
                           np.full(4, 1e-3, np.float32))
    assert len(opt.parameters) == len(net.trainable_params())


def test_settings_records_take_exactly_their_config_keys():
    """Each function's settings record reads its keys of the config (every one a schema key), nothing else."""
    from dataclasses import fields

    from mindcv_poolformer.config import SCHEMA
    from mindcv_poolformer.train.data import TrainDataSettings

    for record in (ScheduleSettings, OptimizerSettings, TrainDataSettings):
        assert {f.name for f in fields(record)} <= set(SCHEMA), record
    cfg = load_config(overrides={"lr": 0.3, "min_lr": 0.1, "epoch_size": 2, "warmup_epochs": 0, "cooldown_epochs": 1,
                                 "scheduler": "constant", "opt": "adam", "beta2": 0.95, "eps": 1e-6,
                                 "weight_decay": 0.0, "mixup": 0.2, "hflip": 0.0, "num_samples": 7})
    schedule = ScheduleSettings.from_config(cfg)
    assert (schedule.lr, schedule.scheduler, schedule.cooldown_epochs) == (0.3, "constant", 1)
    np.testing.assert_allclose(build_lr_schedule(schedule, 2, 1), [0.3] * 4 + [0.3] * 2, rtol=1e-6)
    optimizer = create_optimizer(create_model("poolformer_s12", num_classes=2), OptimizerSettings.from_config(cfg),
                                 1e-3)
    assert type(optimizer).__name__ == "Adam" and float(optimizer.beta2.asnumpy()) == pytest.approx(0.95)
    assert float(optimizer.eps.asnumpy()) == pytest.approx(1e-6)
    data = TrainDataSettings.from_config(cfg)
    assert (data.mixup, data.hflip, data.num_samples, data.deterministic_augment) == (0.2, 0.0, 7, True)
    # the optional keys may be absent from a hand-made mapping; a required one may not
    required = {f.name: cfg[f.name] for f in fields(ScheduleSettings) if f.name not in ("lr_scale_batch", "max_iters",
                                                                                       "lr_epoch_stair")}
    assert ScheduleSettings.from_config(required).max_iters is None
    with pytest.raises(KeyError, match="lr"):
        ScheduleSettings.from_config({k: v for k, v in required.items() if k != "lr"})
