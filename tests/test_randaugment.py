"""RandAugment with timm's semantics (``rand-m9-mstd0.5-inc1``), checked against MindCV's port of timm.

timm itself cannot be installed here, so the reference is MindCV 0.3.0's ``rand_augment_transform``
(its parsing, ``AugmentOp`` and ``RandAugment`` classes: timm's control flow, the same ``random`` /
``np.random`` draws in the same order) with its op table swapped for timm's: PIL ops called as
timm calls them, timm's level maps where MindCV changed them (solarize over 256, SolarizeAdd,
TranslateXRel/YRel) and timm's 15-op increasing list. MindCV's own ops are MindSpore ops whose
arguments mean something else; ``test_mindcv_ops_deviate_from_timm`` pins what differs.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from mindcv_poolformer.transforms import (
    RAND_INCREASING_TRANSFORMS,
    RAND_TRANSFORMS,
    RandAugment,
    create_transforms,
)

from conftest import require

FILL = (124, 116, 104)  # timm's img_mean hparam for the ImageNet mean
SPEC = "rand-m9-mstd0.5-inc1"


# ---------------------------------------------------------------------------------------------- timm's ops


def _geometric(fn: Callable) -> Callable:
    """timm's ``_check_args_tf``: the resample filter is drawn (``random.choice``) after the level args."""

    def op(img: Image.Image, *args, fill_value=None, resample=None):
        kwargs = {"resample": resample}
        _mindcv_aa()._check_args_tf(kwargs)
        return fn(img, *args, resample=kwargs["resample"], fillcolor=fill_value)

    return op


def _posterize(img: Image.Image, bits: int, **_) -> Image.Image:
    if bits >= 8:
        return img
    return img.point(lambda i: i & (~(2 ** (8 - bits) - 1) & 0xFF))  # timm's ImageOps.posterize of PIL < 10


def _solarize_add(img: Image.Image, add: int, thresh: int = 128, **_) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * 3)


TIMM_OPS: dict[str, Callable] = {
    "AutoContrast": lambda img, **_: ImageOps.autocontrast(img),
    "Equalize": lambda img, **_: ImageOps.equalize(img),
    "Invert": lambda img, **_: ImageOps.invert(img),
    "Rotate": _geometric(lambda img, deg, **kw: img.rotate(deg, **kw)),
    "Posterize": _posterize,
    "PosterizeIncreasing": _posterize,
    "Solarize": lambda img, thresh, **_: ImageOps.solarize(img, thresh),
    "SolarizeIncreasing": lambda img, thresh, **_: ImageOps.solarize(img, thresh),
    "SolarizeAdd": _solarize_add,
    **{f"{n}{s}": (lambda cls: lambda img, f, **_: cls(img).enhance(f))(getattr(ImageEnhance, n))
       for n in ("Color", "Contrast", "Brightness", "Sharpness") for s in ("", "Increasing")},
    "ShearX": _geometric(lambda img, f, **kw: img.transform(img.size, Image.AFFINE, (1, f, 0, 0, 1, 0), **kw)),
    "ShearY": _geometric(lambda img, f, **kw: img.transform(img.size, Image.AFFINE, (1, 0, 0, f, 1, 0), **kw)),
    "TranslateXRel": _geometric(lambda img, pct, **kw: img.transform(
        img.size, Image.AFFINE, (1, 0, pct * img.size[0], 0, 1, 0), **kw)),
    "TranslateYRel": _geometric(lambda img, pct, **kw: img.transform(
        img.size, Image.AFFINE, (1, 0, 0, 0, 1, pct * img.size[1]), **kw)),
}
TIMM_INCREASING = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                   "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                   "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]


def _mindcv_aa():
    return require("mindcv.data.auto_augment")


@contextmanager
def timm_op_table() -> Iterator:
    """MindCV's auto_augment module with timm's op table and level maps where MindCV's differ."""
    aa = _mindcv_aa()
    saved = dict(aa.NAME_TO_OP), dict(aa.LEVEL_TO_ARG), list(aa._RAND_INCREASING_TRANSFORMS)
    aa.NAME_TO_OP.update(TIMM_OPS)
    aa.LEVEL_TO_ARG.update({
        "Solarize": lambda level, _h: (int(level / 10 * 256),),
        "SolarizeIncreasing": lambda level, _h: (256 - int(level / 10 * 256),),
        "SolarizeAdd": lambda level, _h: (int(level / 10 * 110),),
        "TranslateXRel": aa._translate_level_to_arg, "TranslateYRel": aa._translate_level_to_arg,
    })
    aa._RAND_INCREASING_TRANSFORMS[:] = TIMM_INCREASING
    try:
        yield aa
    finally:
        aa.NAME_TO_OP.clear()
        aa.NAME_TO_OP.update(saved[0])
        aa.LEVEL_TO_ARG.clear()
        aa.LEVEL_TO_ARG.update(saved[1])
        aa._RAND_INCREASING_TRANSFORMS[:] = saved[2]


def reference(resample) -> Callable:
    """timm's ``rand_augment_transform('rand-m9-mstd0.5-inc1', hparams)`` via MindCV's classes."""
    with timm_op_table() as aa:
        return aa.rand_augment_transform("randaug-m9-mstd0.5-inc1", {"img_mean": FILL, "interpolation": resample})


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """224x224 crops of real photos (scikit-image and scikit-learn sample images)."""
    data = require("skimage.data")
    from sklearn.datasets import load_sample_images

    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.hubble_deep_field(),
               data.immunohistochemistry(), *load_sample_images().images]
    out = []
    for k, src in enumerate(sources):
        img = Image.fromarray(src).convert("RGB")
        w, h = img.size
        side = min(w, h) * (0.6 + 0.1 * (k % 4))
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        out.append(np.asarray(img.resize((224, 224), Image.BICUBIC, box=box)))
    return out


def mismatched_seeds(ours: RandAugment, ref: Callable, photos: list[np.ndarray], seeds: range) -> list[int]:
    """Seeds whose output image differs: both sides draw from ``random`` and ``np.random`` seeded alike."""
    bad = []
    for seed in seeds:
        img = photos[seed % len(photos)]
        random.seed(seed)
        np.random.seed(seed)
        expected = np.asarray(ref(Image.fromarray(img)))
        random.seed(seed)
        np.random.seed(seed)
        if not np.array_equal(np.asarray(ours(img)), expected):
            bad.append(seed)
    return bad


def draw_statistics(ra: RandAugment, n: int, seed: int = 0) -> dict:
    rng, np_rng = random.Random(seed), np.random.RandomState(seed)
    draws = [d for _ in range(n) for d in ra.sample(rng, np_rng)]
    fired = [d for d in draws if d.applied]
    magnitudes = np.array([d.magnitude for d in fired])
    signed = [d for d in fired if d.name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")]
    return {"layers": len(draws), "chosen": Counter(d.name for d in draws), "fired": len(fired) / len(draws),
            "mean": magnitudes.mean(), "std": magnitudes.std(), "max": magnitudes.max(),
            "at_cap": float((magnitudes == 10).mean()), "negative": np.mean([d.args[0] < 0 for d in signed]),
            "resample": Counter(d.resample for d in signed)}


def timm_statistics_hold(stats: dict, names: tuple[str, ...] = RAND_INCREASING_TRANSFORMS) -> bool:
    """The recipe's distribution: 15 ops at 1/15 each, p = 0.5, magnitude N(9, 0.5) clipped to [0, 10]."""
    n = stats["layers"]
    share = 1 / len(RAND_INCREASING_TRANSFORMS)
    sigma = np.sqrt(n * share * (1 - share))
    return (set(stats["chosen"]) == set(names) == set(RAND_INCREASING_TRANSFORMS)
            and all(abs(c - n * share) < 4.5 * sigma for c in stats["chosen"].values())
            and abs(stats["fired"] - 0.5) < 4.5 * np.sqrt(0.25 / n)
            # E[min(N(9, .5), 10)] = 8.9958, its std 0.4880; 2.28% of draws clip at 10
            and abs(stats["mean"] - 8.9958) < 0.015 and abs(stats["std"] - 0.488) < 0.015 and stats["max"] <= 10
            and abs(stats["at_cap"] - 0.0228) < 0.006 and abs(stats["negative"] - 0.5) < 0.03)


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("interpolation", ["random", "bicubic"])
def test_same_images_as_timm_reference(photos, interpolation):
    """300 seeded draws on real photos: pixel-identical to the reference, with every op fired along the way."""
    resample = (Image.BILINEAR, Image.BICUBIC) if interpolation == "random" else Image.BICUBIC
    ours = create_transforms(True, 224, auto_augment=SPEC, interpolation=interpolation)
    (ra,) = [op for op in ours if isinstance(op, RandAugment)]
    assert mismatched_seeds(ra, reference(resample), photos, range(300)) == []
    fired = Counter()
    for seed in range(300):
        random.seed(seed)
        np.random.seed(seed)
        fired.update(d.name for d in ra.sample() if d.applied)
    assert set(fired) == set(RAND_INCREASING_TRANSFORMS) and min(fired.values()) >= 8


def test_generators_draw_like_the_global_modules(photos):
    """``sample(rng, np_rng)`` with per-call generators gives the draws the seeded global modules give."""
    ra = RandAugment(9, 2, 0.5, increasing=True, fill=FILL)
    for seed in range(50):
        random.seed(seed)
        np.random.seed(seed)
        assert ra.sample() == ra.sample(random.Random(seed), np.random.RandomState(seed))


def test_draw_statistics_are_timms():
    ours = draw_statistics(RandAugment(9, 2, 0.5, increasing=True, fill=FILL), 10_000)
    assert timm_statistics_hold(ours), ours
    assert abs(ours["resample"][Image.BILINEAR] / sum(ours["resample"].values()) - 0.5) < 0.03


def test_reference_draw_statistics_match(photos):
    """MindCV's control flow with timm's table draws the same ops as ours for the same seeds (1,000 images)."""
    ref = reference((Image.BILINEAR, Image.BICUBIC))
    ours = RandAugment(9, 2, 0.5, increasing=True, fill=FILL)
    for seed in range(1000):
        np.random.seed(seed)
        expected = [ref.ops[i].name for i in np.random.randint(0, len(ref.ops), size=2)]
        assert [d.name for d in ours.sample(random.Random(seed), np.random.RandomState(seed))] == expected


@pytest.mark.parametrize("broken", [
    {"prob": 1.0},  # every chosen op applied (MindSpore's vision.RandAugment)
    {"magnitude_std": 0.0},  # no magnitude noise
    {"transforms": RAND_INCREASING_TRANSFORMS[:6] + RAND_INCREASING_TRANSFORMS[7:]},  # no SolarizeAdd (MindCV)
    {"interpolation": "bilinear"},  # one filter where timm draws bilinear or bicubic
])
def test_a_broken_semantic_is_caught(photos, broken):
    """The checks above have teeth: each deviation fails the image comparison, the statistics, or both."""
    kwargs = {"magnitude": 9, "num_layers": 2, "magnitude_std": 0.5, "increasing": True, "fill": FILL,
              "interpolation": "random"}
    kwargs.update(broken)
    ra = RandAugment(**kwargs)
    images_differ = mismatched_seeds(ra, reference((Image.BILINEAR, Image.BICUBIC)), photos, range(100))
    stats = draw_statistics(ra, 10_000)
    assert images_differ or not timm_statistics_hold(stats, ra.names)


def test_recipe_wiring_and_other_policies(photos):
    """``auto_augment`` picks ours for rand/randaug, keeps MindSpore's AutoAugment / TrivialAugmentWide."""
    import mindspore.dataset as ds
    from mindspore.dataset import vision

    for spec in (SPEC, "randaug-m9-mstd0.5-inc1"):
        (ra,) = [op for op in create_transforms(True, 224, auto_augment=spec, interpolation="bicubic")
                 if isinstance(op, RandAugment)]
        assert (ra.names, ra.magnitude, ra.magnitude_std, ra.num_layers, ra.prob, ra.fill, ra.resample) == (
            RAND_INCREASING_TRANSFORMS, 9.0, 0.5, 2, 0.5, FILL, (Image.BICUBIC,))
    plain = [op for op in create_transforms(True, 224, auto_augment="rand-m7-n3") if isinstance(op, RandAugment)]
    assert plain[0].names == RAND_TRANSFORMS and plain[0].num_layers == 3 and plain[0].magnitude_std == 0
    assert RandAugment(9, magnitude_std=101).magnitude_std == float("inf")  # timm: mstd > 100 samples uniformly
    assert any(isinstance(op, vision.AutoAugment) for op in create_transforms(True, 224, auto_augment="autoaug"))
    assert any(isinstance(op, vision.TrivialAugmentWide)
               for op in create_transforms(True, 224, auto_augment="trivialaugwide"))
    ra = RandAugment(9, 2, 0.5, increasing=True, fill=FILL)
    dataset = ds.NumpySlicesDataset({"image": np.stack(photos[:4])}, shuffle=False).map(ra, "image")
    out = [row[0] for row in dataset.create_tuple_iterator(output_numpy=True)]
    assert all(o.shape == (224, 224, 3) and o.dtype == np.uint8 for o in out)


def test_mindcv_ops_deviate_from_timm(photos):
    """Why MindCV's port is not the recipe's RandAugment (each line a measured difference)."""
    aa = _mindcv_aa()
    img = photos[0]
    ops = aa.rand_augment_transform("randaug-m9-mstd0.5-inc1", {"img_mean": FILL}).ops
    names = [op.name for op in ops]
    assert len(names) == 14 and "SolarizeAdd" not in names and "TranslateXRel" not in names
    # m9 PosterizeIncreasing keeps 4 - int(3.6) = 1 bit in timm; MindCV keeps max(8 - 1, 1) = 7
    assert len(np.unique(np.asarray(aa.posterize(img, 1)))) > 64
    assert len(np.unique(np.asarray(TIMM_OPS["Posterize"](Image.fromarray(img), 1)))) == 2
    # MindSpore's Equalize is another histogram equalisation (PIL's Invert, AutoContrast, Solarize agree)
    assert np.abs(np.asarray(aa.equalize(img)).astype(int) - np.asarray(ImageOps.equalize(Image.fromarray(img)))
                  ).mean() > 5
    assert np.array_equal(aa.solarize(img, 26), np.asarray(ImageOps.solarize(Image.fromarray(img), 26)))
    # shear 0.27 is a factor (15 degrees) in timm, 0.27 degrees in MindSpore's RandomAffine
    mindcv_shear = np.asarray(aa.shear_x(img, 0.27, fill_value=FILL, resample=aa.Inter.BICUBIC)).astype(int)
    timm_shear = np.asarray(TIMM_OPS["ShearX"](Image.fromarray(img), 0.27, fill_value=FILL,
                                               resample=Image.BICUBIC)).astype(int)
    assert np.abs(mindcv_shear - img).mean() < 0.25 * np.abs(timm_shear - img).mean()
    # the magnitude noise of the string is ignored: hparams.setdefault(0.5) runs before the parse
    assert {op.magnitude_std for op in aa.rand_augment_transform("randaug-m9-mstd0-inc1", {}).ops} == {0.5}
