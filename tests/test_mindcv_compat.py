"""A MindCV user's commands and recipes work unchanged here and mean the same thing (issue 19).

Every flag of MindCV 0.3.0's own argparse parser (``tests/data/mindcv_config_v030.py``, its
``config.py`` verbatim) goes through our real command-line parser: accepted, or refused in one line
that says what to use. MindCV's PoolFormer recipe, parsed by MindCV's parser and by ours, gives the
same value for every key; its weight-decay groups and learning-rate schedule are MindCV's own.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from train_helpers import REPO, make_tiny_folder, run_python, tiny_overrides

from mindcv_poolformer.checkpoint import CheckpointError
from mindcv_poolformer.config import (
    INERT_KEYS,
    MINDCV_DEFAULTS,
    MINDCV_KEYS,
    SCHEMA,
    ConfigError,
    is_mindcv_recipe,
    load_config,
    parse_cli,
)

from deploy_helpers import deploy_assets  # noqa: F401  (fixture)

DATA = Path(__file__).parent / "data"
RECIPE_V02 = DATA / "mindcv_poolformer_s12_ascend.yaml"  # MindCV 0.2.x's copy: it also has filter_bias_and_bn

# The MindCV flags accepted with no effect here: set, they are named in one warning line.
INERT = ["amp_cast_list", "aux_factor", "ckpt_url", "data_url", "dataset_download", "drop_overflow_update",
         "enable_modelarts", "eval_shuffle", "multi_data_url", "train_url"]

# MindCV values refused here, each with the part of its one-line message that says what to use instead.
REFUSED = {
    ("model", "mobilenet_v2_035_224"): "available: ",  # MindCV's default model is not a PoolFormer
    ("dataset", "cifar10"): "is not one of imagenet, digits",
    ("ckpt_save_policy", "None"): "is not one of latest_k, top_k",
    ("layer_decay", "0.75"): "remove layer_decay or set it to null",
    ("aug_splits", "3"): "use 0 (one augmented view per image)",
    **{("opt", o): "is not one of adamw, adam, sgd, momentum" for o in ("lion", "rmsprop", "adagrad", "lamb", "nadam")},
    **{("scheduler", s): "is not one of cosine_decay, constant, step_decay, multi_step_decay"
       for s in ("exponential_decay", "one_cycle", "cyclic")},
}

# A MindCV-valid value for the flags whose MindCV default is None, and further MindCV values worth a check.
SAMPLES = {"num_samples": "1000", "num_classes": "1000", "drop_rate": "0.0", "drop_path_rate": "0.1",
           "auto_augment": "randaug-m9-mstd0.5-inc1", "layer_decay": "0.75", "amp_cast_list": "[nn.Conv2d]"}
MORE = [("layer_decay", "None"), ("aug_splits", "3"), ("re_value", "random"), ("ckpt_save_policy", "top_k"),
        ("ckpt_save_policy", "None"), ("model", "poolformer_s12"), ("dataset", "cifar10"), ("amp_level", "O2"),
        ("val_amp_level", "O3"), ("resume_opt", "True"), ("interpolation", "bicubic")]

# MindCV defaults a MindCV recipe does not get here, and why.
KEPT_OURS = {"model": "MindCV's default (mobilenet_v2_035_224) is not a PoolFormer",
             "data_dir": "'' is a one-line error, where MindCV's './' trains on the working directory"}


def _load_mindcv_config():
    spec = importlib.util.spec_from_file_location("mindcv_config_v030", DATA / "mindcv_config_v030.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MINDCV = _load_mindcv_config()
_, PARSER = MINDCV.create_parser()
ACTIONS = [a for a in PARSER._actions if a.dest not in ("help", "config")]


def _cli_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _flag_cases() -> list[tuple[str, str]]:
    cases = []
    for action in ACTIONS:
        if action.choices:
            cases += [(action.dest, str(c)) for c in action.choices]
        elif action.default is None:
            cases.append((action.dest, SAMPLES[action.dest]))
        else:
            cases.append((action.dest, _cli_value(action.default)))
    return cases + MORE


CASES = _flag_cases()


def _norm(value):
    """A value in a form both parsers' results compare in: tuples as float lists, names lower-case."""
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    if isinstance(value, str):
        try:
            return float(value)  # an untyped MindCV flag (re_value) keeps the command line's string
        except ValueError:
            return value.lower()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def _same(mindcv_value, ours) -> bool:
    a, b = _norm(mindcv_value), _norm(ours)
    if a is None and b == "":  # MindCV's None string (amp_cast_list) is our empty string: off
        return True
    if isinstance(a, float) and isinstance(b, list) and len(b) == 1:  # color_jitter: one float for all three
        b = b[0]
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)
    return a == b


@pytest.fixture
def recipe_v030(tmp_path) -> Path:
    """MindCV 0.3.0's configs/poolformer/poolformer_s12_ascend.yaml: the 0.2 copy less filter_bias_and_bn.

    (The two files differ in that one line; 0.3.0's parser refuses the key, which it renamed.)
    """
    path = tmp_path / "poolformer_s12_ascend.yaml"
    text = RECIPE_V02.read_text()
    assert "filter_bias_and_bn: True\n" in text
    path.write_text(text.replace("filter_bias_and_bn: True\n", ""))
    return path


def test_every_mindcv_flag_is_tried():
    assert {dest for dest, _ in CASES} == {a.dest for a in ACTIONS}
    assert {a.dest for a in ACTIONS} <= MINDCV_KEYS <= set(SCHEMA)


@pytest.mark.parametrize("flag,value", CASES, ids=[f"--{f}={v}" for f, v in CASES])
def test_mindcv_flag_is_accepted_or_refused_in_one_line(flag, value):
    needle = REFUSED.get((flag, value))
    if needle is None:
        cfg = parse_cli([f"--{flag}", value], prog="train.py")
        action = next(a for a in ACTIONS if a.dest == flag)
        # MindCV's type=tuple/list split a string into characters and its type=bool reads "False" as True:
        # bugs of its command line, not meanings to copy
        if action.type not in (tuple, list, bool) and (flag, value) != ("re_value", "random"):
            try:
                theirs = getattr(PARSER.parse_args([f"--{flag}", value]), flag)
            except SystemExit:  # MindCV's command line cannot say it (--layer_decay None); its YAML can
                return
            assert _same(theirs, cfg[flag])
        return
    with pytest.raises(ConfigError) as info:
        parse_cli([f"--{flag}", value], prog="train.py")
    message = str(info.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"{flag}: ") and needle in message


def test_short_config_flag():
    assert parse_cli(["-c", str(RECIPE_V02)]) == parse_cli(["--config", str(RECIPE_V02)])
    assert parse_cli([f"-c={RECIPE_V02}", "--lr", "0.1"]).lr == 0.1


def test_which_recipes_are_mindcv_recipes(recipe_v030):
    assert is_mindcv_recipe(_yaml(RECIPE_V02)) and is_mindcv_recipe(_yaml(recipe_v030))
    ours = sorted((REPO / "configs").rglob("*.yaml"))
    assert ours and not any(is_mindcv_recipe(_yaml(p)) for p in ours)
    assert all(load_config(p).recipe_defaults == "ours" for p in ours)
    assert load_config(recipe_v030).recipe_defaults == "mindcv"
    forced = load_config(recipe_v030, cli_overrides={"recipe_defaults": "ours"})
    assert (forced.recipe_defaults, forced.clip_value, forced.weight_decay_filter) == ("ours", 5.0, "all_1d")
    assert load_config(overrides={"recipe_defaults": "mindcv"}).clip_value == 15.0


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_mindcv_recipe_means_what_it_means_to_mindcv(recipe_v030):
    theirs = vars(MINDCV.parse_args(["-c", str(recipe_v030)]))
    ours = load_config(recipe_v030)
    differ = {k: (v, ours[k]) for k, v in theirs.items() if k != "config" and not _same(v, ours[k])}
    assert differ == {}
    # the keys the issue named: MindCV's meaning, not ours
    assert (ours.weight_decay_filter, ours.clip_value, ours.loss_scale_type) == ("disable", 15.0, "fixed")
    assert (ours.loss_scale, ours.val_while_train, ours.resume_opt) == (1024.0, True, False)
    assert load_config(overrides={}).val_while_train is True  # ours, for our recipes


def test_mindcv_defaults_fill_what_a_mindcv_recipe_leaves_out():
    theirs = vars(MINDCV.parse_args([]))
    ours = load_config(overrides={"recipe_defaults": "mindcv"})
    for key in ("drop_rate", "drop_path_rate"):  # None: MindCV's create_model leaves the model's own 0.0
        assert theirs[key] is None and ours[key] == 0.0
        theirs[key] = 0.0
    differ = {k for k, v in theirs.items() if k != "config" and not _same(v, ours[k])}
    assert differ == set(KEPT_OURS)
    # MINDCV_DEFAULTS holds exactly the keys whose MindCV default differs from ours (plus re_mode, ours only)
    changed = {k for k, v in theirs.items() if k in SCHEMA and k not in KEPT_OURS
               and not _same(v, SCHEMA[k].default) and not (v is None and SCHEMA[k].default in (0.0, "", None))}
    assert changed | {"re_mode"} == set(MINDCV_DEFAULTS)


def test_filter_bias_and_bn_is_an_alias(recipe_v030):
    assert load_config(RECIPE_V02).weight_decay_filter == "norm_and_bias"  # MindCV 0.2's meaning of True
    assert load_config(recipe_v030).weight_decay_filter == "disable"  # MindCV 0.3's default
    ours = load_config(REPO / "configs" / "poolformer" / "poolformer_s12_ascend.yaml")
    assert (ours.weight_decay_filter, ours.filter_bias_and_bn) == ("all_1d", True)
    assert load_config(overrides={"filter_bias_and_bn": False}).weight_decay_filter == "disable"
    for wdf in ("auto", "norm_and_bias", "all_1d"):
        assert load_config(overrides={"weight_decay_filter": wdf, "filter_bias_and_bn": True}).filter_bias_and_bn
    with pytest.raises(ConfigError, match="^filter_bias_and_bn: False contradicts weight_decay_filter: auto"):
        load_config(overrides={"weight_decay_filter": "auto", "filter_bias_and_bn": False})
    with pytest.raises(ConfigError, match="give only weight_decay_filter"):
        parse_cli(["-c", str(RECIPE_V02), "--weight_decay_filter", "disable"])


def test_weight_decay_filters_are_mindcvs_and_mindspores():
    from mindcv.optim.optim_factory import init_group_params
    from mindspore import nn

    from mindcv_poolformer.models import create_model
    from mindcv_poolformer.train.optim import OptimizerSettings, create_optimizer, split_decay

    net = create_model("poolformer_s12", num_classes=10)
    params = net.trainable_params()
    for wdf in ("disable", "norm_and_bias"):
        groups = init_group_params(params, 0.05, wdf, [])
        theirs = {p.name for g in groups if g.get("weight_decay") for p in g["params"]}
        assert {p.name for p in split_decay(net, wdf)[0]} == theirs
    # auto: MindCV passes the parameters ungrouped; MindSpore's optimizer then decides
    flags = nn.AdamWeightDecay(params, weight_decay=0.05).decay_flags
    assert {p.name for p in split_decay(net, "auto")[0]} == {p.name for p, f in zip(params, flags) if f}
    decayed = {w: {p.name for p in split_decay(net, w)[0]} for w in ("all_1d", "norm_and_bias", "auto")}
    assert "network.0.0.layer_scale_1" in decayed["norm_and_bias"] - decayed["all_1d"]
    assert "head.bias" in decayed["auto"] - decayed["norm_and_bias"]
    disable = OptimizerSettings.from_config(load_config(overrides={"weight_decay_filter": "disable"}))
    one_group = create_optimizer(net, disable, 1e-3)
    assert [float(w.asnumpy()) for w in one_group.weight_decay] == pytest.approx([0.05] * len(params))


def test_warmup_and_schedule_are_mindcvs(recipe_v030):
    from mindcv.scheduler import create_scheduler

    from mindcv_poolformer.train.schedule import ScheduleSettings, build_lr_schedule

    for extra in ({}, {"warmup_factor": 0.01, "lr_epoch_stair": True}):
        cfg = load_config(recipe_v030, overrides=extra)
        assert cfg.warmup_lr == pytest.approx(cfg.lr * cfg.warmup_factor)
        theirs = create_scheduler(3, scheduler=cfg.scheduler, lr=cfg.lr, min_lr=cfg.min_lr,
                                  warmup_epochs=cfg.warmup_epochs, warmup_factor=cfg.warmup_factor,
                                  decay_epochs=cfg.decay_epochs, decay_rate=cfg.decay_rate,
                                  milestones=cfg.multi_step_decay_milestones, num_epochs=cfg.epoch_size,
                                  num_cycles=cfg.num_cycles, cycle_decay=cfg.cycle_decay,
                                  lr_epoch_stair=cfg.lr_epoch_stair)
        ours = build_lr_schedule(ScheduleSettings.from_config(cfg), 3, 1024)
        np.testing.assert_allclose(ours, np.asarray(theirs), rtol=1e-6, atol=1e-12)
    with pytest.raises(ConfigError, match="^warmup_factor: 0.5 .* contradicts warmup_lr"):
        load_config(overrides={"warmup_factor": 0.5, "warmup_lr": 1e-6})
    with pytest.raises(ConfigError, match="^warmup_factor: a factor of lr does not follow lr_scale_batch"):
        load_config(overrides={"warmup_factor": 0.1, "lr_scale_batch": 1024})


def test_re_value_random_is_per_pixel_noise(recipe_v030):
    assert load_config(recipe_v030).re_mode == "const"  # MindCV erases with the constant re_value
    cfg = parse_cli(["-c", str(recipe_v030), "--re_value", "random"])
    assert (cfg.re_mode, cfg.re_value) == ("pixel", 0.0)


def test_inert_flags_are_named_in_one_warning(caplog):
    assert INERT == sorted(INERT_KEYS)
    values = {"enable_modelarts": "True", "dataset_download": "True", "drop_overflow_update": "True",
              "eval_shuffle": "True", "aux_factor": "0.4", "amp_cast_list": "[nn.Conv2d]"}
    argv = [a for k in INERT for a in (f"--{k}", values.get(k, "s3://bucket"))]
    with caplog.at_level(logging.WARNING, logger="mindcv_poolformer"):
        parse_cli(argv)
    lines = [r.getMessage() for r in caplog.records if "no effect here" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].split("no effect here: ")[1].split(", ") == INERT


def test_differences_are_said_once_in_one_line(caplog, recipe_v030):
    with caplog.at_level(logging.INFO, logger="mindcv_poolformer"):
        load_config(recipe_v030)
    notes = [r.getMessage() for r in caplog.records]
    defaults = [n for n in notes if "MindCV 0.3.0's defaults" in n]
    assert len(defaults) == 1 and "\n" not in defaults[0]
    assert "clip_value 15.0 (ours 5.0)" in defaults[0] and "loss_scale_type 'fixed' (ours 'auto')" in defaults[0]
    assert "weight_decay_filter 'disable' (ours 'all_1d')" in defaults[0]
    assert sum("opt adamw: MindCV's AdamW corrects the moments for bias" in n for n in notes) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mindcv_poolformer"):
        load_config(REPO / "configs" / "poolformer" / "poolformer_s12_ascend.yaml")
    assert not any("MindCV" in r.getMessage() for r in caplog.records)


def _training_checkpoint(path: Path, epoch: int) -> Path:
    """A safetensors file with only a train_state entry (enough to tell ours from MindCV's)."""
    header = json.dumps({"train_state.epoch": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<q", epoch))
    return path


def test_mindcv_resume_form_is_our_resume(tmp_path, caplog):
    from mindcv_poolformer.train.trainer import apply_mindcv_resume, resume_command

    ours = _training_checkpoint(tmp_path / "poolformer_s12-e0003-s00000030.safetensors", 3)
    cfg = parse_cli(["--ckpt_path", str(ours), "--resume_opt", "True"])
    apply_mindcv_resume(cfg)
    assert (cfg.resume, cfg.ckpt_path, cfg.resume_opt) == (str(ours), "", False)
    import mindspore as ms

    mindcv_ckpt = tmp_path / "poolformer_s12-3_625.ckpt"  # what MindCV writes: its train network, no train_state
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(np.zeros(2, np.float32))}
                        for n in ("head.bias", "adam_m.head.bias", "beta1_power", "global_step")], str(mindcv_ckpt))
    with pytest.raises(CheckpointError, match=f"^resume_opt: {mindcv_ckpt} is not a training checkpoint"):
        apply_mindcv_resume(parse_cli(["--ckpt_path", str(mindcv_ckpt), "--resume_opt"]))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"^ckpt_path: {garbage} is not a readable checkpoint"):
        apply_mindcv_resume(parse_cli(["--ckpt_path", str(garbage), "--resume_opt", "True"]))
    safetensors_weights = tmp_path / "w.safetensors"
    header = b'{"head.bias": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    safetensors_weights.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
    with pytest.raises(CheckpointError) as info:
        apply_mindcv_resume(parse_cli(["--ckpt_path", str(safetensors_weights), "--resume_opt", "True"]))
    message = str(info.value)
    assert message.startswith(f"resume_opt: {safetensors_weights} is not a training checkpoint of this trainer")
    assert "drop --resume_opt" in message and "--resume PATH|auto" in message and "\n" not in message
    with pytest.raises(ConfigError, match="give only --resume"):
        parse_cli(["--ckpt_path", str(ours), "--resume_opt", "True", "--resume", "auto"])
    with caplog.at_level(logging.WARNING, logger="mindcv_poolformer"):
        apply_mindcv_resume(parse_cli(["--resume_opt", "True"]))
    assert "resume_opt True has no effect without --ckpt_path" in caplog.text
    again = resume_command(["train.py", "--ckpt_path", str(ours), "--resume_opt", "True", "--lr", "0.1"])
    assert again == f"python train.py --ckpt_path {ours} --lr 0.1 --resume auto"
    assert "--resume_opt" not in resume_command(["train.py", "--resume_opt", "--lr", "0.1"])


def test_mindcv_resume_form_continues_our_run(tmp_path):
    """``--ckpt_path CKPT --resume_opt True`` on a checkpoint of this trainer starts where it stopped."""
    from mindcv_poolformer.train.trainer import Trainer, TrainResult

    folder = make_tiny_folder(tmp_path / "data", per_class_train=2, per_class_val=1)
    run = tmp_path / "run"
    first = Trainer(load_config(overrides=tiny_overrides(folder, run, num_samples=16)))
    first.global_step, first.best_top1 = 4, 12.5
    first.result = TrainResult()
    first._save(2, 0, 12.5, True)
    ckpt = first.result.last_checkpoint
    resumed = Trainer(load_config(overrides=tiny_overrides(folder, run, num_samples=16, ckpt_path=ckpt,
                                                           resume_opt=True)))
    assert (resumed.start_epoch, resumed.global_step, resumed.best_top1) == (2, 4, 12.5)
    assert resumed.resumed_from == ckpt and resumed.cfg.resume == ckpt


def test_validate_pretrained_uses_the_weights_cache(deploy_assets, tmp_path, monkeypatch, capsys):  # noqa: F811
    from mindcv_poolformer.evaluation.validate import main

    common = ["--data_dir", str(deploy_assets["data"]), "--image_resize", "64", "--batch_size", "4",
              "--num_parallel_workers", "1", "--mode", "1"]
    monkeypatch.setenv("MINDCV_POOLFORMER_HOME", str(tmp_path / "empty"))
    assert main(["--model=poolformer_s12", "--pretrained", *common]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"validate.py: error: no pretrained weights for poolformer_s12 in {tmp_path / 'empty'}")
    assert "set MINDCV_POOLFORMER_HOME" in err and "--ckpt_path FILE" in err
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(deploy_assets["ckpt"], home / "poolformer_s12.safetensors")
    monkeypatch.setenv("MINDCV_POOLFORMER_HOME", str(home))
    assert main(["--model=poolformer_s12", "--pretrained", *common, "--json", str(tmp_path / "p.json")]) == 0
    assert main(["--ckpt_path", str(deploy_assets["ckpt"]), *common, "--json", str(tmp_path / "c.json")]) == 0
    pretrained, direct = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("p", "c"))
    assert pretrained["ckpt"] == str(home / "poolformer_s12.safetensors")
    assert (pretrained["top1"], pretrained["loss"], pretrained["num_samples"]) == (
        direct["top1"], direct["loss"], direct["num_samples"])


def test_validate_amp_level_is_val_amp_level(deploy_assets, tmp_path, capsys):  # noqa: F811
    from mindcv_poolformer.evaluation.validate import main

    common = ["--data_dir", str(deploy_assets["data"]), "--ckpt_path", str(deploy_assets["ckpt"]),
              "--image_resize", "64", "--batch_size", "4", "--num_parallel_workers", "1", "--mode", "1"]
    out = tmp_path / "v.json"
    assert main([*common, "--amp_level", "O3", "--val_amp_level", "O0", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["amp_level"] == "O0"
    capsys.readouterr()
    assert main([*common, "--val_amp_level", "O1"]) == 2
    assert capsys.readouterr().err.strip().startswith("validate.py: error: val_amp_level: O1 is not supported")


def test_training_validates_at_amp_level_as_mindcv_does(caplog, recipe_v030):
    from mindcv_poolformer.train.trainer import validate_train_config

    with caplog.at_level(logging.INFO, logger="mindcv_poolformer"):
        validate_train_config(load_config(recipe_v030, overrides={"device_target": "CPU"}))
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("val_amp_level")]
    assert notes == ["val_amp_level O0 is validate.py's amp level (as in MindCV); validation during training runs "
                     "at amp_level O3, as MindCV's train.py does"]


@pytest.mark.slow
def test_mindcv_commands_through_train_py(tmp_path, recipe_v030):
    """The real train.py: MindCV flags parse (the run stops at the missing data), refusals are one line."""
    missing = tmp_path / "no_data"
    accepted = run_python(["train.py", "-c", str(recipe_v030), "--distribute", "False", "--device_target", "CPU",
                           "--data_dir", str(missing), "--ckpt_save_dir", str(tmp_path / "run"),
                           "--weight_decay_filter", "auto", "--val_amp_level", "O3", "--eval_shuffle", "True",
                           "--aug_splits", "0", "--layer_decay", "None"])
    assert accepted.returncode == 2
    assert accepted.stderr.strip().splitlines() == [f"train.py: error: data_dir: {missing} does not exist"]
    assert "is a MindCV recipe: the keys it leaves out take MindCV 0.3.0's defaults" in accepted.stdout
    assert "ignoring MindCV keys with no effect here: eval_shuffle" in accepted.stdout
    for flags, needle in ((["--layer_decay", "0.75"], "layer_decay: 0.75: layer-wise learning-rate decay"),
                          (["--opt", "lion"], "opt: 'lion' is not one of adamw, adam, sgd, momentum"),
                          (["--weight_decay_filter", "all"], "weight_decay_filter: 'all' is not one of all_1d, ")):
        refused = run_python(["train.py", "-c", str(recipe_v030), *flags])
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"train.py: error: {needle}"), refused.stderr
    assert not (tmp_path / "run").exists()


def test_help_lists_mindcv_keys_and_short_config(capsys):
    with pytest.raises(SystemExit):
        parse_cli(["-h"], prog="train.py")
    text = capsys.readouterr().out
    assert "[-c|--config RECIPE.yaml]" in text
    for key in ("weight_decay_filter", "val_amp_level", "recipe_defaults", "resume_opt"):
        assert f"--{key}" in text
    assert not any(f"--{key} " in text for key in INERT)


def test_mindcv_parser_is_the_v030_one():
    assert isinstance(PARSER, argparse.ArgumentParser)
    assert PARSER.get_default("clip_value") == 15.0 and PARSER.get_default("weight_decay_filter") == "disable"
