"""Kill soak: SIGKILL one small training N times at random moments, resume each time, compare with a clean run.

    python tools/kill_soak.py                 # 20 kills (prints k/20 lines, then 20/20)
    python tools/kill_soak.py --kills 3       # what CI runs (tests/test_kill_soak.py)

One small run (a 4-stage PoolFormer of widths 16-128 registered here as ``poolformer_soak``, the
digits demo data, GRAPH mode on the CPU, a checkpoint after every step, validation after every
epoch, drop path and random crops/flips on) is trained once without interruption, then again with
N SIGKILLs. The kill moments are drawn from a seeded RNG and aimed at three phases in turn:

- mid-step: a random time into a training step (after the previous checkpoint was written);
- mid-validation: a random time into the end-of-epoch validation;
- mid-write: a random time into a checkpoint write. The soak's worker slows the write of each
  checkpoint file down (``--slow-write`` seconds, in 8 chunks; MindSpore's own
  ``safetensors`` writer is replaced by one that writes the same bytes chunk by chunk), so the kill
  lands while the temp file is half written, inside the real temp-file-and-rename path.

The phase a kill really landed in is read back from the process's own markers. After each kill
every checkpoint on disk must load completely and hold the step its name says; the next process
(``--resume auto``) must execute, as its first step, the one after the newest checkpoint's step (so
a restart from scratch or from an older checkpoint fails). At the end the final and best
checkpoints (weights, optimizer moments, EMA/loss-scale and train_state entries) must equal the
clean run's bit for bit, and so must the loss of every step executed by any process (replayed
steps included; from ``$MINDCV_POOLFORMER_STEP_LOG``) and every metrics.csv row but the timings.
Bit-exact is the right bar: on one machine the data order, augmentation and stochastic-depth
masks are keyed by (seed, rank, step) and the kernels are deterministic, so any difference is a
resume bug. Exit code 0 and a final ``N/N`` line on success; 1 and a line naming what differed
otherwise.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "poolformer_soak"
MARK = "SOAK "  # prefix of the worker's phase markers on stdout
PHASES = ("mid-step", "mid-validation", "mid-write")
CKPT = re.compile(rf"^{MODEL}-e(?P<epoch>\d{{4}})-s(?P<step>\d{{8}})\.safetensors$")
STEP_LOG = "MINDCV_POOLFORMER_STEP_LOG"
SLOW_ENV = "KILL_SOAK_SLOW_WRITE"
TIMING_COLUMNS = ("img_per_s", "epoch_time")


class SoakFailure(AssertionError):
    """What differed from the uninterrupted run, or which checkpoint is corrupt."""


# ---------------------------------------------------------------------------------------------- worker


def _worker(argv: list[str]) -> int:
    """``train.py`` with the tiny model registered and phase markers (and slowed writes) installed."""
    sys.path.insert(0, str(REPO))
    import mindcv_poolformer  # noqa: F401  (the oneDNN setting, as train.py)
    import mindcv_poolformer.train.tasks as evaluate_module  # the name the classification task calls
    from mindcv_poolformer.models.metaformer import MetaFormer
    from mindcv_poolformer.models.registry import register_model

    def build(num_classes: int = 1000, in_channels: int = 3, **overrides) -> MetaFormer:
        return MetaFormer(depths=(1, 1, 1, 1), widths=(16, 32, 64, 128), num_classes=num_classes,
                          in_channels=in_channels, **overrides)

    register_model(MODEL, build)

    real_evaluate = evaluate_module.evaluate

    def marked_evaluate(*args, **kwargs):
        print(MARK + "validate-begin", flush=True)
        result = real_evaluate(*args, **kwargs)
        print(MARK + "validate-end", flush=True)
        return result

    evaluate_module.evaluate = marked_evaluate

    import mindspore.train.serialization as serialization
    from safetensors.numpy import save as serialize

    if not hasattr(serialization, "save_file"):
        raise SystemExit("kill_soak: mindspore.train.serialization.save_file is gone; adapt the slowed writer")
    seconds = float(os.environ.get(SLOW_ENV, "0"))
    chunks = 8

    def slowed_save_file(tensors, filename, metadata=None):
        """The bytes ``safetensors.numpy.save_file`` writes, written in chunks with pauses between them."""
        data = serialize(tensors, metadata=metadata)
        print(MARK + f"write-begin {os.path.basename(filename)} {len(data)}", flush=True)
        with open(filename, "wb") as fh:
            size = -(-len(data) // chunks)
            for start in range(0, len(data), size):
                fh.write(data[start:start + size])
                fh.flush()
                time.sleep(seconds / chunks)
        print(MARK + "write-end", flush=True)

    serialization.save_file = slowed_save_file
    from mindcv_poolformer.train.cli import main

    sys.argv[0] = "train.py"
    return main(argv)


# ---------------------------------------------------------------------------------------------- processes


class Proc:
    """One worker process; its stdout lines are collected with arrival times, to act on markers."""

    def __init__(self, config: Path, step_log: Path, resume: bool, slow_write: float, extra: list[str] = ()) -> None:
        # MindSpore's compile cache: the uninterrupted run compiles the graphs once, every relaunch loads
        # them (15 s to the first step instead of 40); a wrong cached graph would show as a difference
        cache = config.parent / "compile-cache"
        env = dict(os.environ, PYTHONPATH=str(REPO), GLOG_v="3", PYTHONUNBUFFERED="1",
                   MS_COMPILER_CACHE_ENABLE="1", MS_COMPILER_CACHE_PATH=str(cache))
        env[STEP_LOG] = str(step_log)
        env[SLOW_ENV] = str(slow_write)
        args = [sys.executable, str(Path(__file__).resolve()), "--worker", "--config", str(config), *extra]
        if resume:
            args += ["--resume", "auto"]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[tuple[float, str]] = []
        self.cursor = 0  # lines up to here were looked at by wait_for
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.started, line.rstrip("\n")))

    def wait_for(self, marker: str, timeout: float = 600) -> bool:
        """True once a line starting with ``marker`` came (after the last match); False if the process ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while self.cursor < len(self.lines):
                self.cursor += 1
                if self.lines[self.cursor - 1][1].startswith(marker):
                    return True
            if self.proc.poll() is not None:
                self.reader.join(10)
                if self.cursor >= len(self.lines):
                    return False
            time.sleep(0.005)
        raise SoakFailure(f"timed out waiting for {marker!r}:\n{self.output}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    def finish(self, timeout: float = 900) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(10)
        return code

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def phase(self) -> str:
        """Where the process was when it died: inside a write, a validation, or else in the training loop."""
        state = "mid-step"
        for _, line in self.lines:
            if line.startswith(MARK + "write-begin"):
                state = "mid-write"
            elif line.startswith(MARK + "validate-begin"):
                state = "mid-validation"
            elif line.startswith((MARK + "write-end", MARK + "validate-end")):
                state = "mid-step"
        return state

    def resumed_from(self) -> str | None:
        """The checkpoint the trainer says it resumed from (None: it started a new run)."""
        for _, line in self.lines:
            found = re.search(r"INFO resumed from (\S+): epoch", line)
            if found:
                return Path(found[1]).name
        return None


def phase_times(proc: Proc) -> dict[str, list[float]]:
    """Durations of the marked phases in one (uninterrupted) process, and of the steps between writes."""
    out: dict[str, list[float]] = {"validation": [], "write": [], "step": []}
    opened: dict[str, float] = {}
    for t, line in proc.lines:
        if line.startswith(MARK + "validate-begin"):
            opened["validation"] = t
            opened.pop("step", None)  # the epoch's last step is followed by validation, not a write
        elif line.startswith(MARK + "validate-end") and "validation" in opened:
            out["validation"].append(t - opened.pop("validation"))
        elif line.startswith(MARK + "write-begin"):
            opened["write"] = t
            if "step" in opened:
                out["step"].append(t - opened.pop("step"))
        elif line.startswith(MARK + "write-end"):
            out["write"].append(t - opened.pop("write", t))
            opened["step"] = t
    return out


# ---------------------------------------------------------------------------------------------- checks


def load(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


def check_checkpoints(run_dir: Path) -> tuple[int, Path | None, int]:
    """Every checkpoint in ``run_dir`` loads and holds its named step: (newest step, its file, files checked)."""
    newest, newest_path, checked = 0, None, 0
    for path in sorted(run_dir.glob(f"{MODEL}-*.safetensors")):
        try:
            state = load(path)
        except Exception as exc:  # safetensors raises its own error types for a cut-off file
            raise SoakFailure(f"corrupt checkpoint {path.name}: {exc}") from None
        step = int(state["train_state.global_step"][0])
        match = CKPT.match(path.name)
        if match and int(match["step"]) != step:
            raise SoakFailure(f"{path.name} holds global_step {step}")
        if match and step > newest:
            newest, newest_path = step, path
        checked += 1
    return newest, newest_path, checked


def steps_of(records: list[dict], pid: int) -> list[int]:
    return [r["step"] for r in records if r["pid"] == pid]


def read_steps(path: Path) -> list[dict]:
    sys.path.insert(0, str(REPO))
    from mindcv_poolformer.train.run_io import read_step_log

    return read_step_log(path) if path.exists() else []


def check_resume(proc: Proc, records: list[dict], ckpt_step: int, ckpt_path: Path | None) -> int:
    """The resumed process executed ``ckpt_step + 1`` first, from the newest checkpoint; its first step."""
    executed = steps_of(records, proc.proc.pid)
    if not executed:
        raise SoakFailure(f"the resumed process executed no step:\n{proc.output[-3000:]}")
    said = proc.resumed_from()
    expected = ckpt_path.name if ckpt_path else None
    if executed[0] != ckpt_step + 1 or said != expected:
        raise SoakFailure(f"resume did not start at the checkpoint: newest complete checkpoint on disk "
                          f"{expected} (step {ckpt_step}); the trainer resumed from {said} and executed step "
                          f"{executed[0]} first (expected {ckpt_step + 1})")
    if executed != list(range(executed[0], executed[0] + len(executed))):
        raise SoakFailure(f"process {proc.proc.pid} executed steps {executed}, not consecutive ones")
    return executed[0]


def metrics_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", encoding="utf-8") as fh:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(fh)]


def compare_states(name: str, ref: Path, got: Path) -> None:
    import numpy as np

    expected, actual = load(ref), load(got)
    if sorted(expected) != sorted(actual):
        raise SoakFailure(f"{name}: entries differ: {sorted(set(expected) ^ set(actual))[:5]}")
    for key in sorted(expected):
        if not np.array_equal(expected[key], actual[key]):
            diff = np.max(np.abs(expected[key].astype(np.float64) - actual[key].astype(np.float64)))
            raise SoakFailure(f"{name}: {key} differs from the uninterrupted run (max |diff| {diff:.3g})")


def compare_runs(ref_dir: Path, run_dir: Path, ref_steps: list[dict], steps: list[dict]) -> tuple[int, int]:
    """Final and best checkpoints, every step's loss and metrics.csv equal the clean run's: (steps, losses)."""
    final = max(ref_dir.glob(f"{MODEL}-e*-s*.safetensors"), key=lambda p: p.name)
    if not (run_dir / final.name).exists():
        raise SoakFailure(f"the soaked run has no {final.name}")
    compare_states("final checkpoint", final, run_dir / final.name)
    compare_states("best checkpoint", ref_dir / f"{MODEL}-best.safetensors", run_dir / f"{MODEL}-best.safetensors")
    reference = {r["step"]: r["loss"] for r in ref_steps}
    if sorted(reference) != list(range(1, len(reference) + 1)):
        raise SoakFailure(f"the uninterrupted run logged steps {sorted(reference)}")
    for record in steps:
        if reference.get(record["step"]) != record["loss"]:
            raise SoakFailure(f"step {record['step']} (process {record['pid']}): loss {record['loss']!r}, "
                              f"uninterrupted run {reference.get(record['step'])!r}")
    missing = sorted(set(reference) - {r["step"] for r in steps})
    if missing:
        raise SoakFailure(f"steps never executed in the soaked run: {missing}")
    ref_rows, rows = metrics_rows(ref_dir), metrics_rows(run_dir)
    if ref_rows != rows:
        raise SoakFailure(f"metrics.csv differs:\n  uninterrupted {ref_rows}\n  soaked        {rows}")
    leftovers = sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".tmp-"))
    if leftovers:
        raise SoakFailure(f"temp files left after the last resume: {leftovers}")
    return len(reference), len(steps)


# ---------------------------------------------------------------------------------------------- the soak


def write_config(path: Path, data_dir: Path, run_dir: Path, epochs: int, steps_per_epoch: int, seed: int) -> Path:
    import yaml

    cfg = {
        "mode": 0, "device_target": "CPU", "dataset": "digits", "data_dir": str(data_dir), "seed": seed,
        "num_parallel_workers": 1, "image_resize": 32, "crop_pct": 1.0, "scale": [0.6, 1.0], "ratio": [0.9, 1.1],
        "hflip": 0.5, "interpolation": "bilinear", "mean": [0.0, 0.0, 0.0], "std": [255.0, 255.0, 255.0],
        "model": MODEL, "num_classes": 10, "drop_path_rate": 0.1, "batch_size": 8,
        "num_samples": 8 * steps_per_epoch, "lr": 2e-3, "warmup_epochs": 1, "warmup_lr": 1e-4, "min_lr": 1e-5,
        "epoch_size": epochs, "weight_decay": 0.05, "label_smoothing": 0.1, "ckpt_save_dir": str(run_dir),
        "ckpt_save_steps": 1, "keep_checkpoint_max": 2, "val_while_train": True, "log_interval": 1,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def plan_kills(rng: random.Random, kills: int) -> list[str]:
    """The phase each kill aims at: the three in equal shares (as far as ``kills`` allows), shuffled."""
    plans = [PHASES[i % len(PHASES)] for i in range(kills)]
    rng.shuffle(plans)
    return plans


def aim(proc: Proc, target: str, rng: random.Random, times: dict[str, float], slow_write: float,
        steps_per_epoch: int) -> bool:
    """Wait for the phase ``target`` to begin, then a random part of its length; False if the run ended first.

    A write kill picks one of the process's first ``steps_per_epoch + 1`` writes, so some land in the
    two writes of an epoch's end (the ``-best`` checkpoint and the epoch's own).
    """
    nth = 1
    if target == "mid-write":
        marker, length, nth = MARK + "write-begin", slow_write, rng.randint(1, steps_per_epoch + 1)
    elif target == "mid-validation":
        marker, length = MARK + "validate-begin", times["validation"]
    else:  # a step starts once the previous step's checkpoint is written
        marker, length = MARK + "write-end", times["step"]
    for _ in range(nth):
        if not proc.wait_for(marker):
            return False
    time.sleep(rng.uniform(0.1, 0.8) * length)
    return True


def _log(text: str) -> None:
    print(text, flush=True)


def soak(kills: int, seed: int, work: Path, slow_write: float, epochs: int, steps_per_epoch: int,
         log=_log) -> None:
    rng = random.Random(seed)
    data_dir = work / "digits"
    ref_dir, run_dir = work / "uninterrupted", work / "soaked"
    ref_log, run_log = work / "uninterrupted-steps.jsonl", work / "soaked-steps.jsonl"
    ref_cfg = write_config(work / "uninterrupted.yaml", data_dir, ref_dir, epochs, steps_per_epoch, seed)
    run_cfg = write_config(work / "soaked.yaml", data_dir, run_dir, epochs, steps_per_epoch, seed)

    start = time.monotonic()
    ref = Proc(ref_cfg, ref_log, resume=False, slow_write=0.0)
    if ref.finish() != 0:
        raise SoakFailure(f"the uninterrupted run failed:\n{ref.output[-3000:]}")
    measured = phase_times(ref)
    # the shortest validation: the first one of a process also compiles (or loads) the eval graph
    times = {"step": statistics.median(measured["step"]), "validation": min(measured["validation"])}
    total = epochs * steps_per_epoch
    log(f"uninterrupted run: {total} steps in {time.monotonic() - start:.0f} s (a step {times['step']:.2f} s, "
        f"a validation {times['validation']:.2f} s; writes slowed to {slow_write:.1f} s in the soak)")

    landed: dict[str, int] = dict.fromkeys(PHASES, 0)
    ckpt_step, ckpt_path, checked = 0, None, 0
    for k, target in enumerate(plan_kills(rng, kills), 1):
        # only a process aimed at a write writes slowly: the others keep the soak short
        proc = Proc(run_cfg, run_log, resume=k > 1, slow_write=slow_write if target == "mid-write" else 0.0)
        if not aim(proc, target, rng, times, slow_write, steps_per_epoch):
            code = proc.finish()
            raise SoakFailure(f"the run ended (exit code {code}) before kill {k}/{kills}: lengthen it "
                              f"(--epochs){chr(10) + proc.output[-3000:] if code else ''}")
        at = time.monotonic() - proc.started
        proc.kill()
        code = proc.finish()
        if code != -signal.SIGKILL:
            raise SoakFailure(f"kill {k}: the process exited with {code} instead of dying by SIGKILL")
        first = check_resume(proc, read_steps(run_log), ckpt_step, ckpt_path)
        resumed = f"resumed from step {ckpt_step}, ran from step {first}" if k > 1 else f"ran from step {first}"
        phase = proc.phase()
        landed[phase] += 1
        partial = sorted(f"{p.name} {p.stat().st_size} B" for p in run_dir.glob(".tmp-*") if p.stat().st_size)
        ckpt_step, ckpt_path, n = check_checkpoints(run_dir)
        checked += n
        note = f"; half-written temp file left: {', '.join(partial)}" if phase == "mid-write" and partial else ""
        log(f"{k}/{kills} killed {phase} (aimed {target}) {at:.1f} s into process {k} ({resumed}); "
            f"{n} checkpoints on disk load, newest step {ckpt_step}{note}")
    final = Proc(run_cfg, run_log, resume=True, slow_write=0.0)
    if final.finish() != 0:
        raise SoakFailure(f"the last resume failed:\n{final.output[-3000:]}")
    first = check_resume(final, read_steps(run_log), ckpt_step, ckpt_path)
    checked += check_checkpoints(run_dir)[2]
    missed = [p for p in PHASES if not landed[p]] if kills >= len(PHASES) else []
    if missed:
        raise SoakFailure(f"no kill landed {', '.join(missed)} (landed: {landed}); try another --seed or a "
                          "longer --slow-write")
    n_steps, n_executed = compare_runs(ref_dir, run_dir, read_steps(ref_log), read_steps(run_log))
    log(f"last resume from step {ckpt_step} ran from step {first} to the end; {checked} checkpoint loads, none "
        f"corrupt; the final and best checkpoints, metrics.csv and the loss of all {n_executed} steps executed "
        f"({n_steps} distinct, replays included) equal the uninterrupted run's bit for bit; kills landed "
        + ", ".join(f"{v} {k}" for k, v in landed.items()))
    log(f"{kills}/{kills} kills recovered ({time.monotonic() - start:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments and of the run")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the run (default: enough for --kills)")
    parser.add_argument("--steps-per-epoch", type=int, default=3)
    parser.add_argument("--slow-write", type=float, default=0.5, help="seconds each checkpoint write takes")
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error(f"--kills must be at least 1, got {args.kills}")
    # a kill costs the run about one step of progress on average (0 to steps_per_epoch): twice that
    epochs = args.epochs or max(2, -(-args.kills * 2 // args.steps_per_epoch))
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kill-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        soak(args.kills, args.seed, work, args.slow_write, epochs, args.steps_per_epoch)
    except SoakFailure as exc:
        print(f"FAILED: {exc}", flush=True)
        return 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
