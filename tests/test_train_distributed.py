"""Data-parallel proof on CPU: 2 ranks (msrun, and mpirun via the scheduler bootstrap), one step, weights equal
across ranks and equal to one process on the concatenated batch."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from train_helpers import REPO, make_tiny_folder, run_python

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
    return dict(np.load(out / "rank0.npz"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    bindir = os.path.dirname(sys.executable)  # msrun starts `python` from PATH: it must be this environment's
    return {"PATH": f"{bindir}:{os.environ.get('PATH', '')}"}


def _check(out: Path, reference: dict) -> float:
    ranks = [dict(np.load(out / f"rank{r}.npz")) for r in range(2)]
    assert all((out / f"rank{r}.txt").read_text().split()[0] == "2" for r in range(2))
    worst = 0.0
    for name, ref in reference.items():
        assert np.array_equal(ranks[0][name], ranks[1][name]), name
        worst = max(worst, float(np.max(np.abs(ranks[0][name] - ref))))
    print(f"max |2 ranks - 1 process| over all weights: {worst:.3e}")
    assert worst <= 1e-6, worst
    return worst


def test_msrun_two_ranks_equal_one_process(folder, reference, tmp_path):
    msrun = shutil.which("msrun", path=os.path.dirname(sys.executable)) or shutil.which("msrun")
    assert msrun, "msrun not found"
    done = run_python([msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
                       f"--log_dir={tmp_path / 'logs'}", "--join=True", WORKER, str(folder), str(tmp_path), "8",
                       "True"], env=_env())
    logs = "".join(p.read_text()[-2000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert done.returncode == 0, done.stderr[-2000:] + logs
    _check(tmp_path, reference)


@pytest.mark.skipif(shutil.which("mpirun") is None and os.environ.get("CI") != "true", reason="no mpirun here")
def test_mpirun_two_ranks_equal_one_process(folder, reference, tmp_path):
    args = ["mpirun", "-n", "2", "--oversubscribe", "--allow-run-as-root", "-x", "PATH", "-x", "PYTHONPATH",
            "-x", "GLOG_v", "-x", "MS_SCHED_PORT", sys.executable, WORKER, str(folder), str(tmp_path), "8", "True"]
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(REPO), GLOG_v="3", MS_SCHED_PORT=str(_free_port()),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **_env())
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    _check(tmp_path, reference)
