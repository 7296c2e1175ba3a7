"""List the primitives of a Cell's compiled MindSpore graph, as the frontend hands it to the device backend.

Why the frontend: the graph after MindSpore's last frontend pass (``validate``) is what the
Ascend backend receives, and it is the same on this CPU as on an NPU; the passes after it (kernel
selection, device-specific rewrites) need the device. A graph built for a 910B simulation may
hold ops with no CPU kernel (e.g. ``AvgPool2D`` of ``mint.nn.functional.avg_pool2d``), so the
compile is allowed to fail after that pass and its IR file is read anyway.

How: the IR of only the ``validate`` pass is dumped (``MS_DEV_DUMP_IR_PASSES=validate``, compact
``MS_DEV_DUMP_IR_FORMAT=0``, the context parameters ``save_graphs``/``save_graphs_path`` set on
``MSContext`` directly: ``ms.set_context(save_graphs=...)`` is deprecated in 2.10 in favour of
the env variable ``MS_DEV_SAVE_GRAPHS``, which is read only at start-up), and every CNode whose
callee is a primitive is read from it. A primitive prints as ``Name``, ``PrimFunc_Name`` (ops
generated from MindSpore's op yaml) or ``S_Prim_Name`` (a primitive behind its signature).

    .venv/bin/python tools/graph_primitives.py poolformer_s12 --batch 2 --size 64
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FRONTEND_ONLY", "GraphPrimitives", "graph_primitives", "parse_ir_primitives"]

# Graph nodes that are not device kernels: the frontend or the runtime consumes them.
FRONTEND_ONLY = frozenset({
    # tuples and lists: the backend flattens them away
    "MakeTuple", "TupleGetItem", "MakeList", "ListGetItem", "RealMakeTuple", "RealTupleGetItem",
    # graph structure and calls
    "Return", "Partial", "Switch", "SwitchLayer", "J", "call",
    # side-effect ordering (auto-monad): order edges, not computation
    "Depend", "UpdateState", "Load",
    # value markers the optimizer leaves without computing anything
    "StopGradient", "ZerosLike_Meta", "EnvironCreate",
})

# "%12(CNode_5) = PrimFunc_Conv2D(" or "%3(out) = Conv2D(" (callee a subgraph "@f" or a value "%4" is skipped)
_CNODE = re.compile(r"^\s*%\d+\([^)]*\)\s*=\s*([A-Za-z_][\w:.-]*)\(")
_PREFIXES = ("PrimFunc_", "S_Prim_", "S-Prim-", "Prim::", "PrimitivePy::")
_VALIDATE_IR = re.compile(r"^\d+_validate_\d+\.ir$")


def _primitive_name(callee: str) -> str:
    for prefix in _PREFIXES:
        if callee.startswith(prefix):
            return callee[len(prefix):]
    return callee


def parse_ir_primitives(lines: Iterable[str]) -> dict[str, int]:
    """Primitive name -> number of CNodes calling it, over the lines of one IR file (meta nodes kept)."""
    counts: dict[str, int] = {}
    for line in lines:
        match = _CNODE.match(line)
        if match:
            name = _primitive_name(match.group(1))
            counts[name] = counts.get(name, 0) + 1
    return counts


@dataclass
class GraphPrimitives:
    """What one compile produced: the kernel primitives, the frontend-only ones stripped, and a later failure."""

    primitives: dict[str, int] = field(default_factory=dict)
    frontend_only: dict[str, int] = field(default_factory=dict)
    ir_files: list[str] = field(default_factory=list)
    backend_error: str | None = None

    @property
    def names(self) -> list[str]:
        return sorted(self.primitives)


class _DumpValidateIR:
    """Context manager: dump only the ``validate`` IR into ``path``; restores the previous settings."""

    _ENV = {"MS_DEV_DUMP_IR_PASSES": "validate", "MS_DEV_DUMP_IR_FORMAT": "0"}

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> _DumpValidateIR:
        from mindspore._c_expression import MSContext, ms_ctx_param

        self.ctx = MSContext.get_instance()
        self.saved_ctx = (self.ctx.get_param(ms_ctx_param.save_graphs),
                          self.ctx.get_param(ms_ctx_param.save_graphs_path))
        self.saved_env = {k: os.environ.get(k) for k in self._ENV}
        os.environ.update(self._ENV)
        self.ctx.set_param(ms_ctx_param.save_graphs, 1)
        self.ctx.set_param(ms_ctx_param.save_graphs_path, self.path)
        return self

    def __exit__(self, *_exc: object) -> None:
        from mindspore._c_expression import ms_ctx_param

        self.ctx.set_param(ms_ctx_param.save_graphs, self.saved_ctx[0])
        self.ctx.set_param(ms_ctx_param.save_graphs_path, self.saved_ctx[1])
        for key, value in self.saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _summary(error: Exception) -> str:
    """The first two meaningful lines of a MindSpore error (its banners are lines of dashes)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip().strip("-")]
    return f"{type(error).__name__}: {' '.join(lines[:2])}"[:240]


def graph_primitives(cell, *inputs, keep_dir: str | None = None) -> GraphPrimitives:
    """Compile ``cell`` (GRAPH_MODE) on ``inputs`` and list the primitives of its frontend graph.

    A failure after the ``validate`` pass (kernel selection on this CPU) is kept in
    ``backend_error``; one before it is raised. ``keep_dir`` keeps the IR files there.
    """
    import mindspore as ms

    if ms.get_context("mode") != ms.GRAPH_MODE:
        raise RuntimeError("graph_primitives needs GRAPH_MODE (ms.set_context(mode=ms.GRAPH_MODE))")
    with tempfile.TemporaryDirectory(prefix="ir_") as tmp:
        path = keep_dir or tmp
        Path(path).mkdir(parents=True, exist_ok=True)
        before = {p.name for p in Path(path).iterdir()}
        error: Exception | None = None
        with _DumpValidateIR(path):
            try:
                cell.compile(*inputs)
            except Exception as exc:  # MindSpore raises RuntimeError/TypeError/ValueError from its backend
                error = exc
        files = sorted(p for p in Path(path).iterdir() if _VALIDATE_IR.match(p.name) and p.name not in before)
        if not files:
            if error is not None:
                raise error
            raise RuntimeError(f"compiling {type(cell).__name__} wrote no validate IR into {path}")
        result = GraphPrimitives(ir_files=[str(p) for p in files])
        if error is not None:
            result.backend_error = _summary(error)
        for ir in files:
            with open(ir, encoding="utf-8", errors="replace") as f:
                for name, count in parse_ir_primitives(f).items():
                    bucket = result.frontend_only if name in FRONTEND_ONLY else result.primitives
                    bucket[name] = bucket.get(name, 0) + count
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the primitives of a registered model's eval graph.")
    parser.add_argument("model", nargs="?", default="poolformer_s12")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--backend", default="none", help="mindcv_poolformer backend to apply (cpu, ascend, none)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import mindspore as ms
    import numpy as np

    from mindcv_poolformer import create_model

    ms.set_context(mode=ms.GRAPH_MODE)
    net = create_model(args.model, num_classes=args.num_classes, backend=args.backend)
    net.set_train(False)
    x = ms.Tensor(np.zeros((args.batch, 3, args.size, args.size), np.float32))
    result = graph_primitives(net, x)
    for name in result.names:
        print(f"{name}\t{result.primitives[name]}")
    if result.backend_error:
        print(f"(backend after validate failed on this machine: {result.backend_error})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
