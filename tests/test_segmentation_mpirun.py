"""Segmentation through the real train.py CLI under ``mpirun -n 2`` (README's launch form, on the recipe YAML): a
short run with validation, and a bad label that only rank 1's share of the label check reads.

CPU stand-ins for the Ascend recipe: amp O0, no SyncBN, no sink, FPN-S12 on the 32x32 tiny ADE20K-layout folder.
Each rank's stdout/stderr lands in its own file (Open MPI's ``--output-filename``), so the tests can tell which
rank wrote what.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from seg_train_helpers import make_tiny_ade
from train_helpers import REPO

from conftest import require_mpirun

pytestmark = [pytest.mark.slow, pytest.mark.two_ranks]

RECIPE = "configs/segmentation/fpn_poolformer_s12_ade20k_ascend.yaml"
# each rank's exit status into RC_DIR/rc.<MPI rank>, then exit 0: mpirun aborts the job when one rank exits
# non-zero, which could kill the other before it reports
_RECORD_RC = 'rc_dir=$1; shift; "$@"; rc=$?; echo $rc > "$rc_dir/rc.$OMPI_COMM_WORLD_RANK"; exit 0'


@pytest.fixture(scope="module")
def mpirun() -> str:
    return require_mpirun()


@pytest.fixture(scope="module")
def ade(tmp_path_factory) -> Path:
    return make_tiny_ade(tmp_path_factory.mktemp("ade") / "ADEChallengeData2016")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_args(data: Path, run: Path) -> list[str]:
    return ["train.py", "--config", RECIPE, "--device_target", "CPU", "--amp_level", "O0", "--sync_bn", "False",
            "--jit_level", "auto", "--dataset_sink_mode", "False", "--data_dir", str(data), "--num_classes", "3",
            "--batch_size", "2", "--seg_crop_size", "32,32", "--seg_scale", "128,32", "--max_iters", "2",
            "--val_interval", "2", "--ckpt_save_interval", "2", "--num_parallel_workers", "1", "--log_interval", "1",
            "--ckpt_save_dir", str(run)]


def _mpirun(mpirun: str, args: list[str], logs: Path, timeout: int, rc_dir: Path | None = None
            ) -> subprocess.CompletedProcess:
    """``mpirun -n 2 python ARGS`` from the repository root; on a timeout the job is ended (mpirun ends its ranks)."""
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PYTHONPATH=str(REPO), GLOG_v="3", MS_SCHED_PORT=str(_free_port()),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PATH=f"{bindir}:{os.environ.get('PATH', '')}")
    command = [sys.executable, *args]
    if rc_dir is not None:
        command = ["sh", "-c", _RECORD_RC, "sh", str(rc_dir), *command]
    full = [mpirun, "-n", "2", "--oversubscribe", "--allow-run-as-root", "-x", "PATH", "-x", "PYTHONPATH",
            "-x", "GLOG_v", "-x", "MS_SCHED_PORT", "--output-filename", str(logs), *command]
    proc = subprocess.Popen(full, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"mpirun did not finish within {timeout} s:\n{out[-2000:]}\n{err[-2000:]}\n{_tails(logs)}")
    return subprocess.CompletedProcess(full, proc.returncode, out, err)


def _rank_logs(logs: Path) -> dict[int, dict[str, str]]:
    """MindSpore rank (from the trainer's "distributed: rank R of 2" line) -> that process's stdout and stderr.

    MindSpore assigns its own ranks, which need not be the MPI ranks that name the folders."""
    found: dict[int, dict[str, str]] = {}
    for folder in sorted(logs.glob("*/rank.*")):
        texts = {name: (folder / name).read_text(errors="replace") if (folder / name).exists() else ""
                 for name in ("stdout", "stderr")}
        ranks = [r for r in (0, 1) if f"distributed: rank {r} of 2 (launcher mpirun)" in texts["stdout"]]
        assert len(ranks) == 1, f"{folder}: no single rank line\n{texts['stdout'][-2000:]}"
        assert ranks[0] not in found, f"two processes say they are rank {ranks[0]}"
        found[ranks[0]] = texts
    assert sorted(found) == [0, 1], f"rank logs found: {sorted(found)}\n{_tails(logs)}"
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, which the container's init may never reap, does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def _check_scheduler_ended(ranks: dict[int, dict[str, str]], wait: float = 30.0) -> None:
    """The MindSpore scheduler that rank 0 started for mpirun ends with the job; one left over is ended here."""
    found = re.findall(r"started the MindSpore scheduler \(pid (\d+)\)", ranks[0]["stdout"] + ranks[1]["stdout"])
    assert len(found) == 1, "no line about the scheduler rank 0 starts"
    pid = int(found[0])
    deadline = time.monotonic() + wait
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the MindSpore scheduler (pid {pid}) was still running {wait:.0f} s after the job; ended it")


def _tails(logs: Path) -> str:
    return "\n".join(f"--- {p.relative_to(logs)}\n{p.read_text(errors='replace')[-1500:]}"
                     for p in sorted(logs.glob("*/rank.*/*")))


def test_mpirun_two_ranks_smoke(mpirun, ade, tmp_path):
    """README's mpirun launch of the segmentation recipe: exit 0, validation and checkpoint by rank 0 only."""
    from mindcv_poolformer.train.trainer import has_training_state

    run, logs = tmp_path / "run", tmp_path / "logs"
    done = _mpirun(mpirun, _train_args(ade, run), logs, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}\n{_tails(logs)}"
    ranks = _rank_logs(logs)
    for rank, texts in ranks.items():
        assert "Traceback" not in texts["stderr"] and "train.py: error:" not in texts["stderr"], \
            (rank, texts["stderr"][-2000:])
    assert "training fpn_poolformer_s12 (segmentation): 2 iterations" in ranks[0]["stdout"]
    assert "2 rank(s)" in ranks[0]["stdout"]
    # the metrics row (and its log line) are rank 0's: rank 1 validates its shard and writes nothing
    assert "step 2/2: loss" in ranks[0]["stdout"] and "val_miou" in ranks[0]["stdout"]
    assert "step 2/2:" not in ranks[1]["stdout"] and "val_miou" not in ranks[1]["stdout"]
    assert sorted(p.name for p in tmp_path.rglob("metrics.csv")) == ["metrics.csv"]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [2], rows
    assert 0.0 <= float(rows[0]["val_miou"]) <= 100.0, rows
    final = run / "fpn_poolformer_s12-e0001-s00000002.safetensors"
    assert final.exists() and has_training_state(final), sorted(p.name for p in run.iterdir())
    assert (run / "fpn_poolformer_s12-best.safetensors").exists() and (run / "config.yaml").exists()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], "a temporary file was left behind"
    _check_scheduler_ended(ranks)


def test_mpirun_bad_label_in_rank1_share_both_ranks_exit2(mpirun, ade, tmp_path):
    """A label out of range in a file only rank 1 reads: both ranks exit 2 with the same one line, no run dir."""
    import shutil

    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(ade, data)
    labels = sorted((data / "annotations" / "training").glob("*.png")) + \
        sorted((data / "annotations" / "validation").glob("*.png"))  # the order the check shares out
    bad = data / "annotations" / "training" / "ADE_train_00000005.png"
    assert labels.index(bad) % 2 == 1, "the file must be in rank 1's share, labels[1::2]"
    label = np.asarray(Image.open(bad)).copy()
    label[3, 3] = 9
    Image.fromarray(label).save(bad)
    run, logs, rcs = tmp_path / "run", tmp_path / "logs", tmp_path / "rc"
    rcs.mkdir()
    done = _mpirun(mpirun, _train_args(data, run), logs, timeout=300, rc_dir=rcs)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"  # the wrappers' status
    codes = sorted((p.name, p.read_text().strip()) for p in rcs.iterdir())
    assert codes == [("rc.0", "2"), ("rc.1", "2")], f"{codes}\n{_tails(logs)}"
    errors = []
    ranks = _rank_logs(logs)
    for rank, texts in ranks.items():
        lines = [ln for ln in texts["stderr"].splitlines() if ln.startswith("train.py: error:")]
        assert len(lines) == 1 and "Traceback" not in texts["stderr"], (rank, texts["stderr"][-3000:])
        errors.append(lines[0])
    assert errors[0] == errors[1], errors
    assert f"{bad} has label value 9" in errors[0] and "num_classes 3" in errors[0], errors[0]
    assert not run.exists(), sorted(p.name for p in run.rglob("*"))
    _check_scheduler_ended(ranks)
