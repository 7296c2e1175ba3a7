"""PoolFormer speed on this machine: ours (MindSpore GRAPH/PYNATIVE) against PyTorch and onnxruntime.

    python bench/bench.py [--models s12,m36] [--batch 32] [--image-size 224] [--iters 5]

Every row runs in its own subprocess (so peak RSS is that configuration's alone and frameworks do
not share thread pools), all in one invocation on the same machine, with the same weights: a
randomised HF PoolFormer converted through our converter. Timings exclude warm-up; the figure is
the median of ``--iters`` timed iterations. With ``--rounds R`` every row is measured R times, the
rows interleaved round by round, and the round with the median img/s is reported: on a shared host
whose speed drifts over minutes, that compares the frameworks under the same conditions instead of
whichever happened to run during a slow spell; the last column is then the median over rounds of
the within-round ratio, which cancels drift between rounds. The table is printed and saved as
markdown and JSON under ``bench/results/`` (the JSON keeps every round).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The environment as the user gave it, before importing our package caps oneDNN at AVX2: the peers
# (PyTorch, onnxruntime) run in their own default configuration.
_USER_ENV = dict(os.environ)
sys.path.insert(0, str(ROOT))

# ours-graph-ops: the same model with the fused CPU kernels switched off (MindSpore's own ops only).
# Ours' rows run right before torch.compile's, the peer of the speed targets, so a round's ratio
# compares two runs a minute apart rather than ten.
ROWS = [
    ("ours-graph", "infer"), ("torch-compile", "infer"), ("ours-graph", "train"), ("torch-compile", "train"),
    ("torch-eager", "infer"), ("torch-eager", "train"), ("onnxruntime", "infer"),
    ("ours-pynative", "infer"), ("ours-graph-ops", "infer"), ("ours-graph-ops", "train"),
]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed(fn, iters: int, batch: int) -> dict:
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    fn()  # second warm-up: some backends finish compiling on the second call
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"img_per_s": batch / median, "first_call_s": first, "median_step_s": median}


def _hf_model(model: str):
    """HF PoolFormerForImageClassification with ``model``'s architecture (1000 classes)."""
    from transformers import PoolFormerConfig, PoolFormerForImageClassification

    from mindcv_poolformer.models.metaformer import POOLFORMER_VARIANTS

    v = POOLFORMER_VARIANTS[model]
    config = PoolFormerConfig(num_labels=1000, depths=list(v.depths), hidden_sizes=list(v.widths),
                              layer_scale_init_value=v.layer_scale_init)
    return PoolFormerForImageClassification(config)


def _weights(model: str, workdir: Path) -> Path:
    """One randomised HF PoolFormer, saved as HF safetensors; every framework loads these weights."""
    import torch
    from safetensors.torch import save_file

    path = workdir / f"{model}.hf.safetensors"
    if path.exists():
        return path
    torch.manual_seed(0)
    save_file({k: t.contiguous() for k, t in _hf_model(model).state_dict().items()}, str(path))
    return path


def _inputs(batch: int, size: int):
    import numpy as np

    rs = np.random.RandomState(0)
    return (rs.randn(batch, 3, size, size).astype(np.float32), rs.randint(0, 1000, size=batch).astype(np.int32))


def _ours(mode: str, task: str, model: str, weights: Path, batch: int, size: int, iters: int) -> dict:
    import mindspore as ms
    import numpy as np

    import mindcv_poolformer as mp

    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE, device_target="CPU")
    net = mp.create_model(model, checkpoint_path=str(weights))
    x_np, y_np = _inputs(batch, size)
    x = ms.Tensor(x_np)
    if task == "infer":
        net.set_train(False)
        return _timed(lambda: net(x).asnumpy(), iters, batch)
    from mindcv_poolformer.backends import backend_all_finite
    from mindcv_poolformer.config import load_config
    from mindcv_poolformer.train.loss import create_loss
    from mindcv_poolformer.train.optim import OptimizerSettings, create_optimizer
    from mindcv_poolformer.train.step import LossScaleState, TrainStep, WithLoss

    cfg = load_config(overrides={"model": model, "opt": "adamw", "lr": 1e-3, "weight_decay": 0.05})
    optimizer = create_optimizer(net, OptimizerSettings.from_config(cfg), 1e-3)
    step = TrainStep(WithLoss(net, create_loss("CE")), optimizer, LossScaleState(1.0, False),
                     all_finite=backend_all_finite())
    step.set_train(True)
    y_soft = ms.Tensor(np.eye(1000, dtype=np.float32)[y_np])
    return _timed(lambda: step(x, y_soft)[0].asnumpy(), iters, batch)


def _torch(mode: str, task: str, model: str, weights: Path, batch: int, size: int, iters: int) -> dict:
    import torch
    from safetensors.torch import load_file

    hf = _hf_model(model)
    hf.load_state_dict(load_file(str(weights)))
    x_np, y_np = _inputs(batch, size)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np).long()

    def forward(inp):
        return hf(inp).logits

    fn = torch.compile(forward) if mode == "compile" else forward
    if task == "infer":
        hf.eval()

        def infer():
            with torch.no_grad():
                fn(x)
        return _timed(infer, iters, batch)
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, weight_decay=0.05)

    def train():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(fn(x), y).backward()
        opt.step()
    return _timed(train, iters, batch)


def _onnxruntime(model: str, weights: Path, batch: int, size: int, iters: int, workdir: Path) -> dict:
    import onnxruntime as ort

    from mindcv_poolformer.deploy.export import export_model

    onnx_path = workdir / f"{model}_b{batch}_{size}.onnx"
    if not onnx_path.exists():
        export_model(model=model, ckpt_path=str(weights), file_format="ONNX", file_name=str(onnx_path),
                     batch_size=batch, image_size=size, overwrite=True)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x_np, _ = _inputs(batch, size)
    return _timed(lambda: session.run(None, {name: x_np}), iters, batch)


def worker(args: argparse.Namespace) -> None:
    """Measure one row and print its JSON on the last stdout line."""
    framework, task = args.row.split(":")
    workdir = Path(args.workdir)
    weights = _weights(args.model, workdir)
    if framework.startswith("ours-"):
        result = _ours(framework.split("-")[1], task, args.model, weights, args.batch, args.image_size, args.iters)
    elif framework.startswith("torch-"):
        result = _torch(framework[6:], task, args.model, weights, args.batch, args.image_size, args.iters)
    else:
        result = _onnxruntime(args.model, weights, args.batch, args.image_size, args.iters, workdir)
    result["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(result))


def _missing(framework: str) -> str | None:
    import importlib.util

    needs = {"torch": ["torch", "transformers", "safetensors"], "onnxruntime": ["onnxruntime", "onnx", "torch"]}
    key = "torch" if framework.startswith("torch") else "onnxruntime" if framework == "onnxruntime" else "ours"
    for module in needs.get(key, ["torch", "transformers", "safetensors"]):
        if importlib.util.find_spec(module) is None:
            return module
    return None


def _run_row(row: tuple[str, str], model: str, args: argparse.Namespace, workdir: Path) -> dict:
    framework, task = row
    missing = _missing(framework)
    if missing:
        return {"status": f"not installed ({missing})"}
    cmd = [sys.executable, __file__, "--worker", f"{framework}:{task}", "--model", model, "--batch", str(args.batch),
           "--image-size", str(args.image_size), "--iters", str(args.iters), "--workdir", str(workdir)]
    env = dict(os.environ if framework.startswith("ours") else _USER_ENV, GLOG_v="3")
    if framework.endswith("-ops"):
        env["MINDCV_POOLFORMER_CPU_KERNELS"] = "0"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {args.timeout}s"}
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"failed: {tail[:120]}"}
    return {"status": "ok", **json.loads(lines[-1])}


def _median_round(measured: list[dict]) -> dict:
    """The round with the median img/s (the lower middle one for an even count), with every round's img/s."""
    ok = sorted((r for r in measured if r["status"] == "ok"), key=lambda r: r["img_per_s"])
    if not ok:
        return measured[-1]
    return {**ok[(len(ok) - 1) // 2], "rounds_img_per_s": [r.get("img_per_s") for r in measured]}


def _paired_ratio(ours: dict, other: dict) -> str:
    """Median over rounds of ours / other within each round: drift between rounds cancels out."""
    pairs = [a / b for a, b in zip(ours.get("rounds_img_per_s", []), other.get("rounds_img_per_s", []))
             if a and b]
    return f"{statistics.median(pairs):.2f}x" if len(pairs) > 1 else "-"


def _table(results: list[dict], macs: dict[str, float]) -> str:
    head = ("| model | framework | task | img/s | first call (s) | peak RSS (MB) | achieved GFLOP/s | "
            "ours / this | ours / this, per round |")
    lines = [head, "|" + "---|" * 9]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['framework']} | {r['task']} | {r['status']} | | | | | |")
            continue
        ours = next((o for o in results if o["model"] == r["model"] and o["framework"] == "ours-graph"
                     and o["task"] == r["task"] and o["status"] == "ok"), None)
        ratio = f"{ours['img_per_s'] / r['img_per_s']:.2f}x" if ours else "-"
        paired = _paired_ratio(ours, r) if ours else "-"
        flops = 2 * macs[r["model"]] * r["img_per_s"] * (3 if r["task"] == "train" else 1) / 1e9
        lines.append(f"| {r['model']} | {r['framework']} | {r['task']} | {r['img_per_s']:.1f} | "
                     f"{r['first_call_s']:.1f} | {r['peak_rss_mb']:.0f} | {flops:.0f} | {ratio} | {paired} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="s12", help="comma-separated variants (s12,s24,s36,m36,m48)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=5, help="timed iterations (median reported; >= 5)")
    parser.add_argument("--rows", default="all", help="comma-separated framework:task rows, e.g. ours-graph:infer")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds per row (median round reported)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per row")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.row = args.worker
        worker(args)
        return
    if args.iters < 5:
        parser.error(f"--iters must be >= 5, got {args.iters}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    models = [m if m.startswith("poolformer_") else f"poolformer_{m}" for m in args.models.split(",")]
    rows = ROWS if args.rows == "all" else [tuple(r.split(":")) for r in args.rows.split(",")]
    unknown = [":".join(row) for row in rows if row not in ROWS]
    if unknown:
        parser.error(f"unknown --rows {','.join(unknown)}; accepted: all, or any of "
                     + ",".join(f"{f}:{t}" for f, t in ROWS))
    out = Path(args.out)
    workdir = out / "work"
    workdir.mkdir(parents=True, exist_ok=True)

    from mindcv_poolformer.models.metaformer import POOLFORMER_VARIANTS

    macs = {m: POOLFORMER_VARIANTS[m].macs * (args.image_size / 224) ** 2 for m in models}
    measured: dict[tuple[str, str, str], list[dict]] = {}
    for round_index in range(args.rounds):
        for model in models:
            for framework, task in rows:
                print(f"measuring {model} {framework} {task} (round {round_index + 1}/{args.rounds}) ...",
                      file=sys.stderr, flush=True)
                measured.setdefault((model, framework, task), []).append(
                    _run_row((framework, task), model, args, workdir))
    results = [{"model": model, "framework": framework, "task": task, **_median_round(rounds)}
               for (model, framework, task), rounds in measured.items()]
    table = _table(results, macs)
    header = (f"batch {args.batch}, {args.image_size}x{args.image_size}, fp32, {os.cpu_count()} cores "
              f"({platform.processor() or platform.machine()}), median of {args.iters}"
              + (f", median of {args.rounds} interleaved rounds" if args.rounds > 1 else "") + "; "
              f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(package default: AVX2)')}; "
              "GFLOP/s = 2 x MACs x img/s (x3 for a training step)")
    print(header)
    print(table)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"bench-{stamp}.md").write_text(header + "\n\n" + table + "\n")
    (out / f"bench-{stamp}.json").write_text(json.dumps({"config": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
