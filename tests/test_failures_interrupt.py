"""Interruption through the real ``train.py``: SIGTERM/SIGINT stop with a checkpoint and the printed command
resumes; a full disk while saving, an unwritable ckpt_save_dir and divergence. SIGKILL at random moments
(mid-step, mid-validation, truly mid-write) and where ``--resume auto`` starts are ``tests/test_kill_soak.py``
(``tools/kill_soak.py``), which checks every resume's first step and the final state bit for bit."""

from __future__ import annotations

import csv
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from train_helpers import REPO, make_tiny_folder, run_python, tiny_overrides

pytestmark = pytest.mark.slow

CKPT = re.compile(r"^poolformer_s12-e\d{4}-s\d{8}\.safetensors$")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("tiny"), per_class_train=4, per_class_val=1)


def write_recipe(path: Path, folder: Path, run_dir: Path, **extra) -> Path:
    cfg = tiny_overrides(folder, run_dir, **extra)
    path.write_text(yaml.safe_dump(cfg))
    return path


class Run:
    """One ``train.py`` process whose output is collected line by line (to act on progress lines)."""

    def __init__(self, args: list[str], env: dict | None = None) -> None:
        full_env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", GLOG_v="3")
        full_env.update(env or {})
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "train_kill_worker.py"), *args],
                                     cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 240) -> bool:
        """True once a line matching ``pattern`` appeared; False if the process ended first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            while seen < len(self.lines):
                if regex.search(self.lines[seen]):
                    return True
                seen += 1
            if self.proc.poll() is not None and seen >= len(self.lines):
                self.reader.join(5)
                if seen >= len(self.lines):
                    return False
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {pattern!r}:\n{self.output}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(10)
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)


def load_state(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def check_run_dir_valid(run_dir: Path) -> list[Path]:
    """Every checkpoint-named file loads completely; temp files are the only other leftovers."""
    ckpts = sorted(p for p in run_dir.iterdir() if CKPT.match(p.name))
    for path in ckpts:
        state = load_state(path)
        assert "train_state.global_step" in state and "head.weight" in state, path
    others = [p.name for p in run_dir.iterdir() if p.suffix == ".safetensors" and p not in ckpts]
    assert all(n.startswith(".tmp-") or n.endswith("-best.safetensors") for n in others), others
    return ckpts


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_with_a_checkpoint_and_exit_0(folder, tmp_path, sig):
    run_dir = tmp_path / "run"
    recipe = str(write_recipe(tmp_path / "r.yaml", folder, run_dir, epoch_size=3, num_samples=16,
                              mode=0 if sig == signal.SIGINT else 1))
    run = Run(["--config", recipe])
    assert run.wait_for(r"epoch 1/3 step 1/2 loss")
    run.kill(sig)
    assert run.finish() == 0, run.output
    message = run.output.strip().splitlines()[-1]
    # MindSpore's GRAPH runtime hands a SIGINT on to the process as SIGTERM: either name is right
    names = {signal.Signals(sig).name, "SIGTERM"}
    assert any(f"stopped by {n}" in message for n in names) and message.endswith("--resume auto"), run.output
    command = message.split("Resume with: ", 1)[1]
    assert command.startswith("python train.py --config ")
    ckpts = check_run_dir_valid(run_dir)
    assert ckpts, run.output
    step = int(re.search(r"-s(\d+)", ckpts[-1].name)[1])
    assert 1 <= step <= 6 and f"at step {step};" in message
    # the printed command continues the run to its end
    resumed = run_python(shlex.split(command)[1:])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (run_dir / "poolformer_s12-e0003-s00000006.safetensors").exists()
    assert [r["epoch"] for r in metrics(run_dir)] == [str(e) for e in range(1, 4)]


def test_disk_full_while_saving_keeps_the_previous_checkpoint(folder, tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes past a size, as a full disk does (EFBIG for ENOSPC)."""
    run_dir = tmp_path / "run"
    recipe = str(write_recipe(tmp_path / "r.yaml", folder, run_dir, mode=1, epoch_size=1, num_samples=16,
                              ckpt_save_steps=1))
    first = run_python(["train.py", "--config", recipe, "--epoch_size", "1"], timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if CKPT.match(p.name)}
    assert before
    limit = min(len(b) for b in before.values()) // 2
    script = ("import resource, signal, sys, runpy; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
              "sys.argv = ['train.py'] + sys.argv[1:]; runpy.run_path('train.py', run_name='__main__')")
    full = run_python(["-c", script, "--config", recipe, "--epoch_size", "2", "--resume", "auto"], timeout=300)
    assert full.returncode == 2, full.stdout + full.stderr
    error = full.stderr.strip().splitlines()[-1]
    assert error.startswith("train.py: error: could not write checkpoint ") and "File too large" in error, error
    assert "is intact" in error and "Traceback" not in full.stderr
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if CKPT.match(p.name)}
    assert after == before  # nothing already written was touched
    assert not list(run_dir.glob(".tmp-*"))


def test_unwritable_ckpt_save_dir_fails_before_training(folder, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    recipe = str(write_recipe(tmp_path / "r.yaml", folder, blocker / "run", mode=1))
    proc = run_python(["train.py", "--config", recipe], timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"train.py: error: ckpt_save_dir: {blocker / 'run'} is not writable"), error
    assert "Traceback" not in proc.stderr and blocker.read_text() == "not a directory"


def test_divergence_stops_with_the_last_good_checkpoint(folder, tmp_path):
    # AdamW's first step moves every weight by ~lr: with lr 1e30 the net overflows from step 2 on
    run_dir = tmp_path / "run"
    recipe = str(write_recipe(tmp_path / "r.yaml", folder, run_dir, mode=1, epoch_size=3, num_samples=16,
                              lr=1e30, ckpt_save_steps=1, max_nonfinite_steps=3))
    proc = run_python(["train.py", "--config", recipe], timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    pattern = (r"train\.py: error: training diverged: loss or gradients not finite for 3 consecutive steps "
               r"\(the last at epoch \d, step 4\); last good checkpoint: \S+-s00000001\.safetensors")
    assert re.match(pattern, error), error
    assert "Traceback" not in proc.stderr
