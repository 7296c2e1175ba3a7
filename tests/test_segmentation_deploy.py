"""Segmentation deployment: MINDIR with dynamic N/H/W (stride-4 logits), predict's class/overlay PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mindcv_poolformer.data.ade20k import SegPreprocess, ade20k_classes, ade20k_palette, overlay_classes
from mindcv_poolformer.deploy.artifacts import load_mindir, load_segmentation_network
from mindcv_poolformer.deploy.export import export_model
from mindcv_poolformer.deploy.predict import main
from mindcv_poolformer.evaluation.segmentation import predict_map

from conftest import require
from deploy_helpers import run_cli

MODEL = "fpn_poolformer_s12"
SCALE = (256, 64)  # a small test resize keeps the CPU run short; the pipeline is the same
SCALE_ARG = "256,64"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A random FPN-S12 whose maps vary (LayerScale 0.5, conv_seg N(0, 0.5)), its MINDIR, two photos."""
    import mindspore as ms

    import mindcv_poolformer as mp

    base = tmp_path_factory.mktemp("seg_deploy")
    ms.set_seed(0)
    net = mp.create_model(MODEL)
    rng = np.random.default_rng(0)
    for name, param in net.parameters_and_names():
        if "layer_scale" in name:
            param.set_data(ms.Tensor(np.full(param.shape, 0.5, np.float32)))
        elif name.startswith("decode_head.conv_seg."):
            param.set_data(ms.Tensor(rng.normal(0, 0.5, param.shape).astype(np.float32)))
    ckpt = base / "fpn.safetensors"
    ms.save_checkpoint(net, str(ckpt), format="safetensors")
    skdata = require("skimage.data")
    Image.fromarray(skdata.chelsea()[:200, :300]).save(base / "cat.jpg", quality=92)
    Image.fromarray(skdata.coffee()[:150, :170]).save(base / "coffee.png")
    result = export_model(MODEL, str(ckpt), "MINDIR", str(base / "fpn"), batch_size=2, image_size=64,
                          preprocess=SegPreprocess(SCALE))
    return {"base": base, "ckpt": ckpt, "mindir": Path(result.path), "cat": base / "cat.jpg",
            "coffee": base / "coffee.png"}


def test_mindir_dynamic_shapes_and_sidecar(assets):
    import mindspore as ms

    meta = json.loads(Path(f"{assets['mindir']}.json").read_text())
    assert meta["task"] == "segmentation" and meta["num_classes"] == 150 and meta["batch"] is None
    assert meta["checked_shapes"] == [[2, 3, 64, 64], [1, 3, 96, 128]] and meta["max_abs_diff"] <= 1e-4
    assert meta["labels"] == ade20k_classes() and np.array_equal(meta["palette"], ade20k_palette())
    assert meta["size_divisor"] == 32 and meta["seg_scale"] == list(SCALE) and "stride 4" in meta["output"]
    assert meta["preprocessing"]["mean"] == pytest.approx([123.675, 116.28, 103.53])

    # a third shape, after others on the same GraphCell: no stale output shape
    net, _ = load_segmentation_network(MODEL, str(assets["ckpt"]))
    graph = load_mindir(str(assets["mindir"]), [None, 3, None, None])
    for shape in ((1, 3, 64, 160), (2, 3, 128, 64)):
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        got, want = graph(ms.Tensor(x)).asnumpy(), net(ms.Tensor(x)).asnumpy()
        assert got.shape == want.shape == (shape[0], 150, shape[2] // 4, shape[3] // 4)
        diff = float(np.abs(got - want).max())
        print(f"MINDIR vs network at {shape}: max |diff| {diff:.2e} (max |logit| {np.abs(want).max():.2f})")
        assert diff <= 1e-5 * max(1.0, float(np.abs(want).max()))  # network here in PyNative, graph compiled


def test_predict_writes_class_and_overlay_pngs(assets, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    images = [str(assets["cat"]), str(bad), str(assets["coffee"])]
    net, _ = load_segmentation_network(MODEL, str(assets["ckpt"]))
    maps = {}
    for kind, source in (("ckpt", ["--model", MODEL, "--ckpt_path", str(assets["ckpt"])]),
                         ("mindir", ["--mindir", str(assets["mindir"])])):
        out = tmp_path / kind
        assert main([*images, *source, "--output_dir", str(out), "--seg_scale", SCALE_ARG]) == 1
        captured = capsys.readouterr()
        errors = captured.err.strip().splitlines()
        assert len(errors) == 1 and "bad.jpg" in errors[0] and "cannot read image" in errors[0]
        assert "1. " in captured.out and "%" in captured.out
        assert sorted(p.name for p in out.iterdir()) == ["cat_classes.png", "cat_overlay.png", "coffee_classes.png",
                                                          "coffee_overlay.png"]
        for name in ("cat", "coffee"):
            image = np.asarray(Image.open(assets[name]).convert("RGB"))
            classes = np.asarray(Image.open(out / f"{name}_classes.png"))
            overlay = np.asarray(Image.open(out / f"{name}_overlay.png"))
            assert classes.dtype == np.uint8 and classes.shape == image.shape[:2]
            assert overlay.shape == image.shape
            expected = np.floor(0.5 * image + 0.5 * ade20k_palette()[classes].astype(np.float64) + 0.5)
            assert np.array_equal(overlay, expected.astype(np.uint8))
            if kind == "ckpt":
                direct = predict_map(net, image, SegPreprocess(SCALE, 32))
                assert np.array_equal(classes, direct)
                assert len(np.unique(classes)) > 3  # the random head does give a varied map
            maps[kind, name] = classes
    for name in ("cat", "coffee"):
        agree = float((maps["ckpt", name] == maps["mindir", name]).mean())
        print(f"{name}: checkpoint and MINDIR class maps agree on {100 * agree:.3f}% of pixels")
        assert agree >= 0.999


def test_overlay_composition():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    classes = np.arange(35, dtype=np.uint8).reshape(5, 7) * 4
    classes[0, 0] = 255
    palette = ade20k_palette()
    got = overlay_classes(image, classes, palette)
    want = np.floor(0.5 * image + 0.5 * palette[np.where(classes == 255, 0, classes)] + 0.5).astype(np.uint8)
    want[0, 0] = image[0, 0]  # "none" keeps the image
    assert np.array_equal(got, want)
    with pytest.raises(ValueError, match="no colour"):
        overlay_classes(image, np.full((5, 7), 200, np.uint8), palette)


def test_bad_input_is_one_line_and_writes_nothing(assets, tmp_path):
    out = tmp_path / "never"
    proc = run_cli("-m", "mindcv_poolformer.predict", str(assets["cat"]), "--mindir", str(assets["mindir"]),
                   "--ckpt_path", str(assets["ckpt"]), "--output_dir", str(out))
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip().count("\n") == 0 and "exactly one of" in proc.stderr
    onnx = tmp_path / "fpn.onnx"
    proc = run_cli("export.py", "--model", MODEL, "--ckpt_path", str(assets["ckpt"]), "--file_format", "ONNX",
                   "--file_name", str(onnx))
    assert proc.returncode == 2 and not onnx.exists() and not Path(f"{onnx}.json").exists()
    assert proc.stderr.strip().count("\n") == 0 and "export MINDIR" in proc.stderr
