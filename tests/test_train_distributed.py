"""Data-parallel proof on CPU: 2 ranks (msrun, and mpirun via the scheduler bootstrap), one step, weights equal
across ranks and equal to one process on the concatenated batch.

The step is plain SGD-momentum without clipping (see train_dist_worker.py), so the comparison sees the scale of
the all-reduced gradient: ranks summed instead of averaged move each weight by its whole update.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from train_helpers import REPO, make_tiny_folder, run_python

from conftest import require_mpirun

pytestmark = pytest.mark.slow
WORKER = str(REPO / "tests" / "train_dist_worker.py")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("tiny"), per_class_train=4, per_class_val=1)


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    done = run_python([WORKER, str(folder), str(out), "16", "False"])
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(out / "rank0.npz")), dict(np.load(out / "init.npz"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    bindir = os.path.dirname(sys.executable)  # msrun starts `python` from PATH: it must be this environment's
    return {"PATH": f"{bindir}:{os.environ.get('PATH', '')}"}


def _check(out: Path, reference: tuple[dict, dict]) -> float:
    """Both ranks hold the same weights, and they are the 1-process step's, to float rounding of its update."""
    weights, init = reference
    ranks = [dict(np.load(out / f"rank{r}.npz")) for r in range(2)]
    assert all((out / f"rank{r}.txt").read_text().split()[0] == "2" for r in range(2))
    start = dict(np.load(out / "init.npz"))
    worst = update = 0.0
    for name, ref in weights.items():
        assert np.array_equal(start[name], init[name]), f"{name}: the ranks started from other weights"
        assert np.array_equal(ranks[0][name], ranks[1][name]), name
        worst = max(worst, float(np.max(np.abs(ranks[0][name] - ref))))
        update = max(update, float(np.max(np.abs(ref - init[name]))))
    print(f"max |2 ranks - 1 process| over all weights: {worst:.3e} (largest update {update:.3e})")
    assert update > 1e-3, f"the step barely moved the weights ({update:.1e}): the comparison would prove nothing"
    assert worst <= 1e-4 * update, f"2 ranks differ from 1 process by {worst:.3e} (largest update {update:.3e})"
    return worst


@pytest.mark.two_ranks
def test_msrun_two_ranks_equal_one_process(folder, reference, tmp_path):
    msrun = shutil.which("msrun", path=os.path.dirname(sys.executable)) or shutil.which("msrun")
    assert msrun, "msrun not found"
    done = run_python([msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
                       f"--log_dir={tmp_path / 'logs'}", "--join=True", WORKER, str(folder), str(tmp_path), "8",
                       "True"], env=_env())
    logs = "".join(p.read_text()[-2000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert done.returncode == 0, done.stderr[-2000:] + logs
    _check(tmp_path, reference)


@pytest.fixture(scope="module")
def mpirun() -> str:
    """Looked up before the 1-process reference is trained (module fixtures are set up in argument order)."""
    return require_mpirun()


@pytest.mark.two_ranks
def test_mpirun_two_ranks_equal_one_process(mpirun, folder, reference, tmp_path):
    args = [mpirun, "-n", "2", "--oversubscribe", "--allow-run-as-root", "-x", "PATH", "-x", "PYTHONPATH",
            "-x", "GLOG_v", "-x", "MS_SCHED_PORT", sys.executable, WORKER, str(folder), str(tmp_path), "8", "True"]
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(REPO), GLOG_v="3", MS_SCHED_PORT=str(_free_port()),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **_env())
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    _check(tmp_path, reference)


# ---------------------------------------------------------------- one skip decision for all ranks

OVERFLOW_WORKER = str(REPO / "tests" / "train_overflow_worker.py")


def _expected_scales(applied: list[bool], start: float = 2.0 ** 12, window: int = 2) -> list[float]:
    """The dynamic loss scale after each step (halve on a skip, double after ``window`` good steps)."""
    scale, good, out = start, 0, [start]
    for ok in applied:
        good = good + 1 if ok else 0
        if ok and good >= window:
            scale, good = scale * 2.0, 0
        elif not ok:
            scale = max(scale / 2.0, 1.0)
        out.append(scale)
    return out


@pytest.mark.two_ranks
def test_msrun_two_ranks_agree_on_overflow_skip(tmp_path: Path) -> None:
    """Only rank 1 reports overflow (as the NPU float-status register would): both ranks must skip."""
    from train_overflow_worker import ACCUM_BAD, ACCUM_STEPS, PLAIN_BAD, PLAIN_STEPS

    msrun = shutil.which("msrun", path=os.path.dirname(sys.executable)) or shutil.which("msrun")
    assert msrun, "msrun not found"
    done = run_python([msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
                       f"--log_dir={tmp_path / 'logs'}", "--join=True", OVERFLOW_WORKER, str(tmp_path)], env=_env())
    logs = "".join(p.read_text()[-2000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert done.returncode == 0, done.stderr[-2000:] + logs
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(2)]
    assert int(ranks[0]["world"]) == 2
    for name, steps, bad in (("plain", PLAIN_STEPS, PLAIN_BAD), ("accum", ACCUM_STEPS, ACCUM_BAD)):
        applied = [list(r[f"{name}/applied"]) for r in ranks]
        assert applied[0] == applied[1], f"{name}: ranks disagree on which steps to skip: {applied}"
        assert applied[0] == [k not in bad for k in range(steps)], f"{name}: {applied[0]}"
        states = {key.split("/", 2)[2]: [r[key] for r in ranks] for key in ranks[0] if key.startswith(f"{name}/state/")}
        for param, (a, b) in states.items():
            assert np.array_equal(a, b), f"{name}: {param} differs across ranks"
        scales = states["loss_scale.value"][0]
        assert list(scales) == _expected_scales(applied[0]), f"{name}: loss scales {list(scales)}"
        for param, (a, _) in states.items():
            if param.startswith("loss_scale."):
                continue
            for k in range(steps):
                if k in bad:
                    assert np.array_equal(a[k + 1], a[k]), f"{name}: skipped step {k} changed {param}"
        for param in ("0.weight", "adam_m.0.weight", "adam_v.0.weight", "global_step"):
            a = states[param][0]
            assert all(not np.array_equal(a[k + 1], a[k]) for k in range(steps) if k not in bad), \
                f"{name}: an applied step left {param} unchanged"
        if name == "accum":
            assert not states["accum.overflow"][0].any(), "the pending micro-batch flag was not reset"


def test_overflow_flag_reduction_is_or() -> None:
    """1 process: with a fake flag all-reduce (this rank + the others' sum), any rank's overflow skips the step.

    Run in a fresh interpreter: MindSpore's graph parser resolved the replaced ``flag_reducer`` Cell to the
    namespace of another Cell of the step when many graphs had been compiled in the same process before
    (seen once in a long pytest-xdist worker), so the check must not depend on what ran earlier."""
    done = run_python([str(REPO / "tests" / "train_overflow_worker.py"), "--flag-or"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "flag-or: 6 cases ok" in done.stdout


@pytest.mark.parametrize("agreed", [True, False])
def test_failed_worker_exit_skips_finalisation_only_for_an_error_every_rank_raised(monkeypatch, agreed) -> None:
    """An mpirun worker's agreed error: flush, barrier, grace period, ``os._exit(2)``, in that order (no
    MindSpore finalisation, whose TCP client teardown segfaulted a loaded 2-rank run in ~1 of 6); any other
    error: ``sys.exit(2)`` with no barrier, since a peer still training would never reach it."""
    from mindcv_poolformer import distributed
    from mindcv_poolformer.errors import ConfigError

    calls: list[str] = []

    class Exited(Exception):
        pass

    def fake_exit(code: int) -> None:
        calls.append(f"_exit {code}")
        raise Exited

    monkeypatch.setattr(distributed, "_BOOTSTRAPPED", True)
    monkeypatch.setattr(distributed, "_FAILED_ON_EVERY_RANK", False)
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda values: calls.append("barrier") or values)
    monkeypatch.setattr(distributed.time, "sleep", lambda seconds: calls.append(f"sleep {seconds}"))
    monkeypatch.setattr(distributed.os, "_exit", fake_exit)
    # logging.shutdown flushes stderr too: one entry for any run of flushes
    monkeypatch.setattr(sys.stderr, "flush", lambda: calls[-1:] == ["flush"] or calls.append("flush"))
    if agreed:
        with pytest.raises(ConfigError, match="bad label"):
            distributed.raise_on_every_rank(ConfigError("bad label"))
        with pytest.raises(Exited):
            distributed.exit_process(2)
        assert calls == ["flush", "barrier", f"sleep {distributed._FAILED_EXIT_GRACE_S}", "_exit 2"], calls
    else:
        with pytest.raises(SystemExit) as exited:
            distributed.exit_process(2)
        assert exited.value.code == 2 and calls == [], calls
    calls.clear()
    with pytest.raises(Exited):  # a finished run leaves without finalisation either way, and without a barrier
        distributed.exit_process(0)
    assert calls == ["flush", "_exit 0"], calls
