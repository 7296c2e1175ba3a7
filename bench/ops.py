"""Micro-benchmarks of PoolFormer's hot ops, alternatives side by side, in GRAPH mode.

    python bench/ops.py [--shape 32,64,56,56] [--iters 10]

Prints median ms per call for each formulation of GroupNorm(1), the token mixer and GELU, and
the max abs difference of each alternative from the current implementation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
from mindspore import nn, ops  # noqa: E402

import mindcv_poolformer  # noqa: E402,F401  (oneDNN ISA before the first conv)
from mindcv_poolformer.deploy.export import ErfFreeGELU  # noqa: E402
from mindcv_poolformer.models.layers import GroupNorm1, Pooling  # noqa: E402


class GNLayerNorm(nn.Cell):
    """GroupNorm(1) via the fused LayerNorm kernel over (C,H,W) and a per-channel affine."""

    def __init__(self, c, shape):
        super().__init__()
        self.ln = ops.LayerNorm(begin_norm_axis=1, begin_params_axis=1, epsilon=1e-5)
        self.ones = ms.Tensor(np.ones(shape[1:], np.float32))
        self.zeros = ms.Tensor(np.zeros(shape[1:], np.float32))
        self.gamma = ms.Parameter(ms.Tensor(np.ones(c, np.float32)))
        self.beta = ms.Parameter(ms.Tensor(np.zeros(c, np.float32)))

    def construct(self, x):
        y = self.ln(x, self.ones, self.zeros)[0]
        return y * self.gamma.reshape((1, -1, 1, 1)) + self.beta.reshape((1, -1, 1, 1))


class GNOnePass(nn.Cell):
    """GroupNorm(1) with E[x] and E[x^2] in one pass over the data."""

    def __init__(self, c):
        super().__init__()
        self.gamma = ms.Parameter(ms.Tensor(np.ones(c, np.float32)))
        self.beta = ms.Parameter(ms.Tensor(np.zeros(c, np.float32)))

    def construct(self, x):
        mean = x.mean(axis=(1, 2, 3), keep_dims=True)
        var = (x * x).mean(axis=(1, 2, 3), keep_dims=True) - mean * mean
        inv = ops.rsqrt(var + 1e-5)
        scale = inv * self.gamma.reshape((1, -1, 1, 1))
        return x * scale + (self.beta.reshape((1, -1, 1, 1)) - mean * scale)


class PoolSame(nn.Cell):
    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(3, 1, pad_mode="same")

    def construct(self, x):
        return self.pool(x) - x


class PoolPadFalse(nn.Cell):
    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(3, 1, pad_mode="pad", padding=1, count_include_pad=False)

    def construct(self, x):
        return self.pool(x) - x


class PoolRecipMap(nn.Cell):
    """Zero-padded 3x3 mean (count_include_pad=True) times a precomputed 9/count map."""

    def __init__(self, h, w):
        super().__init__()
        self.pool = nn.AvgPool2d(3, 1, pad_mode="pad", padding=1, count_include_pad=True)
        cnt = np.full((h, w), 9.0, np.float32)
        cnt[0, :] = cnt[-1, :] = 6
        cnt[:, 0] = cnt[:, -1] = 6
        cnt[0, 0] = cnt[0, -1] = cnt[-1, 0] = cnt[-1, -1] = 4
        self.scale = ms.Tensor((9.0 / cnt)[None, None])

    def construct(self, x):
        return self.pool(x) * self.scale - x


class ErfComposed(nn.Cell):
    def construct(self, x):
        return 0.5 * x * (1.0 + ops.erf(x * 0.7071067811865476))


def bench(cell, x, iters):
    cell.set_train(False)
    out = cell(x).asnumpy()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        cell(x).asnumpy()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="32,64,56,56")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    ms.set_context(mode=ms.GRAPH_MODE)
    x = ms.Tensor(np.random.RandomState(0).randn(*shape).astype(np.float32))
    c, h, w = shape[1:]
    groups = {
        "groupnorm": [("GroupNorm1 (ours)", GroupNorm1(c)), ("nn.GroupNorm(1)", nn.GroupNorm(1, c)),
                      ("LayerNorm kernel + affine", GNLayerNorm(c, shape)), ("one-pass E[x],E[x2]", GNOnePass(c))],
        "token mixer": [("Pooling (ours: pad+valid/count)", Pooling(3)), ("AvgPool same", PoolSame()),
                        ("AvgPool pad, count_include_pad=False", PoolPadFalse()),
                        ("AvgPool pad incl. x 9/count map", PoolRecipMap(h, w))],
        "gelu": [("GELU erf (ours)", nn.GELU(approximate=False)), ("GELU tanh", nn.GELU(approximate=True)),
                 ("x/2*(1+erf(x/sqrt2)) from ops", ErfComposed()), ("erf-free A&S 7.1.26 (ONNX form)", ErfFreeGELU())],
        "reference": [("relu", nn.ReLU())],
    }
    print(f"shape {shape}, GRAPH mode, median of {args.iters}")
    print("| op | formulation | ms | max abs diff vs first |")
    print("|---|---|---|---|")
    for group, cells in groups.items():
        base = None
        for name, cell in cells:
            try:
                ms_time, out = bench(cell, x, args.iters)
            except Exception as exc:  # an unsupported op on this backend is a result too
                print(f"| {group} | {name} | failed: {str(exc).splitlines()[0][:60]} | |")
                continue
            base = out if base is None else base
            print(f"| {group} | {name} | {ms_time:.1f} | {np.abs(out - base).max():.2e} |")


if __name__ == "__main__":
    main()
