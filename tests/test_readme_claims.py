"""README claims of the training step, the run files and the CPU kernels, each against an independent reference.

- "A step whose gradients are not finite is skipped: weights, optimizer state and EMA are left untouched"
  (AdamW moments, Adam's moments and beta powers, SGD momentum, every optimizer's step counter);
- "a dynamic loss scale (halved on overflow, doubled after 1000 clean steps)": the window's length, not
  only its direction;
- "a line cut short by a kill is ignored" in ``metrics.csv``, and the next row starts on a fresh line;
- "``MINDCV_POOLFORMER_KERNEL_THREADS=N`` sets their threads (default: the CPUs this process may use)":
  the threads the kernel library really starts, counted in ``/proc/self/task`` while a kernel runs.

The loss under O2 and the Trainer-level claims (EMA/loss-scale resume, corrupt images) are in
``test_readme_claims_train.py``; the two-rank stop in ``test_readme_claims_dist.py``.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap

import mindspore as ms
import numpy as np
import pytest
from mindspore import ParameterTuple, Tensor, nn

from mindcv_poolformer.config import load_config
from mindcv_poolformer.train import step as step_mod
from mindcv_poolformer.train.optim import OptimizerSettings, create_optimizer
from mindcv_poolformer.train.run_io import METRIC_FIELDS, MetricsLog

from conftest import require_kernel_library

BATCH, FEATURES, CLASSES = 4, 8, 4


def _tiny_step(opt: str, window: int | None = None, ema: bool = True, fused: bool = False
               ) -> tuple[step_mod.TrainStep, nn.Optimizer]:
    """A 2-layer MLP trained by the project's optimizer factory and TrainStep (dynamic loss scale, EMA)."""
    ms.set_seed(0)
    net = nn.SequentialCell([nn.Dense(FEATURES, 16), nn.ReLU(), nn.Dense(16, CLASSES)])
    cfg = load_config(overrides={"opt": opt, "momentum": 0.9, "weight_decay": 0.01})
    optimizer = create_optimizer(net, OptimizerSettings.from_config(cfg), np.full(2000, 1e-3, np.float32))
    scaler = (step_mod.LossScaleState(2.0 ** 10, dynamic=True) if window is None else
              step_mod.LossScaleState(2.0 ** 10, dynamic=True, window=window))
    ema_params = ParameterTuple(optimizer.parameters).clone(prefix="ema", init="same") if ema else None
    all_finite = None
    if fused:
        from mindcv_poolformer.kernels import cpu_kernels

        require_kernel_library()
        all_finite = cpu_kernels().all_finite
    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    step = step_mod.TrainStep(step_mod.WithLoss(net, loss), optimizer, scaler, ema=ema_params, ema_decay=0.9,
                              all_finite=all_finite)
    step.set_train(True)
    return step, optimizer


def _batch(rng: np.random.Generator, poison: bool = False) -> tuple[Tensor, Tensor]:
    x = rng.standard_normal((BATCH, FEATURES)).astype(np.float32)
    if poison:
        x[1, 3] = np.inf  # a real non-finite forward: the gradients are inf/nan, nothing injected
    return Tensor(x), Tensor(rng.integers(0, CLASSES, BATCH).astype(np.int32))


def _state(step: nn.Cell) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy().copy() for p in step.get_parameters()}


# constant Parameters of the optimizers (the lr array, SGD's momentum coefficient): no step changes them
HYPERPARAMETERS = {"learning_rate", "momentum"}
# optimizer -> the state entries it must have (beyond weights, EMA and the loss scale)
OPTIMIZER_STATE = {"adamw": ("adam_m.", "adam_v."), "adam": ("moment1.", "moment2.", "beta1_power", "beta2_power"),
                   "momentum": ("moments.",)}


@pytest.mark.parametrize("fused", [False, True], ids=["ms-all-finite", "fused-all-finite"])
@pytest.mark.parametrize("opt", sorted(OPTIMIZER_STATE))
def test_nonfinite_step_leaves_optimizer_state_and_ema_untouched(opt, fused):
    ms.set_context(mode=ms.GRAPH_MODE)
    step, _ = _tiny_step(opt, fused=fused)
    rng = np.random.default_rng(0)
    _, applied = step(*_batch(rng))  # one clean step first, so moments and EMA are not at their initial values
    assert bool(applied.asnumpy())
    before = _state(step)
    names = set(before)
    for prefix in OPTIMIZER_STATE[opt] + ("ema.", "global_step"):
        assert any(n.startswith(prefix) for n in names), f"{opt}: no {prefix}* in the step's state: {sorted(names)}"
    loss, applied = step(*_batch(rng, poison=True))
    assert not np.isfinite(float(loss.asnumpy())) and not bool(applied.asnumpy())
    after = _state(step)
    changed = sorted(n for n in names if not np.array_equal(before[n], after[n]) and not n.startswith("loss_scale."))
    assert not changed, f"{opt}: a skipped step changed {changed}"
    assert float(after["loss_scale.value"]) == float(before["loss_scale.value"]) / 2
    assert int(after["loss_scale.good_steps"]) == 0
    # and the next clean step does move every one of them (else the comparison above proves nothing)
    _, applied = step(*_batch(rng))
    assert bool(applied.asnumpy())
    moved = _state(step)
    frozen = sorted(n for n in names if np.array_equal(after[n], moved[n]) and not n.startswith("loss_scale.")
                    and n not in HYPERPARAMETERS)
    assert not frozen, f"{opt}: a clean step left {frozen} unchanged"


def test_dynamic_loss_scale_doubles_after_1000_clean_steps_and_halves_on_overflow():
    """The README's window: the 1000th consecutive clean step doubles the scale, not the 999th."""
    ms.set_context(mode=ms.GRAPH_MODE)
    assert step_mod.LossScaleState(1.0, dynamic=True).window == 1000  # what the Trainer builds (no window given)
    step, _ = _tiny_step("momentum", ema=False)
    rng = np.random.default_rng(1)
    batches = [_batch(rng) for _ in range(8)]
    start = float(step.scaler.scale.asnumpy())
    for k in range(999):
        _, applied = step(*batches[k % len(batches)])
    assert bool(applied.asnumpy())
    assert float(step.scaler.scale.asnumpy()) == start and int(step.scaler.good_steps.asnumpy()) == 999
    step(*batches[0])
    assert float(step.scaler.scale.asnumpy()) == 2 * start, "the 1000th clean step did not double the scale"
    assert int(step.scaler.good_steps.asnumpy()) == 0, "the window did not restart after growing"
    for k in range(3):
        step(*batches[k])
    assert int(step.scaler.good_steps.asnumpy()) == 3
    _, applied = step(*_batch(rng, poison=True))
    assert not bool(applied.asnumpy())
    assert float(step.scaler.scale.asnumpy()) == start, "an overflow did not halve the scale"
    assert int(step.scaler.good_steps.asnumpy()) == 0, "an overflow did not restart the window"


def _row(epoch: int) -> dict:
    return {"epoch": epoch, "step": 10 * epoch, "train_loss": 2.5 - 0.1 * epoch, "lr": 1e-3, "val_top1": None,
            "val_top5": None, "img_per_s": 12.5, "epoch_time": 3.25}


def test_metrics_csv_line_cut_short_is_ignored_and_the_next_row_starts_fresh(tmp_path):
    log = MetricsLog(tmp_path)
    log.append(_row(1))
    log.append(_row(2))
    data = log.csv_path.read_bytes()
    cut = data.rindex(b"\n", 0, len(data) - 1) + 1 + 7  # row 2 killed 7 bytes into its write: "2,20,2."
    log.csv_path.write_bytes(data[:cut])
    assert [r["epoch"] for r in log.rows()] == ["1"], "the partial row was read as a row"
    log.append(_row(2))  # the replayed epoch 2 after resume
    log.append(_row(3))
    assert [r["epoch"] for r in log.rows()] == ["1", "2", "3"]
    lines = log.csv_path.read_text().splitlines()
    # csv.reader is the independent reference: every line but the cut one is a full row of the header's width
    parsed = list(csv.reader(lines))
    assert parsed[0] == list(METRIC_FIELDS)
    assert [len(r) for r in parsed] == [len(METRIC_FIELDS)] * 2 + [3] + [len(METRIC_FIELDS)] * 2, lines
    assert parsed[2] == ["2", "20", "2."] and parsed[3][:2] == ["2", "20"] and parsed[4][:2] == ["3", "30"]


# ---------------------------------------------------------------- MINDCV_POOLFORMER_KERNEL_THREADS

_THREAD_PROBE = textwrap.dedent("""
    import ctypes, os, sys, threading
    import numpy as np

    if sys.argv[2]:
        os.sched_setaffinity(0, {int(c) for c in sys.argv[2].split(",")})
    lib = ctypes.CDLL(sys.argv[1])
    n = 1 << 24  # 64 MB of float32: many ParallelFor chunks of 2**18, a few ms per call
    x = np.zeros(n, np.float32)
    out = np.zeros(1, np.bool_)
    params = (ctypes.c_void_p * 2)(x.ctypes.data, out.ctypes.data)
    ndims = (ctypes.c_int * 2)(1, 1)
    dims = [(ctypes.c_int64 * 1)(n), (ctypes.c_int64 * 1)(1)]
    shapes = (ctypes.POINTER(ctypes.c_int64) * 2)(*dims)
    dtypes = (ctypes.c_char_p * 2)(b"float32", b"bool")
    peak, base, done = [0], [0], threading.Event()
    ready = threading.Event()

    def sample():
        base[0] = peak[0] = len(os.listdir("/proc/self/task"))  # main + this sampler
        ready.set()
        while not done.is_set():
            peak[0] = max(peak[0], len(os.listdir("/proc/self/task")))

    sampler = threading.Thread(target=sample)
    sampler.start()
    ready.wait()
    for _ in range(150):  # ctypes releases the GIL: the sampler runs while the kernel's threads live
        assert lib.AllFinite(2, params, ndims, shapes, dtypes, None, None) == 0 and out[0]
    done.set()
    sampler.join()
    print(peak[0] - base[0])
""")


def _extra_threads(library: str, threads: str | None, cpus: str = "") -> int:
    env = {k: v for k, v in os.environ.items() if k != "MINDCV_POOLFORMER_KERNEL_THREADS"}
    if threads is not None:
        env["MINDCV_POOLFORMER_KERNEL_THREADS"] = threads
    done = subprocess.run([sys.executable, "-c", _THREAD_PROBE, library, cpus], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def test_kernel_threads_env_sets_the_threads_the_kernels_start():
    """N threads = the caller's plus N - 1 started per kernel call; unset, one per CPU this process may use."""
    library = require_kernel_library()
    assert _extra_threads(library, "1") == 0
    assert _extra_threads(library, "3") == 2
    cpus = sorted(os.sched_getaffinity(0))
    assert _extra_threads(library, None, str(cpus[0])) == 0, "unset, one allowed CPU: the kernels must not spawn"
    if len(cpus) >= 2:
        assert _extra_threads(library, None, f"{cpus[0]},{cpus[1]}") == 1
        assert _extra_threads(library, "1", f"{cpus[0]},{cpus[1]}") == 0, "the variable must win over the CPU count"


# ---------------------------------------------------------------- the loss in fp32 under O2, compiled

def test_o2_loss_inside_the_compiled_train_step_is_float32():
    """GRAPH: the step's loss equals float64 cross entropy of the O2 network's logits, which sit at ~1000.

    There float16's spacing is 0.5, so a float16 ``log_softmax``/mean is off by ~1e-3 of the loss; float32
    by ~1e-6. (PYNATIVE, where each op's input dtype can be seen, is in test_readme_claims_train.py.)
    """
    from mindcv_poolformer.amp import apply_amp
    from mindcv_poolformer.models.metaformer import MetaFormer
    from mindcv_poolformer.train.loss import create_loss

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(0)
    net = MetaFormer((1, 1, 1, 1), (16, 16, 16, 16), num_classes=10)
    rng = np.random.default_rng(0)
    net.head.bias.set_data(Tensor((1000.0 + 3 * rng.standard_normal(10)).astype(np.float32)))
    amp_net = apply_amp(net, "O2", device_target="CPU")  # the loss is outside the network under either policy
    x = Tensor(rng.standard_normal((4, 3, 32, 32)).astype(np.float32))
    targets = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 4)] * 0.9 + 0.01
    amp_net.set_train(True)
    logits = amp_net(x).asnumpy().astype(np.float64)
    cfg = load_config(overrides={"opt": "momentum", "momentum": 0.0, "weight_decay": 0.0})
    optimizer = create_optimizer(net, OptimizerSettings.from_config(cfg), 1e-3)
    step = step_mod.TrainStep(step_mod.WithLoss(amp_net, create_loss("CE")), optimizer,
                              step_mod.LossScaleState(2.0 ** 10, dynamic=True))
    step.set_train(True)
    loss, applied = step(x, Tensor(targets))
    shifted = logits - logits.max(axis=1, keepdims=True)
    ref = float(-(targets * (shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True)))).sum(axis=1).mean())
    assert loss.dtype == ms.float32 and bool(applied.asnumpy())
    assert abs(float(loss.asnumpy()) - ref) <= 1e-5 * max(1.0, abs(ref)), (float(loss.asnumpy()), ref)


# ---------------------------------------------------------------- two signals within one compiled step

_TWO_SIGNALS = textwrap.dedent("""
    import ctypes, os
    from mindcv_poolformer.train.trainer import StopSignals

    # libc's system() stands for a compiled step: C code that does not return to the interpreter until it is
    # done (ctypes drops the GIL; glibc retries its waitpid on EINTR). The shell it waits for sends both
    # signals, 0.2 s apart, so both land while the main thread is inside that C call, on any host's timing.
    libc = ctypes.CDLL(None)
    pid = os.getpid()
    with StopSignals() as signals:
        status = libc.system(f"kill -TERM {pid}; sleep 0.2; kill -TERM {pid}".encode())
        assert status == 0, status
        print("received", signals.received, flush=True)
""")


def test_two_signals_within_one_step_count_as_one():
    """The README's wording: handlers run between steps, so two signals during one step are one stop request.

    The same two signals around Python code that returns to the interpreter (``time.sleep(0.5)`` in place
    of the C call) abort the process: what this test sees is the step's C code, not the signals' spacing.
    """
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, "-c", _TWO_SIGNALS], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "received SIGTERM" in done.stdout, (done.returncode, done.stderr[-2000:])
    assert "second SIGTERM" not in done.stderr
