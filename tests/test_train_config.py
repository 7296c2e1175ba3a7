"""Training configuration: MindCV recipes load, loss-scale plans per device, launcher and run-dir guards."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from train_helpers import REPO, run_python

from mindcv_poolformer.config import ConfigError, load_config
from mindcv_poolformer.distributed import detect_launcher, init_distributed, mpi_env
from mindcv_poolformer.train.run_io import check_run_dir
from mindcv_poolformer.train.trainer import LossScalePlan, plan_loss_scale

DATA = Path(__file__).parent / "data"


def test_mindcv_recipe_loads_unchanged():
    cfg = load_config(DATA / "mindcv_poolformer_s12_ascend.yaml")
    assert cfg.opt == "adamw" and cfg.lr == 5e-4 and cfg.amp_level == "O3" and cfg.epoch_size == 600
    assert cfg.loss_scale == 1024 and cfg.distribute is True
    # and means what it means to MindCV (0.2's filter_bias_and_bn True, its fixed loss scale, clip at 15)
    assert cfg.recipe_defaults == "mindcv" and cfg.weight_decay_filter == "norm_and_bias"
    assert plan_loss_scale(cfg.loss_scale_type, cfg.amp_level, cfg.loss_scale) == LossScalePlan(1024.0, False)
    assert cfg.clip_value == 15.0 and cfg.warmup_lr == 0.0


@pytest.mark.parametrize("variant,drop_path,crop", [("s12", 0.1, 0.9), ("s24", 0.1, 0.9), ("s36", 0.2, 0.9),
                                                     ("m36", 0.3, 0.95), ("m48", 0.4, 0.95)])
def test_official_recipes(variant, drop_path, crop):
    cfg = load_config(REPO / "configs" / "poolformer" / f"poolformer_{variant}_ascend.yaml")
    assert (cfg.model, cfg.drop_path_rate, cfg.crop_pct) == (f"poolformer_{variant}", drop_path, crop)
    assert (cfg.lr, cfg.lr_scale_batch, cfg.weight_decay, cfg.epoch_size) == (1e-3, 1024, 0.05, 300)
    assert (cfg.warmup_epochs, cfg.warmup_lr, cfg.min_lr, cfg.cooldown_epochs) == (5, 1e-6, 1e-5, 10)
    assert (cfg.label_smoothing, cfg.mixup, cfg.cutmix, cfg.mixup_switch_prob) == (0.1, 0.8, 1.0, 0.5)
    assert cfg.auto_augment == "rand-m9-mstd0.5-inc1" and (cfg.re_prob, cfg.re_mode) == (0.25, "pixel")
    assert (cfg.batch_size, cfg.device_target, cfg.distribute, cfg.interpolation) == (128, "Ascend", True, "bicubic")
    assert cfg.train_interpolation == "random"  # timm train.py's --train-interpolation default, which the official runs
    assert cfg.amp_level != "O0" and cfg.filter_bias_and_bn and cfg.weight_decay_filter == "all_1d"
    assert cfg.recipe_defaults == "ours" and cfg.val_amp_level is None


@pytest.mark.parametrize("name", ["demo/digits_cpu.yaml", "demo/texture_mosaics_cpu.yaml",
                                  "poolformer/poolformer_s12_finetune.yaml"])
def test_other_recipes_load(name):
    load_config(REPO / "configs" / name)


def test_loss_scale_plans():
    def plan(**kw):
        cfg = load_config(overrides={"device_target": "CPU", **kw})
        p = plan_loss_scale(cfg.loss_scale_type, cfg.amp_level, cfg.loss_scale)
        return p.value, p.dynamic

    # dynamic under mixed precision on every device: overflow skipping works on CPU with our step
    assert plan(amp_level="O2", loss_scale=1024) == (1024.0, True)
    assert plan(amp_level="O3") == (65536.0, True)
    assert plan(amp_level="O2", loss_scale_type="fixed", loss_scale=128) == (128.0, False)
    assert plan() == (1.0, False)
    assert plan(device_target="Ascend", amp_level="O2") == (65536.0, True)


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        load_config(overrides={"gradient_accumulation_steps": 0})
    with pytest.raises(ConfigError, match="warmup_lr"):
        load_config(cli_overrides={"warmup_lr": "fast"})
    with pytest.raises(ConfigError) as bad:
        load_config(cli_overrides={"train_interpolation": "lanczos"})
    assert str(bad.value) == "train_interpolation: 'lanczos' is not one of random, bilinear, bicubic"
    # a MindCV recipe has one interpolation for both (MindCV's create_transforms), so it trains at its own
    assert load_config(DATA / "mindcv_poolformer_s12_ascend.yaml").train_interpolation is None


def test_distribute_without_launcher(monkeypatch):
    for var in ("MS_ROLE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "PMIX_RANK",
                "RANK_TABLE_FILE", "RANK_SIZE", "RANK_ID"):
        monkeypatch.delenv(var, raising=False)
    assert detect_launcher() == "none" and mpi_env() is None
    with pytest.raises(ConfigError, match="needs a launcher"):
        init_distributed(True, "CPU")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert detect_launcher() == "mpirun" and mpi_env() == (1, 2)


def test_run_dir_guard(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "poolformer_s12-e0001-s00000010.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError, match="already holds a run"):
        check_run_dir(str(run))
    check_run_dir(str(run), resume="auto")
    check_run_dir(run, overwrite=True)


@pytest.mark.slow
def test_train_script_errors(tmp_path):
    bad = run_python(["train.py", "--config", "configs/demo/digits_cpu.yaml", "--distribute", "True",
                      "--data_dir", str(tmp_path / "d"), "--ckpt_save_dir", str(tmp_path / "r")],
                     env={"MS_ROLE": "", "OMPI_COMM_WORLD_SIZE": ""})
    assert bad.returncode == 2, bad.stderr
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
    assert len(lines) == 1 and "needs a launcher" in lines[0] and "Traceback" not in bad.stderr
    missing = run_python(["train.py", "--data_dir", str(tmp_path / "none"), "--ckpt_save_dir", str(tmp_path / "r")])
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    typo = run_python(["train.py", "--lr_scale_bacth", "1024"])
    assert typo.returncode == 2 and "lr_scale_batch" in typo.stderr
    interp = run_python(["train.py", "--train_interpolation", "lanczos"])
    assert interp.returncode == 2 and "train_interpolation: 'lanczos' is not one of random, bilinear, bicubic" in \
        interp.stderr and "Traceback" not in interp.stderr


def test_saved_config_roundtrip(tmp_path):
    cfg = load_config(REPO / "configs" / "demo" / "digits_cpu.yaml")
    cfg.dump(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    mindcv = load_config(DATA / "mindcv_poolformer_s12_ascend.yaml")  # its derived keys reload unchanged
    mindcv.dump(tmp_path / "mindcv.yaml")
    assert load_config(tmp_path / "mindcv.yaml") == mindcv
    assert load_config(overrides={"auto_augment": None}).auto_augment is None
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"] == "poolformer_s12"


def test_each_script_takes_its_own_flags_and_every_recipe():
    """Sections of the one schema: flags belong to scripts, recipe files load everywhere."""
    from mindcv_poolformer.config import SCHEMA, SCRIPT_SECTIONS, parse_cli, script_accepts

    assert all(any(script_accepts(p, k) for p in SCRIPT_SECTIONS) for k in SCHEMA)
    assert script_accepts("train.py", "lr") and not script_accepts("export.py", "lr")
    assert script_accepts("validate.py", "lr")  # a MindCV key: MindCV's scripts share one parser
    assert not script_accepts("validate.py", "max_nonfinite_steps") and not script_accepts("train.py", "onnx")
    assert script_accepts("export.py", "overwrite") and script_accepts("train.py", "overwrite")
    assert script_accepts("validate.py", "crop_pct") and script_accepts("predict", "model")
    with pytest.raises(ConfigError, match=r"^--onnx is an option of predict, not of train.py"):
        parse_cli(["--onnx", "x.onnx"], prog="train.py")
    with pytest.raises(ConfigError, match=r"^--cooldown_epochs is an option of train.py, not of validate.py"):
        parse_cli(["--cooldown_epochs", "3"], prog="validate.py")
    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "poolformer" / "poolformer_s12_ascend.yaml")
    cfg = parse_cli(["--config", recipe, "--ckpt_path", "w.ckpt"], prog="validate.py")  # holds train keys
    assert cfg.epoch_size == load_config(recipe).epoch_size


@pytest.mark.parametrize("model,drop_path,crop", [("poolformer_s36", 0.2, 0.9), ("poolformer_m48", 0.4, 0.95),
                                                  ("fpn_poolformer_s12", 0.0, 0.9)])
def test_train_defaults_come_from_the_model_record(monkeypatch, model, drop_path, crop):
    """train.py without a recipe trains at the paper's drop path (and validates at its crop); flags win."""
    import mindcv_poolformer.train.cli as cli

    seen = []
    monkeypatch.setattr(cli, "configure_device", lambda cfg: "device: test")
    monkeypatch.setattr(cli, "init_distributed", lambda *a: None)
    monkeypatch.setattr(cli, "preflight", lambda cfg: None)
    monkeypatch.setattr(cli, "train", seen.append)
    assert cli.main(["--model", model]) == 0
    assert cli.main(["--model", model, "--drop_path_rate", "0.05", "--crop_pct", "1.0"]) == 0
    assert [(c.drop_path_rate, c.crop_pct) for c in seen] == [(drop_path, crop), (0.05, 1.0)]


@pytest.mark.parametrize("content,needle", [
    (b"lr: 0.1\nmodel: poolformer_s12\xff\n", "not a UTF-8 text file (byte 0xff at offset 29)"),
    (b"lr: 0.1\nmodel: \x07\n", "not valid YAML (unacceptable character #x0007: special characters are not allowed)"),
    (b"lr: [0.1\n", "line 2 is not valid YAML"),
])
def test_unreadable_recipes_are_one_line_errors(tmp_path, content, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_config(str(recipe))
    message = str(err.value)
    assert needle in message and "\n" not in message
