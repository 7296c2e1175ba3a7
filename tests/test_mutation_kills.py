"""Fast tests written to kill the survivors of ``tools/mutation.py`` (issue 18).

Each expected value comes from a hand computation, numpy/torch, or the formulas of timm and mmseg
(cited per test), never from our own output. All of it is pure Python/numpy (no model is built),
so the mutation run can execute these hundreds of times.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from mindcv_poolformer.config import ConfigError, load_config
from mindcv_poolformer.train.schedule import ScheduleSettings, build_lr_schedule

# ---------------------------------------------------------------------------------------------- schedule


def _sched(**kw):
    base = {"lr": 1.0, "lr_scale_batch": None, "warmup_epochs": 0, "warmup_lr": 0.0, "min_lr": 0.0,
            "epoch_size": 8, "cooldown_epochs": 0}
    base.update(kw)
    return ScheduleSettings.from_config(load_config(overrides=base))


def _cosine(t: float, length: float, top: float, low: float) -> float:
    """timm's CosineLRScheduler: ``lr_min + 0.5 * (lr_max - lr_min) * (1 + cos(pi * t_curr / t_i))``."""
    return low + 0.5 * (top - low) * (1 + math.cos(math.pi * t / length))


class TestSchedule:
    def test_cycles_restart_at_a_decayed_peak(self):
        # timm: cycle i of length t_i restarts at lr_max * cycle_decay ** i
        lrs = build_lr_schedule(_sched(num_cycles=2, cycle_decay=0.5, min_lr=0.1), 1, 1)
        want = [_cosine(t % 4, 4, 0.5 ** (t // 4), 0.1) for t in range(8)]
        np.testing.assert_allclose(lrs, want, rtol=1e-6)

    def test_one_step_cycles(self):
        # cycles of one step each: every step starts a cycle at its decayed peak (timm: t_i = 1, t_curr = 0)
        lrs = build_lr_schedule(_sched(num_cycles=3, cycle_decay=0.5, epoch_size=3), 1, 1)
        np.testing.assert_allclose(lrs, [1.0, 0.5, 0.25], rtol=1e-6)
        # half-step cycles (4 cycles over 2 steps): step 1 is at the start of cycle 2
        lrs = build_lr_schedule(_sched(num_cycles=4, cycle_decay=0.5, epoch_size=2, min_lr=0.1), 1, 1)
        np.testing.assert_allclose(lrs, [1.0, 0.25], rtol=1e-6)

    def test_warmup_then_cosine_by_hand(self):
        # 2 warmup epochs of 2 steps from 0.1 to 1.0, then the cosine over the remaining 4 epochs (8 steps)
        lrs = build_lr_schedule(_sched(warmup_epochs=2, warmup_lr=0.1, min_lr=0.2, epoch_size=6, cooldown_epochs=1),
                                2, 1)
        want = [0.1 + 0.9 * s / 4 for s in range(4)] + [_cosine(t, 8, 1.0, 0.2) for t in range(8)] + [0.2, 0.2]
        np.testing.assert_allclose(lrs, want, rtol=1e-6)
        assert lrs.dtype == np.float32 and len(lrs) == 14

    def test_cooldown_starts_at_epoch_size_even_mid_cosine(self):
        # decay_epochs longer than the run: the cosine is cut at epoch_size, the cooldown runs at min_lr
        lrs = build_lr_schedule(_sched(decay_epochs=6, min_lr=0.25, epoch_size=3, cooldown_epochs=2), 1, 1)
        np.testing.assert_allclose(lrs, [_cosine(t, 6, 1.0, 0.25) for t in range(3)] + [0.25, 0.25], rtol=1e-6)

    def test_mindcv_decay_epochs_length(self):
        # MindCV's cosine_decay: decay_epochs fixes the cosine's length; after it, min_lr
        lrs = build_lr_schedule(_sched(warmup_epochs=1, decay_epochs=3, min_lr=0.25, epoch_size=6), 1, 1)
        want = [0.0] + [_cosine(t, 3, 1.0, 0.25) for t in range(3)] + [0.25, 0.25]
        np.testing.assert_allclose(lrs, want, rtol=1e-6)
        lrs = build_lr_schedule(_sched(decay_epochs=2, min_lr=0.25, epoch_size=3), 2, 1)  # 2 epochs of 2 steps
        np.testing.assert_allclose(lrs, [_cosine(t, 4, 1.0, 0.25) for t in range(4)] + [0.25, 0.25], rtol=1e-6)

    def test_multi_step_and_cooldown_keep_the_last_value(self):
        lrs = build_lr_schedule(_sched(scheduler="multi_step_decay", multi_step_decay_milestones=[2, 4],
                                       decay_rate=0.5, epoch_size=6, cooldown_epochs=2), 1, 1)
        np.testing.assert_allclose(lrs, [1, 1, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25], rtol=1e-6)
        step = build_lr_schedule(_sched(scheduler="step_decay", decay_epochs=0, decay_rate=0.5, epoch_size=3,
                                        cooldown_epochs=1), 2, 1)  # period 0 means every epoch
        np.testing.assert_allclose(step, [1, 1, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125], rtol=1e-6)
        const = build_lr_schedule(_sched(scheduler="constant", epoch_size=2, cooldown_epochs=1, min_lr=0.3), 1, 1)
        np.testing.assert_allclose(const, [1, 1, 1], rtol=1e-6)

    def test_epoch_stair_holds_the_epoch_start(self):
        lrs = build_lr_schedule(_sched(warmup_epochs=2, warmup_lr=0.2, epoch_size=4, lr_epoch_stair=True), 3, 1)
        # epochs 0, 1: warmup at positions 0 and 3 of 6 steps; epochs 2, 3: cosine at t = 0 and 3 of 6
        want = [0.2] * 3 + [0.2 + 0.8 * 3 / 6] * 3 + [1.0] * 3 + [_cosine(3, 6, 1.0, 0.0)] * 3
        np.testing.assert_allclose(lrs, want, rtol=1e-6)

    def test_steps_per_epoch_must_be_positive(self):
        with pytest.raises(ValueError, match="steps_per_epoch must be >= 1, got 0"):
            build_lr_schedule(_sched(), 0, 1)
        assert len(build_lr_schedule(_sched(epoch_size=1), 1, 1)) == 1

    def test_linear_scaling_reaches_the_schedule(self):
        lrs = build_lr_schedule(_sched(lr=0.4, lr_scale_batch=256, scheduler="constant", epoch_size=1), 1, 512)
        np.testing.assert_allclose(lrs, [0.8], rtol=1e-6)


# ---------------------------------------------------------------------------------------------- config


class TestConfig:
    def test_numbers_and_booleans_from_text(self):
        cfg = load_config(cli_overrides={"epoch_size": "7", "lr": "0.5", "shuffle": "off", "ema": "YES"})
        assert (cfg.epoch_size, cfg.lr, cfg.shuffle, cfg.ema) == (7, 0.5, False, True)
        assert load_config(overrides={"epoch_size": 4.0}).epoch_size == 4
        lr = load_config(overrides={"lr": 2, "shuffle": 0, "ema": 1})
        assert type(lr.lr) is float and lr.lr == 2.0 and (lr.shuffle, lr.ema) == (False, True)
        for key, bad, what in (("epoch_size", 2.5, "an integer"), ("epoch_size", True, "an integer"),
                               ("lr", "fast", "a number"), ("shuffle", 2, "true/false"),
                               ("shuffle", "maybe", "true/false"), ("lr", [1.0], "a number"),
                               ("epoch_size", "3.0", "an integer")):
            with pytest.raises(ConfigError, match=rf"^{key}: expected {what}, got {re.escape(repr(bad))}$"):
                load_config(overrides={key: bad})

    def test_none_means_null_empty_or_an_error(self):
        assert load_config(overrides={"num_samples": None}).num_samples is None
        assert load_config(cli_overrides={"num_samples": "None", "data_dir": "null"}).data_dir == ""
        assert load_config(overrides={"data_dir": "none"}).data_dir == "none"  # only the command line spells null
        with pytest.raises(ConfigError, match=r"^epoch_size: a value is required \(got none\)$"):
            load_config(cli_overrides={"epoch_size": "none"})
        with pytest.raises(ConfigError, match=r"^opt: 'NONE' is not one of adamw, adam, sgd, momentum$"):
            load_config(cli_overrides={"opt": "NONE"})
        with pytest.raises(ConfigError, match=r"^model: expected str, got 5$"):
            load_config(overrides={"model": 5})

    def test_lists(self):
        cfg = load_config(cli_overrides={"scale": "[0.2, 0.9]", "mean": "(1,2,3)", "color_jitter": "0.3"})
        assert (cfg.scale, cfg.mean, cfg.color_jitter) == ([0.2, 0.9], [1.0, 2.0, 3.0], [0.3])
        assert load_config(overrides={"color_jitter": 0.4, "ratio": (1, 2)}).color_jitter == [0.4]
        with pytest.raises(ConfigError, match=r"^scale: expected 2 numbers, got 3 \('0.1,0.2,0.3'\)$"):
            load_config(cli_overrides={"scale": "0.1,0.2,0.3"})
        for bad in ("a,b", {"x": 1}, True, "X0.1,0.5"):
            with pytest.raises(ConfigError, match=r"^color_jitter: expected a list of numbers"):
                load_config(overrides={"color_jitter": bad})

    @pytest.mark.parametrize("key,value,accepted", [
        ("lr", 0.0, "> 0"), ("batch_size", 0, ">= 1"), ("hflip", 1.5, r"in \[0, 1\]"), ("hflip", -0.5, r"in \[0, 1\]"),
        ("crop_pct", 0.0, r"in \(0, 1\]"), ("warmup_lr", -1e-9, ">= 0")])
    def test_ranges(self, key, value, accepted):
        with pytest.raises(ConfigError, match=rf"^{key}: {value!r} is out of range \(must be {accepted}\)$"):
            load_config(overrides={key: value})

    def test_range_boundaries_are_accepted(self):
        cfg = load_config(overrides={"hflip": 1.0, "vflip": 0.0, "crop_pct": 1.0, "batch_size": 1, "lr": 1e-9})
        assert (cfg.hflip, cfg.vflip, cfg.crop_pct, cfg.batch_size) == (1.0, 0.0, 1.0, 1)

    def test_accepted_range_wording(self):
        from mindcv_poolformer.config import Option, _accepted_range

        assert _accepted_range(Option(float, 0.0, "", "", high=2.5)) == "<= 2.5"
        assert _accepted_range(Option(float, 0.0, "", "", low=1, high=4, low_open=True)) == "in (1, 4]"
        assert _accepted_range(Option(float, 0.0, "", "", low=1, low_open=True)) == "> 1"

    def test_choices_are_case_insensitive_and_normalised(self):
        cfg = load_config(overrides={"opt": "AdamW", "device_target": "cpu", "mode": 1},
                          cli_overrides={"file_format": "onnx", "mode": "0"})
        assert (cfg.opt, cfg.device_target, cfg.file_format, cfg.mode) == ("adamw", "CPU", "ONNX", 0)
        with pytest.raises(ConfigError, match=r"^mode: 2 is not one of 0, 1$"):
            load_config(overrides={"mode": 2})
        for bad in ("focal", "XX"):
            with pytest.raises(ConfigError, match=rf"^loss: '{bad}' is not one of CE, BCE$"):
                load_config(overrides={"loss": bad})

    def test_unknown_keys_name_the_closest(self):
        with pytest.raises(ConfigError, match=r"^unknown config key 'lr_scale_bacth' in overrides; "
                                              r"did you mean lr_scale_batch\?$"):
            load_config(overrides={"lr_scale_bacth": 1})
        with pytest.raises(ConfigError, match=r"^unknown config key 'qqqqqqqq' in overrides; --help lists every"):
            load_config(overrides={"qqqqqqqq": 1})
        with pytest.raises(ConfigError, match=r"^model: unknown model 'poolfromer_s12'; did you mean "
                                              r"'poolformer_s12'\? \(available: .*poolformer_m48"):
            load_config(overrides={"model": "poolfromer_s12"})
        with pytest.raises(ConfigError, match=r"^model: unknown model 'zzzzzz' \(available: "):
            load_config(overrides={"model": "zzzzzz"})

    def test_each_layer_is_named_and_only_the_command_line_spells_null(self, tmp_path):
        for layer, where in (("defaults", "script defaults"), ("cli_overrides", "command line")):
            with pytest.raises(ConfigError, match=rf"^unknown config key 'nope' in {where}; --help lists"):
                load_config(**{layer: {"nope": "1"}})
        recipe = tmp_path / "r.yaml"
        recipe.write_text("data_dir: 'none'\n")
        assert load_config(recipe).data_dir == "none" and load_config(defaults={"data_dir": "null"}).data_dir == "null"
        assert load_config(recipe, cli_overrides={"data_dir": "none"}).data_dir == ""

    def test_re_value_random_is_pixel_mode(self, tmp_path):
        recipe = tmp_path / "r.yaml"
        recipe.write_text("re_mode: const\nre_value: 3.0\n")
        cfg = load_config(recipe, overrides={"re_value": "Random"})
        assert (cfg.re_mode, cfg.re_value) == ("pixel", 0.0)

    def test_layers_and_recipe_styles(self, tmp_path):
        from mindcv_poolformer.config import is_mindcv_recipe

        assert is_mindcv_recipe(["lr", "opt"]) and not is_mindcv_recipe([]) and not is_mindcv_recipe(["lr", "ema_x"])
        mindcv = tmp_path / "mindcv.yaml"
        mindcv.write_text("lr: 0.1\nopt: sgd\n")
        cfg = load_config(mindcv)  # MindCV 0.3.0's defaults for what it leaves out (tests/data/mindcv_config_v030)
        assert (cfg.recipe_defaults, cfg.epoch_size, cfg.interpolation, cfg.warmup_lr) == ("mindcv", 90, "bilinear",
                                                                                           0.0)
        assert load_config(mindcv, overrides={"recipe_defaults": "OURS"}).epoch_size == 300
        assert load_config(mindcv, overrides={"recipe_defaults": "ours"},
                           cli_overrides={"recipe_defaults": "auto"}).epoch_size == 90  # the command line first
        assert load_config(mindcv, overrides={"recipe_defaults": "mindcv"},
                           cli_overrides={"recipe_defaults": "ours"}).epoch_size == 300
        ours = tmp_path / "ours.yaml"
        ours.write_text("lr: 0.1\nrecipe_defaults: mindcv\nema: true\n")
        assert load_config(ours).epoch_size == 90 and load_config(ours, overrides={"recipe_defaults": "auto"}
                                                                   ).epoch_size == 300
        layered = load_config(mindcv, overrides={"lr": 0.2}, cli_overrides={"lr": "0.3"}, defaults={"lr": 9.0,
                                                                                                    "seed": 5})
        assert (layered.lr, layered.seed, layered.opt) == (0.3, 5, "sgd")

    def test_recipe_file_errors(self, tmp_path):
        with pytest.raises(ConfigError, match=r"^config file not found: "):
            load_config(tmp_path / "missing.yaml")
        bad = tmp_path / "bad.yaml"
        bad.write_text("lr: 1\nopt: [adamw\n")
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: line 3 is not valid YAML"):
            load_config(bad)
        listed = tmp_path / "list.yaml"
        listed.write_text("- lr\n")
        with pytest.raises(ConfigError, match=r"expected a mapping of key: value, got list$"):
            load_config(listed)
        control = tmp_path / "control.yaml"
        control.write_text("lr: 1\x07\n")  # a reader error: YAML gives no line
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(control))}: is not valid YAML \(unacceptable char"):
            load_config(control)
        empty = tmp_path / "empty.yaml"
        empty.write_text("")
        assert load_config(empty).recipe_defaults == "ours"

    def test_filter_alias(self, tmp_path):
        assert load_config(overrides={"filter_bias_and_bn": True}).weight_decay_filter == "all_1d"
        cfg = load_config(overrides={"filter_bias_and_bn": False})
        assert (cfg.weight_decay_filter, cfg.filter_bias_and_bn) == ("disable", False)
        mindcv = tmp_path / "m.yaml"
        mindcv.write_text("filter_bias_and_bn: true\n")
        assert load_config(mindcv).weight_decay_filter == "norm_and_bias"
        both = load_config(overrides={"filter_bias_and_bn": True, "weight_decay_filter": "auto"})
        assert (both.weight_decay_filter, both.filter_bias_and_bn) == ("auto", True)
        assert load_config(overrides={"weight_decay_filter": "disable"}).filter_bias_and_bn is False
        assert load_config(overrides={"filter_bias_and_bn": False, "weight_decay_filter": "disable"}
                           ).filter_bias_and_bn is False
        with pytest.raises(ConfigError, match=r"^filter_bias_and_bn: False contradicts weight_decay_filter: all_1d"):
            load_config(overrides={"filter_bias_and_bn": False, "weight_decay_filter": "all_1d"})
        with pytest.raises(ConfigError, match=r"^filter_bias_and_bn: True contradicts weight_decay_filter: disable"):
            load_config(overrides={"filter_bias_and_bn": True, "weight_decay_filter": "disable"})

    def test_warmup_factor(self, tmp_path):
        assert load_config(overrides={"lr": 0.5, "warmup_factor": 0.1}).warmup_lr == pytest.approx(0.05)
        assert load_config(overrides={"warmup_factor": 0.0}).warmup_lr == 0.0
        assert load_config(overrides={"lr": 0.5, "warmup_factor": 0.1, "warmup_lr": 0.05}).warmup_lr == 0.05
        assert load_config(overrides={"warmup_factor": 0.0, "warmup_lr": 0.02}).warmup_lr == 0.02
        assert load_config(overrides={"lr": 0.5}).warmup_lr == 1e-6  # no factor: our default stays
        mindcv = tmp_path / "m.yaml"
        mindcv.write_text("lr: 0.5\nwarmup_factor: 0.2\n")
        assert load_config(mindcv).warmup_lr == pytest.approx(0.1)
        mindcv.write_text("lr: 0.5\nwarmup_lr: 0.3\n")
        assert load_config(mindcv).warmup_lr == 0.3
        with pytest.raises(ConfigError, match=r"^warmup_factor: 0.1 \(warmup_lr 0.05\) contradicts warmup_lr: 0.06"):
            load_config(overrides={"lr": 0.5, "warmup_factor": 0.1, "warmup_lr": 0.06})
        with pytest.raises(ConfigError, match=r"^warmup_factor: a factor of lr does not follow lr_scale_batch"):
            load_config(overrides={"warmup_factor": 0.1, "lr_scale_batch": 256})
        assert load_config(overrides={"warmup_factor": 0.0, "lr_scale_batch": 256}).warmup_lr == 0.0

    def test_unsupported_mindcv_values(self):
        for key, value, text in (("layer_decay", 0.75, "layer-wise"), ("aug_splits", 3, "augmentation splits")):
            with pytest.raises(ConfigError, match=rf"^{key}: {value}: .*{text}"):
                load_config(overrides={key: value})
        with pytest.raises(ConfigError, match=r"^resume_opt: ckpt_path a.ckpt with resume_opt True"):
            load_config(overrides={"resume": "auto", "resume_opt": True, "ckpt_path": "a.ckpt"})
        for partial in ({"resume_opt": True, "ckpt_path": "a.ckpt"}, {"resume": "auto", "ckpt_path": "a.ckpt"},
                        {"resume": "auto", "resume_opt": True}):
            load_config(overrides=partial)

    def test_log_lines(self, tmp_path, caplog):
        mindcv = tmp_path / "m.yaml"
        mindcv.write_text("lr: 0.1\nopt: adamw\nepoch_size: 300\nweight_decay: 0.01\n")
        with caplog.at_level("INFO", logger="mindcv_poolformer"):
            load_config(mindcv, overrides={"enable_modelarts": True, "data_url": ""})
        text = caplog.text
        assert f"{mindcv} is a MindCV recipe: the keys it leaves out take MindCV 0.3.0's defaults: " in text
        assert "val_while_train False (ours True)" in text and "warmup_lr 0.0 (ours 1e-06)" in text
        listed = text.split("defaults:")[1].splitlines()[0]
        assert "epoch_size" not in listed and "weight_decay 0.01" not in listed  # given: not MindCV's defaults
        assert "opt adamw: MindCV's AdamW corrects the moments" in text and "loss_scale_type auto" not in text
        assert "ignoring MindCV keys with no effect here: enable_modelarts\n" in text
        caplog.clear()
        with caplog.at_level("INFO", logger="mindcv_poolformer"):
            load_config(overrides={"recipe_defaults": "mindcv", "loss_scale_type": "auto", "opt": "sgd"})
        assert any(m.startswith("recipe_defaults mindcv: the keys it leaves out") for m in caplog.messages)
        assert "loss_scale_type auto: MindCV leaves it" in caplog.text and "opt adamw" not in caplog.text
        caplog.clear()
        with caplog.at_level("INFO", logger="mindcv_poolformer"):
            load_config(overrides={"lr": 0.2})
        assert caplog.text == ""

    def test_parse_cli_forms(self, tmp_path, capsys):
        from mindcv_poolformer.config import parse_cli

        recipe = tmp_path / "r.yaml"
        recipe.write_text("lr: 0.25\nema: false\n")
        for form in (["-c", str(recipe)], [f"-c={recipe}"], ["--config", str(recipe)], [f"--config={recipe}"],
                     ["--c", str(recipe)]):
            cfg = parse_cli(form + ["--epoch-size=7", "--ema", "--seed", "3", "--shuffle"], defaults={"seed": 1})
            assert (cfg.lr, cfg.epoch_size, cfg.ema, cfg.seed, cfg.shuffle) == (0.25, 7, True, 3, True), form
        assert parse_cli(["--ema", "--lr", "0.5"]).ema is True and parse_cli(["--ema", "false"]).ema is False
        assert parse_cli([], defaults={"seed": 9}).seed == 9
        with pytest.raises(ConfigError, match=r"^--lr needs a value$"):
            parse_cli(["--lr"])
        with pytest.raises(ConfigError, match=r"^--config needs a value$"):
            parse_cli(["--config"])
        with pytest.raises(ConfigError, match=r"^unexpected argument 'lr'; options are --key value$"):
            parse_cli(["lr", "1"])
        with pytest.raises(ConfigError, match=r"^unknown option --lr_scale_bacth; did you mean --lr_scale_batch\?$"):
            parse_cli(["--lr-scale-bacth", "1"])
        with pytest.raises(SystemExit) as done:
            parse_cli(["--lr", "1", "-h"], prog="train.py", description="Train it.")
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: train.py [-c|--config RECIPE.yaml] [--key value ...]\n\nTrain it.\n")
        assert "  --opt {adamw,adam,sgd,momentum}  optimizer (default: 'adamw')" in out
        assert "scheduler:\n" in out and "--enable_modelarts" not in out

    def test_saved_config_keeps_the_schema_order(self, tmp_path):
        import yaml

        from mindcv_poolformer.config import SCHEMA

        load_config(overrides={"lr": 0.5}).dump(tmp_path / "c.yaml")
        saved = yaml.safe_load((tmp_path / "c.yaml").read_text())
        assert list(saved) == list(SCHEMA) and saved["lr"] == 0.5  # readable: grouped as --help groups them
        assert not list(tmp_path.glob("*.tmp-*"))

    def test_parse_cli_reads_sys_argv(self, monkeypatch, capsys):
        from mindcv_poolformer.config import parse_cli

        monkeypatch.setattr("sys.argv", ["/somewhere/validate.py", "--lr", "0.5", "--ema"])
        cfg = parse_cli()
        assert (cfg.lr, cfg.ema) == (0.5, True)
        monkeypatch.setattr("sys.argv", ["/somewhere/validate.py", "--help"])
        with pytest.raises(SystemExit):
            parse_cli()
        usage = "usage: validate.py [-c|--config RECIPE.yaml] [--key value ...]"
        assert capsys.readouterr().out.startswith(f"{usage}\n\n\n")  # no description: an empty line

    def test_config_attributes(self):
        cfg = load_config()
        cfg.lr = 0.7
        assert cfg["lr"] == 0.7 and cfg.lr == 0.7
        with pytest.raises(AttributeError, match="no_such_key"):
            cfg.no_such_key  # noqa: B018


# ---------------------------------------------------------------------------------------------- checkpoint


def _canonical_s12_names(num_classes: bool = True) -> list[str]:
    """PoolFormer-S12's parameter names in our (MindCV) layout, from the model's documented naming."""
    names = ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    for stage, depth in enumerate((2, 2, 6, 2)):
        if stage:
            names += [f"network.{2 * stage - 1}.proj.weight", f"network.{2 * stage - 1}.proj.bias"]
        for j in range(depth):
            names += [f"network.{2 * stage}.{j}.{n}" for n in (
                "layer_scale_1", "layer_scale_2", "norm1.gamma", "norm1.beta", "norm2.gamma", "norm2.beta",
                "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
    names += ["norm.gamma", "norm.beta"] + (["head.weight", "head.bias"] if num_classes else [])
    return names


def _official(canonical) -> list[str]:
    """Our names in the official sail-sg/timm<0.9 layout: GroupNorm affines are ``weight``/``bias``."""
    return [re.sub(r"(norm\d*)\.gamma$", r"\1.weight", re.sub(r"(norm\d*)\.beta$", r"\1.bias", k)) for k in canonical]


def _arrays(names, seed: int = 0) -> dict[str, np.ndarray]:
    """A distinct small array per name: MLP/conv weights 4-D, everything else 1-D, so values can be followed."""
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=(2, 3, 1, 1) if re.search(r"(fc[12]|proj|conv)\.weight$", k) else (2,)).astype(
        np.float32) for k in names}


def _hf_state(base: bool = False) -> dict[str, np.ndarray]:
    """HF transformers' own key names of a PoolFormer-S12-shaped model (tiny widths), with random values."""
    transformers = pytest.importorskip("transformers")
    config = transformers.PoolFormerConfig(num_labels=5, depths=[2, 2, 6, 2], hidden_sizes=[8, 16, 32, 64])
    model = (transformers.PoolFormerModel if base else transformers.PoolFormerForImageClassification)(config)
    return {k: v.numpy() for k, v in model.state_dict().items()}


class TestCheckpointKeys:
    def test_official_to_canonical(self):
        from mindcv_poolformer.checkpoint import to_canonical

        canonical = _canonical_s12_names()
        official = dict(zip(_official(canonical), _arrays(canonical).values()))
        out, layout = to_canonical(official)
        assert layout == "official" and list(out) == canonical
        assert all(out[c] is official[o] for c, o in zip(canonical, official))

    def test_ours_is_kept_as_it_is(self):
        from mindcv_poolformer.checkpoint import to_canonical

        canonical = _canonical_s12_names()
        state = _arrays(canonical)
        for given in (state, {"backbone." + k: v for k, v in state.items() if not k.startswith(("norm.", "head."))}):
            out, layout = to_canonical(given)
            assert layout == "mindspore" and out == given and out is not given  # a new dict, the same arrays

    @pytest.mark.slow  # importing transformers' PoolFormer: 61 s measured on the shared 2-core machine
    def test_hf_to_canonical_follows_hf_names(self):
        from mindcv_poolformer.checkpoint import to_canonical

        from helpers import hf_to_official

        hf = _hf_state()
        out, layout = to_canonical(hf)
        expected = hf_to_official(hf)  # written independently of the converter (tests/helpers.py)
        assert layout == "hf" and sorted(out) == sorted(_canonical_s12_names())
        assert sorted(_official(out)) == sorted(expected)
        for key in out:
            assert out[key] is expected[_official([key])[0]], key
        base, base_layout = to_canonical(_hf_state(base=True))  # PoolFormerModel: no "poolformer." prefix, norm, head
        assert base_layout == "hf"
        assert sorted(base) == sorted(k for k in _canonical_s12_names(num_classes=False) if not k.startswith("norm."))

    @pytest.mark.parametrize("linear_mlp", [False, True])
    def test_timm_to_canonical(self, linear_mlp):
        from mindcv_poolformer.checkpoint import to_canonical

        from helpers import official_to_timm

        canonical = _canonical_s12_names()
        values = _arrays(canonical)
        values["head.weight"] = np.ones((5, 64), np.float32)  # a Linear head stays 2-D
        timm = official_to_timm(dict(zip(_official(canonical), values.values())), linear_mlp=linear_mlp)
        out, layout = to_canonical(timm)
        assert layout == "timm" and sorted(out) == sorted(canonical)
        for key in canonical:
            np.testing.assert_array_equal(out[key], values[key])
            assert out[key].shape == values[key].shape, key

    def test_unmapped_keys_are_named(self):
        from mindcv_poolformer.checkpoint import CheckpointError, to_canonical

        timm = {"stem.conv.weight": np.zeros(1), "stages.0.blocks.0.token_mixer.x": np.zeros(1)}
        with pytest.raises(CheckpointError, match=r"^timm checkpoint has keys with no PoolFormer counterpart: "
                                                  r"stages\.0\.blocks\.0\.token_mixer\.x$"):
            to_canonical(timm)
        many = {"poolformer.encoder.patch_embeddings.0.projection.weight": np.zeros(1),
                **{f"poolformer.pooler.{i}": np.zeros(1) for i in range(10)}}
        with pytest.raises(CheckpointError, match=r"counterpart: poolformer\.pooler\.0, .*poolformer\.pooler\.7$"):
            to_canonical(many)

    @pytest.mark.parametrize("keys,layout", [
        (["patch_embed.proj.weight", "norm.gamma"], "mindspore"),
        (["patch_embed.proj.weight", "network.0.0.norm1.beta"], "mindspore"),
        (["patch_embed.proj.weight", "norm3.gamma"], "mindspore"),
        (["patch_embed.proj.weight", "norm.weight"], "official"),
        (["stem.conv.weight"], "timm"), (["stages.0.blocks.0.norm1.weight"], "timm"),
        (["poolformer.encoder.block.0.0.layer_scale_1"], "hf"), (["encoder.patch_embeddings.0.projection.bias"], "hf"),
        (["backbone.patch_embed.proj.weight", "decode_head.scale_heads.0.0.bn.moving_mean"], "mindspore"),
        (["backbone.network.0.0.norm1.gamma"], "mindspore"), (["neck.fpn_convs.0.conv.bias", "x.beta"], "mindspore"),
        (["backbone.patch_embed.proj.weight", "decode_head.scale_heads.0.0.bn.running_var"], "mmseg"),
        (["decode_head.conv_seg.weight"], "mmseg")])
    def test_detect_layout(self, keys, layout):
        from mindcv_poolformer.checkpoint import detect_layout

        assert detect_layout(dict.fromkeys(keys)) == layout

    def test_unknown_layout_lists_three_keys(self):
        from mindcv_poolformer.checkpoint import CheckpointError, detect_layout

        with pytest.raises(CheckpointError, match=r"^unrecognised checkpoint layout \(first keys: a, b, c\); accepted"):
            detect_layout(dict.fromkeys(["a", "b", "c", "d"]))

    def test_mmseg_to_canonical(self):
        from mindcv_poolformer.checkpoint import to_canonical

        backbone = _canonical_s12_names(num_classes=False)[:-2] + [f"norm{i}.{p}" for i in (0, 2, 4, 6)
                                                                  for p in ("gamma", "beta")]
        ours = ["backbone." + k for k in backbone]
        mmseg = ["backbone." + k for k in _official(backbone)]
        for i in range(4):  # mmseg's FPN neck and FPNHead names (ConvModule conv/bn, BatchNorm2d's buffers)
            ours += [f"neck.lateral_convs.{i}.conv.weight", f"neck.lateral_convs.{i}.conv.bias",
                     f"neck.fpn_convs.{i}.conv.weight", f"neck.fpn_convs.{i}.conv.bias"]
            for j in range(max(1, i)):
                head = f"decode_head.scale_heads.{i}.{j}"
                ours += [f"{head}.conv.weight", f"{head}.bn.gamma", f"{head}.bn.beta", f"{head}.bn.moving_mean",
                         f"{head}.bn.moving_variance"]
        ours += ["decode_head.conv_seg.weight", "decode_head.conv_seg.bias"]
        mmseg += [re.sub(r"\.bn\.gamma$", ".bn.weight", re.sub(r"\.bn\.beta$", ".bn.bias", re.sub(
            r"\.bn\.moving_mean$", ".bn.running_mean", re.sub(r"\.bn\.moving_variance$", ".bn.running_var", k))))
                  for k in ours[len(mmseg):]]
        values = _arrays(ours)
        state = dict(zip(mmseg, values.values()))
        state.update({k.replace("running_var", "num_batches_tracked"): np.zeros((), np.int64) for k in mmseg
                      if k.endswith("running_var")})
        out, layout = to_canonical(state)
        assert layout == "mmseg" and sorted(out) == sorted(ours)
        assert all(out[k] is values[k] for k in ours)

    def test_mmseg_errors(self):
        from mindcv_poolformer.checkpoint import CheckpointError, to_canonical

        with pytest.raises(CheckpointError, match=r"^mmseg checkpoint has no backbone\.\* tensors$"):
            to_canonical({"decode_head.conv_seg.weight": np.zeros(1)})
        with pytest.raises(CheckpointError, match=r"^mmseg checkpoint has keys with no Semantic FPN counterpart: "
                                                  r"neck\.extra\.weight$"):
            to_canonical({"backbone.patch_embed.proj.weight": np.zeros(1), "neck.extra.weight": np.zeros(1)})

    def test_split_model_state(self):
        from mindcv_poolformer.checkpoint import split_model_state

        keep = ["patch_embed.proj.weight", "network.0.0.norm1.gamma", "norm.gamma", "norm4.beta", "head.bias",
                "backbone.network.0.0.norm1.gamma", "neck.fpn_convs.0.conv.bias", "decode_head.conv_seg.weight"]
        drop = ["adam_m.network.0.0.norm1.gamma", "global_step", "learning_rate", "normx.gamma", "headless",
                "moments.head.bias", "scale_sense"]
        state = {k: np.zeros(1) for k in drop[:2] + keep + drop[2:]}
        model, ignored = split_model_state(state)
        assert list(model) == keep and ignored == drop

    def test_infer_architecture_and_names(self):
        from mindcv_poolformer.checkpoint import CheckpointError, infer_architecture, match_variant, model_name

        widths = (64, 128, 320, 512)
        state = {k: np.zeros((widths[int(k.split(".")[1]) // 2],)) for k in _canonical_s12_names()
                 if k.startswith("network.") and "norm1.gamma" in k}
        state.update({"network.2.1.mlp.fc1.weight": np.zeros(1), "patch_embed.proj.weight": np.zeros((64, 4, 7, 7)),
                      "head.weight": np.zeros((9, 512))})
        arch = infer_architecture(state)
        assert (arch.depths, arch.widths, arch.num_classes, arch.in_channels, arch.task) == (
            (2, 2, 6, 2), widths, 9, 4, "classification")
        assert match_variant(arch) == "poolformer_s12" and model_name(arch) == "poolformer_s12"
        del state["head.weight"]
        assert infer_architecture(state).num_classes == 0
        seg = {"backbone." + k: v for k, v in state.items()}
        seg["decode_head.conv_seg.weight"] = np.zeros((150, 128, 1, 1))
        seg_arch = infer_architecture(seg)
        assert (seg_arch.depths, seg_arch.num_classes, seg_arch.in_channels, seg_arch.task) == (
            (2, 2, 6, 2), 150, 4, "segmentation")
        assert model_name(seg_arch) == "fpn_poolformer_s12"
        del seg["decode_head.conv_seg.weight"]
        assert infer_architecture(seg).num_classes == 0
        state["network.6.0.norm1.gamma"] = np.zeros(500)
        assert match_variant(infer_architecture(state)) is None and model_name(infer_architecture(state)) is None
        for broken in ({k: v for k, v in state.items() if k != "patch_embed.proj.weight"},
                       {"patch_embed.proj.weight": np.zeros((64, 3, 7, 7))}):
            with pytest.raises(CheckpointError, match=r"^checkpoint holds no PoolFormer stem/blocks"):
                infer_architecture(broken)


# ---------------------------------------------------------------------------------------------- data


def _timm_cutmix(rng: np.random.Generator, images: np.ndarray, targets: np.ndarray, alpha: float):
    """timm's batch cutmix (``rand_bbox`` + ``correct_lam``), its draws taken from ``rng`` in the same order."""
    lam = float(rng.beta(alpha, alpha))
    height, width = images.shape[-2:]
    cut = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = rng.integers(0, height), rng.integers(0, width)
    yl, yh = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    xl, xh = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    out = images.copy()
    out[:, :, yl:yh, xl:xh] = images[::-1][:, :, yl:yh, xl:xh]
    lam = 1.0 - (yh - yl) * (xh - xl) / float(height * width)
    return out, lam * targets + (1 - lam) * targets[::-1]


def _smoothed(labels, classes: int, smoothing: float) -> np.ndarray:
    """timm's ``one_hot``/``mixup_target``: off = smoothing / classes, on = 1 - smoothing + off."""
    out = np.full((len(labels), classes), smoothing / classes)
    out[np.arange(len(labels)), labels] = 1.0 - smoothing + smoothing / classes
    return out


class TestData:
    def test_shards_are_strided_and_trimmed(self):
        from mindcv_poolformer.data.listing import shard_indices

        order = np.arange(10, 20)
        assert shard_indices(order, 1, 3).tolist() == [11, 14, 17]  # 10 items -> 9 kept, rank 1 of 3
        assert shard_indices(order, 0, 3).tolist() == [10, 13, 16]
        assert shard_indices(order, 0, 3, even=False).tolist() == [10, 13, 16, 19]
        assert shard_indices(order, 2, 3, even=False).tolist() == [12, 15, 18]
        assert shard_indices(order, 0, 1).tolist() == list(range(10, 20))
        assert shard_indices(order, 1, 2).tolist() == [11, 13, 15, 17, 19]
        for rank, world in ((3, 3), (-1, 3), (0, 0)):
            with pytest.raises(ValueError, match=rf"^rank {rank} is not in \[0, {world}\)$"):
                shard_indices(order, rank, world)

    def test_epoch_order(self):
        from mindcv_poolformer.data.listing import epoch_order

        assert epoch_order(5, 1, 2, shuffle=False).tolist() == [0, 1, 2, 3, 4]
        order = epoch_order(50, 7, 2)
        assert sorted(order.tolist()) == list(range(50)) and order.tolist() != list(range(50))
        assert np.array_equal(order, epoch_order(50, 7, 2))
        assert not np.array_equal(order, epoch_order(50, 8, 2)) and not np.array_equal(order, epoch_order(50, 7, 3))
        assert not np.array_equal(epoch_order(50, 2, 7), order)  # seed and epoch are not interchangeable

    def test_augmentation_seeds(self):
        from mindcv_poolformer.data.listing import augmentation_seed

        seeds = [augmentation_seed(42, rank, epoch) for rank in range(16) for epoch in range(300)]
        assert len(set(seeds)) == len(seeds) and all(type(s) is int for s in seeds)
        assert augmentation_seed(1, 0, 0) != augmentation_seed(2, 0, 0)
        for seed in range(2**31 - 4, 2**31 + 4):  # folded into a positive int32, below 2**31 - 1
            assert 0 <= augmentation_seed(seed, 0, 0) < 2**31 - 1

    def test_targets_are_timms_smoothed_one_hot(self):
        from mindcv_poolformer.train.data import SoftTargetMixer

        mixer = SoftTargetMixer(5, smoothing=0.1)
        labels = np.array([4.0, 0.0, 2.0])
        np.testing.assert_allclose(mixer.targets(labels), _smoothed([4, 0, 2], 5, 0.1), rtol=1e-6)
        images = np.arange(3 * 3 * 2 * 2, dtype=np.float64).reshape(3, 3, 2, 2)
        out, targets = mixer(images, labels)  # no mixup/cutmix: images as they were, float32
        assert out.dtype == np.float32 and targets.dtype == np.float32 and np.array_equal(out, images)
        np.testing.assert_allclose(targets, _smoothed([4, 0, 2], 5, 0.1), rtol=1e-6)
        assert mixer.rng.random() == np.random.default_rng(0).random()  # and nothing was drawn

    @pytest.mark.parametrize("n", [2, 4, 5])
    def test_mixup_is_timms(self, n):
        from mindcv_poolformer.train.data import SoftTargetMixer

        rng = np.random.default_rng(3)
        images = rng.normal(size=(n, 3, 4, 6)).astype(np.float32)
        labels = np.arange(n) % 3
        mixer = SoftTargetMixer(3, smoothing=0.2, mixup=0.4, prob=0.9, seed=11)
        out, targets = mixer(images, labels)
        ref = np.random.default_rng(11)
        assert ref.random() < 0.9  # this seed mixes
        lam = ref.beta(0.4, 0.4)
        np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-6)
        smooth = _smoothed(labels, 3, 0.2)
        np.testing.assert_allclose(targets, lam * smooth + (1 - lam) * smooth[::-1], rtol=1e-5)
        one, one_targets = SoftTargetMixer(3, mixup=0.4, seed=11)(images[:1], labels[:1])
        np.testing.assert_array_equal(one, images[:1])
        np.testing.assert_allclose(one_targets, _smoothed(labels[:1], 3, 0.0), rtol=1e-6)

    @pytest.mark.parametrize("seed", range(8))
    def test_cutmix_is_timms(self, seed):
        from mindcv_poolformer.train.data import SoftTargetMixer

        images = np.random.default_rng(4).normal(size=(4, 2, 48, 80)).astype(np.float32)  # boxes of many sizes
        labels = np.array([0, 1, 2, 3])
        mixer = SoftTargetMixer(4, smoothing=0.1, mixup=0.8, cutmix=1.0, prob=1.0, switch_prob=1.0, seed=seed)
        out, targets = mixer(images, labels)
        ref = np.random.default_rng(seed)
        ref.random(), ref.random()  # the prob and the switch draws
        want, want_targets = _timm_cutmix(ref, images, _smoothed(labels, 4, 0.1), 1.0)
        np.testing.assert_array_equal(out, want)
        np.testing.assert_allclose(targets, want_targets, rtol=1e-6)

    def test_cutmix_box_is_timms_rand_bbox(self):
        from mindcv_poolformer.train.data import SoftTargetMixer

        class Fixed:  # the box centre timm would draw, given
            def __init__(self, *values):
                self.values = list(values)

            def integers(self, low, high):
                assert low == 0
                return self.values.pop(0)

        for lam in (0.999, 0.99, 0.9, 0.7, 0.5, 0.31, 0.05):  # 0.999: an empty box at the corner
            for cy, cx in ((0, 0), (3, 7), (6, 10), (11, 19), (5, 0)):
                height, width = 12, 20
                cut = np.sqrt(1.0 - lam)  # timm's rand_bbox
                cut_h, cut_w = int(height * cut), int(width * cut)
                want = (np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height),
                        np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width))
                got = SoftTargetMixer._cutmix_box(Fixed(cy, cx), lam, height, width)
                assert got == tuple(int(v) for v in want) and all(type(v) is int for v in got), (lam, cy, cx)

    def test_switch_and_prob(self):
        from mindcv_poolformer.train.data import SoftTargetMixer

        images = np.random.default_rng(5).normal(size=(4, 1, 4, 4)).astype(np.float32)
        labels = np.array([0, 1, 2, 3])
        mixed, _ = SoftTargetMixer(4, mixup=0.8, cutmix=1.0, switch_prob=0.0, seed=2)(images, labels)
        ref = np.random.default_rng(2)
        ref.random(), ref.random()
        lam = ref.beta(0.8, 0.8)
        np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-6)
        only_cut, _ = SoftTargetMixer(4, cutmix=1.0, switch_prob=0.0, seed=2)(images, labels)
        ref = np.random.default_rng(2)
        ref.random()
        np.testing.assert_array_equal(only_cut, _timm_cutmix(ref, images, _smoothed(labels, 4, 0.0), 1.0)[0])
        never, targets = SoftTargetMixer(4, mixup=0.8, cutmix=1.0, prob=0.0, seed=2)(images, labels)
        assert np.array_equal(never, images) and np.array_equal(targets, np.eye(4, dtype=np.float32))

    def test_default_switch_is_a_coin(self):
        from mindcv_poolformer.train.data import SoftTargetMixer

        images = np.stack([np.full((1, 4, 4), v, np.float32) for v in (0.0, 1.0)])
        cut = 0
        for seed in range(60):  # timm's default mixup_switch_prob 0.5: cutmix about half the time
            out, _ = SoftTargetMixer(2, mixup=1.0, cutmix=1.0, seed=seed)(images, np.array([0, 1]))
            cut += bool(np.isin(out, (0.0, 1.0)).all())  # cutmix copies pixels, mixup blends them
        assert 18 <= cut <= 42

    def test_mix_batch_in_place_and_per_batch(self):
        from mindcv_poolformer.train.data import SoftTargetMixer

        mixer = SoftTargetMixer(4, mixup=1.0, seed=9)
        images = np.random.default_rng(6).normal(size=(4, 1, 2, 2)).astype(np.float32)
        labels = np.array([0, 1, 2, 3])
        a, ta = mixer.mix_batch(images, labels, 3)
        b, tb = mixer.mix_batch(images.copy(), labels, 3)
        assert np.array_equal(a, b) and np.array_equal(ta, tb) and not np.array_equal(a, images)
        assert not np.array_equal(mixer.mix_batch(images, labels, 4)[1], ta)
        ref = np.random.default_rng([9, 3, 0x313])  # the documented per-batch generator
        ref.random()
        lam = ref.beta(1.0, 1.0)
        np.testing.assert_allclose(a, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-6)
        mine = images.copy()
        out, _ = mixer.mix_batch(mine, labels, 3, in_place=True)
        assert out is mine and np.array_equal(mine, a)
        strided = np.asfortranarray(images)
        out, _ = mixer.mix_batch(strided, labels, 3, in_place=True)
        assert out is not strided and np.array_equal(strided, images)
        frozen = images.copy()
        frozen.flags.writeable = False
        assert mixer.mix_batch(frozen, labels, 3, in_place=True)[0] is not frozen
        copied, _ = mixer.mix_batch(images, labels, 3)
        assert copied is not images


# ---------------------------------------------------------------------------------------------- top-k


class _FakeNet:
    """Logits given per image (its first pixel is the image's index); records the batch sizes it saw."""

    def __init__(self, logits: np.ndarray) -> None:
        self.logits, self.sizes, self.training = logits, [], None

    def set_train(self, mode: bool) -> None:
        self.training = mode

    def __call__(self, x):
        import mindspore as ms

        index = x.asnumpy()[:, 0, 0, 0].astype(np.int64)
        self.sizes.append(len(index))
        return ms.Tensor(self.logits[index].astype(np.float32))


def _reference(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """Top-1/top-5 (percent, numpy argsort) and the mean cross-entropy (torch) of float32 logits."""
    torch = pytest.importorskip("torch")
    order = np.argsort(-logits.astype(np.float64), axis=1)
    k = min(5, logits.shape[1])
    top1 = 100.0 * np.mean(order[:, 0] == labels)
    top5 = 100.0 * np.mean([labels[i] in order[i, :k] for i in range(len(labels))])
    loss = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits).double(), torch.from_numpy(labels)))
    return top1, top5, loss


class TestTopK:
    def test_batch_metrics_equal_argsort_and_torch(self):
        from mindcv_poolformer.evaluation.classification import _batch_metrics

        rng = np.random.default_rng(0)
        logits = (rng.normal(size=(40, 9)) * 30 + 500).astype(np.float32)  # large: softmax must shift
        labels = rng.integers(0, 9, size=40)
        top1, top5, loss = _batch_metrics(logits, labels)
        want1, want5, want_loss = _reference(logits, labels)
        assert (100.0 * top1 / 40, 100.0 * top5 / 40) == (pytest.approx(want1), pytest.approx(want5))
        assert 0 < top1 < top5 < 40
        assert loss == pytest.approx(want_loss * 40, rel=1e-12)

    def test_ties_and_few_classes(self):
        from mindcv_poolformer.evaluation.classification import _batch_metrics

        # ties count for the true class (fewer than k classes score strictly higher); 3 classes: top-5 is top-3
        logits = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
        assert _batch_metrics(logits, np.array([1, 0, 2]))[:2] == (1, 3)
        assert _batch_metrics(np.zeros((0, 3)), np.zeros(0, np.int64)) == (0, 0, 0.0)
        for bad, shown in (([0, 3], 3), ([-1, 0], 0)):
            with pytest.raises(ConfigError, match=rf"^label {shown} is out of range for a model with 3 classes"):
                _batch_metrics(logits[:2], np.array(bad))
        six = np.array([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]] * 2)
        assert _batch_metrics(six, np.array([4, 5]))[:2] == (0, 1)  # rank 5 is in the top 5, rank 6 is not

    def test_evaluate_pads_skips_and_averages(self, capsys):
        from mindcv_poolformer.evaluation.classification import evaluate

        rng = np.random.default_rng(1)
        logits = rng.normal(size=(11, 7))
        labels = np.argmax(logits, axis=1)
        labels[[0, 5]] = np.argsort(logits[[0, 5]], axis=1)[:, -2]  # second best: top-5, not top-1
        labels[10] = np.argmin(logits[10])  # in neither
        labels[[3, 9]] = -1  # unreadable images: in no metric
        images = np.broadcast_to(np.arange(11, dtype=np.float32)[:, None, None, None], (11, 1, 2, 2))
        batches = [(images[i:i + 4], labels[i:i + 4]) for i in range(0, 11, 4)]  # 4, 4, 3
        net = _FakeNet(logits)
        metrics = evaluate(net, batches, log_every=2)
        keep = labels >= 0
        want1, want5, want_loss = _reference(logits[keep].astype(np.float32), labels[keep])
        assert net.sizes == [4, 4, 4] and net.training is False  # the last batch padded to the first's size
        assert (metrics.num_samples, metrics.skipped) == (9, 2)
        assert metrics.top1 == pytest.approx(want1) and metrics.top5 == pytest.approx(want5)
        assert metrics.loss == pytest.approx(want_loss, rel=1e-6)
        assert 0 < want1 < want5 < 100
        first8 = keep[:8]
        correct = int(np.sum(np.argmax(logits[:8], 1)[first8] == labels[:8][first8]))
        assert capsys.readouterr().out == f"  batch 2: 7 samples, top-1 {100.0 * correct / 7:.2f}%\n"
        net = _FakeNet(logits)
        evaluate(net, batches, pad_to=6)
        assert net.sizes == [6, 6, 6]

    def test_evaluate_throughput_excludes_the_first_batch(self, monkeypatch):
        import itertools

        import mindcv_poolformer.evaluation.classification as ev

        ticks = itertools.count(0.0, 2.0)
        monkeypatch.setattr(ev.time, "perf_counter", lambda: next(ticks))
        logits = np.eye(4)
        images = np.arange(4, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 2, 2), np.float32)
        three = [(images[:2], np.array([0, 1])), (images[2:], np.array([2, 3])), (images[:2], np.array([0, 0]))]
        metrics = ev.evaluate(_FakeNet(logits), three)
        # clock: start 0, after the first batch 2, end 4 -> 4 s in all; 4 samples in the 2 s after the first batch
        assert (metrics.seconds, metrics.img_per_s, metrics.top1) == (4.0, 2.0, pytest.approx(500 / 6))
        one = ev.evaluate(_FakeNet(logits), three[:1])  # one batch: the whole loop is timed
        assert (one.seconds, one.img_per_s) == (4.0, 0.5)
        empty = ev.evaluate(_FakeNet(logits), None)
        assert (empty.num_samples, empty.top1, empty.top5, empty.img_per_s) == (0, 0.0, 0.0, 0.0)
        assert math.isnan(empty.loss)
        ticks = itertools.count(0.0, 0.25)
        assert ev.evaluate(_FakeNet(logits), three).img_per_s == 16.0  # 4 samples in 0.25 s
        monkeypatch.setattr(ev.time, "perf_counter", lambda: 7.0)  # a clock that did not move: no rate, no error
        assert ev.evaluate(_FakeNet(logits), three).img_per_s == 0.0
        skipped = ev.evaluate(_FakeNet(logits), [(images[:2], np.array([-1, -1]))])
        assert (skipped.num_samples, skipped.skipped) == (0, 2) and math.isnan(skipped.loss)

    def test_evaluate_distributed_sums(self, monkeypatch):
        import itertools

        import mindcv_poolformer.evaluation.classification as ev

        calls = []

        def two_ranks(values):  # rank 1 saw the same as rank 0, except one more second
            calls.append(values.dtype)
            other = values.copy()
            if len(values) == 4 and values[3] == 1.0:
                other[2] += 1.0
            return values + other

        monkeypatch.setattr(ev, "all_reduce_sum", two_ranks)
        logits = np.eye(3) * 5
        images = np.arange(3, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 2, 2), np.float32)
        ticks = itertools.count(0.0, 2.0)
        monkeypatch.setattr(ev.time, "perf_counter", lambda: next(ticks))
        single = ev.evaluate(_FakeNet(logits), [(images, np.array([0, 1, 1]))])
        ticks = itertools.count(0.0, 2.0)
        both = ev.evaluate(_FakeNet(logits), [(images, np.array([0, 1, 1]))], distributed=True)
        assert calls == [np.float32, np.float32]
        assert (single.num_samples, single.top1, single.seconds, single.img_per_s) == (3, pytest.approx(200 / 3),
                                                                                       4.0, 0.75)
        assert (both.num_samples, both.top1, both.loss) == (6, pytest.approx(200 / 3),
                                                            pytest.approx(single.loss, rel=1e-6))
        assert (both.img_per_s, both.seconds) == (1.5, 4.5)  # throughput adds up, seconds is the mean

    def test_evaluate_reads_a_mindspore_dataset_once(self):
        from mindcv_poolformer.evaluation.classification import evaluate

        class Dataset:
            def create_tuple_iterator(self, output_numpy, num_epochs):
                assert (output_numpy, num_epochs) == (True, 1)
                return iter([(np.zeros((2, 1, 2, 2), np.float32), np.array([[0], [1]]))])

        metrics = evaluate(_FakeNet(np.array([[1.0, 0.0]])), Dataset())
        assert (metrics.num_samples, metrics.top1) == (2, 50.0)


# ---------------------------------------------------------------------------------------------- mIoU


class TestMIoU:
    def test_histogram_compute_by_hand(self):
        from mindcv_poolformer.evaluation.miou import IoUHistogram

        hist = IoUHistogram(3)
        hist.update(np.array([[0, 1], [1, 2]]), np.array([[0, 1], [2, 255]], np.uint8))
        # intersect [1, 1, 0], pred [1, 2, 0] (the pixel under 255 is ignored), label [1, 1, 1]
        metrics = hist.compute()
        np.testing.assert_allclose(metrics.iou, [1.0, 0.5, 0.0])
        np.testing.assert_allclose(metrics.acc, [1.0, 1.0, 0.0])
        assert metrics.miou == pytest.approx(0.5) and metrics.aacc == pytest.approx(2 / 3)
        assert metrics.macc == pytest.approx(2 / 3) and metrics.num_images == 1
        with pytest.raises(ValueError, match=r"^prediction \(2, 2\) and label \(2, 3\) differ in shape$"):
            hist.update(np.zeros((2, 2)), np.zeros((2, 3)))
        hist.update(np.zeros((1, 1), np.int64), np.zeros((1, 1), np.uint8))
        assert hist.num_images == 2 and hist.areas[:, 0].tolist() == [2, 2, 2, 2]

    def test_out_of_range_values_are_dropped_as_torch_histc(self):
        from mindcv_poolformer.evaluation.miou import intersect_and_union

        pred = np.array([-1, 0, 3, 2, 1, 7])
        label = np.array([-1, 0, 3, 2, 9, 0])  # torch.histc(bins=3, min=0, max=2) drops -1, 3, 7, 9
        out = intersect_and_union(pred, label, 3, ignore_index=9)
        assert out.dtype == np.int64 and out.tolist() == [[1, 0, 1], [2, 0, 1], [1, 0, 1], [2, 0, 1]]
        # ignore_index 0: pixels labelled 0 are gone, predictions there too
        assert intersect_and_union(pred, label, 3, ignore_index=0).tolist() == [[0, 0, 1], [0, 1, 1], [0, 1, 1],
                                                                               [0, 0, 1]]

    def test_all_reduce_sums_counts_and_images(self):
        from mindcv_poolformer.evaluation.miou import IoUHistogram, all_reduce_counts

        hist = IoUHistogram(2)
        assert (hist.num_images, hist.skipped, hist.areas.dtype) == (0, 0, np.int64)
        hist.areas[:] = [[1, 2], [3, 4], [5, 6], [7, 2 ** 40]]
        hist.num_images, hist.skipped = 4, 5  # counts no area slot holds, so a swapped slot shows
        hist.all_reduce(lambda limbs: limbs * 3)  # three identical ranks
        assert hist.areas.tolist() == [[3, 6], [9, 12], [15, 18], [21, 3 * 2 ** 40]]
        assert (hist.num_images, hist.skipped) == (12, 15)
        top = 2 ** 48 - 1
        assert all_reduce_counts(np.array([top, 0]), lambda x: x).tolist() == [top, 0]
        for bad in ([-1], [2 ** 48]):
            with pytest.raises(ValueError, match=r"^counts must be in \[0, 2\*\*48\) for an exact reduction$"):
                all_reduce_counts(np.array(bad), lambda x: x)
        for broken in (lambda x: x + 0.5, lambda x: x + 2.0 ** 24, lambda x: x * 0 + 2.0 ** 24):  # 2**24: maybe rounded
            with pytest.raises(RuntimeError, match="not exact"):
                all_reduce_counts(np.array([5]), broken)
        assert all_reduce_counts(np.array([2 ** 24 - 1]), lambda x: x * 0 + 4095).tolist() == [4095 * (1 + 2 ** 12
                                                                                              + 2 ** 24 + 2 ** 36)]

    def test_all_reduce_through_mindspore_ops(self, monkeypatch):
        import mindspore.communication as comm
        from mindspore import ops

        from mindcv_poolformer.evaluation.miou import all_reduce_counts

        seen = []
        monkeypatch.setattr(comm, "get_group_size", lambda: 4096)
        monkeypatch.setattr(ops, "AllReduce", lambda: lambda t: seen.append(t.dtype) or t * 2)
        assert all_reduce_counts(np.array([3, 2 ** 30])).tolist() == [6, 2 ** 31]
        assert str(seen[0]) == "Float32"
        monkeypatch.setattr(comm, "get_group_size", lambda: 4097)
        with pytest.raises(ValueError, match=r"needs at most 4096 ranks$"):
            all_reduce_counts(np.array([3]))

    def test_absent_classes_are_nan_without_warnings(self):
        import warnings

        from mindcv_poolformer.evaluation.miou import IoUHistogram

        empty = IoUHistogram(2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            metrics = empty.compute()
        assert all(math.isnan(v) for v in (metrics.miou, metrics.aacc, metrics.macc))
        hist = IoUHistogram(3)
        hist.update(np.array([[0, 0]]), np.array([[0, 255]]))
        metrics = hist.compute()
        assert metrics.miou == 1.0 and metrics.macc == 1.0 and metrics.aacc == 1.0
        assert np.isnan(metrics.iou[1:]).all() and isinstance(metrics.miou, float)
