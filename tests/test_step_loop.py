"""The step loop without per-step host syncs: batched fetches account every step as reading it at once did,
the loss-scale replay matches the device's, the stop check's schedule, the sink's transfer is closed, the
drop-path counter moves on inside the step's graph."""

from __future__ import annotations

import csv

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn
from train_helpers import make_tiny_folder, tiny_overrides

from mindcv_poolformer.config import ConfigError, load_config
from mindcv_poolformer.models.layers import DropPath, DropPathKey
from mindcv_poolformer.train import trainer as trainer_mod
from mindcv_poolformer.train.run_io import STEP_LOG_ENV, read_step_log
from mindcv_poolformer.train.step import LossScaleState, TrainStep, WithLoss
from mindcv_poolformer.train.trainer import Trainer, TrainingDiverged


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("tiny"), per_class_train=4, per_class_val=1)


def test_scale_replay_matches_the_device_update():
    """The host replay of a run of flags gives the scale the Parameter holds after each step (growth, floor)."""
    rng = np.random.default_rng(0)
    flags = [bool(f) for f in rng.random(60) < 0.7] + [False] * 8 + [True] * 7
    state = LossScaleState(8.0, True, window=3)
    device = []
    for ok in flags:
        state.update(ms.Tensor(ok))
        device.append(float(state.scale.asnumpy()))
    assert state.replay(8.0, 0, flags) == device
    assert min(device) == 1.0 and max(device) > 8.0  # the sequence reaches the floor and grows
    assert LossScaleState(8.0, False).replay(8.0, 0, flags) == [8.0] * len(flags)  # a fixed scale never moves
    # from a mid-run state: good_steps carries over
    state = LossScaleState(4.0, True, window=3)
    state.good_steps.set_data(ms.Tensor(2, ms.int32))
    state.update(ms.Tensor(True))
    assert state.replay(4.0, 2, [True]) == [float(state.scale.asnumpy())] == [8.0]


def _run(folder, run_dir, monkeypatch, log_interval: int, **extra):
    step_log = run_dir.parent / f"{run_dir.name}-steps.jsonl"
    monkeypatch.setenv(STEP_LOG_ENV, str(step_log))
    cfg = load_config(overrides=tiny_overrides(folder, run_dir, log_interval=log_interval, **extra))
    result = Trainer(cfg).fit()
    rows = [{k: v for k, v in r.items() if k not in ("img_per_s", "epoch_time")}
            for r in csv.DictReader(open(run_dir / "metrics.csv"))]
    records = [{k: v for k, v in r.items() if k != "pid"} for r in read_step_log(step_log)]
    states = {}
    for path in sorted(run_dir.glob("poolformer_s12-e*.safetensors")):
        loaded = ms.load_checkpoint(str(path), format="safetensors")
        states[path.name] = {k: v.asnumpy() for k, v in loaded.items() if k.startswith("train_state.")}
    return result, rows, records, states


@pytest.mark.slow
def test_batched_fetch_accounts_like_per_step(folder, tmp_path, monkeypatch):
    """log_interval 2 over 3-step epochs (a flush mid-epoch, one at each epoch end, one before each checkpoint):
    the step losses, step log, metrics rows and checkpoints' train_state equal those of fetching every step."""
    extra = {"epoch_size": 2, "num_samples": 24, "ckpt_save_steps": 1, "keep_checkpoint_max": 10}
    each, rows_each, log_each, states_each = _run(folder, tmp_path / "each", monkeypatch, 1, **extra)
    batched, rows_batched, log_batched, states_batched = _run(folder, tmp_path / "batched", monkeypatch, 2, **extra)
    assert [s for s, _ in each.step_losses] == list(range(6))
    assert batched.step_losses == each.step_losses
    assert rows_batched == rows_each and len(rows_each) == 2
    assert log_batched == log_each and len(log_each) == 6
    assert sorted(states_batched) == sorted(states_each) and len(states_each) >= 4
    for name, state in states_each.items():
        assert state.keys() == states_batched[name].keys()
        for key, value in state.items():
            np.testing.assert_array_equal(states_batched[name][key], value, err_msg=f"{name} {key}")


@pytest.mark.slow
def test_divergence_found_at_a_later_fetch_names_its_step(folder, tmp_path):
    """Fetched only at the epoch end (log_interval 5 > 2 steps an epoch), the streak still ends at step 3 of
    epoch 2, as the per-step test_overflowed_steps_are_skipped finds, and dynamic skips are still absorbed."""
    over = {"amp_level": "O2", "loss_scale": 2.0 ** 30, "epoch_size": 2, "num_samples": 16, "log_interval": 5}
    dynamic = Trainer(load_config(overrides=tiny_overrides(folder, tmp_path / "dyn", **over)))
    result = dynamic.fit()
    assert result.skipped_steps == 4 and float(dynamic.scaler.scale.asnumpy()) == 2.0 ** 26
    fixed = Trainer(load_config(overrides=tiny_overrides(folder, tmp_path / "fixed", loss_scale_type="fixed",
                                                         max_nonfinite_steps=3, **over)))
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps \(the last at epoch 2, step 3\)"):
        fixed.fit()
    assert fixed.result.skipped_steps == 3


class _Ranks:
    """Stands in for a trainer: what ``_stop_check_due`` reads."""

    def __init__(self, world: int, step: int, interval: int) -> None:
        self.dist = type("D", (), {"world": world})()
        self.global_step = step
        self.cfg = {"stop_check_interval": interval}


def test_stop_check_schedule():
    """Several ranks agree every stop_check_interval steps and at checkpoints; one process checks every step."""
    due = [s for s in range(1, 13) if Trainer._stop_check_due(_Ranks(2, s, 5), False)]
    assert due == [5, 10]
    assert Trainer._stop_check_due(_Ranks(2, 7, 5), True)
    assert all(Trainer._stop_check_due(_Ranks(1, s, 5), False) for s in range(1, 13))
    assert load_config(overrides={"stop_check_interval": 7})["stop_check_interval"] == 7
    with pytest.raises(ConfigError, match="stop_check_interval"):
        load_config(overrides={"stop_check_interval": 0})


class _Transfer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def stop_send(self) -> None:
        self.calls.append("stop_send")

    def release(self) -> None:
        self.calls.append("release")


class _Data:
    pass


def test_epoch_sink_closes_its_transfer(monkeypatch):
    """data_sink's transfer (send(-1), without end) is stopped and released when the epoch ends, also on an error."""
    made = []

    def fake_sink(step, data, sink_size):
        assert sink_size == 1
        data.__transfer_dataset__ = _Transfer()
        made.append(data)
        return step

    monkeypatch.setattr(ms, "data_sink", fake_sink)
    first, second = _Data(), _Data()
    with trainer_mod.epoch_sink("step", first, True) as run_step:
        assert run_step == "step" and first.__transfer_dataset__.calls == []
    assert first.__transfer_dataset__.calls == ["stop_send", "release"]
    with pytest.raises(RuntimeError), trainer_mod.epoch_sink("step", second, True):
        raise RuntimeError("a step failed")
    assert second.__transfer_dataset__.calls == ["stop_send", "release"]
    with trainer_mod.epoch_sink("step", _Data(), False) as run_step:
        assert run_step is None
    assert made == [first, second]


class _Tiny(nn.Cell):
    """Dense -> DropPath(0.5): a network whose loss shows which masks a step drew."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Dense(4, 3)
        self.drop_path = DropPath(0.5)

    def construct(self, x):
        return self.drop_path(self.fc(x))


def test_step_draws_the_counters_masks_then_advances_it():
    """TrainStep's forward uses the masks of the counter it finds, and moves the counter on in its graph: the
    step's loss equals the network's loss at that counter, and the counter is one further after it."""
    rng = np.random.default_rng(1)
    x = ms.Tensor(rng.normal(size=(16, 4)).astype(np.float32))
    y = ms.Tensor(rng.normal(size=(16, 3)).astype(np.float32))
    net = _Tiny()
    key = DropPathKey(net, seed=5)
    with_loss = WithLoss(net, nn.MSELoss())
    step = TrainStep(with_loss, nn.SGD(net.trainable_params(), learning_rate=0.0), LossScaleState(1.0, False),
                     drop_path_key=key)
    net.set_train(True)
    expected = {}
    for counter in (5, 6, 7):
        key.set_counter(counter)
        expected[counter] = float(with_loss(x, y).asnumpy())
    assert len(set(expected.values())) == 3, expected  # the masks differ from counter to counter
    step.set_train(True)
    key.set_counter(5)
    for counter in (5, 6, 7):
        loss, _ = step(x, y)
        assert float(loss.asnumpy()) == expected[counter], counter
        assert int(key.counter.asnumpy()) == counter + 1
