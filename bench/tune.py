"""A/B runs of process-wide MindSpore settings for PoolFormer on the CPU (threads, memory, JIT level, ISA).

    python bench/tune.py --task infer --ab "threads=25" "threads=2" --rounds 3
    python bench/tune.py --task train --ab "" "threads=2,mem=O1"

Process-wide settings (oneDNN ISA, kernel thread count, memory pool) cannot be switched inside one
process, so each configuration runs in its own subprocess; the configurations are interleaved
(A, B, A, B, ...) so that load from other processes on this shared 2-core machine hits every
configuration alike, and the median over rounds is reported with the load average seen.

A configuration is a comma-separated list of ``key=value``:
  threads=N      ``mindspore.device_context.cpu.op_tuning.threads_num(N)`` (MindSpore's default is 25)
  mem=O0|O1      ``mindspore.runtime.set_memory(optimize_level=...)``
  jit=O0|O1|O2   ``jit_config={"jit_level": ...}`` of the compiled cell
  isa=AVX2|default  oneDNN ISA (default = the CPU's own, i.e. AVX-512 here)
  batch=N        batch size
  omp=N          OMP_NUM_THREADS
  env.NAME=V     set environment variable NAME to V in the subprocess
  src=DIR        import mindcv_poolformer from DIR (e.g. ``git archive HEAD mindcv_poolformer | tar -x -C DIR``:
                 the code before a change, against the working tree)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(Path(__file__).resolve().parent))
from bench import _timed  # noqa: E402  (bench.py beside this file)

if os.environ.get("PYTHONPATH"):  # src=DIR: that copy of the package before this checkout's
    sys.path[:0] = [p for p in os.environ["PYTHONPATH"].split(os.pathsep) if p]


def parse(config: str) -> dict[str, str]:
    """``"threads=2,mem=O1"`` -> ``{"threads": "2", "mem": "O1"}``."""
    return dict(item.split("=", 1) for item in config.split(",") if item)


def environment(config: dict[str, str]) -> dict[str, str]:
    """The subprocess environment of one configuration (ISA and OpenMP must precede the import)."""
    env = dict(os.environ, GLOG_v="3")
    isa = config.get("isa")
    if isa == "default":
        env.pop("ONEDNN_MAX_CPU_ISA", None)
        env["MINDCV_POOLFORMER_KEEP_ISA"] = "1"
    elif isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    if "omp" in config:
        env["OMP_NUM_THREADS"] = config["omp"]
    env.update({key[4:]: value for key, value in config.items() if key.startswith("env.")})
    if "src" in config:
        env["PYTHONPATH"] = os.pathsep.join([config["src"], env.get("PYTHONPATH", "")])
    return env


def worker(config: dict[str, str], task: str, model: str, size: int, iters: int) -> dict:
    """Build the model under ``config``, time ``iters`` steps after two warm-ups, return the figures."""
    import mindspore as ms
    import numpy as np

    import mindcv_poolformer as mp

    print(f"package: {mp.__file__}", file=sys.stderr)
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    if "threads" in config:
        ms.device_context.cpu.op_tuning.threads_num(int(config["threads"]))
    if "mem" in config:
        ms.runtime.set_memory(optimize_level=config["mem"])
    batch = int(config.get("batch", 32))
    net = mp.create_model(model)
    rs = np.random.RandomState(0)
    x = ms.Tensor(rs.randn(batch, 3, size, size).astype(np.float32))
    if task == "infer":
        net.set_train(False)
        cell = net
        args = (x,)
    else:
        from mindcv_poolformer.config import load_config
        from mindcv_poolformer.train.loss import create_loss
        from mindcv_poolformer.train.optim import OptimizerSettings, create_optimizer
        from mindcv_poolformer.train.step import LossScaleState, TrainStep, WithLoss

        cfg = load_config(overrides={"model": model, "opt": "adamw", "lr": 1e-3, "weight_decay": 0.05})
        try:  # the training step as the trainer builds it: the backend's fused all-finite check where there is one
            from mindcv_poolformer.backends import backend_all_finite

            extra = {"all_finite": backend_all_finite()}
        except ImportError:  # src= a checkout from before the backends, where the step picked the check itself
            extra = {}
        optimizer = create_optimizer(net, OptimizerSettings.from_config(cfg), 1e-3)
        cell = TrainStep(WithLoss(net, create_loss("CE")), optimizer,
                         LossScaleState(1.0, False), **extra)
        cell.set_train(True)
        y = np.eye(1000, dtype=np.float32)[rs.randint(0, 1000, size=batch)]
        args = (x, ms.Tensor(y))
    if "jit" in config:
        cell.set_jit_config(ms.JitConfig(jit_level=config["jit"]))

    def run() -> None:
        out = cell(*args)
        (out[0] if isinstance(out, tuple) else out).asnumpy()

    timed = _timed(run, iters, batch)  # the same warm-up and median as bench.py's rows
    return {"img_per_s": timed["img_per_s"], "step_s": timed["median_step_s"], "first_s": timed["first_call_s"],
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("infer", "train"), default="infer")
    parser.add_argument("--model", default="poolformer_s12")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="subprocesses per configuration, interleaved")
    parser.add_argument("--ab", nargs="+", default=[""], help="configurations to compare")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(parse(args.worker), args.task, args.model, args.image_size, args.iters)))
        return
    runs: dict[str, list[dict]] = {c: [] for c in args.ab}
    for _ in range(args.rounds):
        for config in args.ab:
            cmd = [sys.executable, __file__, "--worker", config, "--task", args.task, "--model", args.model,
                   "--image-size", str(args.image_size), "--iters", str(args.iters)]
            load = os.getloadavg()[0]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=environment(parse(config)))
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode or not lines:
                print(f"[{config or 'baseline'}] failed: {proc.stderr.strip()[-400:]}", flush=True)
                continue
            result = {**json.loads(lines[-1]), "load": load}
            runs[config].append(result)
            print(f"[{config or 'baseline'}] {json.dumps(result)}", flush=True)
    print(f"\n{args.task}, {args.model}: median over {args.rounds} interleaved rounds")
    for config, results in runs.items():
        if results:
            med = {k: statistics.median(r[k] for r in results) for k in ("img_per_s", "first_s", "rss_mb", "load")}
            print(f"  {config or 'baseline':30s} {med['img_per_s']:6.2f} img/s  first {med['first_s']:5.1f} s  "
                  f"RSS {med['rss_mb']:6.0f} MB  (load avg {med['load']:.1f})")


if __name__ == "__main__":
    main()
