"""Peak memory of one Semantic FPN training step on the CPU: ours (GRAPH) against mmseg's model in PyTorch eager.

    nice -n 10 python bench/seg_memory.py [--rows ours:256:1,torch:256:1,...] [--model fpn_poolformer_s12]

A row is ``framework:size:batch`` with ``framework`` one of ``ours`` (the CPU backend, the fused
kernels), ``ours-none`` (backend ``none``: the model as written) or ``torch`` (mmseg 1.2.2's
``EncoderDecoder``, eager). Each row is its own process: it builds the model (fresh weights, 150
classes), runs one training step (train mode: forward, bilinear resize of the logits to the labels,
the trainer's ``SegmentationCrossEntropy`` or, for torch, ``F.cross_entropy(ignore_index=255)``,
backward, AdamW) and reports its peak resident set (``VmHWM``), the resident set before the step
(interpreter, framework, weights) and the step's wall and CPU time. Two sizes and two batches give
the per-image slope and the fixed part: ``peak = fixed + slope * batch * (size / 512) ** 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("ours", "ours-none", "torch")
IGNORE_INDEX = 255
LR, WEIGHT_DECAY = 2e-4, 1e-4  # mmseg's configs/poolformer/ AdamW


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _inputs(batch: int, size: int):
    """The speed bench's inputs (images, labels with a tenth ignored), so both benches measure the same step."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from segmentation_speed import _inputs as speed_inputs

    return speed_inputs(batch, size)


def _ours_step(model: str, backend: str, batch: int, size: int, memory_level: str | None):
    import mindspore as ms

    sys.path.insert(0, str(ROOT))
    import mindcv_poolformer as mp
    from mindcv_poolformer.backends import backend_all_finite
    from mindcv_poolformer.config import load_config
    from mindcv_poolformer.train.loss import SegmentationCrossEntropy
    from mindcv_poolformer.train.optim import OptimizerSettings, create_optimizer
    from mindcv_poolformer.train.step import LossScaleState, TrainStep, WithLoss

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    if memory_level:
        ms.runtime.set_memory(optimize_level=memory_level)
    net = mp.create_model(model, num_classes=150, backend=backend)
    cfg = OptimizerSettings.from_config(load_config(overrides={"model": model, "opt": "adamw", "lr": LR,
                                                                "weight_decay": WEIGHT_DECAY}))
    step = TrainStep(WithLoss(net, SegmentationCrossEntropy(IGNORE_INDEX)), create_optimizer(net, cfg, LR),
                     LossScaleState(1.0, False), all_finite=backend_all_finite(backend))
    step.set_train(True)
    x_np, y_np = _inputs(batch, size)
    x, y = ms.Tensor(x_np), ms.Tensor(y_np)
    return lambda: float(step(x, y)[0].asnumpy())


def _torch_step(model: str, batch: int, size: int):
    import importlib.util

    import torch
    import torch.nn.functional as F

    spec = importlib.util.spec_from_file_location("mmseg_reference", ROOT / "tests" / "mmseg_reference.py")
    reference_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference_module)
    reference = reference_module.mmseg_model(model.rsplit("_", 1)[1], seed=None).train()
    opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)
    x_np, y_np = _inputs(batch, size)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np).long()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        logits = reference.decode_head(reference.extract_feat(x))
        out = F.interpolate(logits, size=y.shape[1:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(out, y, ignore_index=IGNORE_INDEX)
        loss.backward()
        opt.step()
        return float(loss)
    return step


def child(spec: dict) -> dict:
    """One row in this process: build, one training step, the memory and time figures."""
    if spec["framework"] == "torch":
        step = _torch_step(spec["model"], spec["batch"], spec["size"])
    else:
        backend = "cpu" if spec["framework"] == "ours" else "none"
        step = _ours_step(spec["model"], backend, spec["batch"], spec["size"], spec.get("memory_level"))
    before = _status_mb("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    loss = step()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {**spec, "rss_before_mb": before, "peak_mb": _status_mb("VmHWM"), "loss": loss,
            "step_wall_s": wall, "step_cpu_s": cpu}


def _run(spec: dict, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, GLOG_v="3"), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "status": f"timed out after {timeout}s"}
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {**spec, "status": f"failed (rc {proc.returncode}): {tail[:160]}"}
    return {**json.loads(lines[-1]), "status": "ok", "process_wall_s": time.perf_counter() - start,
            "children_maxrss_mb": usage.ru_maxrss / 1024.0}


def fit(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """Least-squares ``peak = fixed + slope * images`` per framework, images counted at 512x512."""
    import numpy as np

    out = {}
    for framework in FRAMEWORKS:
        ok = [r for r in rows if r["framework"] == framework and r.get("status") == "ok"]
        if len({r["batch"] * (r["size"] / 512) ** 2 for r in ok}) < 2:
            continue
        n = np.array([r["batch"] * (r["size"] / 512) ** 2 for r in ok])
        peak = np.array([r["peak_mb"] for r in ok])
        slope, fixed = np.polyfit(n, peak, 1)
        out[framework] = (float(fixed), float(slope))
    return out


def table(rows: list[dict]) -> str:
    lines = ["| framework | memory level | size | batch | peak RSS (MB) | RSS before the step (MB) | step wall (s) | "
             "step CPU (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['framework']} | {r.get('memory_level') or '-'} | {r['size']} | {r['batch']} | "
                         f"{r['status']} | | | |")
            continue
        lines.append(f"| {r['framework']} | {r.get('memory_level') or '-'} | {r['size']} | {r['batch']} | "
                     f"{r['peak_mb']:.0f} | {r['rss_before_mb']:.0f} | {r['step_wall_s']:.1f} | "
                     f"{r['step_cpu_s']:.1f} |")
    fits = fit(rows)
    if fits:
        lines += ["", "| framework | fixed (MB) | per 512x512 image (MB) |", "|---|---|---|"]
        lines += [f"| {f} | {fixed:.0f} | {slope:.0f} |" for f, (fixed, slope) in fits.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fpn_poolformer_s12")
    parser.add_argument("--rows", default="ours:256:1,ours:256:2,ours:512:1,ours:512:2,"
                        "torch:256:1,torch:256:2,torch:512:1,torch:512:2",
                        help="comma-separated framework:size:batch")
    parser.add_argument("--memory-level", default=None, choices=("O0", "O1"),
                        help="ours: mindspore.runtime.set_memory(optimize_level=) (O1: SOMAS static planning)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per row")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    specs = []
    for row in args.rows.split(","):
        framework, size, batch = row.split(":")
        if framework not in FRAMEWORKS:
            parser.error(f"unknown framework {framework!r} in --rows; accepted: {', '.join(FRAMEWORKS)}")
        specs.append({"framework": framework, "size": int(size), "batch": int(batch), "model": args.model,
                      "memory_level": args.memory_level})
    rows = []
    for spec in specs:
        rows.append(_run(spec, args.timeout))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
