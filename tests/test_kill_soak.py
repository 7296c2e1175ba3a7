"""SIGKILL soak and resume start points, through real training processes (``tools/kill_soak.py``).

The soak kills one small run mid-step, mid-validation and truly mid-write (its worker slows the
checkpoint write so the temp file is half written) and checks every resume, the final weights
and the per-step losses against an uninterrupted run. The second test pins where ``--resume auto``
starts: at the newest checkpoint's step, or at the previous checkpoint's when the newest is garbled.
Both are slow (real processes: ~15 s of start-up each, the first also compiles). The last test pins the
order of an epoch end's two writes, which the soak's kills land between only by chance.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "kill_soak.py"


def _soak_module():
    spec = importlib.util.spec_from_file_location("kill_soak", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


soak = _soak_module()


@pytest.mark.slow
@pytest.mark.serial  # the kills are timed from the uninterrupted run's phase lengths: no other test may load the CPU
def test_three_kills_mid_step_validation_and_write_then_the_same_run():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--kills", "3", "--seed", "0"], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines[-1].startswith("3/3 kills recovered"), proc.stdout
    kills = [line for line in lines if line[:4] in ("1/3 ", "2/3 ", "3/3 ") and " killed " in line]
    assert len(kills) == 3, proc.stdout
    for phase in soak.PHASES:
        assert any(f"killed {phase} " in line for line in kills), proc.stdout
    assert any("half-written temp file left" in line for line in kills), proc.stdout


def _run(cfg: Path, log: Path, resume: bool, *extra: str) -> tuple[soak.Proc, list[int]]:
    proc = soak.Proc(cfg, log, resume=resume, slow_write=0.0, extra=list(extra))
    assert proc.finish() == 0, proc.output[-4000:]
    return proc, soak.steps_of(soak.read_steps(log), proc.proc.pid)


@pytest.mark.slow
def test_resume_auto_starts_at_the_newest_checkpoint_and_past_a_garbled_one(tmp_path):
    # one config for all three processes: the compile cache the soak's worker uses keys graphs by source,
    # not by the learning-rate array's length, so a resume with another epoch_size must not share it
    run_dir, log = tmp_path / "run", tmp_path / "steps.jsonl"
    cfg = soak.write_config(tmp_path / "run.yaml", tmp_path / "digits", run_dir, epochs=3, steps_per_epoch=2, seed=0)
    name = "poolformer_soak-e{:04d}-s{:08d}.safetensors".format
    _, steps = _run(cfg, log, False, "--keep_checkpoint_max", "3")
    assert steps == [1, 2, 3, 4, 5, 6]
    final = tmp_path / "s6-uninterrupted.safetensors"
    shutil.copyfile(run_dir / name(3, 6), final)

    # the newest checkpoint on disk is step 4's: the resumed run executes exactly steps 5 and 6
    (run_dir / name(3, 5)).unlink()
    (run_dir / name(3, 6)).unlink()
    resumed, steps = _run(cfg, log, True, "--keep_checkpoint_max", "3")
    assert resumed.resumed_from() == name(2, 4) and steps == [5, 6], (steps, resumed.output[-3000:])
    _assert_same_state(run_dir / name(3, 6), final)

    # the newest cut to half its length: a warning, then the previous checkpoint and ITS step
    newest = run_dir / name(3, 6)
    newest.chmod(0o600)
    with open(newest, "r+b") as fh:
        fh.truncate(newest.stat().st_size // 2)
    fallback, steps = _run(cfg, log, True, "--keep_checkpoint_max", "3")
    assert f"resume auto: skipping {newest.name}" in fallback.output, fallback.output[-3000:]
    assert fallback.resumed_from() == name(3, 5) and steps == [6], (steps, fallback.output[-3000:])
    _assert_same_state(newest, final)  # step 6 redone from step 5's state: the same checkpoint, bit for bit
    losses: dict[int, set] = {}
    for record in soak.read_steps(log):
        losses.setdefault(record["step"], set()).add(record["loss"])
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(len(v) == 1 for v in losses.values()), losses


def _assert_same_state(path: Path, expected_path: Path) -> None:
    got, expected = soak.load(path), soak.load(expected_path)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert np.array_equal(got[key], value), key

def test_a_kill_between_the_best_and_the_step_checkpoint_leaves_the_best_consistent(tmp_path, monkeypatch):
    """The step checkpoint records the new best top-1; it must not be on disk while ``-best`` is not."""
    from mindcv_poolformer.train import run_io

    real, written = run_io.save_state_dict, []

    def dies_at_the_second_write(state, path):
        if written:
            raise KeyboardInterrupt  # the process dies here, as under SIGKILL: nothing after this runs
        written.append(Path(path).name)
        return real(state, path)

    monkeypatch.setattr(run_io, "save_state_dict", dies_at_the_second_write)
    manager = run_io.CheckpointManager(tmp_path, "m", "safetensors", 2, "latest_k")
    with pytest.raises(KeyboardInterrupt):
        manager.save({"w": np.ones(2, np.float32)}, 1, 2, 50.0, True)
    assert written == ["m-best.safetensors"]
    # no step checkpoint: the resume replays the epoch from the previous one and writes -best again
    assert manager.latest() is None and not list(tmp_path.glob("m-e*"))
