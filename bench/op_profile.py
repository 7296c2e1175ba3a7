"""Where the time of a PoolFormer forward / training step goes, per op, in GRAPH mode on the CPU.

    python bench/op_profile.py [--model poolformer_s12] [--batch 32] [--task infer|train] [--steps 2]
    python bench/op_profile.py --model fpn_poolformer_s12 --batch 2 --image-size 256 --task train

Runs MindSpore's Profiler around ``--steps`` warm steps and aggregates its per-kernel CPU times by
(cell class that issued the op, op type), e.g. ``GELU / Erf``, so formulations can be compared by
their real cost inside the network rather than in isolation. A Semantic FPN model (``fpn_*``) trains
on random labels with the trainer's segmentation loss (``SegmentationCrossEntropy``, 255 ignored).
Writes the table as markdown to ``bench/results/profile-<task>-<model>-b<batch>-<stamp>.md`` and
prints it.
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cell(full_op_name: str) -> str:
    """``Default/network-SequentialCell/0-MetaFormerBlock/mlp-ConvMlp/Erf-op11`` -> ``ConvMlp``."""
    scopes = full_op_name.split("/")[:-1]
    for scope in reversed(scopes):
        if "-" in scope:
            return scope.split("-")[-1]
    return "(top level)"


def _build(task: str, model: str, batch: int, size: int):
    """The compiled cell and its arguments: the network in eval mode, or our full training step."""
    import mindspore as ms
    import numpy as np

    import mindcv_poolformer as mp

    net = mp.create_model(model)
    rs = np.random.RandomState(0)
    x = ms.Tensor(rs.randn(batch, 3, size, size).astype(np.float32))
    if task == "infer":
        net.set_train(False)
        return net, (x,)
    from mindcv_poolformer.backends import backend_all_finite
    from mindcv_poolformer.config import load_config
    from mindcv_poolformer.train.loss import SegmentationCrossEntropy, create_loss
    from mindcv_poolformer.train.optim import OptimizerSettings, create_optimizer
    from mindcv_poolformer.train.step import LossScaleState, TrainStep, WithLoss

    segmentation = model.startswith("fpn_")
    cfg = OptimizerSettings.from_config(load_config(overrides={"model": model, "opt": "adamw", "lr": 1e-3,
                                                                "weight_decay": 0.05}))
    loss = SegmentationCrossEntropy(255) if segmentation else create_loss("CE")
    step = TrainStep(WithLoss(net, loss), create_optimizer(net, cfg, 1e-3), LossScaleState(1.0, False),
                     all_finite=backend_all_finite())
    step.set_train(True)
    if segmentation:
        y = rs.randint(0, 150, size=(batch, size, size)).astype(np.int32)
    else:
        y = np.eye(1000, dtype=np.float32)[rs.randint(0, 1000, size=batch)]
    return step, (x, ms.Tensor(y))


def profile(task: str, model: str, batch: int, size: int, steps: int) -> tuple[list[tuple], float]:
    """Per (cell, op type): calls per step, ms per step; and the wall time of one step."""
    import mindspore as ms
    from mindspore import Profiler

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    cell, args = _build(task, model, batch, size)

    def run() -> None:
        out = cell(*args)
        (out[0] if isinstance(out, tuple) else out).asnumpy()

    run()
    run()
    out_dir = tempfile.mkdtemp(prefix="poolformer-profile-")
    profiler = Profiler(output_path=out_dir)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    wall = (time.perf_counter() - start) / steps
    profiler.stop()
    profiler.analyse()
    detail = next(Path(out_dir).rglob("cpu_op_detail_info_0.csv"))
    total: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    with open(detail, newline="") as fh:
        for row in csv.DictReader(fh):
            key = (_cell(row["full_op_name"]), row["op_type"])
            total[key] += float(row["op_total_time(ms)"]) / steps
            calls[key] += int(row["op_occurrences"]) // steps
    return [(cell_name, op, calls[(cell_name, op)], ms_) for (cell_name, op), ms_ in total.most_common()], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="poolformer_s12")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--task", choices=("infer", "train"), default="infer")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    rows, wall = profile(args.task, args.model, args.batch, args.image_size, args.steps)
    kernels = sum(r[3] for r in rows)
    load = os.getloadavg()[0]
    lines = [f"{args.task}, {args.model}, batch {args.batch}, {args.image_size}x{args.image_size}, GRAPH mode, "
             f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')}; profiled step {wall * 1e3:.0f} ms wall "
             f"(kernels sum to {kernels:.0f} ms; the profiler adds overhead), load average {load:.1f}",
             "", "| cell | op | calls/step | ms/step | share |", "|---|---|---|---|---|"]
    for cell_name, op, n, ms_ in rows[: args.top]:
        lines.append(f"| {cell_name} | {op} | {n} | {ms_:.1f} | {100 * ms_ / kernels:.1f}% |")
    rest = sum(r[3] for r in rows[args.top:])
    if rest:
        lines.append(f"| (other {len(rows) - args.top}) | | | {rest:.1f} | {100 * rest / kernels:.1f}% |")
    by_op: collections.Counter = collections.Counter()
    for _, op, _, ms_ in rows:
        by_op[op] += ms_
    lines += ["", "| op type (all cells) | ms/step | share |", "|---|---|---|"]
    lines += [f"| {op} | {ms_:.1f} | {100 * ms_ / kernels:.1f}% |" for op, ms_ in by_op.most_common(12)]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"profile-{args.task}-{args.model}-b{args.batch}-{stamp}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
