"""The one configuration schema: YAML recipes plus ``--key value`` CLI overrides, validated once.

Key names follow MindCV's recipes so a MindCV PoolFormer YAML runs unchanged; MindCV keys that
have no effect here are accepted and reported as inert. Every script (train, validate, export,
predict) reads the same schema, so a recipe means the same thing to all of them.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

__all__ = ["ConfigError", "Option", "SCHEMA", "Config", "load_config", "parse_cli", "format_help"]

_LOG = logging.getLogger("mindcv_poolformer")


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and what is accepted."""


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
    "val_interval": _o(int, 1, "epochs between validations", _SYS, low=1),
    "log_interval": _o(int, 100, "steps between log lines", _SYS, low=1),
    "debug": _o(bool, False, "show full tracebacks on errors", _SYS),
    "enable_modelarts": _o(bool, False, "MindCV ModelArts switch", _SYS, inert=True),
    "multi_data_url": _o(str, "", "MindCV ModelArts path", _SYS, inert=True),
    "data_url": _o(str, "", "MindCV ModelArts path", _SYS, inert=True),
    "ckpt_url": _o(str, "", "MindCV ModelArts path", _SYS, inert=True),
    "train_url": _o(str, "", "MindCV ModelArts path", _SYS, inert=True),
    # dataset
    "dataset": _o(str, "imagenet", "imagenet-style ImageFolder, or 'digits' (built offline from scikit-learn)",
                  _DATA, choices=("imagenet", "digits")),
    "data_dir": _o(str, "", "dataset root holding train/ and val/", _DATA),
    "train_split": _o(str, "train", "training sub-folder of data_dir", _DATA),
    "val_split": _o(str, "val", "validation sub-folder of data_dir", _DATA),
    "dataset_download": _o(bool, False, "MindCV download switch (nothing is downloaded here)", _DATA, inert=True),
    "shuffle": _o(bool, True, "shuffle the training set", _DATA),
    "num_samples": _o(int, None, "use only this many training samples", _DATA, nullable=True, low=1),
    "batch_size": _o(int, 128, "batch size per device", _DATA, low=1),
    "drop_remainder": _o(bool, True, "drop the last incomplete training batch (validation never drops)", _DATA),
    "aug_repeats": _o(int, 0, "repeated augmentation count (0 = off)", _DATA, low=0),
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
    "interpolation": _o(str, "bicubic", "resize interpolation", _AUG,
                        choices=("bicubic", "bilinear", "nearest", "area", "random")),
    "crop_pct": _o(float, 0.9, "eval: resize short side to image_resize / crop_pct, then center crop", _AUG,
                   low=0, high=1, low_open=True),
    "color_jitter": _o(list, None, "brightness/contrast/saturation jitter (or one float)", _AUG, nullable=True),
    "auto_augment": _o(str, None, "e.g. randaug-m9-mstd0.5-inc1 (or timm's rand-m9-mstd0.5-inc1)", _AUG,
                       nullable=True),
    "re_prob": _o(float, 0.0, "random erasing probability", _AUG, low=0, high=1),
    "re_mode": _o(str, "pixel", "random erasing fill", _AUG, choices=("pixel", "rand", "const")),
    "re_scale": _o(list, [0.02, 0.33], "random erasing area range", _AUG, length=2),
    "re_ratio": _o(list, [0.3, 3.3], "random erasing aspect range", _AUG, length=2),
    "re_value": _o(float, 0.0, "random erasing value for re_mode=const", _AUG),
    "re_max_attempts": _o(int, 10, "random erasing attempts", _AUG, low=1),
    "mean": _o(list, [0.485 * 255, 0.456 * 255, 0.406 * 255], "per-channel mean on the 0-255 scale", _AUG, length=3),
    "std": _o(list, [0.229 * 255, 0.224 * 255, 0.225 * 255], "per-channel std on the 0-255 scale", _AUG, length=3),
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
    "pretrained": _o(bool, False, "load <model> weights from the local weights cache", _MODEL),
    "ckpt_path": _o(str, "", "initialise from this checkpoint (any format the converter reads)", _MODEL),
    "amp_level": _o(str, "O0", "mixed precision: O0 fp32, O2 fp16 except norms/loss, O3 all fp16", _MODEL,
                    choices=("O0", "O1", "O2", "O3")),
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
    "filter_bias_and_bn": _o(bool, True, "no weight decay on 1-D parameters (norms, biases, layer scales)", _OPT),
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
                    choices=("cosine_decay", "constant", "step_decay", "multi_step_decay")),
    "min_lr": _o(float, 1e-5, "final learning rate of the cosine", _SCHED, low=0),
    "warmup_epochs": _o(int, 5, "linear warmup epochs", _SCHED, low=0),
    "warmup_factor": _o(float, 0.0, "MindCV warmup start factor (use warmup_lr)", _SCHED, low=0, high=1),
    "warmup_lr": _o(float, 1e-6, "learning rate at the start of the warmup", _SCHED, low=0),
    "cooldown_epochs": _o(int, 0, "epochs at min_lr after the decay", _SCHED, low=0),
    "decay_epochs": _o(int, 0, "step_decay period; for cosine, MindCV's decay length (derived if 0)", _SCHED, low=0),
    "decay_rate": _o(float, 0.1, "step/multi-step decay factor", _SCHED, low=0, high=1),
    "multi_step_decay_milestones": _o(list, [30, 60, 90], "multi_step_decay epochs", _SCHED),
    "lr_epoch_stair": _o(bool, False, "update the learning rate once per epoch instead of per step", _SCHED),
    "num_cycles": _o(int, 1, "cosine cycles", _SCHED, low=1),
    "cycle_decay": _o(float, 1.0, "peak decay per cosine cycle", _SCHED, low=0, high=1),
    "epoch_size": _o(int, 300, "training epochs (excluding cooldown)", _SCHED, low=1),
    # checkpoints
    "ckpt_save_dir": _o(str, "./ckpt", "directory for checkpoints, metrics.csv, curves.png, config.yaml", _CKPT),
    "ckpt_save_policy": _o(str, "latest_k", "which checkpoints to keep (the best-top-1 one is always kept)",
                           _CKPT, choices=("latest_k", "top_k")),
    "ckpt_save_interval": _o(int, 1, "epochs between checkpoints", _CKPT, low=1),
    "ckpt_save_steps": _o(int, 0, "also checkpoint every N steps (0 = off)", _CKPT, low=0),
    "keep_checkpoint_max": _o(int, 10, "checkpoints kept", _CKPT, low=1),
    "ckpt_format": _o(str, "safetensors", "checkpoint file format", _CKPT, choices=("safetensors", "ckpt")),
    "resume": _o(str, "", "continue a run: a checkpoint path, or 'auto' for the newest in ckpt_save_dir", _CKPT),
    "resume_opt": _o(bool, True, "MindCV switch; resuming always restores the optimizer here", _CKPT, inert=True),
    "overwrite": _o(bool, False, "allow writing into a ckpt_save_dir that holds another run", _CKPT),
    "dataset_sink_mode": _o(bool, True, "sink the dataset to the device (Ascend; ignored on CPU)", _CKPT),
    # eval / export
    "json": _o(str, "", "validate: write the metrics as JSON here", _EVAL),
    "file_format": _o(str, "MINDIR", "export format", _EVAL, choices=("MINDIR", "AIR", "ONNX")),
    "file_name": _o(str, "", "export output path (suffix added if missing)", _EVAL),
    "labels": _o(str, "", "export/predict: text file with one class name per line", _EVAL),
    "topk": _o(int, 5, "predict: how many classes to print per image", _EVAL, low=1),
    "mindir": _o(str, "", "predict: run this exported MINDIR (reads its .json sidecar)", _EVAL),
    "onnx": _o(str, "", "predict: run this exported ONNX file in onnxruntime (reads its .json sidecar)", _EVAL),
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
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            yaml.safe_dump(dict(self), fh, sort_keys=False)
        os.replace(tmp, path)


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
    value = _coerce(key, value, from_cli)
    value = _normalise_choice(key, value)
    _check(key, value)
    cfg[key] = value


def _validate_model(cfg: Config) -> None:
    from .models.registry import list_models

    if cfg.model not in list_models():
        close = difflib.get_close_matches(cfg.model, list_models(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"model: unknown model {cfg.model!r}{hint} (available: {', '.join(list_models())})")


def load_config(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None,
                cli_overrides: Mapping[str, str] | None = None, defaults: Mapping[str, Any] | None = None) -> Config:
    """Schema defaults <- ``defaults`` <- YAML recipe at ``path`` <- ``overrides`` <- ``cli_overrides`` (strings)."""
    cfg = Config({key: opt.default for key, opt in SCHEMA.items()})
    for key, value in (defaults or {}).items():
        _set(cfg, key, value, "script defaults", from_cli=False)
    explicit: set[str] = set()
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path, encoding="utf-8") as fh:
                recipe = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(recipe, Mapping):
            raise ConfigError(f"{path}: expected a mapping of key: value, got {type(recipe).__name__}")
        for key, value in recipe.items():
            _set(cfg, str(key), value, str(path), from_cli=False)
            explicit.add(str(key))
    for key, value in (overrides or {}).items():
        _set(cfg, key, value, "overrides", from_cli=False)
        explicit.add(key)
    for key, value in (cli_overrides or {}).items():
        _set(cfg, key, value, "command line", from_cli=True)
        explicit.add(key)
    _validate_model(cfg)
    inert = sorted(k for k in explicit if SCHEMA[k].inert and cfg[k] != SCHEMA[k].default)
    if inert:
        _LOG.warning("ignoring MindCV keys with no effect here: %s", ", ".join(inert))
    return cfg


def format_help(prog: str, description: str) -> str:
    """Grouped ``--key`` help for every schema key."""
    lines = [f"usage: {prog} [--config RECIPE.yaml] [--key value ...]", "", description, ""]
    group = None
    for key, opt in SCHEMA.items():
        if opt.inert:
            continue
        if opt.group != group:
            group = opt.group
            lines.append(f"{group}:")
        choices = f" {{{','.join(map(str, opt.choices))}}}" if opt.choices else ""
        lines.append(f"  --{key}{choices}  {opt.help} (default: {opt.default!r})")
    return "\n".join(lines)


def parse_cli(argv: Sequence[str] | None = None, prog: str | None = None, description: str = "",
              defaults: Mapping[str, Any] | None = None) -> Config:
    """Parse ``[--config FILE] [--key value | --key=value | --bool_key] ...`` into a validated Config.

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
    return load_config(config_path, cli_overrides=cli, defaults=defaults)
