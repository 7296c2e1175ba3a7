"""README: "Ctrl+C / SIGTERM stop at the next step boundary (on several ranks: at the next stop check, every
stop_check_interval steps), write a checkpoint and exit 0 ... All ranks agree on the step. A second signal aborts
at once."

Two ranks under msrun on the CPU, SIGTERM to rank 1 only (the rank that writes no checkpoint, so rank 0 must
learn of it through the all-reduce); then one process that gets SIGTERM twice. ``claims_worker.py`` sends
the signals from inside the real Trainer (see there).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys

import pytest
from train_helpers import REPO, make_tiny_folder, run_python

pytestmark = pytest.mark.slow  # two Trainer start-ups under msrun: ~1 min on 2 shared cores
WORKER = str(REPO / "tests" / "claims_worker.py")
SIGNAL_STEP = 1  # before the second optimizer step of a 5-step epoch
STOP_CHECK = 3  # the ranks agree on a signal after optimizer steps 3, 6, ...: the stop comes at step 3, before the end


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("tiny"), per_class_train=4, per_class_val=1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.two_ranks
def test_ranks_agree_on_the_stop_step_when_one_rank_gets_the_signal(folder, tmp_path):
    msrun = shutil.which("msrun", path=os.path.dirname(sys.executable)) or shutil.which("msrun")
    assert msrun, "msrun not found"
    env = {"PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}",
           "CLAIMS_STOP_CHECK": str(STOP_CHECK)}
    done = run_python([msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
                       f"--log_dir={tmp_path / 'logs'}", "--join=True", WORKER, str(folder), str(tmp_path), "True",
                       "1", str(SIGNAL_STEP), "1"], env=env)
    logs = "".join(p.read_text()[-3000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert done.returncode == 0, done.stderr[-2000:] + logs
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["steps_per_epoch"] > STOP_CHECK + 1, "the epoch would end by itself: nothing to agree on"
    assert ranks[1]["interrupted"] == "SIGTERM" and ranks[0]["interrupted"], ranks
    # both ran on to the first stop check after the signal (not the epoch's end), then stopped there together
    assert ranks[0]["steps"] == ranks[1]["steps"] == list(range(STOP_CHECK)), ranks
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == STOP_CHECK
    ckpts = sorted(p.name for p in (tmp_path / "run").glob("poolformer_s12-e*.safetensors"))
    assert ckpts == [f"poolformer_s12-e0001-s{STOP_CHECK:08d}.safetensors"], ckpts
    assert ranks[0]["last_checkpoint"].endswith(ckpts[0])


def test_a_second_signal_aborts_at_once_without_a_checkpoint(folder, tmp_path):
    done = run_python([WORKER, str(folder), str(tmp_path), "False", "0", str(SIGNAL_STEP), "2"])
    assert (tmp_path / "rank0.started").exists(), done.stderr[-3000:]
    assert done.returncode == -signal.SIGTERM, (done.returncode, done.stderr[-3000:])
    assert "second SIGTERM: aborting without a checkpoint" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "rank0.json").exists(), "fit() returned after the second signal"
    run = tmp_path / "run"
    assert not list(run.glob("*.safetensors")) and not list(run.glob(".tmp-*")), sorted(p.name for p in run.iterdir())
