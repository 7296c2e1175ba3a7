"""Input-pipeline throughput of the S12 training recipe, ours next to MindCV 0.3.0's, and start-up listing cost.

Why: MindCV reports PoolFormer-S12 at 4,834 img/s on 8 x Ascend 910B (batch 128 per card), so each
NPU needs ~605 img/s from its host. This measures what the host side delivers per worker count.

Table 1 (img/s): the training pipeline as configs/poolformer/poolformer_s12_ascend.yaml sets it up
(RandomResizedCrop, flip, timm's RandAugment rand-m9-mstd0.5-inc1, normalise, HWC -> CHW, random
erasing 0.25, mixup 0.8 / cutmix 1.0, batch 128; the recipe's ``train_interpolation: random``, or a
fixed bicubic / bilinear to compare with MindCV at equal interpolation), iterated to the end of an epoch over 2,000 real
JPEGs (crops of the scikit-image / scikit-learn photos re-encoded at 500x375, quality 90, written
once into ``--cache_dir`` as a 10-class ImageFolder). "ours (first epoch)" checks every JPEG
before the C++ decoder sees it (``transforms._decodes_in_cpp``: a marker scan for these baseline JPEGs);
"ours (later epochs)" has them checked already. MindCV's row is
its own ``create_dataset`` + ``create_transforms`` + ``create_loader`` with the values of MindCV's
S12 recipe (tests/data/mindcv_poolformer_s12_ascend.yaml: bilinear, ``randaug-m9-mstd0.5-inc1``).
Rows run in interleaved rounds (ours, MindCV, MindCV, ours, ...) and each cell is the median round.

Table 2: start-up listing of a 100k-file synthetic ImageFolder (empty files): how often the split
folders are listed, and the seconds spent listing, by the code path before this change (mirrored
call for call: ``prepare_data_dir``, ``scan_image_folder``, ``create_eval_dataset``, then
``build_train_dataset`` per epoch) and by today's (``prepare_data_dir`` returns one listing).

    .venv/bin/python bench/input_pipeline.py [--rounds 3] [--workers 1,2,16]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("GLOG_v", "3")

NPU_NEED = 605  # MindCV: 4,834.5 img/s on 8 x 910B for S12, per card (rounded up)
RECIPE = REPO / "configs" / "poolformer" / "poolformer_s12_ascend.yaml"
MINDCV_RECIPE = REPO / "tests" / "data" / "mindcv_poolformer_s12_ascend.yaml"


# ---------------------------------------------------------------------------------------------- data


def make_photo_folder(root: Path, count: int = 2000, classes: int = 10, size: tuple[int, int] = (500, 375),
                      quality: int = 90) -> Path:
    """``count`` JPEG crops of real photos as ``root/train/c<k>/<i>.jpg``; written once, then reused."""
    import numpy as np
    import skimage.data as data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    stamp = root / f".done-{count}-{classes}-{size[0]}x{size[1]}-q{quality}"
    if stamp.exists():
        return root
    names = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "rocket", "retina",
             "camera", "coins", "moon", "brick", "grass", "gravel", "clock")
    sources = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in names]
    sources += [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(0)
    for i in range(count):
        src = sources[i % len(sources)]
        width, height = size if rng.random() >= 0.25 else size[::-1]  # a quarter portrait, as in ImageNet
        scale = rng.uniform(0.5, 1.0) * min(src.width / width, src.height / height)
        cw, ch = int(width * scale), int(height * scale)
        x, y = int(rng.integers(0, src.width - cw + 1)), int(rng.integers(0, src.height - ch + 1))
        folder = root / "train" / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        src.resize((width, height), Image.BICUBIC, box=(x, y, x + cw, y + ch)).save(folder / f"{i:05d}.jpg",
                                                                                 quality=quality)
    stamp.touch()
    return root


def make_listing_tree(root: Path, classes: int = 1000, per_class: int = 100, val_per_class: int = 5) -> Path:
    """An ImageFolder of empty ``.JPEG`` files (listing reads names only): train 100k, val 5k by default."""
    stamp = root / f".done-{classes}-{per_class}-{val_per_class}"
    if stamp.exists():
        return root
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (folder / f"n{c:08d}_{i}.JPEG").touch()
    stamp.touch()
    return root


# ---------------------------------------------------------------------------------------------- pipelines


def ours_cfg(data_dir: Path, workers: int, interpolation: str | None = None):
    """The S12 recipe on ``data_dir``; ``interpolation``: the training one instead of the recipe's (random)."""
    from mindcv_poolformer.config import load_config

    overrides = {"data_dir": str(data_dir), "num_parallel_workers": workers, "device_target": "CPU",
                 "distribute": False, "val_while_train": False}
    if interpolation:
        overrides["train_interpolation"] = interpolation
    return load_config(str(RECIPE), overrides=overrides)


def ours_pipeline(data_dir: Path, workers: int, warm: bool, interpolation: str | None = None) -> Callable:
    """Our epoch-0 training dataset; ``warm``: its JPEGs already checked, as in every epoch after a file's first."""
    from mindcv_poolformer.train.data import TrainDataSettings, build_train_dataset, prepare_data_dir

    cfg = ours_cfg(data_dir, workers, interpolation)
    listing = prepare_data_dir(cfg["data_dir"], cfg["train_split"], cfg["val_split"], with_val=False)
    if warm:
        listing.verified[:] = b"\x01" * len(listing.verified)
    return lambda: build_train_dataset(TrainDataSettings.from_config(cfg), 0, 0, 1, listing=listing).dataset


def mindcv_pipeline(data_dir: Path, workers: int, interpolation: str | None = None) -> Callable:
    """MindCV 0.3.0's train.py data path with its S12 recipe's values (or another interpolation)."""
    import yaml
    from mindcv.data import create_dataset, create_loader, create_transforms

    args = yaml.safe_load(MINDCV_RECIPE.read_text())
    args["interpolation"] = interpolation or args["interpolation"]

    def build():
        dataset = create_dataset(name=args["dataset"], root=str(data_dir), split="train", shuffle=args["shuffle"],
                                 num_parallel_workers=workers)
        transforms = create_transforms(dataset_name=args["dataset"], is_training=True,
                                       image_resize=args["image_resize"], scale=args["scale"], ratio=args["ratio"],
                                       hflip=args["hflip"], vflip=args["vflip"], color_jitter=args["color_jitter"],
                                       interpolation=args["interpolation"], auto_augment=args["auto_augment"],
                                       re_prob=args["re_prob"])
        return create_loader(dataset=dataset, batch_size=args["batch_size"], drop_remainder=args["drop_remainder"],
                             is_training=True, mixup=args["mixup"], cutmix=args["cutmix"],
                             cutmix_prob=args["cutmix_prob"], num_classes=args["num_classes"], transform=transforms,
                             num_parallel_workers=workers)

    return build


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def images_per_second(build: Callable) -> tuple[float, float, int]:
    """Build the dataset, iterate one epoch: img/s (start-up included), CPU ms per image (all threads), count."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    images = 0
    for row in build().create_tuple_iterator(output_numpy=True, num_epochs=1):
        images += len(row[0])
    return images / (time.perf_counter() - start), (_cpu_seconds() - cpu) * 1e3 / images, images


# (label, builder(workers), the MindCV row it is compared with)
def pipeline_rows(data_dir: Path) -> list[tuple[str, Callable, str | None]]:
    cubic, mindcv_own = "MindCV 0.3.0, bicubic", "MindCV 0.3.0, its recipe (bilinear)"
    return [
        ("ours, bicubic, first epoch", lambda w: ours_pipeline(data_dir, w, warm=False, interpolation="bicubic"),
         cubic),
        ("ours, bicubic, later epochs", lambda w: ours_pipeline(data_dir, w, warm=True, interpolation="bicubic"),
         cubic),
        ("ours, recipe (random), later epochs", lambda w: ours_pipeline(data_dir, w, warm=True), None),
        (cubic, lambda w: mindcv_pipeline(data_dir, w, "bicubic"), None),
        ("ours, bilinear, later epochs", lambda w: ours_pipeline(data_dir, w, warm=True, interpolation="bilinear"),
         mindcv_own),
        (mindcv_own, lambda w: mindcv_pipeline(data_dir, w), None),
    ]


def pipeline_table(data_dir: Path, workers: list[int], rounds: int) -> tuple[str, dict]:
    rows = pipeline_rows(data_dir)
    rates: dict[str, dict[int, list[float]]] = {name: {w: [] for w in workers} for name, _, _ in rows}
    cpu: dict[str, dict[int, list[float]]] = {name: {w: [] for w in workers} for name, _, _ in rows}
    for r in range(rounds):
        for w in workers:
            for name, build, _ in rows if r % 2 == 0 else rows[::-1]:
                rate, cpu_ms, count = images_per_second(build(w))
                rates[name][w].append(rate)
                cpu[name][w].append(cpu_ms)
                print(f"round {r + 1}/{rounds}  workers {w:2d}  {name:40s} {rate:7.1f} img/s  {cpu_ms:5.2f} CPU ms/img "
                      f"({count} images)", flush=True)
    med = {name: {w: statistics.median(v) for w, v in per.items()} for name, per in rates.items()}
    med_cpu = {name: {w: statistics.median(v) for w, v in per.items()} for name, per in cpu.items()}
    head = " | ".join(f"{w} worker{'s' if w > 1 else ''}" for w in workers)
    lines = [f"| pipeline | {head} | CPU ms/img ({', '.join(map(str, workers))} workers) |",
             "|---|" + "---:|" * (len(workers) + 1)]
    for name, _, _ in rows:
        lines.append(f"| {name} | " + " | ".join(f"{med[name][w]:.0f}" for w in workers) + " | "
                     + " / ".join(f"{med_cpu[name][w]:.2f}" for w in workers) + " |")
    lines += ["", "Within-round ratios, ours / MindCV at the same interpolation (median of rounds):", "",
              f"| ours row / MindCV row | {head} |", "|---|" + "---:|" * len(workers)]

    def ratio_rows(per_round: dict) -> list[str]:
        return [f"| {name} / {peer} | " + " | ".join(
            f"{statistics.median(a / b for a, b in zip(per_round[name][w], per_round[peer][w])):.2f}x"
            for w in workers) + " |" for name, _, peer in rows if peer]

    lines += ratio_rows(rates)
    lines += ["", "CPU time per image, ours / MindCV within each round (median of rounds; below 1.00x ours costs "
              "less). Unlike img/s it does not move with what the other processes on the host take:", "",
              f"| ours row / MindCV row | {head} |", "|---|" + "---:|" * len(workers)]
    lines += ratio_rows(cpu)
    return "\n".join(lines), {"rounds": rates, "cpu_rounds": cpu, "median": med, "median_cpu": med_cpu}


def cores_per_npu(raw: dict, workers: list[int]) -> str:
    """Cores one NPU needs for 605 img/s, from CPU time per image (an extrapolation: linear scaling)."""
    n = max(workers)
    cores = min(n, os.cpu_count() or n)
    lines = [f"Cores for {NPU_NEED:.0f} img/s = {NPU_NEED:.0f} x CPU seconds per image (process user + system time "
             f"over all its threads, median, {n} workers). This is an extrapolation: it assumes throughput grows "
             "linearly with cores up to that count (no GIL, lock or memory-bandwidth limit) and that the host's "
             "cores are as fast as this machine's, whose 2 cores are shared with other processes (load average "
             f"at the end: {os.getloadavg()[0]:.1f}). The wall-clock rate per core (img/s / {cores}) is given too.",
             "",
             f"| pipeline | CPU ms/img | img/s per core (CPU time) | cores per NPU | img/s per core (wall, {n} "
             "workers) |", "|---|---:|---:|---:|---:|"]
    for name, per in raw["median_cpu"].items():
        ms = per[n]
        lines.append(f"| {name} | {ms:.2f} | {1e3 / ms:.0f} | {NPU_NEED * ms / 1e3:.1f} | "
                     f"{raw['median'][name][n] / cores:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- listing


class CountingLister:
    """``list_image_folder`` wrapped where it is defined and where the training data code imported it:
    counts calls per split and seconds spent (``_before`` calls the first, ``_after`` the second)."""

    def __init__(self) -> None:
        import mindcv_poolformer.data.listing as listing
        import mindcv_poolformer.train.data as train_data

        self.modules = (listing, train_data)
        self.original = listing.list_image_folder
        self.calls: dict[str, int] = {}
        self.seconds = 0.0

    def __enter__(self) -> CountingLister:
        def counted(root, split="", *args, **kwargs):
            start = time.perf_counter()
            try:
                return self.original(root, split, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls[split] = self.calls.get(split, 0) + 1

        for module in self.modules:
            module.list_image_folder = counted
        return self

    def __exit__(self, *_exc: object) -> None:
        for module in self.modules:
            module.list_image_folder = self.original


def _before(cfg, epochs: int) -> None:
    """The listing calls of the code before this change, in order (Trainer.__init__, then each epoch)."""
    import mindcv_poolformer.data.listing as evaluate

    root = str(cfg["data_dir"])
    train = evaluate.list_image_folder(root, cfg["train_split"], split_key="train_split")  # prepare_data_dir
    evaluate.list_image_folder(root, cfg["val_split"], class_names=train.classes, split_key="val_split")
    evaluate.list_image_folder(root, cfg["train_split"], split_key="data_dir")  # scan_image_folder
    evaluate.list_image_folder(root, cfg["val_split"], train.classes)  # create_eval_dataset
    for _ in range(epochs):
        evaluate.list_image_folder(root, cfg["train_split"], split_key="train_split")  # build_train_dataset


def _after(cfg, epochs: int) -> None:
    """Today's: one listing from prepare_data_dir feeds every epoch's shard and the validation set."""
    from mindcv_poolformer.train.data import TrainDataSettings, build_train_dataset, build_val_dataset, prepare_data_dir
    from mindcv_poolformer.transforms import Preprocess

    listing = prepare_data_dir(cfg["data_dir"], cfg["train_split"], cfg["val_split"])
    build_val_dataset(listing.val, Preprocess.from_config(cfg), cfg["batch_size"],
                      num_parallel_workers=cfg["num_parallel_workers"], strict=cfg["strict_data"])
    for epoch in range(epochs):
        build_train_dataset(TrainDataSettings.from_config(cfg), epoch, 0, 8, listing=listing)


def listing_table(tree: Path, rounds: int) -> str:
    from mindcv_poolformer.config import load_config

    cfg = load_config(str(RECIPE), overrides={"data_dir": str(tree), "device_target": "CPU", "distribute": False,
                                              "num_parallel_workers": 1, "num_classes": 1000})
    n_train = sum(1 for _ in (tree / "train").rglob("*.JPEG"))
    n_val = sum(1 for _ in (tree / "val").rglob("*.JPEG"))
    out = {}
    for r in range(rounds):
        for name, fn in (("before", _before), ("after", _after))[:: 1 if r % 2 == 0 else -1]:
            for epochs, label in ((1, "start-up (to the first batch)"), (3, "start-up + 2 more epochs")):
                with CountingLister() as lister:
                    fn(cfg, epochs)
                out.setdefault((name, label), []).append((lister.seconds, dict(lister.calls)))
    lines = [f"Synthetic tree: {n_train:,} train + {n_val:,} val empty files, 1,000 classes; page cache warm; "
             "one rank (each of 8 ranks repeats this).", "",
             "| code path | span | train listings | val listings | seconds listing (median) |",
             "|---|---|---:|---:|---:|"]
    for (name, label), runs in out.items():
        calls = runs[0][1]
        seconds = statistics.median(s for s, _ in runs)
        lines.append(f"| {name} | {label} | {calls.get('train', 0)} | {calls.get('val', 0)} | {seconds:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache_dir", default=str(REPO / "bench" / "results" / "work" / "input_pipeline"))
    parser.add_argument("--workers", default=None, help="comma-separated worker counts (default 1,2,N)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--listing_rounds", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.listing_rounds < 1:
        parser.error("--rounds and --listing_rounds must be >= 1")
    n = os.cpu_count() or 1
    workers = sorted({int(w) for w in args.workers.split(",")} if args.workers else {1, 2, n})

    import logging

    logging.getLogger("mindcv_poolformer").setLevel(logging.WARNING)
    cache = Path(args.cache_dir)
    photos = make_photo_folder(cache / "photos")
    tree = make_listing_tree(cache / "listing")
    table, raw = pipeline_table(photos, workers, args.rounds)
    cores = cores_per_npu(raw, workers)
    listing = listing_table(tree, args.listing_rounds)
    import mindspore

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    report = "\n".join([
        f"# Input pipeline, S12 recipe ({stamp})", "",
        f"Machine: {n} CPU cores (os.cpu_count), MindSpore {mindspore.__version__}; {args.rounds} interleaved "
        "rounds, median per cell. 2,000 JPEGs 500x375 q90 (1,920 images per epoch: 15 batches of 128). Ours "
        "runs its per-image ops as two map stages (decode + crop + flip | the rest) where the cores allow twice "
        "the workers (`train/data._map_stages`: here at 1 worker), MindCV as one.", "",
        "## Training pipeline, img/s", "", table, "", "## Cores per NPU", "", cores, "",
        "## Start-up listing", "", listing, "",
        "## Every round (img/s)", "",
        *[f"- {name}, {w} workers: " + ", ".join(f"{v:.0f}" for v in values) + " img/s; "
          + ", ".join(f"{c:.2f}" for c in raw["cpu_rounds"][name][w]) + " CPU ms/img"
          for name, per in raw["rounds"].items() for w, values in per.items()], ""])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"input-pipeline-{stamp}.md"
    path.write_text(report)
    print(report)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
