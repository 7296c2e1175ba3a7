"""One Preprocess record: every script evaluates at the model record's crop, and the sidecar carries it unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mindcv_poolformer.config import ConfigError
from mindcv_poolformer.transforms import Preprocess, eval_transform_pil

# timm's ImageNet constants and mmseg's ADE20K config values, written out independently of the package
IMAGENET = ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255))
ADE20K = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
# REFERENCE.md: M-sized PoolFormers evaluate at crop_pct 0.95, S-sized at 0.9
M36 = Preprocess(224, 0.95, "bicubic", *IMAGENET)


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
    assert (seen["export"][-1].mean, seen["export"][-1].std) == ADE20K
