"""Every primitive of the compiled S12 graphs has an Ascend kernel in MindSpore 2.10, on 910A and on 910B.

The graphs are the ones this project hands to an Ascend backend, built on this CPU under
``simulate_ascend(chip, device_target=True)`` (so the SoC- and device-dependent Python branches
of MindSpore and of our backends are taken as on that chip): the eval graph of
``create_model("poolformer_s12", backend="ascend")``, and the training step built as
``train/trainer.py`` builds it (WithLoss + create_optimizer + TrainStep + LossScaleState, the
Ascend recipe's AdamW and dynamic loss scale) at amp O0 and O2. Their primitives are read from
the frontend's final ``validate`` IR (``tools/graph_primitives.py``) and looked up in
``mindcv_poolformer/backends/ascend_primitives.json`` (``tools/ascend_primitives.py``).

A primitive passes if a kernel source lists it, or if an Ascend backend pass rewrites it into
primitives that do (``rewrites``: AdamWeightDecay -> AdamApplyOneWithDecay[Assign]). No ``Custom``
primitive may appear. Limits: backend passes after ``validate`` and C++-level device choices of
the frontend are not simulated; dtype/format support of each kernel is not checked.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from ascend_sim import SOCS, simulate_ascend

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "mindcv_poolformer" / "backends" / "ascend_primitives.json"
CONFIG = REPO / "configs" / "poolformer" / "poolformer_s12_ascend.yaml"
BATCH, SIZE, CLASSES = 2, 64, 10
GRAPHS = ("eval", "train_O0", "train_O2")


def _load_tool(name: str):
    """A module of ``tools/`` (not a package) by path; registered in sys.modules for its dataclasses."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def load_table() -> dict:
    return json.loads(TABLE.read_text())


def missing_kernels(names: list[str], table: dict) -> list[str]:
    """The primitives with neither a kernel source nor a rewrite into kernel-backed primitives."""
    kernel_sources = set(table["kernel_sources"])
    listed = table["primitives"]

    def has_kernel(name: str) -> bool:
        return bool(kernel_sources & set(listed.get(name, ())))

    def handled(name: str) -> bool:
        rewrite = table["rewrites"].get(name)
        return has_kernel(name) or bool(rewrite and rewrite["into"] and all(map(has_kernel, rewrite["into"])))

    return [name for name in names if not handled(name)]


def without_ge_adapter(names: list[str], table: dict) -> list[str]:
    """The primitives the GE backend has no adapter for, not even after its unify-mindir rewrites (informational)."""
    def adapted(name: str) -> bool:
        return "ge_adapter" in table["primitives"].get(name, ())

    def rewritten(name: str) -> bool:
        rewrite = table["rewrites"].get(name)
        return bool(rewrite and "ge" in rewrite["backends"] and rewrite["into"] and all(map(adapted, rewrite["into"])))

    return [name for name in names if not adapted(name) and not rewritten(name)]


def _build_eval():
    from mindcv_poolformer import create_model

    net = create_model("poolformer_s12", num_classes=CLASSES, backend="ascend")
    net.set_train(False)
    return net, (ms.Tensor(np.zeros((BATCH, 3, SIZE, SIZE), np.float32)),)


def _build_train_step(amp_level: str, **overrides):
    """The training step of ``Trainer.__init__`` (same calls, same order) for the Ascend S12 recipe.

    ``overrides``: other recipe keys (bench/step_kernels.py compiles it without drop path too).
    """
    from mindcv_poolformer import create_model
    from mindcv_poolformer.amp import apply_amp
    from mindcv_poolformer.backends import backend_all_finite
    from mindcv_poolformer.config import load_config
    from mindcv_poolformer.models.layers import DropPathKey
    from mindcv_poolformer.train.loss import create_loss
    from mindcv_poolformer.train.optim import OptimizerSettings, create_optimizer
    from mindcv_poolformer.train.schedule import ScheduleSettings, build_lr_schedule
    from mindcv_poolformer.train.step import LossScaleState, TrainStep, WithLoss
    from mindcv_poolformer.train.trainer import validate_train_config

    cfg = load_config(CONFIG, {"amp_level": amp_level, "batch_size": BATCH, "num_classes": CLASSES,
                               "distribute": False, **overrides})
    plan = validate_train_config(cfg)
    net = create_model(cfg["model"], num_classes=CLASSES, in_channels=cfg["in_channels"], backend="ascend",
                       drop_path_rate=cfg["drop_path_rate"], drop_rate=cfg["drop_rate"])
    key = DropPathKey(net, int(cfg["seed"]), 0)
    optimizer = create_optimizer(net, OptimizerSettings.from_config(cfg),
                                 build_lr_schedule(ScheduleSettings.from_config(cfg), 1, BATCH))
    net = apply_amp(net, cfg["amp_level"])
    scaler = LossScaleState(plan.value, plan.dynamic)
    step = TrainStep(WithLoss(net, create_loss(cfg["loss"])), optimizer, scaler, None, 0.0,
                     int(cfg["gradient_accumulation_steps"]), None, float(cfg["ema_decay"]),
                     all_finite=backend_all_finite("ascend"), drop_path_key=key)
    step.set_train(True)
    images = ms.Tensor(np.zeros((BATCH, 3, SIZE, SIZE), np.float32))
    targets = ms.Tensor(np.full((BATCH, CLASSES), 1.0 / CLASSES, np.float32))
    return step, (images, targets)


class Graphs:
    """Compiles each (chip, graph) once, on first use; keeps its GraphPrimitives and compile seconds."""

    def __init__(self) -> None:
        self.tool = _load_tool("graph_primitives")
        self.results: dict = {}
        self.seconds: dict = {}

    def __call__(self, chip: str, graph: str):
        if (chip, graph) not in self.results:
            mode = ms.get_context("mode")
            ms.set_context(mode=ms.GRAPH_MODE)
            start = time.perf_counter()
            try:
                with simulate_ascend(chip, device_target=True):
                    cell, inputs = _build_eval() if graph == "eval" else _build_train_step(graph.split("_")[1])
                    self.results[chip, graph] = self.tool.graph_primitives(cell, *inputs)
            finally:
                ms.set_context(mode=mode)
            self.seconds[chip, graph] = time.perf_counter() - start
        return self.results[chip, graph]


@pytest.fixture(scope="module")
def compiled() -> Graphs:
    return Graphs()


def test_table_provenance():
    table = load_table()
    assert table["derived_by"] == "tools/ascend_primitives.py"
    assert table["mindspore_tag"].startswith("v2.10.") and table["commit"].startswith("2d550373")
    assert set(table["kernel_sources"]) < set(table["sources"])
    assert table["sources"]["aclnn_kernel"]["anchor_coverage"] >= 0.95
    assert len(table["primitives"]) > 1000


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("chip", sorted(SOCS))
def test_every_primitive_has_an_ascend_kernel(compiled, chip, graph):
    table = load_table()
    result = compiled(chip, graph)
    names = result.names
    print(f"\n{chip} {graph}: {len(names)} primitives, built and compiled in {compiled.seconds[chip, graph]:.1f} s "
          f"(after validate on this CPU: {result.backend_error or 'ok'})")
    for name in names:
        print(f"  {name:24s} x{result.primitives[name]:<4d} {', '.join(table['primitives'].get(name, ['-']))}")
    print(f"  without a GE adapter (910A's default jit_level O2 is the GE backend): "
          f"{', '.join(without_ge_adapter(names, table)) or '-'}")
    assert "Custom" not in names, f"a Custom op in the {chip} {graph} graph"
    assert not missing_kernels(names, table), f"{chip} {graph}: no Ascend kernel for {missing_kernels(names, table)}"


def test_the_check_catches_a_primitive_without_kernel(compiled):
    """Remove one listed primitive from the table: the same graph must then fail the check."""
    table = load_table()
    names = compiled("910B", "train_O0").names
    assert not missing_kernels(names, table)
    for victim in ("Conv2D", "AvgPool2D"):
        trimmed = {**table, "primitives": {k: v for k, v in table["primitives"].items() if k != victim}}
        assert missing_kernels(names, trimmed) == [victim]
    # a rewritten primitive fails when what it is rewritten into has no kernel
    assert table["rewrites"]["AdamWeightDecay"]["into"] == ["AdamApplyOneWithDecay", "AdamApplyOneWithDecayAssign"]
    trimmed = {**table, "primitives": {k: v for k, v in table["primitives"].items() if k != "AdamApplyOneWithDecay"}}
    assert missing_kernels(names, trimmed) == ["AdamWeightDecay"]


def test_the_simulated_chip_shapes_the_graphs(compiled):
    """The graphs differ where MindSpore and our backend branch on the chip (so no graph was reused)."""
    results = {(chip, graph): compiled(chip, graph) for chip in SOCS for graph in GRAPHS}
    for graph in GRAPHS:
        assert "AvgPool2D" in results["910B", graph].names  # aclnn pooling with count_include_pad=False
        assert "AvgPool2D" not in results["910A", graph].names
        assert "AvgPool" in results["910A", graph].names  # the model's own padded-sum form
    for graph in ("train_O0", "train_O2"):
        assert {"NPUGetFloatStatusV2", "NPUClearFloatStatusV2"} <= set(results["910A", graph].names)
        assert "AllFinite" in results["910B", graph].names
        assert "NPUGetFloatStatusV2" not in results["910B", graph].names
        for chip in SOCS:  # the drop-path masks' counter hash is in the audited graph, not drawn on the host
            assert {"BitwiseXor", "RightShift", "BitwiseAnd", "AssignAdd"} <= set(results[chip, graph].names)
    assert results["910B", "train_O2"].primitives["Cast"] > results["910B", "train_O0"].primitives.get("Cast", 0)
