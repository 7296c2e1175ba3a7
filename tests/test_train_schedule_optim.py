"""LR schedule values and weight-decay grouping."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mindcv_poolformer.config import load_config
from mindcv_poolformer.models import create_model
from mindcv_poolformer.train.optim import create_optimizer, param_groups, split_decay
from mindcv_poolformer.train.schedule import build_lr_schedule, scaled_lr


def _cfg(**kw):
    base = {"lr": 1e-3, "lr_scale_batch": 1024, "warmup_epochs": 5, "warmup_lr": 1e-6, "min_lr": 1e-5,
            "epoch_size": 300, "cooldown_epochs": 10}
    base.update(kw)
    return load_config(overrides=base)


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
    opt = create_optimizer(net, load_config(overrides={"weight_decay": 0.05}), np.full(4, 1e-3, np.float32))
    assert len(opt.parameters) == len(net.trainable_params())
