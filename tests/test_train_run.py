"""End-to-end training on a tiny real ImageFolder: loss falls, run files, exact resume, AMP O2 on CPU."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from train_helpers import make_tiny_folder, tiny_overrides

from mindcv_poolformer.checkpoint import load_checkpoint_into
from mindcv_poolformer.config import load_config
from mindcv_poolformer.models import create_model
from mindcv_poolformer.train.trainer import Trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("tiny"), per_class_train=4, per_class_val=1)


def test_loss_falls_and_run_files(folder, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(overrides=tiny_overrides(folder, run, epoch_size=3, val_while_train=True, num_samples=16,
                                               ckpt_save_steps=3, keep_checkpoint_max=2, label_smoothing=0.1,
                                               lr=5e-4))
    result = Trainer(cfg).fit()
    losses = [v for _, v in result.step_losses]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"epoch", "step", "train_loss", "lr", "val_top1", "val_top5", "img_per_s", "epoch_time"}
    assert all(r["val_top1"] != "" for r in rows)
    assert (run / "curves.png").stat().st_size > 1000 and (run / "config.yaml").exists()
    ckpts = sorted(run.glob("poolformer_s12-e*.safetensors"))
    assert len(ckpts) == 2 and (run / "poolformer_s12-best.safetensors").exists()
    assert not list(run.glob(".tmp-*")) and not list(run.glob("*.tmp*"))
    # a training checkpoint is also a plain model checkpoint for validate/fine-tune
    net = create_model("poolformer_s12", num_classes=10)
    report = load_checkpoint_into(net, str(ckpts[-1]))
    assert any(name.startswith("adam_m.") for name in report.ignored)
    # a second run may not reuse the directory
    from mindcv_poolformer.config import ConfigError

    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(load_config(overrides=tiny_overrides(folder, run)))


def test_resume_gives_identical_losses(folder, tmp_path):
    extra = {"epoch_size": 2, "num_samples": 16, "mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1,
             "scale": [0.5, 1.0], "hflip": 0.5, "ema": True, "ema_decay": 0.9, "clip_grad": True, "clip_value": 1.0,
             "drop_path_rate": 0.3}
    full = Trainer(load_config(overrides=tiny_overrides(folder, tmp_path / "full", **extra))).fit()
    part_dir = tmp_path / "part"
    first = Trainer(load_config(overrides=tiny_overrides(folder, part_dir, ckpt_save_steps=1, **extra))
                    ).fit(stop_after_epoch=1)
    resumed = Trainer(load_config(overrides=tiny_overrides(folder, part_dir, resume="auto", **extra)))
    assert resumed.start_epoch == 1 and resumed.global_step == 2
    second = resumed.fit()
    assert [s for s, _ in second.step_losses] == [2, 3]
    a = np.array([v for _, v in full.step_losses])
    b = np.array([v for _, v in first.step_losses] + [v for _, v in second.step_losses])
    assert np.max(np.abs(a - b)) <= 1e-6, (a, b)
    rows = list(csv.DictReader(open(part_dir / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]  # appended, not replayed
    # from the middle of epoch 1 (a ckpt_save_steps checkpoint), into a fresh directory
    mid = part_dir / "poolformer_s12-e0001-s00000001.safetensors"
    resumed_mid = Trainer(load_config(overrides=tiny_overrides(folder, tmp_path / "mid", resume=str(mid), **extra)))
    assert (resumed_mid.start_epoch, resumed_mid.skip_micro, resumed_mid.global_step) == (0, 1, 1)
    c = np.array([v for _, v in resumed_mid.fit().step_losses])
    assert np.max(np.abs(a[1:] - c)) <= 1e-6, (a, c)


def test_amp_o2_on_cpu(folder, tmp_path):
    # auto loss scaling under O2 is dynamic, starting from loss_scale
    cfg = load_config(overrides=tiny_overrides(folder, tmp_path / "amp", amp_level="O2", loss_scale=1024.0,
                                               epoch_size=4, num_samples=8, lr=3e-4))
    trainer = Trainer(cfg)
    from mindcv_poolformer.models.layers import GroupNorm1

    norms = [c for _, c in trainer.net.cells_and_names() if isinstance(c, GroupNorm1)]
    assert norms and all(c.get_flags().get("fp32") for c in norms)  # O2 keeps GroupNorm in fp32
    result = trainer.fit()
    losses = [v for _, v in result.step_losses]
    assert len(losses) == 4 and all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    net = create_model("poolformer_s12", num_classes=10)
    load_checkpoint_into(net, result.last_checkpoint)  # canonical names despite the AMP wrapper


def test_overflowed_steps_are_skipped(folder, tmp_path):
    """fp16 gradients overflow at scale 2**30: the steps are skipped, the dynamic scale halves, weights stay."""
    from mindcv_poolformer.train.trainer import TrainingDiverged

    over = {"amp_level": "O2", "loss_scale": 2.0 ** 30, "epoch_size": 2, "num_samples": 16}
    trainer = Trainer(load_config(overrides=tiny_overrides(folder, tmp_path / "dyn", **over)))
    before = {p.name: p.asnumpy().copy() for p in trainer.net.trainable_params()}
    result = trainer.fit()
    assert result.skipped_steps == 4 and float(trainer.scaler.scale.asnumpy()) == 2.0 ** 26
    assert all(np.array_equal(before[p.name], p.asnumpy()) for p in trainer.net.trainable_params())
    # a fixed scale cannot absorb them: the run stops after max_nonfinite_steps, naming the step
    fixed = Trainer(load_config(overrides=tiny_overrides(folder, tmp_path / "fixed", loss_scale_type="fixed",
                                                         max_nonfinite_steps=3, **over)))
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps \(the last at epoch 2, step 3\)"):
        fixed.fit()
    assert all(np.array_equal(before[p.name], p.asnumpy()) for p in fixed.net.trainable_params())


# Plain SGD without weight decay: one step's update is exactly -lr * g, so the tests below see the gradient's scale.
SGD = {"num_samples": 8, "epoch_size": 1, "opt": "sgd", "momentum": 0.0, "weight_decay": 0.0, "lr": 0.05}


def _one_step(folder, run_dir, **extra) -> tuple[dict, dict, float]:
    """Weights before and after one optimizer step through the Trainer, and that step's learning rate."""
    trainer = Trainer(load_config(overrides=tiny_overrides(folder, run_dir, **SGD, **extra)))
    before = {p.name: p.asnumpy().copy() for p in trainer.net.trainable_params()}
    trainer.fit()
    assert trainer.global_step == 1
    return before, {p.name: p.asnumpy() for p in trainer.net.trainable_params()}, float(trainer.lrs[0])


def _updates(before: dict, after: dict) -> dict:
    return {k: after[k].astype(np.float64) - before[k] for k in before}


def _norm(update: dict) -> float:
    return float(np.sqrt(sum(np.sum(v * v) for v in update.values())))


@pytest.fixture(scope="module")
def big_batch_step(folder, tmp_path_factory):
    """One unclipped step on one batch of 8: the reference of the accumulation and clipping tests."""
    return _one_step(folder, tmp_path_factory.mktemp("big") / "run", batch_size=8)


def test_gradient_accumulation_equals_big_batch(folder, tmp_path, big_batch_step):
    """2 micro-batches of 4 = 1 batch of 8. Unclipped: a gradient summed instead of averaged doubles the update."""
    before, big, lr = big_batch_step
    trainer = Trainer(load_config(overrides=tiny_overrides(folder, tmp_path / "acc", batch_size=4,
                                                           gradient_accumulation_steps=2, **SGD)))
    assert all(np.array_equal(before[p.name], p.asnumpy()) for p in trainer.net.trainable_params())
    result = trainer.fit()
    assert trainer.global_step == 1 and len(result.step_losses) == 2
    acc = {p.name: p.asnumpy() for p in trainer.net.trainable_params()}
    update = max(float(np.max(np.abs(big[k] - before[k]))) for k in big)
    worst = max(float(np.max(np.abs(big[k] - acc[k]))) for k in big)
    print(f"max |accumulated - big batch| = {worst:.3e} (largest update {update:.3e})")
    assert update > 1e-3, f"the step barely moved the weights ({update:.1e}): the comparison would prove nothing"
    assert worst <= 1e-4 * update, f"accumulated step differs by {worst:.3e} (largest update {update:.3e})"


def test_clipping_scales_the_update_to_clip_value(folder, tmp_path, big_batch_step):
    """clip_by_global_norm: the applied update is the unclipped one times clip / ||g||, of norm lr * clip."""
    clip = 0.5
    before, free_after, lr = big_batch_step
    free = _updates(before, free_after)
    grad_norm = _norm(free) / lr
    clipped_before, clipped_after, clipped_lr = _one_step(folder, tmp_path / "clip", batch_size=8, clip_grad=True,
                                                          clip_value=clip)
    assert clipped_lr == lr and all(np.array_equal(before[k], clipped_before[k]) for k in before)
    clipped = _updates(clipped_before, clipped_after)
    applied = _norm(clipped)
    largest = max(float(np.max(np.abs(v))) for v in clipped.values())
    worst = max(float(np.max(np.abs(clipped[k] - free[k] * (clip / grad_norm)))) for k in free)
    print(f"||g|| = {grad_norm:.4f}; |clipped update norm / (lr * clip) - 1| = {abs(applied / (lr * clip) - 1):.2e}; "
          f"max |clipped - scaled unclipped| = {worst:.2e} (largest element {largest:.2e})")
    assert grad_norm > 2 * clip, "the gradient is below the clip value: nothing would be clipped"
    assert abs(applied - lr * clip) <= 1e-4 * lr * clip, f"clipped update norm {applied:.6e}, lr * clip {lr * clip}"
    # float32 weights of ~1 (norm gammas) round each difference by up to 6e-8 (~1e-4 of the largest element)
    assert worst <= 1e-3 * largest, f"the clipped update is not the unclipped one scaled: {worst:.2e}"
