"""The Semantic FPN's 3x3 convs: ours (the kernels' GEMM, Winograd and direct) against MindSpore's oneDNN and PyTorch's.

    python bench/conv3x3.py [--rounds 2] [--iters 3]

Shapes are FPN-S12's at 512x512, batch 8: the neck's 256 -> 256 and the head's 256 -> 128 at stride 4
(128x128), the head's 128 -> 128 at stride 8 (64x64), 256 -> 128 at stride 16 (32x32) and at stride 32 (16x16).
Ours in two forms: Winograd F(4x4, 3x3) (the default, weight gradient included) and direct. Rows:
forward, and forward + backward (input and weight gradients of a weighted sum), float32, GRAPH mode for
MindSpore. Each framework runs in its own subprocess, interleaved over ``--rounds`` (ours, MindSpore,
torch, ours, ...), because the oneDNN ISA is process-wide: MindSpore's convs run under this package's
AVX2 cap (``mindcv_poolformer/_runtime.py``, applied as the workers import it), PyTorch's oneDNN under
the environment as the user gave it (by default AVX-512 where the CPU has it), as in ``bench/bench.py``.
Reported: the median over rounds of each row's best-of-``--iters`` time, and GFLOP/s (2 x MACs, x3 with
the backward). The table goes to stdout and ``bench/results/conv3x3-<stamp>.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (batch, in channels, height, width, out channels)
SHAPES = [(8, 256, 128, 128, 256), (8, 256, 128, 128, 128), (8, 128, 64, 64, 128), (8, 256, 32, 32, 128),
          (8, 256, 16, 16, 128)]
FRAMEWORKS = ("ours-winograd", "ours-direct", "mindspore-onednn", "torch")
OURS = {"ours-winograd": "conv3x3_winograd", "ours-direct": "conv3x3_direct"}


def _best(fn, iters: int) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _mindspore(framework: str, iters: int) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    import mindspore as ms
    import numpy as np
    from mindspore import nn, ops

    from mindcv_poolformer.kernels import cpu_kernels  # also applies the package's oneDNN ISA choice

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    kernels = cpu_kernels()
    if framework in OURS and (kernels is None or kernels.conv3x3 is None):
        raise SystemExit("the kernel library has no AVX-512 GEMM on this machine")

    class Conv(nn.Cell):
        def __init__(self, out_channels: int) -> None:
            super().__init__()
            self.op = (getattr(kernels, OURS[framework]) if framework in OURS
                       else ops.Conv2D(out_channels, 3, pad_mode="pad", pad=1))

        def construct(self, x, w):
            return self.op(x, w)

    class Weighted(nn.Cell):
        def __init__(self, conv: nn.Cell) -> None:
            super().__init__()
            self.conv = conv

        def construct(self, x, w, dy):
            return (self.conv(x, w) * dy).sum()

    class Backward(nn.Cell):
        def __init__(self, net: nn.Cell) -> None:
            super().__init__()
            self.net = net
            self.grad = ops.GradOperation(get_all=True)

        def construct(self, x, w, dy):
            return self.grad(self.net)(x, w, dy)

    rng = np.random.default_rng(0)
    out = {}
    for batch, channels, height, width, rows in SHAPES:
        x = ms.Tensor(rng.standard_normal((batch, channels, height, width), dtype=np.float32))
        w = ms.Tensor(rng.standard_normal((rows, channels, 3, 3), dtype=np.float32))
        dy = ms.Tensor(rng.standard_normal((batch, rows, height, width), dtype=np.float32))
        conv = Conv(rows)
        backward = Backward(Weighted(conv))
        key = "x".join(map(str, (batch, channels, height, width, rows)))
        out[f"{key}:forward"] = _best(functools.partial(_ms_forward, conv, x, w), iters)
        out[f"{key}:train"] = _best(functools.partial(_ms_train, backward, x, w, dy), iters)
    return out


def _ms_forward(conv, x, w) -> None:
    conv(x, w).asnumpy()


def _ms_train(backward, x, w, dy) -> None:
    for grad in backward(x, w, dy):
        grad.asnumpy()


def _torch_forward(x, w) -> None:
    import torch

    with torch.no_grad():
        torch.nn.functional.conv2d(x, w, padding=1)


def _torch_train(x, w, dy) -> None:
    import torch

    x.grad = w.grad = None
    (torch.nn.functional.conv2d(x, w, padding=1) * dy).sum().backward()


def _torch(iters: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    gen = torch.Generator().manual_seed(0)
    out = {}
    for batch, channels, height, width, rows in SHAPES:
        x = torch.randn(batch, channels, height, width, generator=gen, requires_grad=True)
        w = torch.randn(rows, channels, 3, 3, generator=gen, requires_grad=True)
        dy = torch.randn(batch, rows, height, width, generator=gen)
        key = "x".join(map(str, (batch, channels, height, width, rows)))
        out[f"{key}:forward"] = _best(functools.partial(_torch_forward, x, w), iters)
        out[f"{key}:train"] = _best(functools.partial(_torch_train, x, w, dy), iters)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3, help="timed calls per row (best reported)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("rounds", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.worker:
        result = _torch(args.iters) if args.worker == "torch" else _mindspore(args.worker, args.iters)
        print(json.dumps(result))
        return
    from segmentation_speed import _cpu_name, _load  # bench/: the same header facts as the FPN table

    times: dict[str, list[dict[str, float]]] = {name: [] for name in FRAMEWORKS}
    env = dict(os.environ, GLOG_v="3")  # this process never imports the package: the user's environment
    for _ in range(args.rounds):
        for name in FRAMEWORKS:
            proc = subprocess.run([sys.executable, __file__, "--worker", name, "--iters", str(args.iters)],
                                  capture_output=True, text=True, env=env, check=True)
            times[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    lines = [f"3x3 convs of FPN-S12 at 512x512 batch 8, float32, {len(os.sched_getaffinity(0))} cores "
             f"({_cpu_name()}), median over {args.rounds} interleaved rounds of the best of {args.iters} calls; "
             f"load average {_load()} at the end",
             "", "| shape (B, C, H, W, K) | pass | " + " | ".join(f"{n} ms (GFLOP/s)" for n in FRAMEWORKS)
             + " | Winograd / direct | Winograd / oneDNN | Winograd / torch |",
             "|---|---|" + "---|" * (len(FRAMEWORKS) + 3)]
    for shape in SHAPES:
        key = "x".join(map(str, shape))
        batch, channels, height, width, rows = shape
        for task, factor in (("forward", 1), ("train", 3)):
            flops = 2 * batch * height * width * channels * rows * 9 * factor
            med = {n: statistics.median(r[f"{key}:{task}"] for r in times[n]) for n in FRAMEWORKS}
            cells = [f"{med[n] * 1e3:.1f} ({flops / med[n] / 1e9:.0f})" for n in FRAMEWORKS]
            ratios = " | ".join(f"{med[n] / med['ours-winograd']:.2f}x" for n in FRAMEWORKS[1:])
            lines.append(f"| {shape} | {task} | " + " | ".join(cells) + f" | {ratios} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"conv3x3-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
