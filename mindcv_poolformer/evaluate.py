"""Reusable evaluation: the eval dataset, mixed precision for inference, and exact top-1/top-5/loss.

Every readable sample is counted exactly once; an unreadable image file is skipped (counted in
``EvalMetrics.skipped``, never in the top-1 denominator) or, with ``strict_data``, an error. The
last partial batch is padded on the host to the batch size (so a fixed-shape graph or MINDIR never
recompiles) and the padding is masked out. Sharded evaluation gives rank ``r`` the samples
``r, r + g, r + 2g, ...`` (no repeated samples, unlike ``num_shards``, which pads shards to equal
length by repeating some) and all-reduces the sums.
Softmax, loss and top-k are computed on the host in float64 from the (float32) logits.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .amp import apply_amp
from .config import ConfigError
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ImageReader, create_transforms

__all__ = ["IMAGE_EXTENSIONS", "EvalMetrics", "ImageList", "apply_amp", "create_eval_dataset", "evaluate",
           "format_table", "list_image_folder", "run_validation", "scan_image_folder"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


@dataclass
class EvalMetrics:
    """Top-k accuracies in percent, the mean cross-entropy, and how many samples they cover.

    ``img_per_s`` is the steady-state throughput: the first batch (graph compilation) is excluded
    when there is more than one batch. ``seconds`` is the whole loop. ``skipped`` counts unreadable
    images left out of every metric.
    """

    top1: float
    top5: float
    loss: float
    num_samples: int
    seconds: float
    img_per_s: float
    skipped: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ImageList:
    """The images of one ImageFolder split: ``files[i]`` has label ``labels[i]``, an index into ``classes``."""

    path: str
    classes: list[str]
    files: list[str]
    labels: np.ndarray


def list_image_folder(root: str, split: str = "", class_names: Sequence[str] | None = None,
                      split_key: str = "data_dir") -> ImageList:
    """List ``root/split/<class>/<image>`` (classes and files sorted by name), checking it is usable.

    Raises ConfigError naming what is wrong: no ``root``, no ``split`` folder (``split_key`` is the
    config key that chose it), no class folders, a class folder without images, or, with
    ``class_names`` (the training classes, which also fix the labels), a class the model lacks.
    """
    if not root:
        raise ConfigError("data_dir: no dataset directory given (pass --data_dir DIR, the folder holding train/ and "
                          "val/)")
    if not os.path.exists(root):
        raise ConfigError(f"data_dir: {root} does not exist")
    if not os.path.isdir(root):
        raise ConfigError(f"data_dir: {root} is not a directory")
    path = os.path.join(root, split) if split else root
    if not os.path.isdir(path):
        found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        holds = f"it holds the folders {', '.join(found)}" if found else "it has no sub-folders"
        raise ConfigError(f"{split_key}: {path} does not exist ({holds}; expected {path}/<class>/<image>)")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise ConfigError(f"data_dir: {path} has no class folders (expected {path}/<class>/<image>)")
    index = {c: i for i, c in enumerate(class_names if class_names is not None else classes)}
    unknown = [c for c in classes if c not in index]
    if unknown:
        raise ConfigError(f"data_dir: {path} has {len(unknown)} class folder(s) that the training split lacks "
                          f"({', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}); the model has no output "
                          "for them")
    files: list[str] = []
    labels: list[int] = []
    for cls in classes:
        folder = os.path.join(path, cls)
        with os.scandir(folder) as entries:
            names = sorted(e.name for e in entries
                           if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file())
        if not names:
            raise ConfigError(f"data_dir: class folder {folder} has no images ({' '.join(IMAGE_EXTENSIONS)}); "
                              "add images or remove the folder")
        files += [os.path.join(folder, name) for name in names]
        labels += [index[cls]] * len(names)
    return ImageList(path, list(index), files, np.asarray(labels, dtype=np.int32))


def scan_image_folder(root: str, split: str = "", split_key: str = "data_dir") -> tuple[str, list[str], int]:
    """Check an ImageFolder (see ``list_image_folder``); return its path, class names and image count."""
    images = list_image_folder(root, split, split_key=split_key)
    return images.path, images.classes, len(images.files)


def create_eval_dataset(
    data_dir: str,
    split: str = "val",
    batch_size: int = 32,
    image_size: int = 224,
    crop_pct: float = 0.9,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    num_parallel_workers: int = 4,
    rank: int = 0,
    group_size: int = 1,
    *,
    strict: bool = False,
    class_names: Sequence[str] | None = None,
):
    """The validation ImageFolder of ``data_dir/split`` through the reference eval transform, batched.

    Returns ``(dataset, class_names, num_samples_total)``; ``dataset`` holds this rank's shard only
    (``None`` when the shard is empty, i.e. more ranks than images). No sample is ever dropped; an
    unreadable image comes out with label -1 (see ``ImageReader``), or raises with ``strict``.
    ``class_names`` (the training classes) fixes the labels when the split has only some of them.
    """
    images = list_image_folder(data_dir, split, class_names)
    total = len(images.files)
    workers = max(1, min(num_parallel_workers, os.cpu_count() or 1))
    rows = np.arange(total)
    if group_size > 1:
        from .train.data import shard_indices

        rows = shard_indices(rows, rank, group_size, even=False)
        if not len(rows):
            return None, images.classes, total
    reader = ImageReader([images.files[i] for i in rows], images.labels[rows], strict=strict, substitute=False)
    ops = create_transforms(False, image_size, crop_pct, interpolation, mean, std, decode=False)
    dataset = reader.dataset(workers).map(ops, input_columns="image", num_parallel_workers=workers)
    dataset = dataset.batch(batch_size, drop_remainder=False)
    return dataset, images.classes, total


def _all_reduce(values: np.ndarray) -> np.ndarray:
    import mindspore as ms
    from mindspore import ops

    return ops.AllReduce()(ms.Tensor(values)).asnumpy()


def _batch_metrics(logits: np.ndarray, labels: np.ndarray) -> tuple[int, int, float]:
    logits = logits.astype(np.float64)
    num_classes = logits.shape[1]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(f"label {int(labels.max())} is out of range for a model with {num_classes} classes "
                          "(set num_classes to the dataset's class count)")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_prob = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_prob[np.arange(len(labels)), labels].sum())
    k = min(5, num_classes)
    # A sample is top-k correct when fewer than k classes score strictly higher than the true one.
    true_score = logits[np.arange(len(labels)), labels][:, None]
    rank_of_true = (logits > true_score).sum(axis=1)
    return int((rank_of_true < 1).sum()), int((rank_of_true < k).sum()), loss


def evaluate(net, dataset: Iterable | None, pad_to: int | None = None, distributed: bool = False,
             log_every: int = 0) -> EvalMetrics:
    """Top-1/top-5 (percent), mean cross-entropy and throughput of ``net`` on ``dataset``.

    Args:
        net: a callable taking an NCHW float32 ``Tensor`` and returning logits (Cell or GraphCell).
        dataset: yields ``(images, labels)`` batches (a MindSpore dataset or any iterable of numpy
            pairs); ``None`` for an empty shard.
        pad_to: pad every smaller batch to this size and mask the padding (for fixed-shape graphs);
            default: the size of the first batch.
        distributed: all-reduce the sums over the launched processes (``mindspore.communication``
            must be initialised); every rank gets the global result.
        log_every: print a progress line every that many batches (0 = quiet).
    """
    import mindspore as ms

    if hasattr(net, "set_train"):
        net.set_train(False)
    if dataset is None:
        batches: Iterable = ()
    elif hasattr(dataset, "create_tuple_iterator"):
        batches = dataset.create_tuple_iterator(output_numpy=True, num_epochs=1)
    else:
        batches = dataset
    correct1 = correct5 = count = skipped = 0
    loss_sum = 0.0
    start = time.perf_counter()
    warm_start, warm_count = start, 0
    for step, (images, labels) in enumerate(batches, 1):
        images = np.asarray(images, dtype=np.float32)
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        n = len(labels)
        if pad_to is None:
            pad_to = n
        if n < pad_to:
            images = np.concatenate([images, np.zeros((pad_to - n,) + images.shape[1:], np.float32)])
        logits = net(ms.Tensor(images)).asnumpy()[:n]
        readable = labels >= 0  # -1 marks an unreadable image (ImageReader): in no metric, counted as skipped
        if not readable.all():
            skipped += int(n - readable.sum())
            logits, labels, n = logits[readable], labels[readable], int(readable.sum())
        c1, c5, loss = _batch_metrics(logits, labels)
        correct1, correct5, count, loss_sum = correct1 + c1, correct5 + c5, count + n, loss_sum + loss
        if step == 1:
            warm_start, warm_count = time.perf_counter(), count
        if log_every and step % log_every == 0:
            print(f"  batch {step}: {count} samples, top-1 {100.0 * correct1 / count:.2f}%", flush=True)
    end = time.perf_counter()
    seconds = end - start
    if count > warm_count:
        timed_seconds, timed_count = end - warm_start, count - warm_count
    else:
        timed_seconds, timed_count = seconds, count
    img_per_s = timed_count / timed_seconds if timed_seconds > 0 else 0.0
    if distributed:
        # MindSpore's CPU AllReduce takes float16/float32 only; float32 holds counts exactly below 2**24.
        counts = _all_reduce(np.array([correct1, correct5, count, skipped], dtype=np.float32))
        correct1, correct5, count, skipped = (int(round(float(v))) for v in counts)
        # CPU AllReduce only sums: seconds becomes the mean over ranks; throughput adds up over ranks.
        sums = _all_reduce(np.array([loss_sum, img_per_s, seconds, 1.0], dtype=np.float32))
        loss_sum, img_per_s, seconds = float(sums[0]), float(sums[1]), float(sums[2] / sums[3])
    if count == 0:
        return EvalMetrics(0.0, 0.0, float("nan"), 0, seconds, 0.0, skipped)
    return EvalMetrics(
        top1=100.0 * correct1 / count,
        top5=100.0 * correct5 / count,
        loss=loss_sum / count,
        num_samples=count,
        seconds=seconds,
        img_per_s=img_per_s,
        skipped=skipped,
    )


def _load_mindir(path: str):
    """An exported MINDIR as a callable graph plus its sidecar (image size, batch) when present."""
    from .export import load_mindir, read_sidecar, sidecar_path

    meta = read_sidecar(path) if os.path.isfile(sidecar_path(path)) else {}
    return load_mindir(path), meta


def run_validation(cfg) -> dict:
    """validate.py's work for a parsed config: build/load the network, evaluate, return the JSON record.

    Prints the line naming the device first (``device: CPU (auto: no Ascend or GPU found)``). The
    weights are ``ckpt_path``, else with ``pretrained`` the model's file in the local weights cache
    (MindCV's ``validate.py --model NAME --pretrained``). The amp level is ``val_amp_level`` (MindCV's
    key for it), else ``amp_level``.
    """
    from ._runtime import configure_device
    from ._script import ScriptError
    from .checkpoint import resolve_pretrained
    from .export import load_network
    from .train.distributed import init_distributed

    print(configure_device(cfg), flush=True)
    # the trainer's launcher-aware init (msrun, env cluster, or plain mpirun with the scheduler bootstrapped),
    # before any Tensor/Parameter exists
    dist = init_distributed(cfg.distribute, cfg.device_target)
    rank, group_size = dist.rank, dist.world
    if not cfg.ckpt_path and cfg.pretrained:
        cfg.ckpt_path = resolve_pretrained(cfg.model, True)
    if not cfg.ckpt_path:
        raise ConfigError("ckpt_path: no checkpoint given (pass --ckpt_path FILE: .ckpt, .safetensors, "
                          ".pth(.tar) or an exported .mindir; or --pretrained for the local weights cache)")
    if not os.path.isfile(cfg.ckpt_path):
        raise ConfigError(f"ckpt_path: {cfg.ckpt_path!r} does not exist")
    amp_key = "val_amp_level" if cfg.val_amp_level else "amp_level"
    amp_level = cfg[amp_key]
    if amp_key == "val_amp_level" and amp_level == "O1":  # apply_amp's own message would name amp_level
        raise ConfigError("val_amp_level: O1 is not supported (MindSpore's O1 network rewrite cannot handle these "
                          "models); use O0, O2 or O3")
    from .models.registry import model_info

    if model_info(cfg.model).task == "segmentation":
        from .evaluation.segmentation import validate_segmentation

        return validate_segmentation(cfg, amp_level, rank, group_size, lambda net: apply_amp(net, amp_level))
    path, classes, _ = scan_image_folder(cfg.data_dir, cfg.val_split, split_key="val_split")
    image_size, batch_size, pad_to = cfg.image_resize, cfg.batch_size, cfg.batch_size
    model_name = cfg.model
    if cfg.ckpt_path.lower().endswith(".mindir"):
        if amp_level != "O0":
            raise ConfigError(f"{amp_key}: {amp_level} cannot be applied to an exported MINDIR (use O0)")
        net, meta = _load_mindir(cfg.ckpt_path)
        image_size = int(meta.get("image_size", image_size))
        model_name = meta.get("model", model_name)
        if meta.get("batch"):  # a fixed-batch graph: feed exactly that batch size
            batch_size = pad_to = int(meta["batch"])
        num_classes = meta.get("num_classes")
    else:
        net, num_classes = load_network(cfg.model, cfg.ckpt_path, cfg.num_classes)
        net = apply_amp(net, amp_level)
    if num_classes is not None and num_classes < len(classes):
        raise ConfigError(f"data_dir: {path} has {len(classes)} class folders but the model ({cfg.ckpt_path}) has "
                          f"only {num_classes} outputs; validate on the dataset it was trained for")
    if num_classes is not None and num_classes != len(classes) and rank == 0:
        print(f"note: the model has {num_classes} outputs and {path} {len(classes)} class folders; label i is "
              "the i-th folder in sorted order", file=sys.stderr)
    dataset, _, total = create_eval_dataset(
        cfg.data_dir, cfg.val_split, batch_size, image_size, cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std,
        cfg.num_parallel_workers, rank, group_size, strict=cfg.strict_data)
    metrics = evaluate(net, dataset, pad_to=pad_to, distributed=group_size > 1)
    if metrics.num_samples + metrics.skipped != total:
        raise ScriptError(f"evaluated {metrics.num_samples} samples (+{metrics.skipped} unreadable) but {path} "
                          f"holds {total}")
    if metrics.skipped and rank == 0:
        print(f"warning: {metrics.skipped} unreadable image(s) of {path} were skipped and are not counted in top-1/"
              f"top-5/loss (--strict_data True makes them an error)", file=sys.stderr)
    record = {"top1": metrics.top1, "top5": metrics.top5, "loss": metrics.loss, "num_samples": metrics.num_samples,
              "skipped": metrics.skipped, "model": model_name, "ckpt": cfg.ckpt_path, "img_per_s": metrics.img_per_s,
              "amp_level": amp_level, "image_size": image_size, "crop_pct": cfg.crop_pct,
              "interpolation": cfg.interpolation, "data": path, "ranks": group_size}
    return record


def format_table(record: dict) -> str:
    """The metrics as a small two-column text table."""
    if record.get("task") == "segmentation":
        from .evaluation.segmentation import format_segmentation_table

        return format_segmentation_table(record)
    rows = [("model", record["model"]), ("checkpoint", record["ckpt"]), ("samples", record["num_samples"]),
            ("skipped (unreadable)", record.get("skipped", 0)),
            ("top-1 (%)", f"{record['top1']:.3f}"), ("top-5 (%)", f"{record['top5']:.3f}"),
            ("loss", f"{record['loss']:.4f}"), ("img/s", f"{record['img_per_s']:.1f}"),
            ("amp", record["amp_level"]), ("input", f"{record['image_size']} crop_pct {record['crop_pct']} "
                                                   f"{record['interpolation']}")]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(str(v)) for _, v in rows))
    return "\n".join([line] + [f"{k:<{width}} | {v}" for k, v in rows] + [line])


def main(argv: list[str] | None = None) -> int:
    """``python validate.py --config RECIPE --data_dir DIR (--ckpt_path CKPT | --pretrained) [--json OUT]``."""
    import json

    from ._script import run_script
    from .config import parse_cli
    from .models.registry import model_info

    def _main(args: list[str]) -> int:
        first = parse_cli(args, prog="validate.py", description="Top-1/top-5 of a checkpoint on an ImageFolder.")
        cfg = parse_cli(args, prog="validate.py", defaults={"crop_pct": model_info(first.model).crop_pct})
        record = run_validation(cfg)
        if not cfg.distribute or _rank() == 0:
            print(format_table(record))
            if cfg.json:
                tmp = f"{cfg.json}.tmp-{os.getpid()}"
                with open(tmp, "w", encoding="utf-8") as fh:
                    json.dump(record, fh, indent=2)
                os.replace(tmp, cfg.json)
                print(f"wrote {cfg.json}")
        return 0

    return run_script(_main, "validate.py", sys.argv[1:] if argv is None else argv)


def _rank() -> int:
    from mindspore.communication import get_rank

    return get_rank()
