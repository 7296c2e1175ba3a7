"""Does the channel MLP want the AVX-512 matmul (default oneDNN ISA) or the AVX2 conv? Measured per op.

    python bench/isa.py [--rounds 3] [--iters 7]

The oneDNN ISA is process-wide, so each ISA runs in its own subprocess, interleaved (AVX2,
default, AVX2, ...). In each, the stage-1 and stage-3 MLP matmuls of PoolFormer-S12 at batch 32
are timed as a 1x1 conv on NCHW (what the model does), as a Dense on channels-last rows (what an
NHWC model would do) and as a weight-broadcast batched matmul on NCHW, together with the stage-1
downsampling 3x3/s2 conv, which under the default ISA falls to oneDNN's reference kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"stage1": (32, 64, 56, 56), "stage3": (32, 320, 14, 14)}


def worker(iters: int) -> dict[str, float]:
    """Median ms of each formulation under this process's ISA."""
    sys.path.insert(0, str(ROOT))
    import mindspore as ms
    import numpy as np
    from mindspore import nn, ops

    import mindcv_poolformer  # noqa: F401  (applies the package's ISA choice unless the env sets one)

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")

    class BatchedMatmul(nn.Cell):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.weight = ms.Parameter(ms.Tensor(np.random.randn(cout, cin).astype(np.float32) * 0.02))
            self.bias = ms.Parameter(ms.Tensor(np.zeros((cout, 1), np.float32)))

        def construct(self, x):
            n, c, h, w = x.shape
            return (ops.matmul(self.weight, x.reshape((n, c, h * w))) + self.bias).reshape((n, -1, h, w))

    cells = {}
    rs = np.random.RandomState(0)
    for stage, (n, c, h, w) in SHAPES.items():
        x = ms.Tensor(rs.randn(n, c, h, w).astype(np.float32))
        rows = ms.Tensor(rs.randn(n * h * w, c).astype(np.float32))
        cells[f"{stage} conv1x1 NCHW {c}->{4 * c}"] = (nn.Conv2d(c, 4 * c, 1, has_bias=True), x)
        cells[f"{stage} Dense NHWC {c}->{4 * c}"] = (nn.Dense(c, 4 * c), rows)
        cells[f"{stage} batched matmul NCHW {c}->{4 * c}"] = (BatchedMatmul(c, 4 * c), x)
    x = ms.Tensor(rs.randn(*SHAPES["stage1"]).astype(np.float32))
    cells["stage1->2 downsample conv3x3/s2 64->128"] = (
        nn.Conv2d(64, 128, 3, stride=2, pad_mode="pad", padding=1, has_bias=True), x)
    for cell, arg in cells.values():
        cell(arg).asnumpy()
    times: dict[str, list[float]] = {name: [] for name in cells}
    for _ in range(iters):
        for name, (cell, arg) in cells.items():
            start = time.perf_counter()
            cell(arg).asnumpy()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.iters)))
        return
    isas = {"AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "default (AVX-512)": {"MINDCV_POOLFORMER_KEEP_ISA": "1"}}
    results: dict[str, list[dict[str, float]]] = {isa: [] for isa in isas}
    loads = []
    for _ in range(args.rounds):
        for isa, extra in isas.items():
            env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
            env.update(extra, GLOG_v="3")
            loads.append(os.getloadavg()[0])
            proc = subprocess.run([sys.executable, __file__, "--worker", "--iters", str(args.iters)],
                                  capture_output=True, text=True, env=env)
            results[isa].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    names = list(results["AVX2"][0])
    print(f"median ms over {args.rounds} interleaved processes x {args.iters} calls; load average "
          f"{min(loads):.1f}-{max(loads):.1f}")
    print("| op | AVX2 | default (AVX-512) |")
    print("|---|---|---|")
    for name in names:
        cols = [statistics.median(r[name] for r in results[isa]) for isa in isas]
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in cols) + " |")


if __name__ == "__main__":
    main()
