"""The texture_mosaics demo set: layout, classes, regions, a train/val split by photo halves, never overwritten."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mindcv_poolformer.config import ConfigError
from mindcv_poolformer.data import texture_mosaics as tm
from mindcv_poolformer.data.ade20k import list_ade20k, load_sample

from conftest import require


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory):
    require("skimage")
    root = tmp_path_factory.mktemp("tex") / "mosaics"
    return tm.ensure_texture_mosaics(root, size=64, num_train=16, num_val=8, seed=0)


def _photos() -> dict[str, np.ndarray]:
    """The 8 photos straight from scikit-image (independent of the generator's loader)."""
    skdata = require("skimage.data")
    out = {}
    for name in tm.SOURCES:
        photo = np.asarray(getattr(skdata, name)())
        out[name] = np.stack([photo] * 3, axis=-1) if photo.ndim == 2 else photo
    return out


def test_layout_classes_and_regions(mosaics):
    from PIL import Image

    assert sorted(p.name for p in mosaics.iterdir()) == ["annotations", "images", "mosaics.json"]
    seen = set()
    for split, count in (("training", 16), ("validation", 8)):
        listing = list_ade20k(str(mosaics), split)
        assert len(listing.images) == count and not listing.skipped
        for image_path, label_path in zip(listing.images, listing.labels):
            with Image.open(label_path) as img:
                assert img.mode == "L" and img.size == (64, 64)
            raw = np.asarray(Image.open(label_path))
            values = set(np.unique(raw).tolist())
            assert values <= set(range(1, 9)) and 3 <= len(values) <= 6, label_path
            sample = load_sample(image_path, label_path, num_classes=8)  # reduce_zero_label: 8 classes 0..7
            assert sample.image.shape == (64, 64, 3) and set(np.unique(sample.label)) <= set(range(8))
            seen |= values
    assert seen == set(range(1, 9))


def test_split_is_top_half_versus_bottom_half(mosaics):
    """Every region's pixels are its source photo's at the recorded crop, inside the split's half of that photo."""
    from PIL import Image

    photos = _photos()
    crops = json.loads((mosaics / "mosaics.json").read_text())["crops"]
    rows_used = {split: {name: set() for name in tm.SOURCES} for split in tm.SPLITS}
    for split in tm.SPLITS:
        for stem, regions in crops[split].items():
            image = np.asarray(Image.open(mosaics / "images" / split / f"{stem}.png"))
            label = np.asarray(Image.open(mosaics / "annotations" / split / f"{stem}.png"))
            assert sorted(r["label"] for r in regions) == sorted(np.unique(label).tolist())
            for r in regions:
                photo = photos[r["source"]]
                assert tm.SOURCES.index(r["source"]) + 1 == r["label"]
                window = photo[r["y0"]:r["y0"] + 64, r["x0"]:r["x0"] + 64]
                mask = label == r["label"]
                assert window.shape[:2] == (64, 64) and np.array_equal(image[mask], window[mask]), (stem, r)
                rows_used[split][r["source"]].update(range(r["y0"], r["y0"] + 64))
    for name, photo in photos.items():
        train, val = rows_used["training"][name], rows_used["validation"][name]
        assert not train & val, name
        middle = photo.shape[0] // 2
        assert all(y < middle for y in train) and all(y >= middle for y in val), name


def test_fixed_seed_and_no_overwrite(mosaics, tmp_path):
    again = tm.ensure_texture_mosaics(tmp_path / "again", size=64, num_train=16, num_val=8, seed=0)
    for split in tm.SPLITS:
        for part in ("images", "annotations"):
            for path in sorted((mosaics / part / split).iterdir()):
                assert path.read_bytes() == (again / part / split / path.name).read_bytes()
    stamp = {p: p.stat().st_mtime_ns for p in mosaics.rglob("*")}
    assert tm.ensure_texture_mosaics(mosaics, size=32, num_train=3, num_val=3, seed=1) == mosaics
    assert {p: p.stat().st_mtime_ns for p in mosaics.rglob("*")} == stamp
    # an ADE20K-layout folder of another dataset is used as it is
    other = tmp_path / "ade"
    for part in ("images", "annotations"):
        for split in tm.SPLITS:
            (other / part / split).mkdir(parents=True)
    assert tm.ensure_texture_mosaics(other) == other
    assert not any((other / "images" / "training").iterdir()) and not (other / "mosaics.json").exists()


def test_half_written_folder_is_a_one_line_error(tmp_path):
    half = tmp_path / "half"
    (half / "images" / "training").mkdir(parents=True)
    (half / "annotations" / "training").mkdir(parents=True)
    with pytest.raises(ConfigError) as err:
        tm.ensure_texture_mosaics(half)
    message = str(err.value)
    assert "\n" not in message and "half-written" in message and "images/validation" in message
    assert not any((half / "images" / "training").iterdir())  # nothing written into it
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        tm.ensure_texture_mosaics(tmp_path / "file")


def test_killed_generation_leaves_no_dataset(tmp_path, monkeypatch):
    require("skimage")
    real = tm.make_mosaic
    made = []

    def dies(*args, **kwargs):
        if len(made) == 5:
            raise KeyboardInterrupt  # as a kill in the middle of writing
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tm, "make_mosaic", dies)
    target = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        tm.ensure_texture_mosaics(target, num_train=8, num_val=2)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(tm, "make_mosaic", real)
    target.mkdir()  # an empty folder is filled
    tm.ensure_texture_mosaics(target, num_train=8, num_val=2)
    assert len(list_ade20k(str(target), "validation").images) == 2
