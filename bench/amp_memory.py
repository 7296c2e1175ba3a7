"""Where AMP O2's memory goes on the CPU: peak RSS of one GRAPH-mode eval forward, one fresh process per row.

    python bench/amp_memory.py [--batches 8,32] [--suite net,bisect,ops] [--out FILE.md]

``net``: PoolFormer-S12 at O0 and O2, O2 with the CPU policy (``apply_amp``'s default here) and
with the Ascend policy (what O2 ran on the CPU before: every block float16), fused CPU kernels on
and off (``MINDCV_POOLFORMER_CPU_KERNELS``). ``bisect``: the Ascend policy with one more cell
class kept float32, to find the float16 cells that hold the memory. ``ops``: ten chained ops on
a 32x64x56x56 map, float16 against float32. Each row is its own process, and its peak is that
process's ``getrusage`` maximum resident set (interpreter, MindSpore and the graph included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BISECT = ("ConvMlp", "GELU", "Pooling", "Conv2d", "MetaFormerBlock")
OPS = ("mul_scalar", "add_same", "mul_channel", "erf")


def _child(spec: dict) -> dict:
    """Run one row in this process and return its numbers (called with ``--child JSON``)."""
    import resource
    import time

    sys.path.insert(0, str(ROOT))
    import mindspore as ms
    import numpy as np

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    if spec["kind"] == "ops":
        net, x = _ops_net(spec["op"], ms.float16 if spec["dtype"] == "fp16" else ms.float32)
    else:
        from mindspore import nn

        import mindcv_poolformer as mp
        from mindcv_poolformer.amp import apply_amp
        from mindcv_poolformer.models import layers, metaformer

        net = mp.create_model(spec["model"])
        net.set_train(False)
        net = apply_amp(net, spec["level"], device_target=spec["policy"])
        extra = tuple(getattr(layers, n, None) or getattr(metaformer, n, None) or getattr(nn, n)
                      for n in spec.get("float32", ()))
        for _, cell in net.cells_and_names():
            if extra and isinstance(cell, extra):
                cell.to_float(ms.float32)
        x = ms.Tensor(np.random.default_rng(0).standard_normal((spec["batch"], 3, 224, 224)).astype(np.float32))
    times = []
    for _ in range(2):
        start = time.perf_counter()
        net(x).asnumpy()
        times.append(time.perf_counter() - start)
    return {"peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "first_s": times[0],
            "second_s": times[1]}


def _ops_net(op: str, dtype):
    """Ten ``op``s in a row on a (32, 64, 56, 56) map of ``dtype``."""
    import mindspore as ms
    import numpy as np
    from mindspore import nn, ops

    class Chain(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.channel = ms.Tensor(np.random.default_rng(1).uniform(1, 2, (1, 64, 1, 1)), dtype)

        def construct(self, x):
            y = x
            for _ in range(10):
                if op == "mul_scalar":
                    y = y * 1.001
                elif op == "add_same":
                    y = y + x
                elif op == "mul_channel":
                    y = y * self.channel
                else:
                    y = ops.erf(y)
            return y

    return Chain(), ms.Tensor(np.random.default_rng(0).standard_normal((32, 64, 56, 56)), dtype)


def _run(spec: dict) -> dict:
    env = {**os.environ, "GLOG_v": "3"}
    if "kernels" in spec:
        env["MINDCV_POOLFORMER_CPU_KERNELS"] = "1" if spec["kernels"] else "0"
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=1800)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rows(suites: list[str], batches: list[int]) -> list[tuple[str, dict]]:
    rows = []
    if "net" in suites:
        for batch in batches:
            for kernels in (True, False):
                for level, policy in (("O0", "CPU"), ("O2", "CPU"), ("O2", "Ascend")):
                    label = f"S12 b{batch} {level}" + (f" {policy} policy" if level == "O2" else "")
                    label += "" if kernels else ", kernels off"
                    rows.append((label, {"kind": "net", "model": "poolformer_s12", "batch": batch, "level": level,
                                         "policy": policy, "kernels": kernels}))
    if "bisect" in suites:
        for name in BISECT:
            rows.append((f"S12 b8 O2 Ascend policy + {name} float32",
                         {"kind": "net", "model": "poolformer_s12", "batch": 8, "level": "O2", "policy": "Ascend",
                          "kernels": True, "float32": [name]}))
    if "ops" in suites:
        for op in OPS:
            for dtype in ("fp32", "fp16"):
                rows.append((f"10x {op} on 32x64x56x56 {dtype}", {"kind": "ops", "op": op, "dtype": dtype}))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--suite", default="net,bisect,ops")
    parser.add_argument("--out", default="")
    parser.add_argument("--child", default="")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    lines = ["| row | peak RSS (GB) | 1st call (s) | 2nd call (s) |", "|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for label, spec in _rows(args.suite.split(","), [int(b) for b in args.batches.split(",")]):
        r = _run(spec)
        line = (f"| {label} | {r['error']} | | |" if "error" in r else
                f"| {label} | {r['peak_gb']:.2f} | {r['first_s']:.2f} | {r['second_s']:.2f} |")
        lines.append(line)
        print(line, flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
