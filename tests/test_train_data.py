"""Training pipeline: digits materialisation, shapes and soft labels, per-rank seeds, reproducible epochs."""

from __future__ import annotations

import numpy as np
import pytest
from train_helpers import make_tiny_folder

from mindcv_poolformer.config import load_config
from mindcv_poolformer.train.data import (
    SoftTargetMixer,
    TrainDataSettings,
    augmentation_seed,
    build_train_dataset,
    epoch_order,
    materialize_digits,
    shard_indices,
)
from mindcv_poolformer.transforms import Preprocess


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("tiny"), per_class_train=4, per_class_val=1)


def _cfg(folder, **kw):
    base = {"data_dir": str(folder), "image_resize": 32, "crop_pct": 1.0, "batch_size": 8, "num_parallel_workers": 1,
            "num_classes": 10, "scale": [0.3, 1.0], "hflip": 0.5, "label_smoothing": 0.1}
    base.update(kw)
    return load_config(overrides=base)


def _batches(cfg, epoch, rank=0, world=1):
    data = build_train_dataset(TrainDataSettings.from_config(cfg), epoch, rank, world)
    return [(img.copy(), lab.copy()) for img, lab in data.dataset.create_tuple_iterator(output_numpy=True,
                                                                                         num_epochs=1)]


def test_digits_materialised_as_imagefolder(tmp_path):
    root = materialize_digits(tmp_path / "digits")
    train = sorted((root / "train").glob("*/*.png"))
    val = sorted((root / "val").glob("*/*.png"))
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert sorted(p.name for p in (root / "val").iterdir()) == [str(i) for i in range(10)]
    per_class = [len(list((root / "val" / str(c)).iterdir())) for c in range(10)]
    assert min(per_class) >= 35 and max(per_class) <= 37  # stratified
    from PIL import Image

    with Image.open(train[0]) as img:
        assert img.size == (32, 32) and img.mode == "RGB"
    before = train[0].stat().st_mtime_ns
    materialize_digits(tmp_path / "digits")  # present: nothing rewritten
    assert train[0].stat().st_mtime_ns == before


def test_shapes_and_soft_labels(folder):
    batches = _batches(_cfg(folder, mixup=0.8, cutmix=1.0), epoch=0)
    assert len(batches) == 5
    images, targets = batches[0]
    assert images.shape == (8, 3, 32, 32) and images.dtype == np.float32
    assert targets.shape == (8, 10) and targets.dtype == np.float32
    assert np.allclose(targets.sum(axis=1), 1.0, atol=1e-5) and targets.min() >= 0.01 - 1e-6
    plain = _batches(_cfg(folder), epoch=0)[0][1]
    assert np.allclose(np.sort(plain, axis=1)[:, -1], 0.91) and np.allclose(np.sort(plain, axis=1)[:, 0], 0.01)


def test_mixer_mixes_pairs():
    mixer = SoftTargetMixer(4, smoothing=0.0, mixup=1.0, cutmix=0.0, prob=1.0, seed=0)
    images = np.stack([np.full((3, 4, 4), v, np.float32) for v in range(4)])
    out, targets = mixer(images, np.array([0, 1, 2, 3]))
    lam = targets[0, 0]
    assert np.allclose(out[0], lam * 0 + (1 - lam) * 3) and np.allclose(targets[0], [lam, 0, 0, 1 - lam])
    cut = SoftTargetMixer(4, cutmix=1.0, prob=1.0, seed=1)
    out, targets = cut(images, np.array([0, 1, 2, 3]))
    frac_own = float((out[0] == 0).mean())
    assert np.isclose(targets[0, 0], frac_own)


def test_ranks_draw_different_augmentations(folder):
    cfg = _cfg(folder, shuffle=False)
    assert len({augmentation_seed(42, r, 0) for r in range(8)}) == 8
    rank0 = _batches(cfg, 0, rank=0, world=1)[0][0]
    again = _batches(cfg, 0, rank=0, world=1)[0][0]
    assert np.array_equal(rank0, again)  # same (seed, rank, epoch): identical
    # the same images seen with rank 1's seed: other crops/flips
    from mindcv_poolformer.train import data as data_mod

    original = data_mod.augmentation_seed
    try:
        data_mod.augmentation_seed = lambda seed, rank, epoch: original(seed, 1, epoch)
        other = _batches(cfg, 0, rank=0, world=1)[0][0]
    finally:
        data_mod.augmentation_seed = original
    assert not np.array_equal(rank0, other)
    assert not np.array_equal(rank0, _batches(cfg, 1, rank=0, world=1)[0][0])  # and per epoch


def test_epoch_reproducible_with_parallel_workers(folder):
    cfg = _cfg(folder, num_parallel_workers=2, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, mixup=0.8,
               cutmix=1.0)
    first, second = _batches(cfg, 3), _batches(cfg, 3)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(first, second))


def test_epoch_order_and_shards():
    order = epoch_order(100, 42, 3)
    assert np.array_equal(order, epoch_order(100, 42, 3)) and not np.array_equal(order, epoch_order(100, 42, 4))
    shards = [shard_indices(order, r, 3) for r in range(3)]
    assert all(len(s) == 33 for s in shards)
    assert len(set(np.concatenate(shards).tolist())) == 99


def test_digits_without_scikit_learn_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    from mindcv_poolformer.train.data import DataError, materialize_digits

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match=r"needs scikit-learn, which is not installed \(pip install scikit-learn\)"):
        materialize_digits(tmp_path / "digits")
    assert not (tmp_path / "digits" / "train").exists()


def test_split_folders_are_listed_once_per_run(folder, monkeypatch):
    """prepare_data_dir lists train and val once; every epoch's shard and the val set come from that listing."""
    import mindcv_poolformer.train.data as train_data
    from mindcv_poolformer.train.data import build_val_dataset, prepare_data_dir

    calls = []
    original = train_data.list_image_folder
    monkeypatch.setattr(train_data, "list_image_folder", lambda root, split="", *a, **k: calls.append(split)
                        or original(root, split, *a, **k))
    cfg = _cfg(folder, val_while_train=True)
    listing = prepare_data_dir(cfg["data_dir"], cfg["train_split"], cfg["val_split"])
    assert calls == ["train", "val"]
    for epoch in range(3):
        for rank in range(2):
            build_train_dataset(TrainDataSettings.from_config(cfg), epoch, rank, 2, listing=listing)
    build_val_dataset(listing.val, Preprocess.from_config(cfg), 8, 0, 2)
    assert calls == ["train", "val"]


def test_val_set_from_the_listing_is_create_eval_datasets(folder):
    from mindcv_poolformer.evaluation.classification import create_eval_dataset
    from mindcv_poolformer.train.data import build_val_dataset, prepare_data_dir

    cfg = _cfg(folder, val_while_train=True, batch_size=3)
    listing = prepare_data_dir(cfg["data_dir"], cfg["train_split"], cfg["val_split"])
    preprocess = Preprocess(32, 1.0, cfg["interpolation"], cfg["mean"], cfg["std"])
    for rank, world in ((0, 1), (1, 3)):
        ours = build_val_dataset(listing.val, preprocess, 3, rank, world)
        ref, _, _ = create_eval_dataset(str(folder), "val", 3, preprocess, 1, rank, world,
                                        class_names=listing.train.classes)
        a = list(ours.create_tuple_iterator(output_numpy=True, num_epochs=1))
        b = list(ref.create_tuple_iterator(output_numpy=True, num_epochs=1))
        assert len(a) == len(b) > 0 and all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])
                                            for x, y in zip(a, b))


def test_fused_decode_path_when_augmenting_in_all_workers(folder):
    """deterministic_augment False: RandomCropDecodeResize in every worker; same shapes and soft targets."""
    cfg = _cfg(folder, num_parallel_workers=2, deterministic_augment=False, auto_augment="rand-m9-mstd0.5-inc1",
               re_prob=0.25, mixup=0.8, cutmix=1.0, interpolation="random")
    batches = _batches(cfg, 0)
    assert len(batches) == 5 and {b[0].shape for b in batches} == {(8, 3, 32, 32)}
    assert all(np.allclose(t.sum(axis=1), 1.0, atol=1e-5) for _, t in batches)


@pytest.fixture(scope="module")
def folder48(tmp_path_factory):
    """48x48 images, so a 32-pixel crop resamples and bilinear differs from bicubic."""
    return make_tiny_folder(tmp_path_factory.mktemp("tiny48"), per_class_train=3, per_class_val=1, size=48)


def _normalised(rgb: np.ndarray, cfg) -> np.ndarray:
    mean, std = np.array(cfg["mean"], np.float32), np.array(cfg["std"], np.float32)
    return ((rgb.astype(np.float32) - mean) / std).transpose(2, 0, 1)


def _train_references(cfg, files) -> dict[str, np.ndarray]:
    """Each file's whole-image crop resized to 32 by MindSpore's own C++ resize, bilinear and bicubic."""
    from mindspore.dataset import vision

    out = {}
    for name, inter in (("bilinear", vision.Inter.BILINEAR), ("bicubic", vision.Inter.BICUBIC)):
        out[name] = np.stack([_normalised(vision.Resize((32, 32), inter)(vision.Decode()(np.fromfile(f, np.uint8))),
                                          cfg) for f in files])
    return out


def _interpolations_used(cfg, refs) -> list[str]:
    """Which interpolation made each training image (the epoch is unshuffled: row i is file i)."""
    images = np.concatenate([img for img, _ in _batches(cfg, 0)])
    used = []
    for i, img in enumerate(images):
        hits = [name for name, ref in refs.items() if np.allclose(img, ref[i], atol=1e-4)]
        assert len(hits) == 1, (i, hits)
        used.append(hits[0])
    return used


def test_train_interpolation_random_draws_both_per_image_per_seed(folder48):
    """random: bilinear or bicubic per image (timm's RandomResizedCropAndInterpolation), the same draws for
    the same seed, other draws for another; a fixed train_interpolation is used for every image whatever
    interpolation (eval's) says; unset, training follows interpolation."""
    from mindcv_poolformer.data.listing import list_image_folder

    files = list_image_folder(str(folder48), "train").files
    # the whole image, no flip, no mixing: the interpolation is the only random choice
    base = {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip": 0.0, "shuffle": False, "label_smoothing": 0.0,
            "batch_size": 6}
    refs = _train_references(_cfg(folder48, **base), files)
    assert not np.allclose(refs["bilinear"], refs["bicubic"], atol=1e-4)
    seed0 = _interpolations_used(_cfg(folder48, train_interpolation="random", interpolation="bilinear", **base), refs)
    assert 5 <= seed0.count("bicubic") <= len(files) - 5, seed0
    assert _interpolations_used(_cfg(folder48, train_interpolation="random", **base), refs) == seed0
    assert _interpolations_used(_cfg(folder48, train_interpolation="random", seed=7, **base), refs) != seed0
    assert set(_interpolations_used(_cfg(folder48, train_interpolation="bicubic", interpolation="bilinear", **base),
                                    refs)) == {"bicubic"}
    assert set(_interpolations_used(_cfg(folder48, interpolation="bilinear", **base), refs)) == {"bilinear"}


def test_train_interpolation_reaches_randaugment():
    """RandAugment's rotate/shear/translate resample as timm's: both filters at random, else the one given."""
    from PIL import Image

    from mindcv_poolformer.train import data as train_data
    from mindcv_poolformer.transforms import RandAugment

    def resample(**kw) -> tuple:
        cfg = load_config(overrides={"auto_augment": "rand-m9-mstd0.5-inc1", "interpolation": "bicubic", **kw})
        (op,) = [t for t in train_data._train_transforms(TrainDataSettings.from_config(cfg))
                 if isinstance(t, RandAugment)]
        return op.resample

    assert resample(train_interpolation="random") == (Image.BILINEAR, Image.BICUBIC)
    assert resample(train_interpolation="bilinear") == (Image.BILINEAR,)
    assert resample() == (Image.BICUBIC,)


def test_interpolation_still_controls_eval(folder48):
    """The validation set resizes with interpolation (PIL, as timm's eval), never with train_interpolation."""
    from PIL import Image

    from mindcv_poolformer.train.data import build_val_dataset, prepare_data_dir

    def val_images(**kw) -> np.ndarray:
        cfg = _cfg(folder48, val_while_train=True, batch_size=4, **kw)
        listing = prepare_data_dir(cfg["data_dir"], cfg["train_split"], cfg["val_split"])
        data = build_val_dataset(listing.val, Preprocess.from_config(cfg), cfg["batch_size"])
        return np.concatenate([b[0] for b in data.create_tuple_iterator(
            output_numpy=True, num_epochs=1)]), listing.val.files, cfg

    images, files, cfg = val_images(interpolation="bicubic", train_interpolation="bilinear")
    # crop_pct 1: the short side resized to 32, the whole 32x32 kept
    ref = {name: np.stack([_normalised(np.asarray(Image.open(f).convert("RGB").resize((32, 32), flt)), cfg)
                           for f in files]) for name, flt in (("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR))}
    assert np.allclose(images, ref["bicubic"], atol=1e-4) and not np.allclose(images, ref["bilinear"], atol=1e-4)
    assert np.allclose(val_images(interpolation="bilinear", train_interpolation="bicubic")[0], ref["bilinear"],
                       atol=1e-4)
