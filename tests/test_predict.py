"""predict: same answers from the checkpoint, the MINDIR and the ONNX file; bad images reported, others kept."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mindcv_poolformer.deploy.export import export_model
from mindcv_poolformer.deploy.predict import _split_argv, main

from conftest import require
from deploy_helpers import CLASS_NAMES, IMAGE_SIZE, MODEL, deploy_assets, run_cli  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def artifacts(deploy_assets, tmp_path_factory):  # noqa: F811
    """MINDIR (dynamic batch) and ONNX (fixed batch 2) exports of the test checkpoint, with labels."""
    out = tmp_path_factory.mktemp("artifacts")
    files = {}
    for fmt, batch in (("MINDIR", 2), ("ONNX", 2)):
        if fmt == "ONNX":
            require("onnxruntime")
        result = export_model(MODEL, str(deploy_assets["ckpt"]), fmt, str(out / "s12"), batch_size=batch,
                              image_size=IMAGE_SIZE, labels=list(CLASS_NAMES))
        files[fmt] = result.path
    return files


def _images(deploy_assets) -> list[str]:  # noqa: F811
    val = deploy_assets["data"] / "val"
    return [str(p) for cls in sorted(val.iterdir()) for p in sorted(cls.iterdir())[:2]]  # 6 images, PNG and JPEG


def test_checkpoint_mindir_onnx_agree(deploy_assets, artifacts, tmp_path, capsys):  # noqa: F811
    images = _images(deploy_assets)
    outputs = {}
    for kind, source in (("ckpt", ["--ckpt_path", str(deploy_assets["ckpt"]), "--image_resize", str(IMAGE_SIZE),
                                   "--labels", str(deploy_assets["labels"])]),
                         ("mindir", ["--mindir", artifacts["MINDIR"]]),
                         ("onnx", ["--onnx", artifacts["ONNX"]])):
        out = tmp_path / f"{kind}.json"
        assert main([*images, *source, "--topk", "3", "--json", str(out)]) == 0
        outputs[kind] = json.loads(out.read_text())["predictions"]
    printed = capsys.readouterr().out
    assert "  1. " in printed and any(name in printed for name in CLASS_NAMES)
    worst = 0.0
    for preds in zip(*outputs.values()):
        assert len({p["image"] for p in preds}) == 1
        assert len({tuple(e["label"] for e in p["topk"]) for p in preds}) == 1  # same ranking and labels
        probs = np.array([[e["prob"] for e in p["topk"]] for p in preds])
        worst = max(worst, float(np.abs(probs - probs[0]).max()))
    print(f"max |prob difference| across checkpoint/MINDIR/ONNX: {worst:.2e}")
    assert worst <= 1e-4
    assert len(outputs["ckpt"]) == len(images)


def test_bad_images_are_reported_and_the_rest_predicted(deploy_assets, tmp_path):  # noqa: F811
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    missing = tmp_path / "missing.png"
    good = _images(deploy_assets)[:2]
    out = tmp_path / "preds.json"
    proc = run_cli("-m", "mindcv_poolformer.predict", good[0], str(corrupt), str(missing), good[1], "--ckpt_path",
                   str(deploy_assets["ckpt"]), "--image_resize", str(IMAGE_SIZE), "--json", str(out))
    assert proc.returncode == 1
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 2 and "corrupt.jpg" in errors[0] and "missing.png" in errors[1]
    assert "Traceback" not in proc.stderr
    preds = json.loads(out.read_text())["predictions"]
    assert [p["image"] for p in preds] == good
    assert all(p["topk"][0]["label"].startswith("class_") for p in preds)  # no labels file given


def test_usage_errors(deploy_assets, artifacts, capsys):  # noqa: F811
    image = _images(deploy_assets)[0]
    assert main([image]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert main([image, "--mindir", artifacts["MINDIR"], "--onnx", artifacts["ONNX"]]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert main(["--ckpt_path", str(deploy_assets["ckpt"])]) == 2
    assert "no images given" in capsys.readouterr().err
    assert main([image, "--topk", "0", "--onnx", artifacts["ONNX"]]) == 2
    assert "topk" in capsys.readouterr().err


def test_argv_split():
    images, options = _split_argv(["a.jpg", "--model", "poolformer_s24", "b.png", "--debug", "c.jpg", "--topk=3"])
    assert images == ["a.jpg", "b.png", "c.jpg"]
    assert options == ["--model", "poolformer_s24", "--debug", "--topk=3"]
