"""Kernels of the S12 training step as an Ascend backend receives it, and what the drop-path masks add.

Why: the step loop draws the drop-path masks in the graph from a counter hash (models/layers.py
``counter_uniform``) instead of feeding host noise every step. Those are small int32 kernels; on
an NPU each costs a launch. The NPU is not here, so this counts them: the training step of the
Ascend S12 recipe, built as tests/test_ascend_audit.py builds it under a simulated 910B (or 910A)
and read from the frontend's final ``validate`` IR (``tools/graph_primitives.py``), compiled with
the recipe's drop path (0.1) and with drop path 0; the difference is what the masks cost in kernels.
Counts are of the frontend graph: backend fusion (O1's DVM, GE under O2) may merge some of them.

Second, what one small kernel costs MindSpore's runtime on this host: a compiled graph of 60 chained
``hash32`` (660 int32 kernels on 128 words) against one ``hash32`` (11), CPU backend, the per-call
difference over the 649 kernels (best of 3 x 300 calls; wall and process CPU time). On the CPU the
kernel's own work on 128 words is negligible, so this is the runtime's per-kernel host cost; an
Ascend launch adds aclnn's own host work to it, which this cannot measure.

    OMP_NUM_THREADS=1 .venv/bin/python bench/step_kernels.py [--chip 910B] [--amp O2]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("GLOG_v", "3")


def count(chip: str, amp: str, drop_path: float) -> dict[str, int]:
    import mindspore as ms
    from ascend_sim import simulate_ascend
    from test_ascend_audit import _build_train_step, _load_tool

    ms.set_context(mode=ms.GRAPH_MODE)
    with simulate_ascend(chip, device_target=True):
        step, inputs = _build_train_step(amp, drop_path_rate=drop_path)
        return _load_tool("graph_primitives").graph_primitives(step, *inputs).primitives


def host_cost_per_kernel() -> dict[str, float]:
    """ms per call of the 11- and 660-kernel graphs and us per kernel (wall, CPU), CPU backend."""
    import resource
    import time

    import mindspore as ms
    import numpy as np

    from mindcv_poolformer.models.layers import hash32

    class Chain(ms.nn.Cell):
        def __init__(self, links: int) -> None:
            super().__init__()
            self.links = links

        def construct(self, x):
            for _ in range(self.links):
                x = hash32(x)
            return x

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    ms.set_context(mode=ms.GRAPH_MODE)
    x = ms.Tensor(np.arange(128, dtype=np.int32))
    per_call = {}
    for links in (1, 60):
        chain = Chain(links)
        chain(x).asnumpy()
        rounds = []
        for _ in range(3):
            start, cpu0 = time.perf_counter(), cpu()
            for _ in range(300):
                out = chain(x)
            out.asnumpy()
            rounds.append(((time.perf_counter() - start) / 300 * 1e3, (cpu() - cpu0) / 300 * 1e3))
        per_call[links] = min(rounds)
    kernels = 11 * 59
    return {"call_ms_11": per_call[1][0], "call_cpu_ms_11": per_call[1][1], "call_ms_660": per_call[60][0],
            "us_per_kernel": (per_call[60][0] - per_call[1][0]) / kernels * 1e3,
            "cpu_us_per_kernel": (per_call[60][1] - per_call[1][1]) / kernels * 1e3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chip", default="910B", choices=("910A", "910B"))
    parser.add_argument("--amp", default="O2", choices=("O0", "O2"))
    args = parser.parse_args(argv)
    on, off = count(args.chip, args.amp, 0.1), count(args.chip, args.amp, 0.0)
    names = sorted(set(on) | set(off))
    print(f"S12 TrainStep, simulated {args.chip}, amp {args.amp}: {sum(on.values())} kernels with drop path 0.1, "
          f"{sum(off.values())} without; added: {sum(on.values()) - sum(off.values())}")
    print("| primitive | drop path 0.1 | drop path 0 | added |\n|---|---:|---:|---:|")
    for name in names:
        a, b = on.get(name, 0), off.get(name, 0)
        if a != b:
            print(f"| {name} | {a} | {b} | {a - b} |")
    host = host_cost_per_kernel()
    print(f"\nHost cost, CPU backend: a call of the 11-kernel graph {host['call_ms_11']:.3f} ms wall "
          f"({host['call_cpu_ms_11']:.3f} ms CPU), of the 660-kernel one {host['call_ms_660']:.2f} ms; per kernel "
          f"{host['us_per_kernel']:.1f} us wall, {host['cpu_us_per_kernel']:.1f} us CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
