"""Kernels of the S12 training step as an Ascend backend receives it, and what the drop-path masks add.

Why: the step loop draws the drop-path masks in the graph from a counter hash (models/layers.py
``counter_uniform``) instead of feeding host noise every step. Those are small int32 kernels; on
an NPU each costs a launch. The NPU is not here, so this counts them: the training step of the
Ascend S12 recipe, built as tests/test_ascend_audit.py builds it under a simulated 910B (or 910A)
and read from the frontend's final ``validate`` IR (``tools/graph_primitives.py``), compiled with
the recipe's drop path (0.1) and with drop path 0; the difference is what the masks cost in kernels.
Counts are of the frontend graph: backend fusion (O1's DVM, GE under O2) may merge some of them.

    .venv/bin/python bench/step_kernels.py [--chip 910B] [--amp O2]
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
