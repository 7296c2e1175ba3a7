"""README claims of the Trainer that no other test checks, each on the tiny real-digits ImageFolder.

- "``--resume auto`` continues it exactly (optimizer, schedule, EMA, loss scale, ...)": the EMA weights and
  the loss scale's value and window counter right after a resume equal the checkpoint's, and after the
  resumed steps equal an uninterrupted run's (``test_train_run`` compares losses only, which EMA and the
  loss scale's counter do not move);
- "Corrupt images ... replaced by the next image of the rank's epoch order, so steps per epoch and exact
  resume are unchanged": the resume starts in a fresh process's state (no file known bad yet) in an epoch
  where the uninterrupted run already knew the file, at a step before the batch that holds it;
- "``--amp_level O2`` keeps ... the loss in fp32": what ``log_softmax`` receives inside the Trainer's own
  training step, and the loss value inside a compiled step against float64.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor
from train_helpers import make_tiny_folder, tiny_overrides

from mindcv_poolformer import transforms
from mindcv_poolformer.config import load_config
from mindcv_poolformer.data.listing import epoch_order, list_image_folder
from mindcv_poolformer.train.trainer import Trainer

# two S12 training runs and two more Trainer start-ups: ~40 s of CPU, 2-4 min on the shared 2-core host
pytestmark = pytest.mark.slow
SEED = 42
# 20 training images in batches of 10: 2 steps per epoch and every image in every epoch; PYNATIVE (no
# compile: 5 steps in all) since exact resume does not depend on the mode (test_train_run runs both)
RUN = {"mode": 1, "batch_size": 10, "epoch_size": 2, "ema": True, "ema_decay": 0.9, "loss_scale_type": "dynamic",
       "loss_scale": 1024.0, "ckpt_save_steps": 1, "keep_checkpoint_max": 4, "seed": SEED, "hflip": 0.5,
       "scale": [0.5, 1.0]}
BAD_POSITION = 14  # in epoch 2's order: the second batch, after the mid-epoch checkpoint the resume starts from


@pytest.fixture(scope="module")
def corrupt_folder(tmp_path_factory):
    """The digits folder with one training PNG cut to a third, at ``BAD_POSITION`` of epoch 2's order."""
    folder = make_tiny_folder(tmp_path_factory.mktemp("corrupt"), per_class_train=2, per_class_val=1)
    files = list_image_folder(str(folder), "train").files
    assert len(files) == 20
    bad = files[int(epoch_order(len(files), SEED, 1)[BAD_POSITION])]
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 3])
    return folder, str(bad)


def _ema_and_scale(trainer: Trainer) -> dict[str, np.ndarray]:
    return {n: p.asnumpy().copy() for n, p in trainer._state_parameters().items()
            if n.startswith(("ema.", "loss_scale."))}


@pytest.fixture(scope="module")
def runs(corrupt_folder, tmp_path_factory):
    """An uninterrupted run (checkpoint after every step) and a resume from its step-3 checkpoint, fresh state."""
    folder, bad = corrupt_folder
    root = tmp_path_factory.mktemp("runs")
    transforms._UNREADABLE.clear()
    full = Trainer(load_config(overrides=tiny_overrides(folder, root / "full", **RUN)))
    assert full.scaler.dynamic and full.scaler.window == 1000 and full.scaler.factor == 2.0  # the README's numbers
    full_result = full.fit()
    assert bad in transforms.unreadable_images(), "the cut PNG was read as an image: the test proves nothing"
    mid = root / "full" / "poolformer_s12-e0002-s00000003.safetensors"
    transforms._UNREADABLE.clear()  # a new process: no file known bad yet
    resumed = Trainer(load_config(overrides=tiny_overrides(folder, root / "resumed", resume=str(mid), **RUN)))
    at_resume = _ema_and_scale(resumed)
    resumed_result = resumed.fit()
    return {"full": full, "full_result": full_result, "mid": mid, "resumed": resumed, "at_resume": at_resume,
            "resumed_result": resumed_result, "bad": bad}


def test_resume_restores_ema_and_loss_scale_from_the_checkpoint(runs):
    from safetensors.numpy import load_file

    saved = load_file(str(runs["mid"]))
    at_resume = runs["at_resume"]
    assert any(n.startswith("ema.") for n in at_resume) and "loss_scale.good_steps" in at_resume
    for name, value in at_resume.items():
        assert np.array_equal(value.reshape(-1), saved[name].reshape(-1)), f"{name} not restored from the checkpoint"
    assert int(at_resume["loss_scale.good_steps"]) == 3 and float(at_resume["loss_scale.value"]) == 1024.0
    # the EMA at step 3 is not the weights (else a resume that copied the weights into it would pass)
    assert any(not np.array_equal(saved[n], saved[n[len("ema."):]]) for n in saved if n.startswith("ema."))


def test_resume_restores_edited_loss_scale_and_ema(runs, corrupt_folder, tmp_path):
    """Values the run could not reach by itself (scale 256, counter 777, shifted EMA) come back as written."""
    from safetensors.numpy import load_file, save_file

    state = load_file(str(runs["mid"]))
    state["loss_scale.value"] = np.array([256.0], np.float32)
    state["loss_scale.good_steps"] = np.array([777], np.int32)
    emas = [n for n in state if n.startswith("ema.")]
    for name in emas:
        state[name] = state[name] + np.float32(0.25)
    edited = tmp_path / "edited.safetensors"
    save_file(state, str(edited))
    folder, _ = corrupt_folder
    trainer = Trainer(load_config(overrides=tiny_overrides(folder, tmp_path / "run", resume=str(edited), **RUN)))
    got = _ema_and_scale(trainer)
    assert float(got["loss_scale.value"]) == 256.0 and float(trainer.scaler.scale.asnumpy()) == 256.0
    assert int(got["loss_scale.good_steps"]) == 777
    assert all(np.array_equal(got[n].reshape(-1), state[n].reshape(-1)) for n in emas)


def test_resumed_run_matches_the_uninterrupted_one_with_a_corrupt_image(runs):
    """Step 4's loss, the weights, the EMA and the loss scale after it: as if never interrupted."""
    full, resumed = runs["full"], runs["resumed"]
    assert runs["bad"] in transforms.unreadable_images(), "the resumed run never met the cut PNG"
    a = dict(runs["full_result"].step_losses)
    b = dict(runs["resumed_result"].step_losses)
    assert sorted(b) == [3] and len(a) == 4, (a, b)
    assert abs(a[3] - b[3]) <= 1e-6, f"step 4 loss {b[3]} after resume, {a[3]} uninterrupted"
    ref, got = full._state_parameters(), resumed._state_parameters()
    worst = {n: float(np.max(np.abs(ref[n].asnumpy().astype(np.float64) - got[n].asnumpy())))
             for n in ref if not n.startswith("accum.")}
    bad = {n: v for n, v in worst.items() if v > 1e-6}
    assert not bad, f"state differs after the resumed step: {dict(list(bad.items())[:5])}"
    assert int(got["loss_scale.good_steps"].asnumpy()) == 4


def test_o2_loss_is_computed_in_float32_inside_the_trainer_step(corrupt_folder, tmp_path, monkeypatch):
    """PYNATIVE: every ``log_softmax`` the Trainer's step runs gets float32, with logits at ~1000 where fp16 fails."""
    from mindcv_poolformer.train import loss as loss_mod

    folder, _ = corrupt_folder
    trainer = Trainer(load_config(overrides=tiny_overrides(folder, tmp_path / "amp", mode=1, amp_level="O2",
                                                           batch_size=4, epoch_size=1)))
    head_bias = next(p for p in trainer.optimizer.parameters if p.name == "head.bias")
    rng = np.random.default_rng(0)
    head_bias.set_data(Tensor((1000.0 + rng.standard_normal(head_bias.shape)).astype(np.float32)))
    images = Tensor(rng.standard_normal((4, 3, 32, 32)).astype(np.float32))
    targets = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 4)] * 0.9 + 0.01
    trainer.net.set_train(True)
    logits = trainer.net(images).asnumpy().astype(np.float64)
    seen = []
    real = loss_mod.ops.log_softmax

    def spy(x, axis=-1):
        seen.append(x.dtype)
        return real(x, axis=axis)

    monkeypatch.setattr(loss_mod.ops, "log_softmax", spy)
    loss, applied = trainer.step(images, Tensor(targets))
    assert seen and all(d == ms.float32 for d in seen), f"log_softmax inside the step received {seen}"
    assert loss.dtype == ms.float32 and bool(applied.asnumpy())
    shifted = logits - logits.max(axis=1, keepdims=True)
    ref = float(-(targets * (shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True)))).sum(axis=1).mean())
    assert abs(float(loss.asnumpy()) - ref) < 1e-4, (float(loss.asnumpy()), ref)
