"""export.py: MINDIR round trip (dynamic batch), ONNX checked in onnxruntime (bad input: test_failures_cli)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mindcv_poolformer.deploy.artifacts import load_network
from mindcv_poolformer.deploy.export import ErfFreeGELU, make_onnx_exportable
from mindcv_poolformer.evaluation.classification import create_eval_dataset, evaluate
from mindcv_poolformer.transforms import Preprocess

from conftest import require
from deploy_helpers import IMAGE_SIZE, MODEL, deploy_assets, run_cli  # noqa: F401  (fixture)


def _export(ckpt, out, file_format: str, *extra: str):
    return run_cli("export.py", "--model", MODEL, "--ckpt_path", str(ckpt), "--file_format", file_format,
                   "--file_name", str(out), "--image_resize", str(IMAGE_SIZE), *extra)


def test_mindir_round_trip_and_validation(deploy_assets, tmp_path):  # noqa: F811
    out = tmp_path / "s12"
    proc = _export(deploy_assets["ckpt"], out, "MINDIR", "--batch_size", "2", "--labels", str(deploy_assets["labels"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dynamic batch" in proc.stdout and "max |diff|" in proc.stdout
    meta = json.loads((tmp_path / "s12.mindir.json").read_text())
    assert meta["batch"] is None and meta["max_abs_diff"] <= 1e-4
    assert meta["labels"] == ["cat", "coffee", "space"] and meta["image_size"] == IMAGE_SIZE
    assert meta["crop_pct"] == 0.9 and meta["num_classes"] == 3

    # validate.py evaluates the MINDIR like the checkpoint (batch 4: the graph takes any batch size)
    report = tmp_path / "mindir.json"
    proc = run_cli("validate.py", "--data_dir", str(deploy_assets["data"]), "--ckpt_path", str(tmp_path / "s12.mindir"),
                   "--batch_size", "4", "--num_parallel_workers", "1", "--json", str(report))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(report.read_text())
    net, _ = load_network(MODEL, str(deploy_assets["ckpt"]))
    s12_eval = Preprocess(IMAGE_SIZE, 0.9, "bicubic", (0.485 * 255, 0.456 * 255, 0.406 * 255),
                          (0.229 * 255, 0.224 * 255, 0.225 * 255))
    dataset, _, _ = create_eval_dataset(str(deploy_assets["data"]), "val", 4, s12_eval, num_parallel_workers=1)
    direct = evaluate(net, dataset)
    assert record["num_samples"] == direct.num_samples == 13
    assert record["top1"] == direct.top1 and record["loss"] == pytest.approx(direct.loss, abs=1e-4)

    again = _export(deploy_assets["ckpt"], out, "MINDIR")
    assert again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr


def test_onnx_matches_onnxruntime(deploy_assets, tmp_path):  # noqa: F811
    ort = require("onnxruntime")
    onnx = require("onnx")
    import mindspore as ms

    out = tmp_path / "s12.onnx"
    proc = _export(deploy_assets["ckpt"], out, "ONNX", "--batch_size", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    print(proc.stdout.strip())
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert "Erf" not in ops and "AveragePool" in ops

    net, _ = load_network(MODEL, str(deploy_assets["ckpt"]))
    x = np.random.default_rng(7).standard_normal((2, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    reference = net(ms.Tensor(x)).asnumpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    diff = float(np.abs(got - reference).max())
    print(f"onnxruntime vs MindSpore (exact-erf network): max |diff| {diff:.2e}, max |logit| "
          f"{np.abs(reference).max():.1f}")
    assert diff <= 1e-4
    assert json.loads((tmp_path / "s12.onnx.json").read_text())["batch"] == 2


def test_erf_free_gelu_is_exact_gelu():
    import mindspore as ms

    z = np.concatenate([np.linspace(-10, 10, 20001), [0.0, -0.0, 1e-8, -1e-8, 40.0, -40.0]]).astype(np.float32)
    got = ErfFreeGELU()(ms.Tensor(z)).asnumpy().astype(np.float64)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in z.astype(np.float64)])
    assert np.abs(got - exact).max() < 1e-6  # A&S 7.1.26 (1.5e-7 on erf) plus float32 rounding


def test_onnx_graph_keeps_parameter_names(deploy_assets):  # noqa: F811
    net, _ = load_network(MODEL, str(deploy_assets["ckpt"]))
    before = {name: param.asnumpy() for name, param in net.parameters_and_names()}
    make_onnx_exportable(net)
    after = {name: param.asnumpy() for name, param in net.parameters_and_names()}
    assert list(before) == list(after)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert all(param.name == name for name, param in net.parameters_and_names())


def test_load_network_reads_official_layout(deploy_assets, tmp_path):  # noqa: F811
    """A sail-sg/timm-style .pth.tar (GroupNorm weight/bias) loads to the same network as our safetensors."""
    torch = require("torch")
    from mindcv_poolformer.checkpoint import CheckpointError, read_state_dict

    ours = read_state_dict(deploy_assets["ckpt"])
    official = {k.replace(".gamma", ".weight").replace(".beta", ".bias"): torch.from_numpy(np.array(v))
                for k, v in ours.items()}
    torch.save(official, tmp_path / "s12.pth.tar")
    a, _ = load_network(MODEL, str(deploy_assets["ckpt"]))
    b, classes = load_network(MODEL, str(tmp_path / "s12.pth.tar"))
    assert classes == 3
    for (name, pa), (_, pb) in zip(a.parameters_and_names(), b.parameters_and_names()):
        assert np.array_equal(pa.asnumpy(), pb.asnumpy()), name
    with pytest.raises(CheckpointError, match="has a 3-class head but num_classes is 5"):
        load_network(MODEL, str(deploy_assets["ckpt"]), num_classes=5)

