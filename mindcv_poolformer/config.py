"""The one configuration schema: YAML recipes plus ``--key value`` CLI overrides, validated once.

Key names follow MindCV's recipes so a MindCV PoolFormer YAML runs unchanged; MindCV keys that
have no effect here are accepted and reported as inert (``INERT_KEYS``). Every script (train,
validate, export, predict) reads the same schema, so a recipe means the same thing to all of them.

A MindCV recipe also means what it means to MindCV: a recipe whose every key is one that MindCV's
``train.py`` accepts (``MINDCV_KEYS``; MindCV refuses any other key, and every recipe of ours has
keys MindCV lacks) is a MindCV recipe, and the keys it leaves out take MindCV 0.3.0's defaults
(``MINDCV_DEFAULTS``) instead of ours. ``recipe_defaults: mindcv|ours`` overrides that rule.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any

import yaml

from ._atomic import atomic_write_text
from .errors import ConfigError
from .models.registry import IMAGENET_MEAN, IMAGENET_STD, list_models, model_info

__all__ = ["ConfigError", "Option", "SCHEMA", "SECTIONS", "INERT_KEYS", "MINDCV_KEYS", "MINDCV_DEFAULTS", "Config",
           "is_mindcv_recipe", "load_config", "model_defaults", "parse_cli", "format_help", "script_accepts",
           "settings_from"]

_LOG = logging.getLogger("mindcv_poolformer")


def settings_from(cls: type, cfg: Mapping[str, Any]) -> Any:
    """Build the settings record ``cls`` (a dataclass of config keys) from a parsed config.

    A field without a default must be in ``cfg``; a field with one may be absent (a config built
    by hand for a test or a bench), and then takes the record's default.
    """
    return cls(**{f.name: cfg[f.name] if f.default is MISSING else cfg.get(f.name, f.default) for f in fields(cls)})


@dataclass(frozen=True)
class Option:
    """One configuration key: its type, default, accepted values and meaning."""
    type: type
    default: Any
    help: str
    group: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    nullable: bool = False
    length: int | None = None  # for list-valued keys
    inert: bool = False  # a MindCV key accepted for compatibility, with no effect here


def _o(type_, default, help_, group, **kw) -> Option:
    return Option(type_, default, help_, group, **kw)


_SYS, _DATA, _AUG, _MODEL, _LOSS, _OPT, _SCHED, _CKPT, _EVAL = (
    "system", "dataset", "augmentation", "model", "loss", "optimizer", "scheduler", "checkpoint", "eval/export")

SCHEMA: dict[str, Option] = {
    # system
    "mode": _o(int, 0, "0 = GRAPH_MODE, 1 = PYNATIVE_MODE", _SYS, choices=(0, 1)),
    "device_target": _o(str, "auto", "device to run on; auto: Ascend if present, else GPU, else CPU", _SYS,
                        choices=("auto", "CPU", "Ascend", "GPU")),
    "jit_level": _o(str, "auto", "GRAPH_MODE compile level: O0 kernel by kernel, O1 plus operator fusion, O2 the GE "
                    "backend (deprecated since MindSpore 2.9); auto: MindSpore's own choice (O0 on CPU)", _SYS,
                    choices=("auto", "O0", "O1", "O2")),
    "distribute": _o(bool, False, "data-parallel over all launched processes (mpirun/msrun)", _SYS),
    "seed": _o(int, 42, "global seed; each rank derives its own augmentation seed from it", _SYS, low=0),
    "num_parallel_workers": _o(int, 8, "dataset workers per process", _SYS, low=1),
    "val_while_train": _o(bool, True, "validate after every val_interval epochs", _SYS),
    "val_interval": _o(int, 1, "epochs between validations (iterations when max_iters is set)", _SYS, low=1),
    "task": _o(str, "auto", "classification or segmentation: selects the dataset, loss, metric and schedule; auto: "
               "the model's task (fpn_* models segment)", _SYS, choices=("auto", "classification", "segmentation")),
    "log_interval": _o(int, 100, "steps between log lines; also how often the step losses and skip flags are fetched "
                       "from the device (and at checkpoints, validation and epoch ends)", _SYS, low=1),
    "stop_check_interval": _o(int, 50, "optimizer steps between the ranks' agreement on a stop signal (SIGINT/SIGTERM: "
                              "an all-reduce); also at every checkpoint and epoch end. One process checks every step",
                              _SYS, low=1),
    "debug": _o(bool, False, "show full tracebacks on errors", _SYS),
    "recipe_defaults": _o(str, "auto", "defaults of the keys a recipe leaves out: mindcv (MindCV 0.3.0's), ours, "
                          "or auto: MindCV's for a recipe whose every key is a MindCV key, ours otherwise", _SYS,
                          choices=("auto", "mindcv", "ours")),
    "enable_modelarts": _o(bool, False, "MindCV ModelArts switch", _SYS, inert=True),
    "multi_data_url": _o(str, "", "MindCV ModelArts path", _SYS, inert=True),
    "data_url": _o(str, "", "MindCV ModelArts path", _SYS, inert=True),
    "ckpt_url": _o(str, "", "MindCV ModelArts path", _SYS, inert=True),
    "train_url": _o(str, "", "MindCV ModelArts path", _SYS, inert=True),
    # dataset
    "dataset": _o(str, "imagenet", "imagenet-style ImageFolder, 'digits' (built offline from scikit-learn), 'ade20k' "
                  "(the ADEChallengeData2016 layout) or 'texture_mosaics' (an ADE20K-layout demo set, written offline "
                  "into data_dir where none exists)", _DATA,
                  choices=("imagenet", "digits", "ade20k", "texture_mosaics")),
    "data_dir": _o(str, "", "dataset root holding train/ and val/", _DATA),
    "train_split": _o(str, "train", "training sub-folder of data_dir", _DATA),
    "val_split": _o(str, "val", "validation sub-folder of data_dir", _DATA),
    "dataset_download": _o(bool, False, "MindCV download switch (nothing is downloaded here)", _DATA, inert=True),
    "shuffle": _o(bool, True, "shuffle the training set", _DATA),
    "num_samples": _o(int, None, "use only this many training samples", _DATA, nullable=True, low=1),
    "batch_size": _o(int, 128, "batch size per device", _DATA, low=1),
    "reduce_zero_label": _o(bool, True, "segmentation: label 0 is 'other' and ignored (255), ids k > 0 become k - 1 "
                            "(ADE20K's mmseg setting)", _DATA),
    "seg_scale": _o(list, [2048, 512], "segmentation test resize: fit (long, short) keeping the aspect ratio "
                    "(mmseg's Resize scale)", _DATA, length=2),
    "seg_size_divisor": _o(int, 32, "segmentation test resize: then resize each side up to a multiple of this "
                           "(mmseg's ResizeToMultiple; 1 = off)", _DATA, low=1),
    "seg_crop_size": _o(list, [512, 512], "segmentation training: random crop (height, width) after the random "
                        "resize (mmseg's RandomCrop crop_size)", _DATA, length=2),
    "seg_ratio_range": _o(list, [0.5, 2.0], "segmentation training: random resize of seg_scale by a factor in this "
                          "range (mmseg's RandomResize ratio_range)", _DATA, length=2),
    "cat_max_ratio": _o(float, 0.75, "segmentation training: retry a crop (up to 10 times) where one class covers more "
                        "than this share (mmseg's RandomCrop cat_max_ratio; 1 = off)", _DATA, low=0, high=1,
                        low_open=True),
    "seg_photometric": _o(bool, True, "segmentation training: mmseg's PhotoMetricDistortion", _DATA),
    "drop_remainder": _o(bool, True, "drop the last incomplete training batch (validation never drops)", _DATA),
    "aug_repeats": _o(int, 0, "repeated augmentation count (0 = off)", _DATA, low=0),
    "aug_splits": _o(int, 0, "MindCV's augmentation splits; only 0 (one augmented view per image) here", _DATA,
                     low=0),
    "strict_data": _o(bool, False, "an unreadable (corrupt or truncated) image stops the run with an error naming "
                      "the file; False: it is skipped with a warning (training substitutes the next image of the "
                      "epoch, validation leaves it out of top-1)", _DATA),
    "deterministic_augment": _o(bool, True, "random augmentations in one worker per rank (decoding stays parallel) "
                                "so every epoch is reproducible and resume is exact; False: faster, not bit-exact",
                                _DATA),
    # augmentation
    "image_resize": _o(int, 224, "training/eval crop size", _AUG, low=32),
    "scale": _o(list, [0.08, 1.0], "RandomResizedCrop area range", _AUG, length=2),
    "ratio": _o(list, [0.75, 1.333], "RandomResizedCrop aspect range", _AUG, length=2),
    "hflip": _o(float, 0.5, "horizontal flip probability", _AUG, low=0, high=1),
    "vflip": _o(float, 0.0, "vertical flip probability", _AUG, low=0, high=1),
    "interpolation": _o(str, "bicubic", "eval resize interpolation; also training's when train_interpolation is "
                        "null (random: bicubic at eval)", _AUG,
                        choices=("bicubic", "bilinear", "nearest", "area", "random")),
    "train_interpolation": _o(str, None, "training interpolation (RandomResizedCrop and RandAugment's geometric ops): "
                              "random = bilinear or bicubic drawn per image and op (timm's default, the official "
                              "recipe's); null: interpolation's (MindCV's one setting for both)", _AUG,
                              choices=("random", "bilinear", "bicubic"), nullable=True),
    "crop_pct": _o(float, 0.9, "eval: resize short side to image_resize / crop_pct, then center crop", _AUG,
                   low=0, high=1, low_open=True),
    "color_jitter": _o(list, None, "brightness/contrast/saturation jitter (or one float)", _AUG, nullable=True),
    "auto_augment": _o(str, None, "e.g. randaug-m9-mstd0.5-inc1 (or timm's rand-m9-mstd0.5-inc1)", _AUG,
                       nullable=True),
    "re_prob": _o(float, 0.0, "random erasing probability", _AUG, low=0, high=1),
    "re_mode": _o(str, "pixel", "random erasing fill", _AUG, choices=("pixel", "rand", "const")),
    "re_scale": _o(list, [0.02, 0.33], "random erasing area range", _AUG, length=2),
    "re_ratio": _o(list, [0.3, 3.3], "random erasing aspect range", _AUG, length=2),
    "re_value": _o(float, 0.0, "random erasing value for re_mode=const ('random', MindCV's, is re_mode pixel)",
                   _AUG),
    "re_max_attempts": _o(int, 10, "random erasing attempts", _AUG, low=1),
    "mean": _o(list, list(IMAGENET_MEAN), "per-channel mean on the 0-255 scale", _AUG, length=3),
    "std": _o(list, list(IMAGENET_STD), "per-channel std on the 0-255 scale", _AUG, length=3),
    "mixup": _o(float, 0.0, "mixup beta-distribution alpha (0 = off)", _AUG, low=0),
    "cutmix": _o(float, 0.0, "cutmix beta-distribution alpha (0 = off)", _AUG, low=0),
    "cutmix_prob": _o(float, 1.0, "probability of applying mixup/cutmix to a batch", _AUG, low=0, high=1),
    "mixup_switch_prob": _o(float, 0.5, "probability of cutmix instead of mixup when both are on", _AUG,
                            low=0, high=1),
    "mixup_off_epoch": _o(int, 0, "turn mixup/cutmix off from this epoch (0 = never)", _AUG, low=0),
    # model
    "model": _o(str, "poolformer_s12", "registered model name", _MODEL),
    "num_classes": _o(int, None, "classifier outputs (default: the dataset's class count)", _MODEL,
                      nullable=True, low=1),
    "in_channels": _o(int, 3, "input image channels", _MODEL, low=1),
    "drop_rate": _o(float, 0.0, "dropout rate", _MODEL, low=0, high=1),
    "drop_path_rate": _o(float, 0.0, "stochastic depth of the last block", _MODEL, low=0, high=1),
    "head_dropout": _o(float, 0.1, "segmentation: Dropout2d rate before the FPN head's classifier (mmseg's "
                       "dropout_ratio); it draws from MindSpore's kernel RNG, so a resumed run's masks differ", _MODEL,
                       low=0, high=1),
    "frozen_stages": _o(int, 0, "segmentation: backbone cells kept at their initial weights (no gradient, no "
                        "weight decay): 0 the 7x7 stem, as mmseg's configs; k > 0 also the first k network entries; "
                        "-1 none, as the official sail-sg code (from scratch a frozen stem stays random)", _MODEL,
                        low=-1),
    "sync_bn": _o(bool, False, "segmentation: the head's BatchNorm as SyncBatchNorm across the data-parallel ranks "
                  "(mmseg's SyncBN; MindSpore's is Ascend-only)", _MODEL),
    "pretrained": _o(bool, False, "load <model> weights from the local weights cache", _MODEL),
    "ckpt_path": _o(str, "", "initialise from this checkpoint (any format the converter reads)", _MODEL),
    "amp_level": _o(str, "O0", "mixed precision: O0 fp32, O2 fp16 except norms/loss, O3 all fp16", _MODEL,
                    choices=("O0", "O1", "O2", "O3")),
    "val_amp_level": _o(str, None, "validate.py's amp level (MindCV's meaning; train.py validates at amp_level, as "
                        "MindCV's does); default: amp_level", _MODEL, choices=("O0", "O1", "O2", "O3"),
                        nullable=True),
    "amp_cast_list": _o(str, "", "MindCV custom AMP cast list", _MODEL, inert=True),
    "ema": _o(bool, False, "keep an exponential moving average of the weights", _MODEL),
    "ema_decay": _o(float, 0.9999, "EMA decay per step", _MODEL, low=0, high=1),
    # loss
    "loss": _o(str, "CE", "loss function", _LOSS, choices=("CE", "BCE")),
    "label_smoothing": _o(float, 0.0, "label smoothing", _LOSS, low=0, high=1),
    "aux_factor": _o(float, 0.0, "MindCV auxiliary-loss factor (no aux heads here)", _LOSS, inert=True),
    "reduction": _o(str, "mean", "loss reduction", _LOSS, choices=("mean",)),
    # optimizer
    "opt": _o(str, "adamw", "optimizer", _OPT, choices=("adamw", "adam", "sgd", "momentum")),
    "lr": _o(float, 1e-3, "peak learning rate (after lr_scale_batch scaling)", _OPT, low=0, low_open=True),
    "lr_scale_batch": _o(int, None, "if set, lr is for this global batch and is scaled linearly to the real one",
                         _OPT, nullable=True, low=1),
    "momentum": _o(float, 0.9, "SGD momentum / Adam beta1", _OPT, low=0, high=1),
    "beta2": _o(float, 0.999, "Adam beta2", _OPT, low=0, high=1),
    "eps": _o(float, 1e-8, "Adam epsilon", _OPT, low=0, low_open=True),
    "weight_decay": _o(float, 0.05, "decoupled weight decay", _OPT, low=0),
    "weight_decay_filter": _o(str, "all_1d", "parameters without weight decay: all_1d = every 1-D one (norms, "
                              "biases, layer scales; the official recipe), norm_and_bias = names with beta/gamma/bias "
                              "(MindCV), auto = names with beta/gamma (MindSpore's own filter), disable = none",
                              _OPT, choices=("all_1d", "norm_and_bias", "auto", "disable")),
    "filter_bias_and_bn": _o(bool, None, "alias of weight_decay_filter: True = all_1d (norm_and_bias in a MindCV "
                             "recipe, MindCV 0.2's meaning), False = disable", _OPT, nullable=True),
    "layer_decay": _o(float, None, "MindCV's layer-wise lr decay; not available here (only null)", _OPT,
                      nullable=True),
    "use_nesterov": _o(bool, False, "Nesterov momentum for SGD", _OPT),
    "loss_scale_type": _o(str, "auto", "auto: dynamic under amp_level O2/O3, fixed otherwise", _OPT,
                          choices=("auto", "fixed", "dynamic")),
    "loss_scale": _o(float, 1.0, "initial/fixed loss scale", _OPT, low=0, low_open=True),
    "drop_overflow_update": _o(bool, False, "MindCV switch: steps with non-finite gradients are always skipped here",
                               _OPT, inert=True),
    "max_nonfinite_steps": _o(int, 10, "stop after this many consecutive skipped steps with non-finite loss or "
                              "gradients (overflow skips that a dynamic loss scale can still absorb do not count)",
                              _OPT, low=1),
    "clip_grad": _o(bool, False, "clip gradients by global norm (after the all-reduce)", _OPT),
    "clip_value": _o(float, 5.0, "global-norm clipping threshold", _OPT, low=0, low_open=True),
    "gradient_accumulation_steps": _o(int, 1, "micro-batches per optimizer step", _OPT, low=1),
    # scheduler
    "scheduler": _o(str, "cosine_decay", "learning-rate schedule (per step)", _SCHED,
                    choices=("cosine_decay", "constant", "step_decay", "multi_step_decay", "poly")),
    "lr_power": _o(float, 0.9, "poly schedule: lr = (peak - min_lr) * (1 - t / T) ** lr_power + min_lr (mmseg's "
                   "PolyLR power)", _SCHED, low=0, low_open=True),
    "min_lr": _o(float, 1e-5, "final learning rate of the cosine", _SCHED, low=0),
    "warmup_epochs": _o(int, 5, "linear warmup epochs", _SCHED, low=0),
    "warmup_factor": _o(float, 0.0, "MindCV's warmup start as a factor of lr: sets warmup_lr = lr * warmup_factor "
                        "when given (always in a MindCV recipe)", _SCHED, low=0, high=1),
    "warmup_lr": _o(float, 1e-6, "learning rate at the start of the warmup", _SCHED, low=0),
    "cooldown_epochs": _o(int, 0, "epochs at min_lr after the decay", _SCHED, low=0),
    "decay_epochs": _o(int, 0, "step_decay period; for cosine, MindCV's decay length (derived if 0)", _SCHED, low=0),
    "decay_rate": _o(float, 0.1, "step/multi-step decay factor", _SCHED, low=0, high=1),
    "multi_step_decay_milestones": _o(list, [30, 60, 90], "multi_step_decay epochs", _SCHED),
    "lr_epoch_stair": _o(bool, False, "update the learning rate once per epoch instead of per step", _SCHED),
    "num_cycles": _o(int, 1, "cosine cycles", _SCHED, low=1),
    "cycle_decay": _o(float, 1.0, "peak decay per cosine cycle", _SCHED, low=0, high=1),
    "epoch_size": _o(int, 300, "training epochs (excluding cooldown)", _SCHED, low=1),
    "max_iters": _o(int, None, "an iteration-based run: this many optimizer steps (epoch_size and cooldown_epochs "
                    "are then unused; val_interval and ckpt_save_interval count iterations; the data restarts a new "
                    "shuffled epoch when exhausted)", _SCHED, nullable=True, low=1),
    # checkpoints
    "ckpt_save_dir": _o(str, "./ckpt", "directory for checkpoints, metrics.csv, curves.png, config.yaml", _CKPT),
    "ckpt_save_policy": _o(str, "latest_k", "which checkpoints to keep (the best-top-1 one is always kept)",
                           _CKPT, choices=("latest_k", "top_k")),
    "ckpt_save_interval": _o(int, 1, "epochs between checkpoints (iterations when max_iters is set)", _CKPT, low=1),
    "ckpt_save_steps": _o(int, 0, "also checkpoint every N steps (0 = off)", _CKPT, low=0),
    "keep_checkpoint_max": _o(int, 10, "checkpoints kept", _CKPT, low=1),
    "ckpt_format": _o(str, "safetensors", "checkpoint file format", _CKPT, choices=("safetensors", "ckpt")),
    "resume": _o(str, "", "continue a run: a checkpoint path, or 'auto' for the newest in ckpt_save_dir", _CKPT),
    "resume_opt": _o(bool, False, "MindCV's resume form: with ckpt_path (a checkpoint of this trainer) it continues "
                     "that run, as --resume CKPT does", _CKPT),
    "overwrite": _o(bool, False, "allow writing into a ckpt_save_dir that holds another run", _CKPT),
    "dataset_sink_mode": _o(bool, True, "sink the dataset to the device (Ascend; ignored on CPU)", _CKPT),
    # eval / export
    "json": _o(str, "", "validate: write the metrics as JSON here", _EVAL),
    "eval_shuffle": _o(bool, False, "MindCV's shuffle of the validation data (top-1 does not depend on it)", _EVAL,
                       inert=True),
    "file_format": _o(str, "MINDIR", "export format", _EVAL, choices=("MINDIR", "AIR", "ONNX")),
    "file_name": _o(str, "", "export output path (suffix added if missing)", _EVAL),
    "labels": _o(str, "", "export/predict: text file with one class name per line", _EVAL),
    "topk": _o(int, 5, "predict: how many classes to print per image", _EVAL, low=1),
    "mindir": _o(str, "", "predict: run this exported MINDIR (reads its .json sidecar)", _EVAL),
    "onnx": _o(str, "", "predict: run this exported ONNX file in onnxruntime (reads its .json sidecar)", _EVAL),
    "output_dir": _o(str, ".", "predict (segmentation): folder for <stem>_classes.png and <stem>_overlay.png", _EVAL),
}

# MindCV keys accepted for compatibility that change nothing here (warned about when set).
INERT_KEYS: tuple[str, ...] = tuple(key for key, opt in SCHEMA.items() if opt.inert)

# Every key of MindCV's train.py/validate.py parser (config.py of 0.2.0-0.3.0 and master). MindCV
# refuses a recipe key outside its parser, so a MindCV recipe holds only these.
MINDCV_KEYS: frozenset[str] = frozenset("""
    amp_cast_list amp_level aug_repeats aug_splits auto_augment aux_factor batch_size ckpt_path ckpt_save_dir
    ckpt_save_interval ckpt_save_policy ckpt_url clip_grad clip_value color_jitter crop_pct cutmix cutmix_prob
    cycle_decay data_dir data_url dataset dataset_download dataset_sink_mode decay_epochs decay_rate device_target
    distribute drop_overflow_update drop_path_rate drop_rate drop_remainder ema ema_decay enable_modelarts
    epoch_size eps eval_shuffle filter_bias_and_bn gradient_accumulation_steps hflip image_resize in_channels
    interpolation keep_checkpoint_max label_smoothing layer_decay log_interval loss loss_scale loss_scale_type lr
    lr_epoch_stair mean min_lr mixup mode model momentum multi_data_url multi_step_decay_milestones num_classes
    num_cycles num_parallel_workers num_samples opt pretrained ratio re_max_attempts re_prob re_ratio re_scale
    re_value reduction resume_opt scale scheduler seed shuffle std train_split train_url use_nesterov
    val_amp_level val_interval val_split val_while_train vflip warmup_epochs warmup_factor weight_decay
    weight_decay_filter
""".split())

# MindCV 0.3.0's defaults where they differ from ours, for the keys a MindCV recipe leaves out.
# Kept ours: model (MindCV's default is not a PoolFormer), data_dir (ours is a one-line error, not
# training on ./), device_target (auto picks Ascend where MindCV's default Ascend is there).
# re_mode is ours only: MindCV erases with the constant re_value. warmup_lr follows warmup_factor.
MINDCV_DEFAULTS: dict[str, Any] = {
    "val_while_train": False, "interpolation": "bilinear", "crop_pct": 0.875, "color_jitter": [0.4],
    "epoch_size": 90, "clip_value": 15.0, "opt": "adam", "weight_decay": 1e-6, "weight_decay_filter": "disable",
    "eps": 1e-10, "min_lr": 1e-6, "warmup_epochs": 3, "decay_epochs": 100, "decay_rate": 0.9,
    "loss_scale_type": "fixed", "val_amp_level": "O0", "re_mode": "const",
}

# What a MindCV recipe's value means there and here, where the two differ and neither can follow the other.
_MINDCV_MEANINGS: dict[tuple[str, str], str] = {
    ("opt", "adamw"): "opt adamw: MindCV's AdamW corrects the moments for bias; here it is MindSpore's "
                      "nn.AdamWeightDecay, which does not (the first ~1/(1-beta2) steps differ)",
    ("loss_scale_type", "auto"): "loss_scale_type auto: MindCV leaves it to MindSpore's Model (dynamic from 2**24 "
                                 "under O2, no scaling under O3); here dynamic from loss_scale (2**16 if 1) under "
                                 "O2/O3",
}


class Config(dict):
    """A validated configuration: a dict with attribute access (``cfg.lr``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def dump(self, path: str | os.PathLike) -> None:
        """Write the effective configuration as YAML (atomically)."""
        atomic_write_text(path, yaml.safe_dump(dict(self), sort_keys=False))


def _suggest(key: str, prefix: str = "") -> str:
    """The closest valid key (a typo is the usual cause), else where the valid keys are listed."""
    close = difflib.get_close_matches(key, SCHEMA, n=1)
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    return "; --help lists every valid key"


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _number(key: str, value: Any, cast: type) -> int | float:
    """``value`` as ``cast`` (int or float); ints accept integral floats, floats accept ints."""
    what = "an integer" if cast is int else "a number"
    if not isinstance(value, bool):
        if cast is int and isinstance(value, float):
            if value.is_integer():
                return int(value)
        elif isinstance(value, (int, float)):
            return cast(value)
        elif isinstance(value, str):
            try:
                return cast(value)
            except ValueError:
                pass
    raise ConfigError(f"{key}: expected {what}, got {value!r}")


def _coerce(key: str, value: Any, from_cli: bool) -> Any:
    opt = SCHEMA[key]
    if value is None or (from_cli and isinstance(value, str) and value.lower() in ("none", "null")):
        if opt.nullable or opt.default is None:
            return None
        if opt.type is str:
            return ""
        raise ConfigError(f"{key}: a value is required (got none)")
    expected = opt.type.__name__
    if opt.type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if opt.type in (int, float):
        return _number(key, value, opt.type)
    if opt.type is list:
        items = value
        if isinstance(value, str):
            items = [v for v in value.strip("[]() ").split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            items = [value]
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of numbers, got {value!r}")
        try:
            out = [float(v) for v in items]
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a list of numbers, got {value!r}") from None
        if opt.length is not None and len(out) != opt.length:
            raise ConfigError(f"{key}: expected {opt.length} numbers, got {len(out)} ({value!r})")
        return out
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")
    return value


def _check(key: str, value: Any) -> None:
    opt = SCHEMA[key]
    if value is None or value == "":
        return
    if opt.choices is not None:
        probe = value
        if isinstance(value, str):
            lowered = {str(c).lower(): c for c in opt.choices}
            probe = lowered.get(value.lower(), value)
        if probe not in opt.choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, opt.choices))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        too_low = opt.low is not None and (value < opt.low or (opt.low_open and value == opt.low))
        if too_low or (opt.high is not None and value > opt.high):
            raise ConfigError(f"{key}: {value!r} is out of range (must be {_accepted_range(opt)})")


def _accepted_range(opt: Option) -> str:
    """``> 0``, ``>= 1``, ``<= 1`` or ``in (0, 1]``: the whole accepted interval, so one error says it all."""
    if opt.low is not None and opt.high is not None:
        return f"in {'(' if opt.low_open else '['}{opt.low:g}, {opt.high:g}]"
    if opt.low is not None:
        return f"{'>' if opt.low_open else '>='} {opt.low:g}"
    return f"<= {opt.high:g}"


def _normalise_choice(key: str, value: Any) -> Any:
    opt = SCHEMA[key]
    if opt.choices and isinstance(value, str):
        for choice in opt.choices:
            if str(choice).lower() == value.lower():
                return choice
    return value


def _set(cfg: Config, key: str, value: Any, source: str, from_cli: bool) -> None:
    if key not in SCHEMA:
        raise ConfigError(f"unknown config key {key!r} in {source}{_suggest(key)}")
    if key == "re_value" and isinstance(value, str) and value.lower() == "random":
        cfg["re_mode"], cfg["re_value"] = "pixel", 0.0  # MindCV's per-pixel random fill
        return
    given = value
    value = _coerce(key, value, from_cli)
    value = _normalise_choice(key, value)
    if value == "" and SCHEMA[key].choices:  # "none" on the command line is no choice either
        raise ConfigError(f"{key}: {given!r} is not one of {', '.join(map(str, SCHEMA[key].choices))}")
    _check(key, value)
    cfg[key] = value


def is_mindcv_recipe(keys: Sequence[str] | Mapping[str, Any]) -> bool:
    """Whether a recipe with these keys is MindCV's: it has keys and each is one MindCV's parser accepts."""
    keys = list(keys)
    return bool(keys) and all(str(k) in MINDCV_KEYS for k in keys)


def _read_recipe(path: str | os.PathLike) -> Mapping[str, Any]:
    """The recipe's raw mapping: read before any layer is applied, since its keys decide the defaults."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            recipe = yaml.safe_load(fh) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start}); save the recipe as UTF-8 YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        # a scanner error has a `problem`; a reader error (e.g. a control character) says it in its first line
        detail = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        raise ConfigError(f"{path}:{where} is not valid YAML ({detail})") from None
    if not isinstance(recipe, Mapping):
        raise ConfigError(f"{path}: expected a mapping of key: value, got {type(recipe).__name__}")
    return recipe


def _recipe_style(recipe: Mapping[str, Any], overrides: Mapping[str, Any], cli: Mapping[str, str]) -> str:
    """``mindcv`` or ``ours``: ``recipe_defaults`` where given (command line first), else the recipe's keys."""
    for layer, from_cli in ((cli, True), (overrides, False), (recipe, False)):
        if "recipe_defaults" in layer:
            probe = Config()
            _set(probe, "recipe_defaults", layer["recipe_defaults"], "recipe_defaults", from_cli)
            if probe.recipe_defaults != "auto":
                return probe.recipe_defaults
            break
    return "mindcv" if is_mindcv_recipe(recipe) else "ours"


def _resolve(cfg: Config, explicit: set[str], mindcv: bool) -> None:
    """Aliases and MindCV-only keys: derived values filled in, contradictions and unsupported values refused."""
    alias = cfg["filter_bias_and_bn"]
    if alias is not None and "weight_decay_filter" in explicit:
        if alias != (cfg["weight_decay_filter"] != "disable"):
            raise ConfigError(f"filter_bias_and_bn: {alias} contradicts weight_decay_filter: "
                              f"{cfg['weight_decay_filter']} (it is an alias: True = any filter but disable, "
                              "False = disable); give only weight_decay_filter")
    elif alias is not None:
        cfg["weight_decay_filter"] = ("norm_and_bias" if mindcv else "all_1d") if alias else "disable"
    cfg["filter_bias_and_bn"] = cfg["weight_decay_filter"] != "disable"
    if "warmup_factor" in explicit or mindcv:
        derived = float(cfg["lr"]) * float(cfg["warmup_factor"])
        if "warmup_lr" in explicit:  # wins over a factor of 0 (MindCV's default, in every saved config.yaml)
            if "warmup_factor" in explicit and cfg["warmup_factor"] and abs(cfg["warmup_lr"] - derived) > 1e-12:
                raise ConfigError(f"warmup_factor: {cfg['warmup_factor']} (warmup_lr {derived:g}) contradicts "
                                  f"warmup_lr: {cfg['warmup_lr']:g}; give only one of them")
        elif cfg["warmup_factor"] and cfg["lr_scale_batch"]:
            raise ConfigError("warmup_factor: a factor of lr does not follow lr_scale_batch scaling; give warmup_lr "
                              "(the learning rate the warmup starts from) instead")
        else:
            cfg["warmup_lr"] = derived
    if cfg["layer_decay"] is not None:
        raise ConfigError(f"layer_decay: {cfg['layer_decay']}: layer-wise learning-rate decay is not available here "
                          "(every layer trains at lr); remove layer_decay or set it to null")
    if cfg["aug_splits"]:
        raise ConfigError(f"aug_splits: {cfg['aug_splits']}: MindCV's augmentation splits (3 views of each image "
                          "for AugMix) are not available here; use 0 (one augmented view per image)")
    if cfg["resume"] and cfg["resume_opt"] and cfg["ckpt_path"]:
        raise ConfigError(f"resume_opt: ckpt_path {cfg['ckpt_path']} with resume_opt True (MindCV's resume form) "
                          f"and resume {cfg['resume']} both ask to resume; give only --resume")


def _note_mindcv(cfg: Config, explicit: set[str], why: str) -> None:
    """One line naming the MindCV defaults that differ from ours, one per value whose meaning differs."""
    taken = [f"{k} {cfg[k]!r} (ours {SCHEMA[k].default!r})" for k in (*MINDCV_DEFAULTS, "warmup_lr")
             if k not in explicit and cfg[k] != SCHEMA[k].default]
    if taken:
        _LOG.info("%s: the keys it leaves out take MindCV 0.3.0's defaults: %s (--recipe_defaults ours keeps ours)",
                  why, ", ".join(taken))
    for (key, value), meaning in _MINDCV_MEANINGS.items():
        if cfg[key] == value:
            _LOG.info("%s", meaning)


def _validate_model(cfg: Config) -> None:
    if cfg.model not in list_models():
        close = difflib.get_close_matches(cfg.model, list_models(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"model: unknown model {cfg.model!r}{hint} (available: {', '.join(list_models())})")


_SEGMENTATION_DATASETS = ("ade20k", "texture_mosaics")


def _resolve_task(cfg: Config, explicit: set[str]) -> None:
    """``task: auto`` becomes the model's task; a segmentation run defaults to ADE20K data; mismatches are refused."""

    model_task = model_info(cfg.model).task
    if cfg["task"] == "auto":
        cfg["task"] = model_task
    elif cfg["task"] != model_task:
        raise ConfigError(f"task: {cfg['task']} does not fit model {cfg.model}, a {model_task} model; use a "
                          f"{'fpn_poolformer_*' if cfg['task'] == 'segmentation' else 'poolformer_*'} model or "
                          f"task: {model_task}")
    if cfg["task"] != "segmentation":
        for key, default in (("sync_bn", False), ("head_dropout", 0.1), ("frozen_stages", 0)):
            if key in explicit and cfg[key] != default:
                raise ConfigError(f"{key}: {cfg[key]} applies to segmentation models only (model {cfg.model} "
                                  "classifies); remove it")
    elif cfg["sync_bn"] and cfg["device_target"] not in ("Ascend", "auto"):
        raise ConfigError(f"sync_bn: True needs device_target Ascend (MindSpore's SyncBatchNorm is Ascend-only), got "
                          f"{cfg['device_target']}; use sync_bn False")
    if cfg["task"] == "segmentation":
        entries = 2 * len(model_info(cfg.model).depths) - 1  # the stages and the downsamples between them
        if cfg["frozen_stages"] > entries:
            raise ConfigError(f"frozen_stages: {cfg['frozen_stages']} is more than the {entries} backbone entries of "
                              f"{cfg.model}; use -1 (train all), 0 (freeze the stem) .. {entries}")
        if "dataset" not in explicit:
            cfg["dataset"] = "ade20k"
        elif cfg["dataset"] not in _SEGMENTATION_DATASETS:
            raise ConfigError(f"dataset: {cfg['dataset']} is a classification dataset; a segmentation run takes "
                              f"{' or '.join(_SEGMENTATION_DATASETS)}")
    elif cfg["dataset"] in _SEGMENTATION_DATASETS:
        raise ConfigError(f"dataset: {cfg['dataset']} is a segmentation dataset; model {cfg.model} classifies (use "
                          "an fpn_poolformer_* model)")


def load_config(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None,
                cli_overrides: Mapping[str, str] | None = None, defaults: Mapping[str, Any] | None = None) -> Config:
    """Schema defaults <- ``defaults`` <- YAML recipe at ``path`` <- ``overrides`` <- ``cli_overrides`` (strings).

    For a MindCV recipe (see the module doc) ``MINDCV_DEFAULTS`` come between ``defaults`` and the
    recipe, so a key it leaves out means what MindCV's default means; one INFO line says which.
    """
    cfg = Config({key: opt.default for key, opt in SCHEMA.items()})
    for key, value in (defaults or {}).items():
        _set(cfg, key, value, "script defaults", from_cli=False)
    recipe = _read_recipe(path) if path else {}
    style = _recipe_style(recipe, overrides or {}, cli_overrides or {})
    if style == "mindcv":
        for key, value in MINDCV_DEFAULTS.items():
            _set(cfg, key, value, "MindCV defaults", from_cli=False)
    explicit: set[str] = set()
    for key, value in recipe.items():
        _set(cfg, str(key), value, str(path), from_cli=False)
        explicit.add(str(key))
    for key, value in (overrides or {}).items():
        _set(cfg, key, value, "overrides", from_cli=False)
        explicit.add(key)
    for key, value in (cli_overrides or {}).items():
        _set(cfg, key, value, "command line", from_cli=True)
        explicit.add(key)
    cfg["recipe_defaults"] = style
    _validate_model(cfg)
    _resolve_task(cfg, explicit)
    _resolve(cfg, explicit, style == "mindcv")
    if style == "mindcv":
        why = f"{path} is a MindCV recipe" if is_mindcv_recipe(recipe) else "recipe_defaults mindcv"
        _note_mindcv(cfg, explicit, why)
    inert = sorted(k for k in explicit if SCHEMA[k].inert and cfg[k] != SCHEMA[k].default)
    if inert:
        _LOG.warning("ignoring MindCV keys with no effect here: %s", ", ".join(inert))
    return cfg


# The schema is one, in sections: a recipe holds keys of every script and loads in each of them (MindCV
# recipes serve train.py and validate.py alike), but a command-line flag must belong to the script it is
# given to, so `train.py --onnx x` is an error instead of a silently ignored option. A key outside the
# sections below is shared by every script.
_TRAIN_GROUPS = frozenset({"loss", "optimizer", "scheduler", "checkpoint"})
_EVAL_PREPROCESSING = frozenset({"image_resize", "interpolation", "crop_pct", "mean", "std"})
SECTIONS: dict[str, frozenset[str]] = {
    "train": frozenset({"seed", "val_while_train", "val_interval", "log_interval", "stop_check_interval",
                        "train_split", "shuffle",
                        "num_samples", "drop_remainder", "aug_repeats", "aug_splits", "deterministic_augment",
                        "drop_rate", "drop_path_rate", "ema", "ema_decay", "val_amp_level", "seg_crop_size",
                        "seg_ratio_range", "cat_max_ratio", "seg_photometric", "head_dropout", "frozen_stages",
                        "sync_bn"}),
    "eval": frozenset({"val_amp_level", "json", "eval_shuffle"}),
    "export": frozenset({"file_format", "file_name", "labels", "overwrite"}),
    "predict": frozenset({"labels", "topk", "mindir", "onnx", "output_dir", "json"}),
}
SCRIPT_SECTIONS = {"train.py": ("train",), "validate.py": ("eval",), "export.py": ("export",),
                   "predict": ("predict",)}
_MINDCV_SCRIPTS = ("train.py", "validate.py")


def _key_sections(key: str) -> frozenset[str]:
    """The sections ``key`` belongs to; empty for a shared key."""
    opt = SCHEMA[key]
    own = {name for name, keys in SECTIONS.items() if key in keys}
    if opt.group in _TRAIN_GROUPS or (opt.group == "augmentation" and key not in _EVAL_PREPROCESSING):
        own.add("train")
    return frozenset(own)


def script_accepts(prog: str, key: str) -> bool:
    """Whether ``key`` is a command-line option of script ``prog`` (any key for a script not listed).

    MindCV's train.py and validate.py share one parser, so every MindCV key stays a flag of both.
    """
    own = SCRIPT_SECTIONS.get(prog)
    if own is None or (prog in _MINDCV_SCRIPTS and key in MINDCV_KEYS):
        return True
    sections = _key_sections(key)
    return not sections or bool(sections.intersection(own))


def _check_script_keys(prog: str, keys: Sequence[str]) -> None:
    for key in keys:
        if not script_accepts(prog, key):
            owners = sorted(script for script, own in SCRIPT_SECTIONS.items() if script_accepts(script, key))
            raise ConfigError(f"--{key} is an option of {' and '.join(owners)}, not of {prog} "
                              f"(see {prog} --help; in a recipe file it is fine)")


def format_help(prog: str, description: str) -> str:
    """Grouped ``--key`` help for every key ``prog`` takes on its command line."""
    lines = [f"usage: {prog} [-c|--config RECIPE.yaml] [--key value ...]", "", description, ""]
    group = None
    for key, opt in SCHEMA.items():
        if opt.inert or not script_accepts(prog, key):
            continue
        if opt.group != group:
            group = opt.group
            lines.append(f"{group}:")
        choices = f" {{{','.join(map(str, opt.choices))}}}" if opt.choices else ""
        lines.append(f"  --{key}{choices}  {opt.help} (default: {opt.default!r})")
    return "\n".join(lines)


def model_defaults(model: str) -> dict[str, Any]:
    """The model record's facts that a recipe or flag may override: drop path and the eval preprocessing.

    Every script passes them as ``parse_cli(defaults=)``, so ``train.py --model poolformer_s36``
    trains at the paper's drop path 0.2 (not the schema's 0.0) and all four scripts evaluate at the
    record's crop, interpolation and normalisation (ADE20K's for a segmentation model).
    """
    info = model_info(model)
    return {"drop_path_rate": info.drop_path_rate, "crop_pct": info.crop_pct, "interpolation": info.interpolation,
            "mean": list(info.mean), "std": list(info.std)}


def parse_cli(argv: Sequence[str] | None = None, prog: str | None = None, description: str = "",
              defaults: Mapping[str, Any] | None = None) -> Config:
    """Parse ``[-c|--config FILE] [--key value | --key=value | --bool_key] ...`` into a validated Config.

    ``defaults`` are script-specific defaults that the recipe and the command line override.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0])
    if any(a in ("-h", "--help") for a in argv):
        print(format_help(prog, description))
        raise SystemExit(0)
    config_path = None
    cli: dict[str, str] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "-c" or token.startswith("-c="):  # MindCV's short form of --config
            token = "--config" + token[2:]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}; options are --key value")
        key, eq, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if key in ("config", "c"):
            key = "config"
        elif key not in SCHEMA:
            raise ConfigError(f"unknown option --{key}{_suggest(key, prefix='--')}")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if key != "config" and SCHEMA[key].type is bool and (nxt is None or nxt.startswith("--")):
                value = "true"
            elif nxt is None:
                raise ConfigError(f"--{key} needs a value")
            else:
                value = nxt
                i += 1
        if key == "config":
            config_path = value
        else:
            cli[key] = value
        i += 1
    _check_script_keys(prog, list(cli))
    return load_config(config_path, cli_overrides=cli, defaults=defaults)
