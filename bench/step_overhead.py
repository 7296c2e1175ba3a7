"""Host overhead of the training loop per step, before and after the loop without per-step host syncs.

Why: on an NPU a step that waits for the host each time (``loss.asnumpy()``, the applied flag, the
stop-signal check) or feeds it per-step buffers (the drop-path noise: one ``set_data`` per block)
leaves the device idle for that long. The NPU is not here; the host side is, so this measures it on
the CPU with a small run: PoolFormer-S12 at 32x32, batch 4, drop path 0.1 (24 DropPath layers),
40 steps an epoch, GRAPH_MODE, log_interval 50 (so the new loop fetches once an epoch).

Per tree (``--before REF``, default ``main``, and ``--after REF``, default ``HEAD``, each unpacked
by ``git archive``, so edits made while it runs do not enter) one process trains 1 + ``--epochs``
epochs through ``Trainer.fit`` and reads each epoch's loop time (``epoch_time`` of its record: from
the first batch to the last step, no validation or checkpoint); then it runs the same compiled step
over the same epochs' batches in a bare loop (iterator + step call, one sync at the end). Host
overhead per step = (trainer loop - bare loop) / steps, the median of the measured epochs. Processes
alternate before/after over ``--rounds`` rounds; each cell is the median over rounds. CPU execution
is synchronous, so a fetch's wait for the device is not what this shows; it shows the host work the
loop adds per step.

    .venv/bin/python bench/step_overhead.py [--before main] [--after HEAD] [--rounds 2] [--epochs 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BATCH, STEPS, CLASSES = 4, 40, 10


def make_folder(root: Path) -> Path:
    """A 10-class ImageFolder of 32x32 RGB PNGs (seeded noise; decoding cost is the same either way)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    per_class = BATCH * STEPS // CLASSES
    for split, count in (("train", per_class), ("val", 1)):
        for label in range(CLASSES):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return root


def worker(data_dir: str, run_dir: str, epochs: int) -> dict:
    """Train in this process with the package found first on sys.path; the loop and bare-step seconds per epoch."""
    os.environ.setdefault("GLOG_v", "3")
    from mindcv_poolformer.config import load_config
    from mindcv_poolformer.train.trainer import Trainer

    cfg = load_config(overrides={
        "mode": 0, "device_target": "CPU", "dataset": "imagenet", "data_dir": data_dir, "num_parallel_workers": 1,
        "image_resize": 32, "crop_pct": 1.0, "scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip": 0.0,
        "interpolation": "bilinear", "model": "poolformer_s12", "num_classes": CLASSES, "drop_path_rate": 0.1,
        "batch_size": BATCH, "lr": 1e-4, "warmup_epochs": 0, "epoch_size": 1 + 2 * epochs, "weight_decay": 0.05,
        "ckpt_save_dir": run_dir, "log_interval": 50, "val_while_train": False, "keep_checkpoint_max": 1,
        "ckpt_save_interval": 1000})
    trainer = Trainer(cfg)
    assert trainer.steps_per_epoch == STEPS, trainer.steps_per_epoch
    result = trainer.fit(stop_after_epoch=1 + epochs)  # the schedule's other epochs serve the bare loop
    loop = [float(r["epoch_time"]) for r in result.epochs[1:]]
    bare = []
    for epoch in range(1, 1 + epochs):
        data = trainer.task.train_dataset(epoch, 0, 1, trainer.num_classes)
        start = time.perf_counter()
        loss = None
        for images, targets in data.create_tuple_iterator(num_epochs=1):
            loss, _ = trainer.step(images, targets)
        float(loss.asnumpy())
        bare.append(time.perf_counter() - start)
    return {"loop": loop, "bare": bare, "steps": STEPS}


def unpack(ref: str, into: Path) -> Path:
    """The package of ``ref`` (``git archive``) under ``into``, to import the code as it was there."""
    archive = into.with_suffix(".tar")
    subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(archive), ref, "mindcv_poolformer"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into


def run_worker(tree: Path, data_dir: Path, run_dir: Path, epochs: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), GLOG_v="3")
    code = (f"import json,sys; sys.path.insert(0, {str(tree)!r}); sys.path.insert(1, {str(REPO / 'bench')!r}); "
            f"import step_overhead as b; print('RESULT', json.dumps(b.worker({str(data_dir)!r}, {str(run_dir)!r}, "
            f"{epochs})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tree), env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"worker in {tree} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default="main", help="git ref of the loop before (default: main)")
    parser.add_argument("--after", default="HEAD", help="git ref of the loop after (default: HEAD)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs per process (after a warm-up one)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "step-overhead.md"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.before], capture_output=True,
                         text=True, check=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.after], capture_output=True,
                          text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data_dir = make_folder(tmp_path / "data")
        trees = {"before": unpack(args.before, tmp_path / "before"), "after": unpack(args.after, tmp_path / "after")}
        cells: dict[str, list[dict]] = {"before": [], "after": []}
        order = ["before", "after"]
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                cells[name].append(run_worker(trees[name], data_dir, tmp_path / f"run-{name}-{r}", args.epochs))
                print(f"round {r + 1} {name}: done", flush=True)
    rows = []
    for name in order:
        loop = statistics.median(statistics.median(c["loop"]) for c in cells[name]) / STEPS * 1e3
        bare = statistics.median(statistics.median(c["bare"]) for c in cells[name]) / STEPS * 1e3
        rows.append((name, loop, bare, loop - bare, 1e3 / loop))
    load = os.getloadavg()
    lines = [f"# Training-loop host overhead per step ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
             f"`python bench/step_overhead.py --before {args.before} --after {args.after} --rounds {args.rounds} "
             f"--epochs {args.epochs}`: "
             f"before = `{args.before}` ({rev}), after = `{args.after}` ({head}). "
             f"PoolFormer-S12 32x32, batch {BATCH}, drop path 0.1, {STEPS} steps an epoch, CPU GRAPH_MODE, "
             f"log_interval 50; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} "
             "cores.", "",
             "| loop | trainer loop ms/step | bare step ms/step | host overhead ms/step | steps/s |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} | {loop:.2f} | {bare:.2f} | {over:.2f} | {sps:.1f} |" for n, loop, bare, over, sps in rows]
    lines += ["", "Host overhead = trainer loop - bare loop (iterator + compiled step, one sync at the end), "
              "the same batches.", "", f"After / before, host overhead: {rows[1][3] / rows[0][3]:.2f}x; steps/s: "
              f"{rows[1][4] / rows[0][4]:.2f}x.", "",
              "Raw seconds per epoch (loop, bare), per process:", ""]
    for name in order:
        for c in cells[name]:
            lines.append(f"- {name}: loop {', '.join(f'{v:.3f}' for v in c['loop'])}; "
                         f"bare {', '.join(f'{v:.3f}' for v in c['bare'])}")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
