"""The training input pipeline: C++ decoding behind the corrupt-file guard, and per-batch mixing.

MindSpore 2.10's C++ JPEG decoder kills the process on some damaged headers (a DHT count of 0xff:
SIGSEGV; an SOS table selector of 0xff: SIGBUS), where PIL raises. So every JPEG passes a check before the C++
decoder sees it (a marker scan for baseline JPEGs, else a 1/8-scale PIL decode; the scan must never
admit a file that decode refuses), and anything else is decoded by PIL and handed on losslessly.
"""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_helpers import REPO

from mindcv_poolformer import transforms
from mindcv_poolformer.train.data import SoftTargetMixer


def _jpeg(img: Image.Image, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90, **kwargs)
    return out.getvalue()


def _mutate(data: bytes, marker: bytes, offset: int, value: int) -> bytes:
    out = bytearray(data)
    out[data.find(marker) + offset] = value
    return bytes(out)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    from sklearn.datasets import load_sample_images

    return Image.fromarray(load_sample_images().images[0]).resize((160, 120), Image.BICUBIC)


@pytest.fixture(scope="module")
def damaged(photo) -> dict[str, bytes]:
    """Files PIL refuses; the first two crash MindSpore's C++ decoder (the process dies)."""
    good = _jpeg(photo)
    return {"dht_count.jpg": _mutate(good, b"\xff\xc4", 6, 0xFF), "sos_table.jpg": _mutate(good, b"\xff\xda", 6, 0xFF),
            "truncated.jpg": good[: len(good) // 2], "garbage.jpg": b"not a JPEG at all"}


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory, photo, damaged) -> Path:
    """10 classes x 4 photo JPEGs (RGB, grey, progressive, CMYK, PNG among them), plus the damaged files."""
    root = tmp_path_factory.mktemp("jpegs")
    for i in range(40):
        folder = root / "train" / str(i % 10)
        folder.mkdir(parents=True, exist_ok=True)
        crop = photo.rotate(9 * i).resize((96 + i, 72 + i))
        if i % 10 == 3:
            crop.save(folder / f"{i:03d}.png")
            continue
        kind = {1: crop.convert("L"), 2: crop.convert("CMYK")}.get(i % 10, crop)
        (folder / f"{i:03d}.jpg").write_bytes(_jpeg(kind, progressive=i % 10 == 4))
    for k, (name, data) in enumerate(damaged.items()):
        (root / "train" / str(k) / f"zz_{name}").write_bytes(data)
    return root


def test_only_checked_jpegs_go_to_the_cpp_decoder(photo, damaged):
    assert transforms._decodes_in_cpp(_jpeg(photo))
    assert transforms._decodes_in_cpp(_jpeg(photo.convert("L")))
    assert transforms._decodes_in_cpp(_jpeg(photo, progressive=True))
    assert not transforms._decodes_in_cpp(_jpeg(photo.convert("CMYK")))  # PIL converts CMYK as eval does
    png = io.BytesIO()
    photo.save(png, "PNG")
    assert not transforms._decodes_in_cpp(png.getvalue())
    for name, data in damaged.items():
        try:
            passed = transforms._decodes_in_cpp(data)
        except Exception:  # PIL raises OSError, SyntaxError, ... for broken files
            passed = False
        assert not passed, name


def _pil_check(data: bytes) -> bool:
    """The 1/8-scale PIL decode that guarded every file before the marker scan: the reference verdict."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return False
            img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
        return True
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        return False


def test_marker_scan_takes_baseline_jpegs_without_decoding(photo, damaged, monkeypatch):
    """Baseline JPEGs pass the cheap scan (no PIL decode); progressive, CMYK, PNG and damaged files do not."""
    baseline = [_jpeg(photo), _jpeg(photo.convert("L")), _jpeg(photo, subsampling=0), _jpeg(photo, subsampling=1),
                _jpeg(photo, optimize=True)]
    assert all(transforms._plain_baseline_jpeg(d) for d in baseline)
    png = io.BytesIO()
    photo.save(png, "PNG")
    others = [_jpeg(photo, progressive=True), _jpeg(photo.convert("CMYK")), png.getvalue(), *damaged.values()]
    assert not any(transforms._plain_baseline_jpeg(d) for d in others)

    def no_decode(*_args, **_kwargs):
        raise AssertionError("a baseline JPEG was decoded by PIL")

    monkeypatch.setattr(transforms.Image, "open", no_decode)
    assert all(transforms._decodes_in_cpp(d) for d in baseline)


def _header_fault(data: bytes, fault: str) -> bytes:
    """A baseline JPEG with one header field broken the way ``fault`` names (each a libjpeg error)."""
    out = bytearray(data)
    dht, dqt, sof = data.find(b"\xff\xc4") + 4, data.find(b"\xff\xdb") + 4, data.find(b"\xff\xc0") + 4
    if fault == "huffman code overfull":  # 3 codes of length 1, the table's symbol count unchanged
        counts = out[dht + 1:dht + 17]
        k = max(i for i, c in enumerate(counts) if c >= 3)
        out[dht + 1], out[dht + 1 + k] = counts[0] + 3, counts[k] - 3
    elif fault == "more than 256 symbols":  # an extra, unused AC table 3: 45 + 255 codes of lengths 15, 16
        counts = bytes(14) + bytes([45, 255])
        out[dht - 4:dht - 4] = b"\xff\xc4" + (2 + 17 + 300).to_bytes(2, "big") + bytes([0x13]) + counts + bytes(300)
    elif fault == "quantisation precision":
        out[dqt] = 0x20 | (out[dqt] & 15)
    elif fault == "empty image":
        out[sof + 1:sof + 3] = b"\x00\x00"
    return bytes(out)


@pytest.mark.parametrize("fault", ["huffman code overfull", "more than 256 symbols", "quantisation precision",
                                   "empty image"])
def test_marker_scan_refuses_each_header_fault(photo, fault):
    """Each fault libjpeg raises on: the PIL decode refuses the file, and so does the scan."""
    data = _header_fault(_jpeg(photo), fault)
    assert not _pil_check(data)
    assert not transforms._plain_baseline_jpeg(data)


def test_marker_scan_admits_only_what_the_decode_passes(photo):
    """Fuzz: a damaged file the scan admits is one the 1/8-scale PIL decode also passes (never the reverse)."""
    import random

    bases = [_jpeg(photo.resize((64, 48))), _jpeg(photo.resize((48, 64)).convert("L")),
             _jpeg(photo.resize((64, 48)), subsampling=0)]
    rng = random.Random(0)
    admitted = passed = 0
    for _ in range(1500):
        data = bytearray(rng.choice(bases))
        scan = data.find(b"\xff\xda") + 14
        for _ in range(rng.choice((1, 1, 2))):
            i = rng.randrange(scan) if rng.random() < 0.7 else rng.randrange(len(data))
            kind = rng.random()
            if kind < 0.7:
                data[i] = rng.choice((rng.randrange(256), 0xFF, 0x00))
            elif kind < 0.85:
                del data[i]
            else:
                data.insert(i, rng.randrange(256))
        if rng.random() < 0.1:
            data = data[:rng.randrange(len(data))]
        data = bytes(data)
        fast, reference = transforms._plain_baseline_jpeg(data), _pil_check(data)
        assert reference or not fast, data.hex()
        admitted += fast
        passed += reference
    assert 0.6 * passed < admitted <= passed  # the scan takes most decodable files, so the test has teeth


def test_pil_fallback_reaches_cpp_exactly(jpeg_folder):
    """PNG and CMYK files go on as PPM: C++ Decode gives back exactly the pixels PIL decoded."""
    import mindspore.dataset as ds
    from mindspore.dataset import vision

    files = sorted(str(p) for p in (jpeg_folder / "train").rglob("*") if p.suffix in (".png", ".jpg")
                   and not p.name.startswith("zz_") and p.name[:3] in ("003", "002", "013", "012"))
    reader = transforms.ImageReader(files, [0] * len(files), encoded=True)
    encoded = [reader(i)[0] for i in range(len(files))]
    assert all(e[:2].tobytes() == b"P6" for e in encoded)
    dataset = ds.NumpySlicesDataset({"image": np.arange(len(files))}, shuffle=False).map(
        lambda r: encoded[int(r)], "image").map(vision.Decode(), "image")
    for path, (image,) in zip(files, dataset.create_tuple_iterator(output_numpy=True, num_epochs=1)):
        assert np.array_equal(image, transforms.read_rgb(path))


def test_each_jpeg_is_checked_once_per_process(jpeg_folder, monkeypatch):
    files = sorted(str(p) for p in (jpeg_folder / "train").rglob("*.jpg") if not p.name.startswith("zz_"))
    calls = []
    original = transforms._decodes_in_cpp
    monkeypatch.setattr(transforms, "_decodes_in_cpp", lambda data: calls.append(1) or original(data))
    verified = bytearray(100)
    index = np.arange(len(files)) * 2  # the rows' places in the whole training listing
    for _epoch in range(3):
        reader = transforms.ImageReader(files, [0] * len(files), encoded=True, verified=verified, index=index)
        assert all(reader(i)[0].size for i in range(len(files)))
    rgb_or_grey = [f for f in files if Path(f).name[2] != "2"]  # the CMYK ones are PIL's every time
    assert len(calls) == len(files) + 2 * (len(files) - len(rgb_or_grey))
    assert sum(verified) == len(rgb_or_grey) and all(verified[int(i)] for i, f in zip(index, files)
                                                     if f in rgb_or_grey)


@pytest.mark.parametrize("deterministic", [False, True])
def test_damaged_files_never_reach_the_cpp_decoder(jpeg_folder, tmp_path, deterministic):
    """A training epoch over the folder with the crashing files: the process lives, they are substituted."""
    script = textwrap.dedent(f"""
        import numpy as np
        from mindcv_poolformer.config import load_config
        from mindcv_poolformer.train.data import TrainDataSettings, build_train_dataset
        cfg = load_config(overrides={{"data_dir": {str(jpeg_folder)!r}, "image_resize": 32, "batch_size": 4,
                                     "num_parallel_workers": 2, "num_classes": 10, "deterministic_augment":
                                     {deterministic}, "auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25,
                                     "mixup": 0.8, "cutmix": 1.0, "interpolation": "random"}})
        data = build_train_dataset(TrainDataSettings.from_config(cfg), 0)
        shapes = [(i.shape, t.shape) for i, t in data.dataset.create_tuple_iterator(output_numpy=True,
                                                                                     num_epochs=1)]
        assert len(shapes) == data.num_batches == 11 and set(shapes) == {{((4, 3, 32, 32), (4, 10))}}, shapes
        print("EPOCH OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "GLOG_v": "3", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and "EPOCH OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert log.count("skipping unreadable image ") == 4  # each once; CMYK and PNG files are readable
    for name in ("dht_count", "sos_table", "truncated", "garbage"):
        assert f"skipping unreadable image {jpeg_folder}/train/" in log and f"zz_{name}.jpg (" in log
    assert "4 unreadable image(s) so far" in log


def _train_epoch(folder: Path, monkeypatch, cores: int, workers: int, **extra) -> tuple[list[str], list]:
    """The map stages of epoch 0's training dataset (outermost first) and its batches, on ``cores`` cores."""
    from mindcv_poolformer.config import load_config
    from mindcv_poolformer.train import data as train_data

    monkeypatch.setattr(train_data, "_cores", lambda: cores)
    cfg = load_config(overrides={"data_dir": str(folder), "image_resize": 32, "batch_size": 4, "num_classes": 10,
                                 "num_parallel_workers": workers, **extra})
    data = train_data.build_train_dataset(train_data.TrainDataSettings.from_config(cfg), 0)
    stages, node = [], data.dataset
    while node.children:
        if type(node).__name__ == "MapDataset":
            stages.append([type(op).__name__ for op in node.operations])
        node = node.children[0]
    return stages, list(data.dataset.create_tuple_iterator(output_numpy=True, num_epochs=1))


@pytest.mark.parametrize("deterministic", [False, True])
def test_training_ops_split_into_two_map_stages_only_where_cores_are_spare(jpeg_folder, monkeypatch, deterministic):
    """1 worker on 2 cores: crop + flip in one map stage, the rest in a second, and the batches one stage gives;
    2 workers on 2 cores: one stage (deterministic_augment: its augmentation always runs in 1 worker). Seeded
    batches: the C++ ops alone, or with deterministic_augment the recipe's RandAugment, erasing and mixing too."""
    recipe = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "re_mode": "pixel", "mixup": 0.8,
              "cutmix": 1.0, "interpolation": "random"}
    extra = {"hflip": 1.0, "deterministic_augment": deterministic,
             **(recipe if deterministic else {"interpolation": "bilinear"})}
    one_stage, want = _train_epoch(jpeg_folder, monkeypatch, cores=1, workers=1, **extra)
    two_stages, got = _train_epoch(jpeg_folder, monkeypatch, cores=2, workers=1, **extra)
    crop = ["RandomChoice" if deterministic else "RandomCropDecodeResize", "RandomHorizontalFlip"]
    rest = (["RandAugment"] if deterministic else []) + ["HWC2CHW", "Normalize"] + (
        ["RandomErasing"] if deterministic else [])
    reader = [["Decode"], ["ImageReader"]] if deterministic else [["ImageReader"]]
    assert one_stage[1:] == [crop + rest, *reader], one_stage
    assert two_stages[1:] == [rest, crop, *reader], two_stages
    assert len(got) == len(want) == 11
    for (image_a, target_a), (image_b, target_b) in zip(want, got):
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(target_a, target_b)
    wide = _train_epoch(jpeg_folder, monkeypatch, cores=2, workers=2, **extra)[0][1:]
    assert wide == (two_stages[1:] if deterministic else one_stage[1:])


def test_mix_batch_depends_on_the_batch_number_only():
    """Per-batch draws: any worker may mix any batch, in any order; the pair formula is timm's."""
    smoothing, classes = 0.1, 6
    mixer = SoftTargetMixer(classes, smoothing, mixup=0.8, cutmix=1.0, prob=1.0, switch_prob=0.5, seed=7)
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(6, 3, 8, 8)).astype(np.float32) for _ in range(12)]
    copies = [b.copy() for b in batches]
    labels = np.arange(6)
    forward = [mixer.mix_batch(b, labels, k) for k, b in enumerate(batches)]
    backward = [mixer.mix_batch(b, labels, k) for k, b in reversed(list(enumerate(batches)))][::-1]
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(forward, backward))
    assert all(np.array_equal(b, c) for b, c in zip(batches, copies))  # the inputs are not mixed in place
    modes = set()
    for images, (out, targets) in zip(batches, forward):
        lam = (targets[0, 0] - smoothing / classes) / (1 - smoothing)
        assert np.allclose(targets.sum(axis=1), 1.0, atol=1e-5)
        own = np.all(out == images, axis=1)
        if np.all(own | np.all(out == images[::-1], axis=1)):  # cutmix: a box of the partner's pixels
            modes.add("cutmix")
            assert np.isclose(own[0].mean(), lam, atol=1e-6)
        else:
            modes.add("mixup")
            assert np.allclose(out, lam * images + (1 - lam) * images[::-1], atol=1e-5)
    assert modes == {"cutmix", "mixup"}
