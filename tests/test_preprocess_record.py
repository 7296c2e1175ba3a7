"""One Preprocess record (and one SegPreprocess for Semantic FPN): every script evaluates at the model record's
preprocessing, and the sidecar carries it unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mindcv_poolformer.config import ConfigError, model_defaults, parse_cli
from mindcv_poolformer.data.ade20k import SegPreprocess
from mindcv_poolformer.errors import ScriptError
from mindcv_poolformer.transforms import Preprocess, eval_transform_pil

# timm's ImageNet constants and mmseg's ADE20K config values, written out independently of the package
IMAGENET = ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255))
ADE20K = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
# REFERENCE.md: M-sized PoolFormers evaluate at crop_pct 0.95, S-sized at 0.9
M36 = Preprocess(224, 0.95, "bicubic", *IMAGENET)
# mmseg configs/poolformer test_pipeline: Resize(scale=(2048, 512), keep_ratio=True), ResizeToMultiple(32)
FPN_TEST = SegPreprocess((2048, 512), 32, *ADE20K)
# a segmentation sidecar as export.py has written it since segmentation export exists (flat keys predict reads)
SEG_SIDECAR = {"model": "fpn_poolformer_s12", "task": "segmentation", "num_classes": 150,
               "preprocessing": {"resize": "...", "seg_scale": [256, 64], "size_divisor": 32,
                                 "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]},
               "image_size": None, "seg_scale": [256, 64], "size_divisor": 32, "mean": [123.675, 116.28, 103.53],
               "std": [58.395, 57.12, 57.375], "crop_pct": None, "interpolation": "bilinear", "file_format": "MINDIR",
               "batch": None}


def test_sidecar_round_trips_and_older_sidecars_read():
    pre = Preprocess(96, 0.875, "bilinear", *ADE20K)
    meta = json.loads(json.dumps({"model": "x", "num_classes": 3, **pre.to_sidecar()}))
    assert Preprocess.from_sidecar(meta) == pre
    # the layout export.py wrote before the record existed (flat keys, lists)
    older = {"model": "poolformer_s12", "num_classes": 3, "image_size": 64, "crop_pct": 0.9,
             "interpolation": "bicubic", "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375],
             "labels": None, "file_format": "MINDIR", "batch": None}
    assert Preprocess.from_sidecar(older) == Preprocess(64, 0.9, "bicubic", (123.675, 116.28, 103.53),
                                                        (58.395, 57.12, 57.375))


def test_record_applies_the_reference_transform_and_rejects_bad_values():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    np.testing.assert_array_equal(M36(img), eval_transform_pil(img, 224, 0.95, "bicubic", *IMAGENET))
    assert Preprocess.for_model("poolformer_m36") == M36
    assert Preprocess.for_model("fpn_poolformer_s12", 512) == Preprocess(512, 0.9, "bilinear", *ADE20K)
    with pytest.raises(ConfigError, match="crop_pct: 1.5"):
        Preprocess(224, 1.5, "bicubic", *IMAGENET)
    with pytest.raises(ConfigError, match="interpolation: 'lanczos'"):
        Preprocess(224, 0.9, "lanczos", *IMAGENET)
    with pytest.raises(ConfigError, match="mean/std"):
        Preprocess(224, 0.9, "bicubic", (1.0, 2.0), (1.0, 1.0, 1.0))


def test_validate_predict_and_export_take_the_model_records_preprocessing(monkeypatch, tmp_path):
    """Without a recipe, validate.py, predict and export.py evaluate m36 at 0.95 (the schema says 0.9); a flag wins."""
    import mindcv_poolformer.deploy.export as export
    import mindcv_poolformer.deploy.predict as predict
    import mindcv_poolformer.evaluation.validate as validate

    seen: dict[str, list] = {"validate": [], "predict": [], "export": []}

    def fake_validation(cfg):
        seen["validate"].append(Preprocess.from_config(cfg))
        raise ConfigError("stop")

    def fake_predictor(cfg):
        pre = Preprocess.from_config(cfg)
        seen["predict"].append(pre)
        return predict.Predictor(lambda x: np.zeros((len(x), 2), np.float32), 1, pre, None, "fake")

    def fake_export(*args, preprocess, **kwargs):
        seen["export"].append(preprocess)
        raise ConfigError("stop")

    monkeypatch.setattr(validate, "run_validation", fake_validation)
    monkeypatch.setattr(predict, "load_predictor", fake_predictor)
    monkeypatch.setattr(export, "export_model", fake_export)
    monkeypatch.setattr(export, "configure_device", lambda cfg, mode=None: "device: test")
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(image)
    for flags, want in (([], M36), (["--crop_pct", "0.8"], Preprocess(224, 0.8, "bicubic", *IMAGENET))):
        model = ["--model", "poolformer_m36", *flags]
        assert validate.main([*model, "--ckpt_path", "w.ckpt"]) == 2
        assert predict.main([str(image), *model, "--ckpt_path", "w.ckpt"]) == 0
        assert export.main([*model, "--ckpt_path", "w.ckpt"]) == 2
        assert seen["validate"][-1] == seen["predict"][-1] == seen["export"][-1] == want
    assert export.main(["--model", "fpn_poolformer_s12", "--ckpt_path", "w.ckpt"]) == 2
    assert seen["export"][-1] == FPN_TEST
    assert export.main(["--model", "fpn_poolformer_s12", "--ckpt_path", "w.ckpt", "--seg_scale", "256,64",
                        "--seg_size_divisor", "16"]) == 2
    assert seen["export"][-1] == SegPreprocess((256, 64), 16, *ADE20K)


def _parsed(model: str, *flags: str):
    return parse_cli(["--model", model, *flags], prog="validate.py", defaults=model_defaults(model))


def test_seg_record_from_model_config_and_sidecar_agree():
    """The FPN's test preprocessing is the same record whether it comes from the model, a config or a sidecar."""
    assert SegPreprocess.for_model("fpn_poolformer_s12") == SegPreprocess() == FPN_TEST
    assert SegPreprocess.from_config(_parsed("fpn_poolformer_s12")) == FPN_TEST
    flags = ("--seg_scale", "256,64", "--seg_size_divisor", "16", "--mean", "1,2,3", "--std", "4,5,6")
    assert SegPreprocess.from_config(_parsed("fpn_poolformer_s12", *flags)) == SegPreprocess((256, 64), 16, (1, 2, 3),
                                                                                             (4, 5, 6))
    small = SegPreprocess((256, 64), 32, *ADE20K)
    assert SegPreprocess.from_sidecar(SEG_SIDECAR) == small == SegPreprocess.for_model("fpn_poolformer_s12", (256, 64))
    written = json.loads(json.dumps(small.to_sidecar()))
    assert written == {k: SEG_SIDECAR[k] for k in SegPreprocess.SIDECAR_KEYS}  # the keys and values old sidecars hold
    assert SegPreprocess.from_sidecar(written) == small
    # the normalisation is the record's: a classifier's record gives ImageNet's
    assert SegPreprocess.for_model("poolformer_s12") == SegPreprocess((2048, 512), 32, *IMAGENET)


def test_seg_record_is_the_test_pipeline_and_rejects_bad_values():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)  # fits (256, 64) and is a multiple of 32: no resize
    mean, std = (10.0, 20.0, 30.0), (2.0, 3.0, 4.0)
    want = ((image - np.asarray(mean)) / np.asarray(std)).transpose(2, 0, 1)[None]
    got = SegPreprocess((256, 64), 32, mean, std)(image)
    assert got.dtype == np.float32 and got.shape == (1, 3, 64, 96)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    # 100x150 at (256, 64): factor min(256/150, 64/100) = 0.64 -> 96x64, already multiples of 32; divisor 40 -> 120x80
    assert SegPreprocess((256, 64), 32)(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)).shape == (1, 3, 64, 96)
    assert SegPreprocess((256, 64), 40)(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)).shape == (1, 3, 80, 120)
    with pytest.raises(ConfigError, match=r"seg_scale: .*\[512\]"):
        SegPreprocess((512,))
    with pytest.raises(ConfigError, match="seg_size_divisor: .* got 0"):
        SegPreprocess((2048, 512), 0)
    with pytest.raises(ConfigError, match="mean/std"):
        SegPreprocess((2048, 512), 32, ADE20K[0], (1.0, 0.0, 1.0))


@pytest.mark.parametrize("missing", SegPreprocess.SIDECAR_KEYS)
def test_seg_sidecar_missing_a_key_is_one_line(missing, tmp_path, capsys):
    import mindcv_poolformer.deploy.predict as predict

    meta = {k: v for k, v in SEG_SIDECAR.items() if k != missing}
    with pytest.raises(ScriptError, match=f"fpn.json: key '{missing}' is missing"):
        SegPreprocess.from_sidecar(meta, "fpn.json")
    # predict refuses it before loading anything (the MINDIR here is not even one)
    mindir = tmp_path / "fpn.mindir"
    mindir.write_bytes(b"not a graph")
    (tmp_path / "fpn.mindir.json").write_text(json.dumps(meta))
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(image)
    capsys.readouterr()
    assert predict.main([str(image), "--mindir", str(mindir), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"key '{missing}' is missing" in err and not (tmp_path / "out").exists()
