"""Semantic FPN speed on this machine: ours (MindSpore GRAPH) against mmseg's own model in PyTorch.

    python bench/segmentation_speed.py [--model fpn_poolformer_s12] [--batch 8] [--size 512] [--rounds 2] [--iters 3]

Rows: inference (eval mode, stride-4 logits) and a training step (train mode: forward, bilinear resize
of the logits to the label size, mmseg's cross entropy with ignore_index 255 averaged over every
pixel (ours: the trainer's ``SegmentationCrossEntropy``), backward, AdamW update) for
ours in GRAPH mode on the CPU backend, and for mmseg 1.2.2's ``EncoderDecoder`` built from its own
ADE20K config (``tests/mmseg_reference.py``) in PyTorch eager and ``torch.compile`` (inductor).
Every framework runs the same weights: mmseg's randomised state dict, saved as an mmseg checkpoint
and read by our converter, as the parity tests do. As in ``bench/bench.py`` (whose timing and
round helpers are used here): every row is its own subprocess, the rows are interleaved over
``--rounds``, the round with the median img/s is reported, and the last column is the median over
rounds of the within-round ratio ours / that row. The table goes to stdout and to
``bench/results/segmentation-speed-<stamp>.md`` (with the load average before and after the run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import bench as classification_bench  # bench/bench.py: captures the user's environment before our package loads

ROOT = classification_bench.ROOT
_USER_ENV = classification_bench._USER_ENV

ROWS = [("ours-graph", "infer"), ("torch-compile", "infer"), ("ours-graph", "train"), ("torch-compile", "train"),
        ("torch-eager", "infer"), ("torch-eager", "train")]
IGNORE_INDEX = 255
# mmseg's configs/poolformer/ schedule: AdamW, lr 2e-4, weight decay 1e-4
LR, WEIGHT_DECAY = 2e-4, 1e-4


def _arch(model: str) -> str:
    return model.rsplit("_", 1)[1]


def _mmseg_reference():
    """``tests/mmseg_reference.py`` loaded by file, so that ``tests/`` (and its conftest) stays off ``sys.path``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mmseg_reference", ROOT / "tests" / "mmseg_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _weight_paths(workdir: Path, model: str) -> tuple[Path, Path]:
    return workdir / f"{model}.mmseg.pth", workdir / f"{model}.ours.safetensors"


def prepare(model: str, workdir: Path) -> None:
    """mmseg's model with randomised weights as an mmseg checkpoint, and that checkpoint through our converter."""
    import torch

    mmseg_path, ours_path = _weight_paths(workdir, model)
    if mmseg_path.exists() and ours_path.exists():
        return
    reference = _mmseg_reference().mmseg_model(_arch(model), seed=0)
    torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": reference.state_dict()}, str(mmseg_path))
    from mindcv_poolformer import convert_checkpoint

    convert_checkpoint(str(mmseg_path), str(ours_path))


def _inputs(batch: int, size: int):
    """Images and labels in 0..149, a tenth of the pixels ignored (255)."""
    import numpy as np

    rs = np.random.RandomState(0)
    images = rs.randn(batch, 3, size, size).astype(np.float32)
    labels = rs.randint(0, 150, size=(batch, size, size)).astype(np.int32)
    labels[rs.rand(batch, size, size) < 0.1] = IGNORE_INDEX
    return images, labels


def _segmentation_loss():
    """The trainer's loss (``SegmentationCrossEntropy``): mmseg's decode-head loss, resize + CE ignoring 255.

    Not ``ops.cross_entropy(ignore_index=255)``: besides dividing by the non-ignored pixels only (not
    mmseg's ``avg_non_ignore=False``), its masked-fill NLL keeps several more full-size float32 maps
    for backward; at 512x512 it took 2.6 GB per image against 0.62 GB,
    enough to make batch 8 not fit in 24 GB (bench/results/fpn-memory-20261202.md).
    """
    from mindcv_poolformer.train.loss import SegmentationCrossEntropy

    return SegmentationCrossEntropy(IGNORE_INDEX)


def _ours(task: str, model: str, workdir: Path, batch: int, size: int, iters: int) -> dict:
    import mindspore as ms

    import mindcv_poolformer as mp

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    net = mp.create_model(model, num_classes=150, checkpoint_path=str(_weight_paths(workdir, model)[1]))
    x_np, y_np = _inputs(batch, size)
    x = ms.Tensor(x_np)
    if task == "infer":
        net.set_train(False)
        return classification_bench._timed(lambda: net(x).asnumpy(), iters, batch)
    from mindcv_poolformer.backends import backend_all_finite
    from mindcv_poolformer.config import load_config
    from mindcv_poolformer.train.optim import OptimizerSettings, create_optimizer
    from mindcv_poolformer.train.step import LossScaleState, TrainStep, WithLoss

    cfg = OptimizerSettings.from_config(load_config(overrides={"model": model, "opt": "adamw", "lr": LR,
                                                                "weight_decay": WEIGHT_DECAY}))
    step = TrainStep(WithLoss(net, _segmentation_loss()), create_optimizer(net, cfg, LR), LossScaleState(1.0, False),
                     all_finite=backend_all_finite())
    step.set_train(True)
    y = ms.Tensor(y_np)
    return classification_bench._timed(lambda: step(x, y)[0].asnumpy(), iters, batch)


def _torch(mode: str, task: str, model: str, workdir: Path, batch: int, size: int, iters: int) -> dict:
    import torch
    import torch.nn.functional as F

    reference = _mmseg_reference().mmseg_model(_arch(model), seed=None)
    reference.load_state_dict(torch.load(str(_weight_paths(workdir, model)[0]), weights_only=False)["state_dict"])
    x_np, y_np = _inputs(batch, size)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np).long()

    def logits(inp):
        return reference.decode_head(reference.extract_feat(inp))

    if task == "infer":
        reference.eval()
        forward = torch.compile(logits) if mode == "compile" else logits

        def infer():
            with torch.no_grad():
                forward(x)
        return classification_bench._timed(infer, iters, batch)

    def loss(inp, labels):
        out = F.interpolate(logits(inp), size=labels.shape[1:], mode="bilinear", align_corners=False)
        # mmseg's CrossEntropyLoss(avg_non_ignore=False): per-pixel CE, then the mean over every pixel
        return F.cross_entropy(out, labels, ignore_index=IGNORE_INDEX, reduction="none").mean()

    reference.train()
    loss_fn = torch.compile(loss) if mode == "compile" else loss
    opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)

    def train():
        opt.zero_grad(set_to_none=True)
        loss_fn(x, y).backward()
        opt.step()
    return classification_bench._timed(train, iters, batch)


def worker(args: argparse.Namespace) -> None:
    """Measure one row (or prepare the weights) and print its JSON on the last stdout line."""
    workdir = Path(args.workdir)
    if args.worker == "prepare":
        prepare(args.model, workdir)
        print(json.dumps({"status": "ok"}))
        return
    framework, task = args.worker.split(":")
    if framework == "ours-graph":
        result = _ours(task, args.model, workdir, args.batch, args.size, args.iters)
    else:
        result = _torch(framework[6:], task, args.model, workdir, args.batch, args.size, args.iters)
    result["peak_rss_mb"] = classification_bench._peak_rss_mb()
    print(json.dumps(result))


def _run(what: str, args: argparse.Namespace, workdir: Path, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", what, "--model", args.model, "--batch", str(args.batch),
           "--size", str(args.size), "--iters", str(args.iters), "--workdir", str(workdir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, GLOG_v="3"), timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {args.timeout}s"}
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if proc.returncode < 0:  # e.g. SIGKILL from the kernel's OOM killer, which leaves no Python error
        return {"status": f"failed: killed by signal {-proc.returncode}"}
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"failed: {tail[:160]}"}
    return {"status": "ok", **json.loads(lines[-1])}


def _table(results: list[dict], macs: float) -> str:
    head = ("| framework | task | img/s | step (s) | first call (s) | peak RSS (MB) | achieved GFLOP/s | "
            "ours / this | ours / this, per round | img/s per round |")
    lines = [head, "|" + "---|" * 10]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['framework']} | {r['task']} | {r['status']} | | | | | | | |")
            continue
        ours = next((o for o in results if o["framework"] == "ours-graph" and o["task"] == r["task"]
                     and o["status"] == "ok"), None)
        ratio = f"{ours['img_per_s'] / r['img_per_s']:.2f}x" if ours else "-"
        paired = classification_bench._paired_ratio(ours, r) if ours else "-"
        flops = 2 * macs * r["img_per_s"] * (3 if r["task"] == "train" else 1) / 1e9
        rounds = ", ".join(f"{v:.2f}" if v else "-" for v in r.get("rounds_img_per_s", []))
        lines.append(f"| {r['framework']} | {r['task']} | {r['img_per_s']:.2f} | {r['median_step_s']:.2f} | "
                     f"{r['first_call_s']:.1f} | {r['peak_rss_mb']:.0f} | {flops:.0f} | {ratio} | {paired} | "
                     f"{rounds} |")
    return "\n".join(lines)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fpn_poolformer_s12", help="a Semantic FPN model (fpn_poolformer_*)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512, help="square input size (a multiple of 32)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per row (median reported)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per row (median round reported)")
    parser.add_argument("--rows", default="all", help="comma-separated framework:task rows, e.g. ours-graph:infer")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per row")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    for name in ("batch", "iters", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.size < 32 or args.size % 32:
        parser.error(f"--size must be a positive multiple of 32, got {args.size}")
    rows = ROWS if args.rows == "all" else [tuple(r.split(":")) for r in args.rows.split(",")]
    unknown = [":".join(row) for row in rows if row not in ROWS]
    if unknown:
        parser.error(f"unknown --rows {','.join(unknown)}; accepted: all, or any of "
                     + ",".join(f"{f}:{t}" for f, t in ROWS))
    from mindcv_poolformer.models.fpn import SEGMENTATION_VARIANTS

    if args.model not in SEGMENTATION_VARIANTS:
        parser.error(f"unknown --model {args.model}; accepted: {', '.join(SEGMENTATION_VARIANTS)}")
    out = Path(args.out)
    workdir = out / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = _load()
    prepared = _run("prepare", args, workdir, dict(os.environ))
    if prepared["status"] != "ok":
        sys.exit(f"error: preparing the weights {prepared['status']}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    measured: dict[tuple[str, str], list[dict]] = {}
    for round_index in range(args.rounds):
        for framework, task in rows:
            print(f"measuring {framework} {task} (round {round_index + 1}/{args.rounds}, load {_load()}) ...",
                  file=sys.stderr, flush=True)
            env = dict(os.environ) if framework.startswith("ours") else _USER_ENV
            measured.setdefault((framework, task), []).append(_run(f"{framework}:{task}", args, workdir, env))
            # rewritten after every row: a run stopped early (a busy host, a deadline) keeps what it measured
            rounds_done = round_index + int((framework, task) == rows[-1])
            table = _write(out, stamp, args, measured, load_before, rounds_done)
    print(table)


def _write(out: Path, stamp: str, args: argparse.Namespace, measured: dict, load_before: str,
           rounds_done: int) -> str:
    """The header and table of the rows measured so far, saved as markdown (and every round as JSON)."""
    from mindcv_poolformer.models.fpn import SEGMENTATION_VARIANTS

    results = [{"framework": framework, "task": task, **classification_bench._median_round(rounds)}
               for (framework, task), rounds in measured.items()]
    macs = SEGMENTATION_VARIANTS[args.model].macs * (args.size / 512) ** 2
    header = (f"{args.model}, batch {args.batch}, {args.size}x{args.size}, fp32, {os.cpu_count()} cores "
              f"({_cpu_name()}), median of {args.iters} timed steps, median round of {rounds_done} of "
              f"{args.rounds} interleaved rounds done; load average (1/5/15 min) {load_before} at the start, "
              f"{_load()} at the last row; ONEDNN_MAX_CPU_ISA for ours: "
              f"{os.environ.get('ONEDNN_MAX_CPU_ISA', '(package default)')}; "
              "GFLOP/s = 2 x MACs x img/s (x3 for a training step)")
    text = header + "\n\n" + _table(results, macs)
    (out / f"segmentation-speed-{stamp}.md").write_text(text + "\n")
    (out / f"segmentation-speed-{stamp}.json").write_text(
        json.dumps({"config": vars(args), "load_average": [load_before, _load()], "results": results}, indent=2))
    return text


if __name__ == "__main__":
    main()
