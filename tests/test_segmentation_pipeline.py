"""The segmentation train pipeline against mmseg 1.2.2 / mmcv 2.1's own transforms, with the same random draws.

mmseg draws from ``numpy.random``; ours from a ``Generator``. Each comparison gives mmseg a stand-in
for ``numpy.random`` that replays a second generator of the same seed, so both sides take the same
scale, box, coin flips and factors, and the outputs must then be equal (max difference 0).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from mindcv_poolformer._script import user_error_message
from mindcv_poolformer.config import ConfigError
from mindcv_poolformer.data import seg_transforms as st
from mindcv_poolformer.data.ade20k import list_ade20k
from mindcv_poolformer.data.seg_train import build_segmentation_train_dataset, num_train_batches

from conftest import require


class Replay:
    """``numpy.random``'s legacy calls that mmseg makes, answered by a Generator as our transforms draw."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def randint(self, low: int, high: int | None = None) -> int:
        return int(self.rng.integers(low, high))

    def uniform(self, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high))

    def random_sample(self) -> float:
        return float(self.rng.random())


def _photo() -> np.ndarray:
    skdata = require("skimage.data")
    return np.ascontiguousarray(skdata.coffee()[::2, ::2])  # 200x300 RGB: real edges and colours


def _blocks(height: int, width: int, seed: int, block: int = 8, classes: int = 6) -> np.ndarray:
    """A label map of random ``block``-sized class squares (some 255): asymmetric, so a lost flip shows."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, classes + 1, (height // block + 1, width // block + 1))
    grid[grid == classes] = 255
    return np.kron(grid, np.ones((block, block), np.int64))[:height, :width].astype(np.uint8)


@pytest.fixture(scope="module")
def mmseg_transforms():
    from mmseg_reference import _import_mmseg

    _import_mmseg()
    import mmseg.datasets.transforms.transforms as module

    return module


def test_resize_equals_mmcv_random_resize(monkeypatch):
    require("cv2")
    from mmcv.transforms import RandomResize

    image, label = _photo(), _blocks(200, 300, 0, block=5)
    for seed, scale in [(0, (2048, 512)), (1, (2048, 512)), (2, (600, 150)), (3, (256, 64)), (4, (97, 1000))]:
        ours_img, ours_lab = st.random_resize(image, label, np.random.default_rng(seed), scale, (0.5, 2.0))
        monkeypatch.setattr(np.random, "random_sample", Replay(seed).random_sample)
        ref = RandomResize(scale=scale, ratio_range=(0.5, 2.0), keep_ratio=True, resize_type="mmcv.Resize").transform(
            {"img": image.copy(), "gt_seg_map": label.copy(), "img_shape": image.shape[:2]})
        assert ours_img.shape == ref["img"].shape and ours_lab.shape == ref["gt_seg_map"].shape
        assert np.abs(ours_img.astype(int) - ref["img"]).max() == 0  # MindSpore LINEAR == cv2 INTER_LINEAR
        assert np.array_equal(ours_lab, ref["gt_seg_map"])  # MindSpore NEAREST == cv2 INTER_NEAREST


def test_random_crop_equals_mmseg(monkeypatch, mmseg_transforms):
    image = _photo()
    labels = [_blocks(200, 300, 1, block=40, classes=3),  # often one class per 64 box: re-draws
              np.zeros((200, 300), np.uint8),  # never accepted: mmseg keeps the 11th box
              _blocks(200, 300, 2, block=10)]
    labels[1][:, :150] = 255
    for li, label in enumerate(labels):
        for seed in range(12):
            for crop, ratio in [((64, 64), 0.75), ((128, 96), 0.75), ((512, 512), 0.75), ((64, 64), 1.0)]:
                ours = st.random_crop(image, label, np.random.default_rng(seed), crop, ratio)
                monkeypatch.setattr(np.random, "randint", Replay(seed).randint)
                ref = mmseg_transforms.RandomCrop(crop, cat_max_ratio=ratio).transform(
                    {"img": image.copy(), "gt_seg_map": label.copy(), "seg_fields": ["gt_seg_map"]})
                assert np.array_equal(ours[0], ref["img"]), (li, seed, crop)
                assert np.array_equal(ours[1], ref["gt_seg_map"]), (li, seed, crop)


def test_cat_max_ratio_semantics():
    # left 48 columns class 0, the rest class 1: a 32-wide box [x, x + 32) is balanced only for 24 < x < 40
    label = np.zeros((32, 96), np.uint8)
    label[:, 48:] = 1
    rejected = 0
    for seed in range(40):
        y1, y2, x1, x2 = st.crop_bbox(label, np.random.default_rng(seed), (32, 32), 0.75)
        values, counts = np.unique(label[y1:y2, x1:x2], return_counts=True)
        if len(values) > 1 and counts.max() / counts.sum() < 0.75:
            continue
        # a rejected box is only returned as the 11th draw, after 10 rejections
        replay = np.random.default_rng(seed)
        draws = [(int(replay.integers(0, 1)), int(replay.integers(0, 65)))[1] for _ in range(11)]  # (y, x) each
        assert x1 == draws[-1] and all(not 24 < x < 40 for x in draws[:-1]), seed
        rejected += 1
    assert 0 < rejected < 10  # 0.77 ** 10: about 3 in 40 find no balanced box in 10 tries (31 without the rule)
    # 255 is not a class: one class plus ignore is rejected, and every draw is used
    label = np.full((32, 96), 255, np.uint8)
    label[:, :40] = 3
    rng = np.random.default_rng(0)
    st.crop_bbox(label, rng, (32, 32), 0.75)
    replay = np.random.default_rng(0)
    for _ in range(11):
        replay.integers(0, 1), replay.integers(0, 65)
    assert rng.random() == replay.random()  # exactly 11 boxes were drawn


def test_hsv_equals_opencv():
    cv2 = require("cv2")
    rng = np.random.default_rng(0)
    for shape in [(64, 64), (37, 50), (8, 300)]:  # rows of whole SIMD blocks, and scalar tails
        rgb = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
        assert np.array_equal(st.rgb_to_hsv(rgb), cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV))
        hsv = np.stack([rng.integers(0, 180, shape), rng.integers(0, 256, shape), rng.integers(0, 256, shape)],
                       axis=-1).astype(np.uint8)
        assert np.array_equal(st.hsv_to_rgb(hsv), cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))


def test_photometric_distortion_equals_mmseg(monkeypatch, mmseg_transforms):
    photo = _photo()
    crops = [photo[:64, :64], photo[10:60, 20:70], photo[:, :]]
    for seed in range(40):
        image = crops[seed % 3]
        ours = st.photometric_distortion(image, np.random.default_rng(seed))
        monkeypatch.setattr(mmseg_transforms, "random", Replay(seed))
        ref = mmseg_transforms.PhotoMetricDistortion().transform({"img": image[..., ::-1].copy()})["img"][..., ::-1]
        assert np.abs(ours.astype(int) - ref).max() == 0, seed


def test_pad_equals_mmseg_stack_batch():
    torch = require("torch")
    from mmseg_reference import _import_mmseg

    _import_mmseg()
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    from mmseg.utils import stack_batch

    rng = np.random.default_rng(0)
    image = rng.normal(size=(40, 50, 3)).astype(np.float32)
    label = rng.integers(0, 8, (40, 50)).astype(np.uint8)
    ours_img, ours_lab = st.pad_to(image, label, (64, 56))
    sample = SegDataSample(gt_sem_seg=PixelData(data=torch.from_numpy(label[None].astype(np.int64))))
    ref_img, ref_samples = stack_batch([torch.from_numpy(image.transpose(2, 0, 1).copy())], [sample], size=(64, 56),
                                       pad_val=0, seg_pad_val=255)
    assert np.array_equal(ours_img.transpose(2, 0, 1), ref_img[0].numpy())
    assert np.array_equal(ours_lab, ref_samples[0].gt_sem_seg.data[0].numpy())


def test_label_stays_aligned_through_the_geometric_ops():
    """Image pixel = 30 * label + 10: wherever the label is constant around a pixel the image must say the same."""
    transform = st.SegTrainTransform(crop_size=(64, 64), scale=(160, 80), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                                     flip_prob=0.5, photometric=False, mean=(0, 0, 0), std=(1, 1, 1))
    for seed in range(30):
        label = _blocks(70, 90, seed, block=9)
        code = np.where(label == 255, 250, 30 * label.astype(np.int64) + 10).astype(np.uint8)
        image = np.stack([code, 255 - code, code], axis=-1)
        out_img, out_lab = transform(image, label, np.random.default_rng(seed))
        assert out_img.shape == (3, 64, 64) and out_img.dtype == np.float32
        assert out_lab.shape == (64, 64) and out_lab.dtype == np.int32
        valid = out_img[0] != 0  # padding is 0 after normalising (mean 0 here), label 255
        assert (out_lab[~valid] == 255).all()
        lab = out_lab.astype(np.int64)
        windows = np.lib.stride_tricks.sliding_window_view(np.pad(lab, 2, constant_values=-1), (5, 5))
        inner = valid & (windows == lab[..., None, None]).all(axis=(-2, -1))  # a 5x5 neighbourhood of one label
        want = np.where(lab == 255, 250, 30 * lab + 10)
        assert inner.sum() > 200, seed
        assert np.array_equal(out_img[0][inner], want[inner].astype(np.float32)), seed
        assert np.array_equal(out_img[1][inner], 255 - want[inner].astype(np.float32)), seed
    # the flip is taken about half the time, to image and label together
    probe_img, probe_lab = np.arange(6).reshape(1, 2, 3), np.arange(2).reshape(1, 2)
    taken = []
    for s in range(200):
        img, lab = st.random_flip(probe_img, probe_lab, np.random.default_rng(s))
        assert (img[0, 0, 0] == 3) == (lab[0, 0] == 1)
        taken.append(lab[0, 0] == 1)
    assert 70 < sum(taken) < 130


def _write_ade(root, count: int, size: int = 24, bad_label: int | None = None):
    from PIL import Image

    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
    for i in range(count):
        image = np.full((size, size + 8, 3), 8 * i, np.uint8)  # the value names the file
        label = np.ones((size, size + 8), np.uint8)
        label[: size // 2] = 1 + i % 3
        if bad_label is not None and i == 0:
            label[0, 0] = bad_label
        Image.fromarray(image).save(root / "images" / "training" / f"{i:03d}.png")
        Image.fromarray(label).save(root / "annotations" / "training" / f"{i:03d}.png")
    return list_ade20k(str(root), "training")


def _batches(listing, **kw):
    args = dict(batch_size=2, crop_size=(16, 16), scale=(32, 24), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                mean=(0, 0, 0), std=(1, 1, 1), num_classes=4, seed=3, num_workers=2)
    args.update(kw)
    ds = build_segmentation_train_dataset(listing, **args)
    return [(img.copy(), lab.copy()) for img, lab in ds.create_tuple_iterator(output_numpy=True, num_epochs=1)]


def test_dataset_is_a_function_of_seed_rank_epoch(tmp_path):
    listing = _write_ade(tmp_path, 12)
    assert num_train_batches(listing, 2, 1) == 6 and num_train_batches(listing, 4, 2) == 1
    first = _batches(listing)
    assert len(first) == 6
    img, lab = first[0]
    assert img.shape == (2, 3, 16, 16) and img.dtype == np.float32 and lab.shape == (2, 16, 16)
    assert lab.dtype == np.int32 and set(np.unique(lab)) <= {0, 1, 2, 255}  # reduce_zero_label: 1..3 -> 0..2
    again = _batches(listing, num_workers=1)  # another worker count, same batches
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(first, again))
    other = _batches(listing, epoch=1)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other))

    plain = dict(photometric=False, ratio_range=(1.0, 1.0), scale=(32, 24), crop_size=(24, 32))
    seen = []
    for rank in (0, 1):
        batches = _batches(listing, world=2, rank=rank, epoch=2, **plain)
        assert len(batches) == 3
        seen.append(sorted(int(v) // 8 for b in batches for v in b[0][:, 0, 0, 0]))
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(12))


def test_dataset_errors(tmp_path):
    listing = _write_ade(tmp_path / "a", 4)
    with pytest.raises(ConfigError, match="batch_size: 5"):
        _batches(listing, batch_size=5)
    (tmp_path / "a" / "images" / "training" / "001.png").write_bytes(b"not a png")
    listing = list_ade20k(str(tmp_path / "a"), "training")
    with pytest.raises(RuntimeError, match="001.png is not a readable image"):
        _batches(listing)
    plain = dict(photometric=False, ratio_range=(1.0, 1.0), crop_size=(24, 32), strict=False, shuffle=False)
    values = [int(v) // 8 for b in _batches(listing, **plain) for v in b[0][:, 0, 0, 0]]
    assert values == [0, 2, 2, 3]  # the corrupt file's slot takes the next readable pair
    bad = _write_ade(tmp_path / "b", 4, bad_label=9)
    with pytest.raises(RuntimeError, match="label value 9") as err:
        _batches(bad, strict=False)
    # the scripts' one-line error (exit code 2) finds it inside MindSpore's wrapping
    message = user_error_message(err.value)
    assert message.startswith("data: ") and "000.png has label value 9" in message and "\n" not in message


def _flip_direction(replay: Replay) -> str | None:
    return "horizontal" if replay.random_sample() < 0.5 else None


def test_whole_pipeline_equals_mmseg(monkeypatch, mmseg_transforms):
    """mmseg's train pipeline + SegDataPreProcessor, all draws from one replayed stream, = ``SegTrainTransform``."""
    torch = require("torch")
    from mmcv.transforms import RandomResize
    from mmengine.structures import PixelData
    from mmseg.models.data_preprocessor import SegDataPreProcessor
    from mmseg.structures import SegDataSample

    from mindcv_poolformer.data.ade20k import ADE20K_MEAN, ADE20K_STD

    image, label = _photo(), _blocks(200, 300, 5, block=12)
    crop = (96, 128)
    ours_t = st.SegTrainTransform(crop, scale=(400, 100), ratio_range=(0.5, 2.0), cat_max_ratio=0.75)
    pre = SegDataPreProcessor(mean=list(ADE20K_MEAN), std=list(ADE20K_STD), bgr_to_rgb=True, size=crop, pad_val=0,
                              seg_pad_val=255)
    for seed in range(8):
        ours_img, ours_lab = ours_t(image, label, np.random.default_rng(seed))
        replay = Replay(seed)
        monkeypatch.setattr(np.random, "random_sample", replay.random_sample)
        monkeypatch.setattr(np.random, "randint", replay.randint)
        monkeypatch.setattr(mmseg_transforms, "random", replay)
        flip = mmseg_transforms.RandomFlip(prob=0.5)
        flip._choose_direction = functools.partial(_flip_direction, replay)  # mmcv draws np.random.choice
        results = {"img": image[..., ::-1].copy(), "gt_seg_map": label.copy(), "seg_fields": ["gt_seg_map"],
                   "img_shape": image.shape[:2]}
        for t in (RandomResize(scale=(400, 100), ratio_range=(0.5, 2.0), keep_ratio=True),
                  mmseg_transforms.RandomCrop(crop, cat_max_ratio=0.75), flip,
                  mmseg_transforms.PhotoMetricDistortion()):
            results = t.transform(results)
        seg = torch.from_numpy(results["gt_seg_map"][None].astype(np.int64))
        sample = SegDataSample(gt_sem_seg=PixelData(data=seg))
        out = pre({"inputs": [torch.from_numpy(results["img"].transpose(2, 0, 1).copy())], "data_samples": [sample]},
                  training=True)
        ref_img = out["inputs"][0].numpy()
        ref_lab = out["data_samples"][0].gt_sem_seg.data[0].numpy()
        assert np.array_equal(ours_lab, ref_lab), seed
        assert np.abs(ours_img - ref_img).max() < 1e-5, seed
