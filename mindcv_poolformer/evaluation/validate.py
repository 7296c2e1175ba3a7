"""validate.py: top-1/top-5 of a checkpoint or an exported MINDIR on an ImageFolder, or mIoU on ADE20K."""

from __future__ import annotations

import os
import sys
from dataclasses import replace

from .._atomic import atomic_write_json
from .._runtime import configure_device
from .._script import run_script
from ..amp import apply_amp
from ..checkpoint import resolve_pretrained
from ..config import model_defaults, parse_cli
from ..data.listing import scan_image_folder
from ..deploy.artifacts import load_mindir, load_network, read_sidecar, sidecar_path
from ..distributed import init_distributed
from ..errors import ConfigError, ScriptError
from ..models.registry import model_info
from ..transforms import Preprocess
from .classification import create_eval_dataset, evaluate
from .segmentation import format_segmentation_table, validate_segmentation

__all__ = ["format_table", "main", "run_validation"]


def _load_mindir(path: str):
    """An exported MINDIR as a callable graph plus its sidecar (image size, batch) when present."""
    meta = read_sidecar(path) if os.path.isfile(sidecar_path(path)) else {}
    return load_mindir(path), meta


def run_validation(cfg) -> dict:
    """validate.py's work for a parsed config: build/load the network, evaluate, return the JSON record.

    Prints the line naming the device first (``device: CPU (auto: no Ascend or GPU found)``). The
    weights are ``ckpt_path``, else with ``pretrained`` the model's file in the local weights cache
    (MindCV's ``validate.py --model NAME --pretrained``). The amp level is ``val_amp_level`` (MindCV's
    key for it), else ``amp_level``.
    """
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
    if model_info(cfg.model).task == "segmentation":
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
    preprocess = replace(Preprocess.from_config(cfg), size=image_size)
    dataset, _, total = create_eval_dataset(cfg.data_dir, cfg.val_split, batch_size, preprocess,
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
              "amp_level": amp_level, "image_size": preprocess.size, "crop_pct": preprocess.crop_pct,
              "interpolation": preprocess.interpolation, "data": path, "ranks": group_size}
    return record


def format_table(record: dict) -> str:
    """The metrics as a small two-column text table."""
    if record.get("task") == "segmentation":
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
    def _main(args: list[str]) -> int:
        first = parse_cli(args, prog="validate.py", description="Top-1/top-5 of a checkpoint on an ImageFolder.")
        cfg = parse_cli(args, prog="validate.py", defaults=model_defaults(first.model))
        record = run_validation(cfg)
        if not cfg.distribute or _rank() == 0:
            print(format_table(record))
            if cfg.json:
                atomic_write_json(cfg.json, record)
                print(f"wrote {cfg.json}")
        return 0

    return run_script(_main, "validate.py", sys.argv[1:] if argv is None else argv)


def _rank() -> int:
    from mindspore.communication import get_rank

    return get_rank()
