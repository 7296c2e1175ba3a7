"""Device backends beside a device-neutral model: the layering, and what applying one keeps and changes."""

from __future__ import annotations

import ast
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from mindcv_poolformer import backends, create_model, models
from mindcv_poolformer.backends import ascend as ascend_backend
from mindcv_poolformer.backends import cpu as cpu_backend
from mindcv_poolformer.models.layers import AvgPoolExcludePad, Pooling

PACKAGE = Path(__file__).resolve().parents[1] / "mindcv_poolformer"
DEVICE_SPECIFIC = ("backends", "kernels")


def _imported_modules(path: Path, root: Path = PACKAGE) -> list[str]:
    """Every module a file of the package at ``root`` imports, relative ones resolved (``..kernels`` -> ``kernels``)."""
    folder = path.relative_to(root).parent.parts
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                module = node.module or ""
            else:
                base = folder[: len(folder) - node.level + 1]
                module = ".".join(("mindcv_poolformer", *base, *(node.module.split(".") if node.module else [])))
            found += [module] + [f"{module}.{alias.name}" for alias in node.names]  # `from .. import backends`
    return found


def _device_specific(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "mindcv_poolformer" and len(parts) > 1 and parts[1] in DEVICE_SPECIFIC


def test_models_import_nothing_device_specific():
    offenders = {f"{path.name}: {module}" for path in (PACKAGE / "models").glob("*.py")
                 for module in _imported_modules(path) if _device_specific(module)}
    assert not offenders, f"models/ must not import a backend or the kernels: {sorted(offenders)}"


@pytest.mark.parametrize("line", ["from ..backends import cpu", "from ..kernels import cpu_kernels",
                                  "import mindcv_poolformer.backends.cpu", "from .. import backends",
                                  "from mindcv_poolformer.kernels import CpuKernels"])
def test_the_layering_check_sees_a_device_import(tmp_path, line):
    """The check above can fail: each form of importing a backend from models/ is recognised."""
    fake = tmp_path / "models" / "metaformer.py"
    fake.parent.mkdir()
    fake.write_text(line + "\n" + (PACKAGE / "models" / "metaformer.py").read_text())
    assert any(_device_specific(m) for m in _imported_modules(fake, tmp_path))


def _names_and_ids(net) -> list[tuple[str, int]]:
    return [(p.name, id(p)) for p in net.get_parameters()]


def test_cpu_backend_keeps_parameters_and_switches_back():
    net = models.create_model("poolformer_s12", num_classes=4)
    before = _names_and_ids(net)
    assert backends.applied_backend(net) == "none"
    assert backends.apply_backend(net, "cpu") == "cpu"
    assert backends.applied_backend(net) == "cpu"
    assert _names_and_ids(net) == before  # same Parameter objects under the same names: checkpoints unchanged
    pools = [c for _, c in net.cells_and_names() if isinstance(c, Pooling)]
    assert pools and all(isinstance(p.pool, cpu_backend.CpuAvgPoolExcludePad) for p in pools)
    assert backends.apply_backend(net, "none") == "none"
    assert backends.applied_backend(net) == "none"
    assert _names_and_ids(net) == before
    assert all(type(p.pool) is AvgPoolExcludePad for p in pools)
    assert not any(isinstance(c, cpu_backend.FusedPoolFormerBlock) for _, c in net.cells_and_names())


def test_auto_backend_follows_the_device_target():
    assert ms.get_context("device_target") == "CPU"
    assert backends.resolve_backend("auto") == "cpu"
    assert backends.applied_backend(create_model("poolformer_s12", num_classes=2)) == "cpu"
    assert backends.applied_backend(create_model("poolformer_s12", num_classes=2, backend="none")) == "none"
    with pytest.raises(ValueError, match="unknown backend 'tpu'; accepted: auto, cpu, ascend, none"):
        backends.resolve_backend("tpu")


def test_ascend_backend_uses_native_pooling_only_where_the_soc_has_it(monkeypatch):
    net = models.create_model("poolformer_s12", num_classes=2, depths=(1, 1, 1, 1))
    monkeypatch.setattr(ascend_backend, "native_pooling", lambda: False)  # 910A: the model's own form stays
    assert backends.apply_backend(net, "ascend") == "ascend"
    assert backends.applied_backend(net) == "none"
    monkeypatch.setattr(ascend_backend, "native_pooling", lambda: True)  # Atlas A2 (910B / 910_93)
    backends.apply_backend(net, "ascend")
    pools = [c.pool for _, c in net.cells_and_names() if isinstance(c, Pooling)]
    assert len(pools) == 4 and all(isinstance(p, ascend_backend.AscendAvgPoolExcludePad) for p in pools)
    assert all(p.padding == 1 and p.pool_size == 3 for p in pools)
    assert not any(isinstance(c, cpu_backend.FusedPoolFormerBlock) for _, c in net.cells_and_names())
    backends.apply_backend(net, "none")
    assert backends.applied_backend(net) == "none"


def test_backend_outputs_equal_the_model_as_written():
    rng = np.random.default_rng(0)
    net = models.create_model("poolformer_s12", num_classes=5, depths=(1, 1, 2, 1), layer_scale_init=0.3)
    for p in net.get_parameters():
        p.set_data(ms.Tensor((p.asnumpy() + rng.normal(0, 0.2, p.shape)).astype(np.float32)))
    x = ms.Tensor(rng.normal(0, 1, (2, 3, 64, 96)).astype(np.float32))
    net.set_train(False)
    plain = net(x).asnumpy()
    backends.apply_backend(net, "cpu")
    fused = net(x).asnumpy()
    assert np.abs(plain).max() > 0.1
    np.testing.assert_allclose(fused, plain, rtol=0, atol=2e-6 * np.abs(plain).max())


def _nearest_sources(size_in: int, size_out: int) -> np.ndarray:
    """PyTorch's ``nearest`` source index of each output index: ``floor(dst * in / out)``."""
    return np.floor(np.arange(size_out) * size_in / size_out).astype(int)


@pytest.mark.parametrize("fine_size", [(8, 12), (7, 12), (9, 11)])
def test_cpu_fpn_top_down_sums_equal_nearest_upsampling(fine_size):
    """The broadcast form of ``fine + nearest(coarse)`` equals numpy's upsample-and-add exactly at a 2x ratio and
    takes the upsample elsewhere; its gradients are the upsample's (the coarse map's: sums of 2x2 blocks)."""
    rng = np.random.default_rng(3)
    fine = rng.normal(0, 1, (2, 3, *fine_size)).astype(np.float32)
    coarse = rng.normal(0, 1, (2, 3, 4, 6)).astype(np.float32)
    upsample = models.fpn.Resize("nearest")
    got = cpu_backend.add_nearest_upsampled(ms.Tensor(fine), ms.Tensor(coarse), upsample).asnumpy()
    rows, cols = _nearest_sources(4, fine_size[0]), _nearest_sources(6, fine_size[1])
    np.testing.assert_array_equal(got, fine + coarse[:, :, rows][:, :, :, cols])
    weights = ms.Tensor(rng.normal(0, 1, (2, 3, *fine_size)).astype(np.float32))

    def weighted_sum(f, c):  # a def, not a lambda: GRAPH mode (left on by an earlier test) parses it from source
        return (cpu_backend.add_nearest_upsampled(f, c, upsample) * weights).sum()

    d_fine, d_coarse = ms.grad(weighted_sum, (0, 1))(ms.Tensor(fine), ms.Tensor(coarse))
    w = weights.asnumpy()
    expected = np.zeros_like(coarse)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            expected[:, :, r, c] += w[:, :, i, j]
    np.testing.assert_array_equal(d_fine.asnumpy(), w)
    np.testing.assert_allclose(d_coarse.asnumpy(), expected, rtol=1e-6, atol=1e-6)


def test_cpu_fpn_neck_equals_the_neck_as_written_compiled():
    """GRAPH mode, a 64x96 input's feature sizes (every ratio 2): the CpuFPN neck's outputs equal mmseg's form."""
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(4)
    necks = [models.fpn.FPN((8, 16, 24, 32), 16) for _ in range(2)]
    for a, b in zip(necks[0].get_parameters(), necks[1].get_parameters()):
        b.set_data(ms.Tensor(a.asnumpy()))
    assert cpu_backend.apply(necks[0], None) == 0 and type(necks[0]) is cpu_backend.CpuFPN
    assert backends.applied_backend(necks[0]) == "cpu"
    features = tuple(ms.Tensor(rng.normal(0, 1, (2, c, 16 >> i, 24 >> i)).astype(np.float32))
                     for i, c in enumerate((8, 16, 24, 32)))
    for got, expected in zip(necks[0](features), necks[1](features)):
        np.testing.assert_allclose(got.asnumpy(), expected.asnumpy(), rtol=1e-6, atol=1e-6)
    cpu_backend.remove(necks[0])
    assert type(necks[0]) is models.fpn.FPN and backends.applied_backend(necks[0]) == "none"
