"""Segmentation evaluation against mmseg 1.2.2: its test-time resize, its IoUMetric, and validate.py end to end.

The resize is compared with mmseg's own ``Resize(scale=(2048, 512), keep_ratio=True)`` +
``ResizeToMultiple(32)`` transforms (OpenCV inside) on real photos; the metric with
``IoUMetric.intersect_and_union``/``total_area_to_metrics``; the CLI's mIoU with numpy on the same
predictions, on a small ADE20K-layout folder built from real photos with random labels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from mmseg_reference import _import_mmseg
from PIL import Image

from mindcv_poolformer.config import ConfigError
from mindcv_poolformer.data.ade20k import (
    ade20k_classes,
    ade20k_palette,
    inference_resize,
    list_ade20k,
    load_sample,
    rescale_size,
)
from mindcv_poolformer.evaluation.miou import IoUHistogram, all_reduce_counts, intersect_and_union

from conftest import require
from deploy_helpers import run_cli


def _photos() -> dict[str, np.ndarray]:
    data = require("skimage.data")
    names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "coins")
    photos = {n: getattr(data, n)() for n in names}
    photos["coins"] = np.repeat(photos["coins"][..., None], 3, axis=2)  # grey 303x384
    photos["small_64x80"] = photos["chelsea"][:64, :80]
    photos["tall_700x230"] = np.ascontiguousarray(np.rot90(photos["hubble_deep_field"])[:700, :230])
    return photos


def _mmseg_test_resize(image: np.ndarray) -> np.ndarray:
    _import_mmseg()
    from mmseg.registry import TRANSFORMS

    results = {"img": image, "img_shape": image.shape[:2], "ori_shape": image.shape[:2]}
    for cfg in (dict(type="Resize", scale=(2048, 512), keep_ratio=True),
                dict(type="ResizeToMultiple", size_divisor=32)):
        results = TRANSFORMS.build(cfg)(results)
    return results["img"]


def test_resize_equals_mmseg_test_pipeline():
    """Our MindSpore-only resize reproduces mmseg's (cv2 INTER_LINEAR) test pipeline exactly on real photos."""
    for name, photo in _photos().items():
        ours, ref = inference_resize(photo), _mmseg_test_resize(photo)
        assert ours.shape == ref.shape, name
        diff = np.abs(ours.astype(int) - ref.astype(int))
        print(f"{name} {photo.shape[:2]} -> {ours.shape[:2]}: max {diff.max()} mean {diff.mean():.4f}")
        assert diff.max() == 0, name


def test_rescale_size_is_mmcv():
    mmcv = require("mmcv")
    for w, h in [(683, 512), (512, 683), (80, 64), (2600, 300), (1, 1000), (333, 777), (4000, 4000)]:
        new, _ = mmcv.rescale_size((w, h), (2048, 512), return_scale=True)
        assert rescale_size(w, h) == tuple(new), (w, h)


def test_miou_equals_mmseg_iou_metric():
    """Histograms and metrics equal mmseg's IoUMetric (static methods) with ignored pixels and absent classes."""
    _import_mmseg()
    torch = require("torch")
    from mmseg.evaluation.metrics import IoUMetric

    rng = np.random.default_rng(0)
    num_classes = 12
    hist = IoUHistogram(num_classes)
    totals = [0, 0, 0, 0]
    for _ in range(7):
        h, w = rng.integers(20, 90, size=2)
        label = rng.choice([0, 1, 2, 3, 5, 6, 7, 255], size=(h, w)).astype(np.uint8)  # 4, 8.. never in labels
        pred = rng.choice([0, 1, 2, 4, 5, 6, 9], size=(h, w)).astype(np.int64)  # 3, 7 never predicted
        hist.update(pred, label)
        ref = IoUMetric.intersect_and_union(torch.from_numpy(pred), torch.from_numpy(label.astype(np.int64)),
                                            num_classes, 255)
        totals = [t + r for t, r in zip(totals, ref)]
        assert np.array_equal(intersect_and_union(pred, label, num_classes), np.stack([r.numpy() for r in ref]))
    # mmseg's histograms are float32 (exact integers here): its formulas on them in float64, to compare at 1e-12
    ref = IoUMetric.total_area_to_metrics(*(t.double() for t in totals), metrics=["mIoU"])
    ours = hist.compute()
    assert np.array_equal(hist.areas, np.stack([t.numpy() for t in totals]).astype(np.int64))
    np.testing.assert_allclose(ours.iou, np.asarray(ref["IoU"]), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours.acc, np.asarray(ref["Acc"]), rtol=0, atol=1e-12)
    assert abs(ours.aacc - float(ref["aAcc"])) < 1e-12
    assert abs(ours.miou - float(np.nanmean(np.asarray(ref["IoU"])))) < 1e-12
    assert abs(ours.macc - float(np.nanmean(np.asarray(ref["Acc"])))) < 1e-12
    assert np.isnan(ours.iou[[8, 10, 11]]).all() and ours.iou[3] == 0 and ours.iou[4] == 0


def test_limb_all_reduce_is_exact_beyond_float32():
    """Counts far above 2**24 summed over 5 simulated ranks through a float32 SUM come back exact."""
    rng = np.random.default_rng(1)
    ranks = [rng.integers(0, 2 ** 44, size=(4, 150)) for _ in range(5)]
    ranks[0][0, 0] = 2 ** 24 + 1  # a float32 would round it

    def simulated_sum(limbs: np.ndarray) -> np.ndarray:
        assert limbs.dtype == np.float32
        per_rank = [np.stack([(r >> (12 * k)) & 4095 for k in range(4)]).astype(np.float32) for r in ranks]
        out = np.zeros_like(limbs)
        for value in per_rank:
            out += value  # float32 accumulation, as AllReduce
        return out

    assert np.array_equal(all_reduce_counts(ranks[0], simulated_sum), sum(ranks))


def test_ade20k_class_table():
    _import_mmseg()
    from mmseg.datasets import ADE20KDataset

    assert tuple(ade20k_classes()) == ADE20KDataset.METAINFO["classes"]
    assert ade20k_palette().tolist() == ADE20KDataset.METAINFO["palette"]


def _make_ade(root: Path, n: int = 6, seed: int = 0) -> Path:
    """``root/ADEChallengeData2016`` with ``n`` 64x80 JPEG crops of real photos and random label PNGs (0..150)."""
    rng = np.random.default_rng(seed)
    photos = [p for name, p in _photos().items() if min(p.shape[:2]) >= 64 and name != "small_64x80"]
    base = root / "ADEChallengeData2016"
    for sub in ("images/validation", "annotations/validation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - 64), rng.integers(0, photo.shape[1] - 80)
        Image.fromarray(photo[y:y + 64, x:x + 80]).save(base / f"images/validation/ADE_val_{i:08d}.jpg", quality=95)
        label = rng.choice(np.r_[0:20, 150], size=(64, 80)).astype(np.uint8)
        Image.fromarray(label).save(base / f"annotations/validation/ADE_val_{i:08d}.png")
    return root


@pytest.fixture(scope="module")
def seg_assets(tmp_path_factory):
    """A random-weight FPN S12 checkpoint (safetensors) and a synthetic ADE20K folder."""
    from mindcv_poolformer.checkpoint import save_state_dict
    from mindcv_poolformer.factory import create_model

    tmp = tmp_path_factory.mktemp("seg")
    net = create_model("fpn_poolformer_s12", num_classes=150)
    ckpt = save_state_dict({k: v.asnumpy() for k, v in net.parameters_dict().items()}, tmp / "fpn_s12.safetensors")
    return tmp, Path(ckpt), _make_ade(tmp / "ade")


def _one_line_exit2(proc, *patterns: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in lines if ln.startswith("validate.py: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for pattern in patterns:
        assert pattern in errors[0], errors[0]
    return errors[0]


def test_validate_cli_miou_equals_numpy(seg_assets):
    """validate.py's mIoU/aAcc/mAcc/per-class IoU equal numpy on the same model's predictions of the same files."""
    from mindcv_poolformer.deploy.artifacts import load_segmentation_network
    from mindcv_poolformer.evaluation.segmentation import predict_map

    tmp, ckpt, data = seg_assets
    out = tmp / "seg.json"
    proc = run_cli("validate.py", "--model", "fpn_poolformer_s12", "--data_dir", str(data), "--ckpt_path", str(ckpt),
                   "--json", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    record = json.loads(out.read_text())
    net, classes = load_segmentation_network("fpn_poolformer_s12", str(ckpt))
    pairs = list_ade20k(str(data), "val")
    inter = np.zeros(classes)
    union = np.zeros(classes)
    label_area = np.zeros(classes)
    for image_path, label_path in zip(pairs.images, pairs.labels):
        sample = load_sample(image_path, label_path, classes)
        raw = np.asarray(Image.open(label_path)).astype(int)
        assert np.array_equal(sample.label, np.where(raw == 0, 255, raw - 1))
        pred = predict_map(net, sample.image)
        valid = sample.label != 255
        for c in range(classes):
            p, g = (pred == c) & valid, (sample.label == c) & valid
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
            label_area[c] += g.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = inter / union, inter / label_area
    assert record["num_samples"] == 6 and record["skipped"] == 0 and record["task"] == "segmentation"
    assert abs(record["miou"] - 100 * np.nanmean(iou)) < 1e-9
    assert abs(record["aacc"] - 100 * inter.sum() / label_area.sum()) < 1e-9
    assert abs(record["macc"] - 100 * np.nanmean(acc)) < 1e-9
    names = ade20k_classes()
    assert list(record["per_class_iou"]) == names
    for name, value in zip(names, iou):
        got = record["per_class_iou"][name]
        assert (got is None) if np.isnan(value) else abs(got - 100 * value) < 1e-9, name
    assert "mIoU (%)" in proc.stdout


@pytest.mark.parametrize("case", ["no_annotations", "image_without_label", "label_out_of_range", "size_mismatch"])
def test_validate_cli_bad_ade20k_is_one_line(seg_assets, tmp_path, case):
    _, ckpt, _ = seg_assets
    data = _make_ade(tmp_path / "ade", n=2)
    base = data / "ADEChallengeData2016"
    label = base / "annotations/validation/ADE_val_00000001.png"
    expect = {"no_annotations": "annotations/validation is missing", "image_without_label": "has no annotation",
              "label_out_of_range": "label value 200", "size_mismatch": "must match"}[case]
    if case == "no_annotations":
        for f in (base / "annotations/validation").iterdir():
            f.unlink()
        (base / "annotations/validation").rmdir()
    elif case == "image_without_label":
        label.unlink()
    elif case == "label_out_of_range":
        values = np.asarray(Image.open(label)).copy()
        values[3, 5] = 200
        Image.fromarray(values).save(label)
    else:
        Image.fromarray(np.zeros((64, 81), np.uint8)).save(label)
    out = tmp_path / "out.json"
    proc = run_cli("validate.py", "--model", "fpn_poolformer_s12", "--data_dir", str(data), "--ckpt_path", str(ckpt),
                   "--json", str(out))
    print(_one_line_exit2(proc, expect, "ADE_val_0000000" if case != "no_annotations" else "annotations"))
    assert not out.exists()


def test_corrupt_image_is_skipped_or_strict_error(seg_assets, tmp_path):
    """A JPEG that does not decode: counted skip by default, one-line error with --strict_data True."""
    _, ckpt, _ = seg_assets
    data = _make_ade(tmp_path / "ade", n=2)
    bad = data / "ADEChallengeData2016/images/validation/ADE_val_00000000.jpg"
    bad.write_bytes(bad.read_bytes()[:40])
    out = tmp_path / "out.json"
    args = ("validate.py", "--model", "fpn_poolformer_s12", "--data_dir", str(data), "--ckpt_path", str(ckpt))
    proc = run_cli(*args, "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["num_samples"] == 1 and record["skipped"] == 1
    assert "skipped" in proc.stderr
    os.unlink(out)
    print(_one_line_exit2(run_cli(*args, "--strict_data", "True", "--json", str(out)), "ADE_val_00000000.jpg"))
    assert not out.exists()


def test_load_sample_errors_name_the_file(tmp_path):
    image = tmp_path / "a.jpg"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    label = tmp_path / "a.png"
    Image.fromarray(np.full((8, 8), 151, np.uint8)).save(label)
    with pytest.raises(ConfigError, match=r"a\.png has label value 151 \(class 150"):
        load_sample(str(image), str(label), 150)
    Image.fromarray(np.full((8, 8), 149, np.uint8)).save(label)
    assert load_sample(str(image), str(label), 150, reduce_zero_label=False).label.max() == 149
    assert load_sample(str(image), str(label), 150).label.max() == 148
