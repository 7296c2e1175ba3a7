"""Mixed precision (``mindcv_poolformer.amp``): what O2 really computes in float32, and what it costs the CPU.

Under O2 every norm, softmax and the loss must compute in float32, in GRAPH and in PYNATIVE mode. The
tests look at the computation, not at flags: in PYNATIVE, forward hooks compare each norm's output with
a float64 reference computed from the input it received; in GRAPH, the compiled kernel graph (MindSpore's
IR dump) says which dtype enters each reduction (the norms' statistics) and each Softmax. The norms' inputs
sit at a large offset (1000 + N(0, 1)), where a float16 norm is off by 0.02-0.7 and a float32 one by ~1e-5.
Both O2 policies are checked: Ascend's (blocks in float16) and the CPU's (blocks in float32), and the
hybrid's attention softmax.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from mindcv_poolformer.amp import apply_amp
from mindcv_poolformer.models.layers import Attention, GroupNorm1, LayerNormChannel
from mindcv_poolformer.models.metaformer import MetaFormer
from mindcv_poolformer.train.loss import create_loss
from mindcv_poolformer.train.step import WithLoss

ROOT = Path(__file__).resolve().parents[1]
NORMS = ("gn1", "ln", "bn")
POLICIES = ("Ascend", "CPU")
REDUCTIONS = {"LayerNorm", "LayerNormV3", "LayerNormExt", "BatchNorm", "BatchNormExt", "ReduceMean", "MeanExt",
              "ReduceSum", "SumExt"}
OFFSET = 1000.0
MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}


def _tiny(norm: str = "gn1", mixers=("pooling",) * 4, features_only: bool = False) -> MetaFormer:
    """A one-block-per-stage MetaFormer whose first norms see 1000 + N(0, 1); BatchNorm stats to match."""
    ms.set_seed(0)
    net = MetaFormer((1, 1, 1, 1), (16, 16, 16, 16), num_classes=10, norm=norm, token_mixers=mixers,
                     mixer_kwargs=[{"head_dim": 8} if mixer == "attention" else {} for mixer in mixers],
                     features_only=features_only)
    rng = np.random.default_rng(0)
    proj = net.patch_embed.proj
    proj.weight.set_data(Tensor((rng.standard_normal(proj.weight.shape) / np.sqrt(3 * 49)).astype(np.float32)))
    proj.bias.set_data(Tensor(np.full(proj.bias.shape, OFFSET, np.float32)))
    for _, cell in net.cells_and_names():
        if isinstance(cell, nn.BatchNorm2d):  # a mean float16 cannot hold, a small variance: fp16 is off by ~0.5
            cell.moving_mean.set_data(Tensor(np.full(cell.moving_mean.shape, OFFSET + 0.1, np.float32)))
            cell.moving_variance.set_data(Tensor(np.full(cell.moving_variance.shape, 0.04, np.float32)))
    net.set_train(False)
    return net


def _images(batch: int = 2, size: int = 32) -> Tensor:
    return Tensor(np.random.default_rng(1).standard_normal((batch, 3, size, size)).astype(np.float32))


def _norm_reference(cell: nn.Cell, x: np.ndarray) -> np.ndarray:
    """What ``cell`` computes, in float64, from the input it was given."""
    x = x.astype(np.float64)
    gamma = cell.gamma.asnumpy().astype(np.float64).reshape(1, -1, 1, 1)
    beta = cell.beta.asnumpy().astype(np.float64).reshape(1, -1, 1, 1)
    if isinstance(cell, nn.BatchNorm2d):
        mean = cell.moving_mean.asnumpy().astype(np.float64).reshape(1, -1, 1, 1)
        var = cell.moving_variance.asnumpy().astype(np.float64).reshape(1, -1, 1, 1)
    else:
        axes = (1, 2, 3) if isinstance(cell, GroupNorm1) else (1,)
        mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + cell.eps) * gamma + beta


def _norm_cells(net: nn.Cell) -> dict[str, nn.Cell]:
    kinds = (GroupNorm1, LayerNormChannel, nn.BatchNorm2d)
    return {_path(name): cell for name, cell in net.cells_and_names() if isinstance(cell, kinds)}


def _path(name: str) -> str:
    """A cell's name without the ``_backbone`` levels that MindSpore's AMP wrappers add."""
    return ".".join(part for part in name.split(".") if part and part != "_backbone")


def _kernels(net: nn.Cell, x: Tensor, ir_dir: Path) -> list[dict]:
    """Every kernel of ``net``'s compiled GRAPH (MindSpore's IR dump): op, float dtypes in and out, scope.

    ``source`` is the dtype of the first input as the network computed it: where the CPU backend
    lacks a float16 kernel it inserts a cast to float32 in front, which does not make the input float32.
    """
    ms.set_context(mode=ms.GRAPH_MODE, save_graphs=1, save_graphs_path=str(ir_dir))
    try:
        out = net(x)
        for tensor in out if isinstance(out, tuple) else (out,):
            tensor.asnumpy()
    finally:
        ms.set_context(save_graphs=0)
    final = sorted(glob.glob(str(ir_dir / "**" / "*hwopt_common_final_graph*.ir"), recursive=True))
    assert final, f"MindSpore wrote no final kernel graph under {ir_dir}"
    kernels, current = [], None
    for line in Path(final[-1]).read_text().splitlines():
        node = re.match(r"\s+%(\w+)\([^)]*\) = (?:PrimFunc_)?(\w+)\((.*)", line)
        if node:
            arg = re.match(r"\s*%(\w+)", node.group(3))
            current = {"id": node.group(1), "op": node.group(2), "arg": arg.group(1) if arg else None,
                       "backend": "is_backend_cast: Bool(1)" in line, "in": [], "out": [], "scope": ""}
            kernels.append(current)
        elif current is None:
            continue
        elif not current["in"] and line.strip().startswith(": (<"):
            inputs, _, outputs = line.partition("->")
            current["in"] = re.findall(r"Tensor\[(Float\d+)\]", inputs)
            current["out"] = re.findall(r"Tensor\[(Float\d+)\]", outputs)
        elif "# Scope:" in line:
            current["scope"] = line.split("# Scope:", 1)[1].strip(" ()")
    nodes = {k["id"]: k for k in kernels}
    for kernel in kernels:
        source, feeder = kernel["in"][:1], nodes.get(kernel["arg"])
        while feeder is not None and feeder["op"] == "Cast" and feeder["backend"]:
            source, feeder = feeder["in"][:1], nodes.get(feeder["arg"])
        kernel["source"] = source
    return kernels


def _scope_path(scope: str) -> tuple[str, str]:
    """``Default/_backbone-MetaFormer/network-SequentialCell/0-.../norm1-GroupNorm1`` -> (``network.0...norm1``,
    ``GroupNorm1``): the cell path (as ``cells_and_names`` spells it) and the class of the innermost cell."""
    parts = [segment.rsplit("-", 1) for segment in scope.split("/")[1:] if "-" in segment]
    names = [name for name, _ in parts if name != "_backbone"]
    return ".".join(names), (parts[-1][1] if parts else "")


def _o2(net: nn.Cell, policy: str) -> nn.Cell:
    return apply_amp(net, "O2", device_target=policy)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("norm", NORMS)
def test_o2_norms_compute_in_float32_pynative(norm, policy):
    """Each norm's output equals the float64 norm of the very input it was handed (float16 is off by >= 0.02)."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    net = _tiny(norm)
    cells = _norm_cells(net)
    seen: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
    for path, cell in cells.items():
        cell.register_forward_hook(lambda c, args, out, path=path: seen.__setitem__(
            path, (args[0].asnumpy(), out.asnumpy(), str(out.dtype))))
    logits = _o2(net, policy)(_images())
    assert logits.dtype == ms.float32
    assert sorted(seen) == sorted(cells), f"norms never called as cells (their to_float cast bypassed): " \
                                         f"{sorted(set(cells) - set(seen))}"
    for path, (x, y, dtype) in seen.items():
        ref = _norm_reference(cells[path], x)
        err = np.abs(y.astype(np.float64) - ref) / (1.0 + np.abs(ref))
        assert dtype == "Float32" and err.max() < 1e-3, f"{path} ({norm}, {policy} O2) computed in {dtype}: " \
                                                        f"max relative error {err.max():.3g}"


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("norm", NORMS)
def test_o2_norms_compute_in_float32_graph(norm, policy, tmp_path):
    """In the compiled GRAPH every reduction kernel (the norms' statistics) reads float32.

    The backbone form (``features_only``: each stage through its own norm, no pooled head) has no
    reduction but the norms', so no kernel needs attributing: MindSpore files tensor-method
    reductions under the ``Default`` scope and can file a merged node under a norm's.
    """
    net = _tiny(norm, features_only=True)
    count = len(_norm_cells(net))
    reductions = [k for k in _kernels(_o2(net, policy), _images(), tmp_path) if k["op"] in REDUCTIONS]
    assert len(reductions) >= count, f"{len(reductions)} reductions for {count} norm cells: {reductions}"
    wrong = [(k["op"], k["source"], k["scope"]) for k in reductions if k["source"] != ["Float32"]]
    assert not wrong, f"{norm} norm statistics under {policy} O2 read float16: {wrong}"


def _float32_softmax_rows(net: nn.Cell) -> dict[int, list[float]]:
    """Hooks on the cells inside every Attention mixer: for each mixer, the row-sum errors of its float32 outputs
    that are attention probabilities (..., n, n) in [0, 1]. A float16 softmax's rows miss 1 by ~1e-4."""
    rows: dict[int, list[float]] = {}
    for index, mixer in enumerate(c for _, c in net.cells_and_names() if isinstance(c, Attention)):
        rows[index] = []

        def keep(cell, args, out, index=index) -> None:
            if isinstance(out, Tensor) and out.ndim == 4 and out.shape[-1] == out.shape[-2] and out.dtype == ms.float32:
                p = out.asnumpy().astype(np.float64)
                if p.min() >= 0 and p.max() <= 1:
                    rows[index].append(float(np.abs(p.sum(-1) - 1).max()))

        for _, cell in mixer.cells_and_names():
            if cell is not mixer:
                cell.register_forward_hook(keep)
    return rows


_HYBRID = ("attention", "pooling", "attention", "attention")


def test_o2_attention_softmax_in_float32_pynative():
    """Each attention mixer of the hybrid produces its probabilities in float32: rows sum to 1 within 1e-5."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    net = _tiny("ln", _HYBRID)
    rows = _float32_softmax_rows(net)
    _o2(net, "Ascend")(_images(size=64))
    assert len(rows) == 3 and all(errors and min(errors) < 1e-5 for errors in rows.values()), rows


def test_o2_attention_softmax_in_float32_graph(tmp_path):
    """Every Softmax kernel of the compiled hybrid reads float32."""
    net = _tiny("ln", _HYBRID)
    softmax = [k for k in _kernels(_o2(net, "Ascend"), _images(size=64), tmp_path) if k["op"] == "Softmax"]
    assert len(softmax) == 3 and all(k["source"] == ["Float32"] for k in softmax), softmax


class _SoftmaxMixer(nn.Cell):
    """Attention's core with its softmax as a cell: the form the O2 policy keeps in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.qk = nn.Dense(16, 16)
        self.softmax = nn.Softmax(axis=-1)

    def construct(self, x: Tensor) -> Tensor:
        scores = ops.matmul(self.qk(x), x.transpose(0, 2, 1))
        return ops.matmul(self.softmax(scores), x)


@pytest.mark.parametrize("mode", MODES)
def test_o2_softmax_cells_compute_in_float32_and_hand_float16_on(mode, tmp_path):
    """A softmax cell runs in float32 (rows sum to 1 within 1e-5) and the matmul after it stays float16."""
    ms.set_context(mode=MODES[mode])
    cell = _SoftmaxMixer()
    x = Tensor(np.random.default_rng(2).standard_normal((2, 64, 16)).astype(np.float32))
    net = _o2(cell, "Ascend")
    if mode == "pynative":
        found = []
        cell.softmax.cell.register_forward_hook(lambda c, args, out: found.append(out))
        net(x)
        (probabilities,) = found
        assert probabilities.dtype == ms.float32
        assert np.abs(probabilities.asnumpy().astype(np.float64).sum(-1) - 1).max() < 1e-5
        return
    kernels = _kernels(net, x, tmp_path)
    (softmax,) = [k for k in kernels if k["op"] == "Softmax"]
    assert softmax["source"] == ["Float32"] and softmax["out"] == ["Float32"]
    after = [k for k in kernels if k["op"] == "Cast" and _scope_path(k["scope"])[1] == "_Float16Output"]
    assert after and all(k["out"] == ["Float16"] for k in after)


@pytest.mark.parametrize("mode", MODES)
def test_o2_loss_computes_in_float32(mode):
    """The training loss of an O2 network equals the float64 cross entropy of its (float32) logits."""
    ms.set_context(mode=MODES[mode])
    net = _tiny("gn1")
    net.head.bias.set_data(Tensor(np.full(net.head.bias.shape, OFFSET, np.float32)))  # float16 logsumexp: off
    amp_net = _o2(net, "Ascend")
    x = _images()
    rng = np.random.default_rng(3)
    targets = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 2)] * 0.9 + 0.01
    loss = float(WithLoss(amp_net, create_loss("CE"))(x, Tensor(targets)).asnumpy())
    logits = amp_net(x).asnumpy().astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_prob = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    ref = float(-(targets * log_prob).sum(axis=1).mean())
    assert abs(loss - ref) < 1e-5 * max(1.0, abs(ref)), (loss, ref)


@pytest.mark.parametrize("policy", POLICIES)
def test_o2_convs_and_matmuls_float16_except_cpu_blocks(policy):
    """Ascend's O2 keeps every conv and dense float16; the CPU's keeps only the stem, downsampling and head."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    net = _tiny("gn1", ("pooling", "pooling", "attention", "attention"))
    dtypes: dict[str, str] = {}
    for name, cell in net.cells_and_names():
        if isinstance(cell, (nn.Conv2d, nn.Dense)):
            cell.register_forward_hook(lambda c, args, out, name=name: dtypes.__setitem__(name, str(out.dtype)))
    _o2(net, policy)(_images(size=64))
    assert len(dtypes) == sum(isinstance(c, (nn.Conv2d, nn.Dense)) for _, c in net.cells_and_names())
    for name, dtype in dtypes.items():
        in_block = name.startswith("network.") and name.split(".")[1] in ("0", "2", "4", "6")
        expected = "Float32" if policy == "CPU" and in_block else "Float16"
        assert dtype == expected, f"{name}: {dtype} under {policy} O2"


_PEAK_RSS_CHILD = """
import json, resource, sys
import numpy as np
import mindspore as ms
ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
import mindcv_poolformer as mp
from mindcv_poolformer.amp import apply_amp
level, batch = sys.argv[1], int(sys.argv[2])
net = mp.create_model("poolformer_s12")
net.set_train(False)
net = apply_amp(net, level)
x = ms.Tensor(np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32))
logits = net(x).asnumpy()
peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"peak_gb": peak_gb, "finite": bool(np.isfinite(logits).all())}))
"""


def _eval_peak_rss_gb(level: str, batch: int) -> float:
    """Peak resident memory of a fresh process that builds S12 at ``level`` and runs one GRAPH eval forward."""
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS_CHILD, level, str(batch)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "GLOG_v": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["finite"], f"{level} logits are not finite"
    return record["peak_gb"]


def test_o2_eval_memory_on_cpu_within_2x_of_o0():
    """S12 eval at batch 32 under O2 needs at most twice O0's memory (float16 blocks took 13.7 GB against 0.8)."""
    start = time.perf_counter()
    o0 = _eval_peak_rss_gb("O0", 32)
    o2 = _eval_peak_rss_gb("O2", 32)
    assert o2 <= 2.0 * o0, f"O2 peak {o2:.2f} GB vs O0 {o0:.2f} GB at batch 32 ({time.perf_counter() - start:.0f} s)"
