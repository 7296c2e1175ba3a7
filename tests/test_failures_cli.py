"""Bad input through the real command lines (issue #6).

Every bad input below is run as a user would run it (``python train.py ...``, ``validate.py``,
``export.py``, ``python -m mindcv_poolformer.convert``) and must exit with code 2 and ONE line on
stderr that names the bad value and what is accepted, with no traceback, and leave every file that
was already there untouched, even with ``--overwrite True``. Unreadable images inside a dataset are
skipped with a counted warning (training keeps its number of steps, validation leaves them out of
top-1), or with ``--strict_data True`` are a one-line error naming the file.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import REPO, make_tiny_folder

pytestmark = pytest.mark.slow

RECIPE_1000 = "configs/poolformer/poolformer_s12_ascend.yaml"  # num_classes: 1000, device_target: Ascend
NOT_A_CHECKPOINT = b"this is a text file, not a checkpoint\n"


def _absent_devices() -> list[str]:
    from mindcv_poolformer._runtime import available_device_targets

    return [t for t in ("Ascend", "GPU") if t not in available_device_targets()]


ABSENT = _absent_devices()


def cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` from the repository root outside any launcher (no MPI/msrun variables)."""
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("OMPI_", "PMI_", "PMIX_")) and k not in ("MS_ROLE", "RANK_TABLE_FILE",
                                                                              "RANK_SIZE", "RANK_ID")}
    full_env.update(PYTHONPATH=str(REPO), GLOG_v="3", PYTHONDONTWRITEBYTECODE="1")
    full_env.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def _save(name: str, num_classes: int, path: Path) -> Path:
    import mindspore as ms

    from mindcv_poolformer import create_model

    fmt = "safetensors" if path.suffix == ".safetensors" else "ckpt"
    ms.save_checkpoint(create_model(name, num_classes=num_classes), str(path), format=fmt)
    return path


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, str]:
    """Datasets (good and broken), checkpoints (good and broken), a previous run and previous outputs."""
    base = tmp_path_factory.mktemp("failures")
    data = make_tiny_folder(base / "data", per_class_train=2, per_class_val=1)  # 10 classes, 20 train, 10 val
    (base / "empty").mkdir()
    shutil.copytree(data / "val", base / "only_val" / "val")
    shutil.copytree(data / "train", base / "only_train" / "train")
    shutil.copytree(data, base / "empty_class")
    (base / "empty_class" / "train" / "x").mkdir()
    shutil.copytree(data, base / "extra_val_class")
    shutil.copytree(data / "val" / "0", base / "extra_val_class" / "val" / "zz")
    shutil.copytree(data / "val", base / "empty_val_class" / "val")
    (base / "empty_val_class" / "val" / "x").mkdir()
    bad = shutil.copytree(data, base / "bad")  # 20 + 2 unreadable train images, 10 + 1 unreadable val images
    (bad / "train" / "3" / "zz_garbage.jpg").write_bytes(b"not a JPEG at all")
    png = sorted((bad / "train" / "5").iterdir())[0].read_bytes()
    (bad / "train" / "5" / "zz_truncated.png").write_bytes(png[: len(png) // 3])
    (bad / "val" / "2" / "zz_garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated JPEG header")

    s12 = _save("poolformer_s12", 10, base / "s12_10.safetensors")
    _save("poolformer_s12", 3, base / "s12_3.safetensors")
    _save("poolformer_s24", 10, base / "s24_10.safetensors")
    (base / "trunc.safetensors").write_bytes(s12.read_bytes()[:100_000])
    whole = _save("poolformer_s12", 10, base / "whole.ckpt")
    (base / "trunc.ckpt").write_bytes(whole.read_bytes()[:100_000])
    whole.unlink()
    for name in ("text.ckpt", "text.safetensors", "text.mindir"):
        (base / name).write_bytes(NOT_A_CHECKPOINT)
    (base / "w.pth").write_bytes(b"PK\x03\x04 a PyTorch zip archive")  # never opened: torch is missing
    (base / "no_torch").mkdir()
    (base / "no_torch" / "torch.py").write_text("raise ImportError('No module named torch (simulated)')\n")
    (base / "typo.yaml").write_text("lr_scale_bacth: 1024\n")
    (base / "wrong_type.yaml").write_text("epoch_size: [3]\n")

    prior = base / "prior"  # a previous run: must survive every failed command, even with --overwrite True
    prior.mkdir()
    (prior / "config.yaml").write_text("model: poolformer_s12\n")
    (prior / "metrics.csv").write_text("epoch,step,train_loss\n1,5,2.3\n")
    (prior / "checkpoints.json").write_text('{"checkpoints": []}')
    (prior / "poolformer_s12-e0001-s00000005.safetensors").write_bytes(b"weights of a previous run")
    out = base / "out"  # previous outputs of validate/export/convert
    out.mkdir()
    (out / "prev.json").write_text('{"top1": 77.2}')
    (out / "s12.mindir").write_bytes(b"a previous export")
    (out / "s12.mindir.json").write_text('{"model": "poolformer_s12"}')
    (out / "conv.safetensors").write_bytes(b"a previous conversion")
    paths = {name: str(base / name) for name in ("data", "bad", "prior", "out", "s12_3.safetensors",
                                                 "s24_10.safetensors", "no_torch")}
    paths.update(ws=str(base), s12=str(s12), s12_3=paths["s12_3.safetensors"], s24=paths["s24_10.safetensors"])
    return paths


BASE = {
    "train.py": ["--data_dir", "{data}", "--image_resize", "32", "--crop_pct", "1.0", "--batch_size", "4",
                 "--num_parallel_workers", "1", "--epoch_size", "1", "--warmup_epochs", "0", "--mode", "1",
                 "--ckpt_save_dir", "{prior}", "--overwrite", "True"],
    "validate.py": ["--data_dir", "{data}", "--ckpt_path", "{s12}", "--image_resize", "32", "--batch_size", "4",
                    "--num_parallel_workers", "1", "--mode", "1", "--json", "{out}/prev.json"],
    "export.py": ["--ckpt_path", "{s12}", "--image_resize", "32", "--file_name", "{out}/s12", "--overwrite", "True"],
    "convert": [],
}
NO_TORCH = {"PYTHONPATH": "{no_torch}" + os.pathsep + str(REPO)}


def case(script: str, args: list[str], *needles: str, env: dict | None = None, skip: str = ""):
    marks = [pytest.mark.skip(reason=skip)] if skip else []
    return pytest.param(script, args, needles, env or {}, marks=marks, id=f"{script.split('.')[0]}:{' '.join(args)}")


def _device_cases() -> list:
    out = []
    for target in ("Ascend", "GPU"):
        skip = "" if target in ABSENT else f"{target} is available here"
        for script in ("train.py", "validate.py", "export.py"):
            out.append(case(script, ["--device_target", target], f"device_target: {target} is not available on "
                            "this machine (this MindSpore", "can run on: CPU", "pass --device_target", skip=skip))
    return out


CASES = [
    # configuration: unknown key / flag (closest valid key suggested), wrong type, out of range
    case("train.py", ["--bacth_size", "4"], "unknown option --bacth_size; did you mean --batch_size?"),
    case("train.py", ["--config", "{ws}/typo.yaml"],
         "unknown config key 'lr_scale_bacth' in {ws}/typo.yaml; did you mean lr_scale_batch?"),
    case("validate.py", ["--bogus", "1"], "unknown option --bogus; --help lists every valid key"),
    # each script takes only its own flags (a recipe may hold every script's keys)
    case("train.py", ["--onnx", "{out}/x.onnx"], "--onnx is an option of predict, not of train.py"),
    case("validate.py", ["--max_nonfinite_steps", "3"], "--max_nonfinite_steps is an option of train.py, not of "
         "validate.py"),
    case("export.py", ["--topk", "3"], "--topk is an option of predict, not of export.py"),
    case("train.py", ["--batch_size", "four"], "batch_size: expected an integer, got 'four'"),
    case("train.py", ["--config", "{ws}/wrong_type.yaml"], "epoch_size: expected an integer, got [3]"),
    case("train.py", ["--lr", "-0.001"], "lr: -0.001 is out of range (must be > 0)"),
    case("train.py", ["--batch_size", "0"], "batch_size: 0 is out of range (must be >= 1)"),
    case("train.py", ["--crop_pct", "1.5"], "crop_pct: 1.5 is out of range (must be in (0, 1])"),
    case("validate.py", ["--crop_pct", "0"], "crop_pct: 0.0 is out of range (must be in (0, 1])"),
    case("train.py", ["--model", "poolformer_s13"], "model: unknown model 'poolformer_s13'", "available: "),
    case("train.py", ["--amp_level", "O4"], "amp_level: 'O4' is not one of O0, O1, O2, O3"),
    case("validate.py", ["--amp_level", "O1"], "amp_level: O1 is not supported", "use O2"),
    case("export.py", ["--file_format", "TFLITE"], "file_format: 'TFLITE' is not one of MINDIR, AIR, ONNX"),
    case("train.py", ["--jit_level", "O3"], "jit_level: 'O3' is not one of auto, O0, O1, O2"),
    case("validate.py", ["--device_target", "TPU"], "device_target: 'TPU' is not one of auto, CPU, Ascend, GPU"),
    # data_dir
    case("train.py", ["--data_dir", ""], "data_dir: no dataset directory given (pass --data_dir DIR"),
    case("train.py", ["--data_dir", "{ws}/missing"], "data_dir: {ws}/missing does not exist"),
    case("train.py", ["--data_dir", "{ws}/empty"], "train_split: {ws}/empty/train does not exist (it has no "
         "sub-folders; expected {ws}/empty/train/<class>/<image>)"),
    case("train.py", ["--data_dir", "{ws}/only_val"],
         "train_split: {ws}/only_val/train does not exist (it holds the folders val;"),
    case("train.py", ["--data_dir", "{ws}/only_train"],
         "val_split: {ws}/only_train/val does not exist (it holds the folders train;"),
    case("train.py", ["--data_dir", "{ws}/empty_class"],
         "data_dir: class folder {ws}/empty_class/train/x has no images (.jpg .jpeg .png"),
    case("train.py", ["--data_dir", "{ws}/extra_val_class"], "data_dir: {ws}/extra_val_class/val has 1 class "
         "folder(s) that the training split lacks (zz)"),
    case("train.py", ["--num_classes", "5"], "num_classes: 5 is fewer than the 10 class folders of {data}/train"),
    case("validate.py", ["--data_dir", "{ws}/missing"], "data_dir: {ws}/missing does not exist"),
    case("validate.py", ["--data_dir", "{ws}/only_train"],
         "val_split: {ws}/only_train/val does not exist (it holds the folders train;"),
    case("validate.py", ["--data_dir", "{ws}/empty_val_class"],
         "data_dir: class folder {ws}/empty_val_class/val/x has no images"),
    case("validate.py", ["--ckpt_path", "{s12_3}"],
         "data_dir: {data}/val has 10 class folders but the model ({s12_3}) has only 3 outputs"),
    # checkpoints: missing, truncated, not a checkpoint, wrong architecture, class count, .pth without torch
    case("train.py", ["--ckpt_path", "{ws}/missing.ckpt"], "ckpt_path: {ws}/missing.ckpt does not exist"),
    case("train.py", ["--ckpt_path", "{ws}/trunc.safetensors"],
         "{ws}/trunc.safetensors: not a readable safetensors checkpoint"),
    case("train.py", ["--ckpt_path", "{ws}/text.ckpt"], "{ws}/text.ckpt: not a readable ckpt checkpoint"),
    case("train.py", ["--ckpt_path", "{s24}"], "{s24} holds a poolformer_s24 (depths (4, 4, 12, 4), widths (64, 128, "
         "320, 512)) but the model is a poolformer_s12 (depths (2, 2, 6, 2)", "pass --model poolformer_s24"),
    case("train.py", ["--ckpt_path", "{ws}/w.pth"], "{ws}/w.pth: reading a PyTorch checkpoint needs torch, which is "
         "not installed", env=NO_TORCH),
    case("validate.py", ["--ckpt_path", "{ws}/missing.ckpt"], "ckpt_path: '{ws}/missing.ckpt' does not exist"),
    case("validate.py", ["--ckpt_path", "{ws}/trunc.ckpt"], "{ws}/trunc.ckpt: not a readable ckpt checkpoint"),
    case("validate.py", ["--ckpt_path", "{ws}/text.safetensors"],
         "{ws}/text.safetensors: not a readable safetensors checkpoint"),
    case("validate.py", ["--ckpt_path", "{ws}/text.mindir"], "{ws}/text.mindir is not a loadable MINDIR"),
    case("validate.py", ["--ckpt_path", "{s24}"], "{s24} holds a poolformer_s24", "pass --model poolformer_s24"),
    case("validate.py", ["--config", RECIPE_1000, "--device_target", "CPU", "--distribute", "False"],
         "num_classes: {s12} has a 10-class head but num_classes is 1000; drop --num_classes"),
    case("validate.py", ["--ckpt_path", "{ws}/w.pth"], "needs torch, which is not installed", env=NO_TORCH),
    case("export.py", ["--ckpt_path", "{ws}/missing.ckpt"], "ckpt_path: '{ws}/missing.ckpt' does not exist"),
    case("export.py", ["--ckpt_path", "{ws}/trunc.safetensors"], "not a readable safetensors checkpoint"),
    case("export.py", ["--ckpt_path", "{ws}/text.ckpt"], "{ws}/text.ckpt: not a readable ckpt checkpoint"),
    case("export.py", ["--ckpt_path", "{s24}"], "{s24} holds a poolformer_s24", "pass --model poolformer_s24"),
    case("export.py", ["--num_classes", "1000"], "num_classes: {s12} has a 10-class head but num_classes is 1000"),
    case("export.py", ["--ckpt_path", "{ws}/w.pth"], "needs torch, which is not installed", env=NO_TORCH),
    case("convert", ["{ws}/missing.pth", "{out}/conv.safetensors", "--overwrite"],
         "checkpoint not found: {ws}/missing.pth"),
    case("convert", ["{ws}/trunc.safetensors", "{out}/conv.safetensors", "--overwrite"],
         "{ws}/trunc.safetensors: not a readable safetensors checkpoint"),
    case("convert", ["{ws}/text.ckpt", "{out}/conv.safetensors", "--overwrite"], "not a readable ckpt checkpoint"),
    case("convert", ["{s24}", "{out}/conv.safetensors", "--overwrite", "--arch", "poolformer_s12"],
         "{s24} holds a poolformer_s24 (depths (4, 4, 12, 4), widths (64, 128, 320, 512)), not poolformer_s12"),
    case("convert", ["{s12}", "{out}/conv.safetensors", "--overwrite", "--arch", "poolformer_x"],
         "arch: unknown model 'poolformer_x'"),
    case("convert", ["{s12}", "{out}/conv.pth"], "{out}/conv.pth: the output must be a .safetensors (default) or "
         ".ckpt file"),
    case("convert", ["{s12}", "{out}/conv.safetensors"], "{out}/conv.safetensors already exists; pass "
         "overwrite=True (--overwrite)"),
    case("convert", ["{ws}/w.pth", "{out}/conv.safetensors", "--overwrite"], "needs torch, which is not installed",
         env=NO_TORCH),
    # MindCV's flags (issue 19): refused values say what to use; --pretrained without a weights cache says where
    case("train.py", ["-c", "{ws}/typo.yaml"], "unknown config key 'lr_scale_bacth' in {ws}/typo.yaml"),
    case("train.py", ["--layer_decay", "0.75"], "layer_decay: 0.75: layer-wise learning-rate decay is not available",
         "remove layer_decay"),
    case("train.py", ["--aug_splits", "3"], "aug_splits: 3: MindCV's augmentation splits", "use 0"),
    case("train.py", ["--weight_decay_filter", "auto", "--filter_bias_and_bn", "False"],
         "filter_bias_and_bn: False contradicts weight_decay_filter: auto", "give only weight_decay_filter"),
    case("train.py", ["--ckpt_path", "{s12}", "--resume_opt", "True"],
         "resume_opt: {s12} is not a training checkpoint of this trainer", "drop --resume_opt", "--resume PATH|auto"),
    case("train.py", ["--pretrained"], "no pretrained weights for poolformer_s12 in {ws}/no_cache",
         "set MINDCV_POOLFORMER_HOME", "or pass --ckpt_path FILE", env={"MINDCV_POOLFORMER_HOME": "{ws}/no_cache"}),
    case("validate.py", ["--ckpt_path", "", "--pretrained"], "no pretrained weights for poolformer_s12 in "
         "{ws}/no_cache", "download https://", env={"MINDCV_POOLFORMER_HOME": "{ws}/no_cache"}),
    case("validate.py", ["--val_amp_level", "O1"], "val_amp_level: O1 is not supported", "use O0, O2 or O3"),
    # devices and launchers
    *_device_cases(),
    case("export.py", ["--file_format", "AIR"], "AIR export needs the Ascend backend", "Export MINDIR or ONNX here",
         skip="" if "Ascend" in ABSENT else "Ascend is available here"),
    case("train.py", ["--distribute", "True"], "distribute=True needs a launcher: run under `msrun"),
    case("validate.py", ["--distribute", "True"], "distribute=True needs a launcher"),
]


def _command(script: str, args: list[str], paths: dict[str, str]) -> list[str]:
    head = ["-m", "mindcv_poolformer.convert"] if script == "convert" else [script]
    return head + [a.format(**paths) for a in BASE[script] + args]


@pytest.mark.parametrize("script,args,needles,env", CASES)
def test_bad_input_is_one_line_and_touches_nothing(ws, script, args, needles, env):
    before = _snapshot(Path(ws["ws"]))
    kept = {p: p.read_bytes() for d in ("prior", "out") for p in Path(ws[d]).iterdir()}
    proc = cli(*_command(script, args, ws), env={k: v.format(**ws) for k, v in env.items()})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    prog = "convert" if script == "convert" else script
    assert lines[0].startswith(f"{prog}: error: ")
    for needle in needles:
        assert needle.format(**ws) in lines[0]
    assert _snapshot(Path(ws["ws"])) == before  # nothing written, removed or touched
    assert all(p.read_bytes() == content for p, content in kept.items())


def test_debug_shows_the_traceback(ws):
    proc = cli("validate.py", "--data_dir", f"{ws['ws']}/missing", "--ckpt_path", ws["s12"], "--debug")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and f"ConfigError: data_dir: {ws['ws']}/missing does not exist" in proc.stderr


def test_unreadable_images_are_replaced_in_training_and_skipped_in_validation(ws, tmp_path):
    """22 training images (2 unreadable), batch 2: still 11 steps; fine-tuning a 3-class checkpoint to 10 classes."""
    run = tmp_path / "run"
    proc = cli(*_command("train.py", ["--data_dir", ws["bad"], "--batch_size", "2", "--ckpt_save_dir", str(run),
                                      "--overwrite", "False", "--ckpt_path", ws["s12_3"], "--val_while_train", "True",
                                      "--num_parallel_workers", "2"], ws))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout
    assert "re-initialised (new in the model or shape differs): head.weight, head.bias" in log
    bad = ws["bad"]
    for path, reason in ((f"{bad}/train/3/zz_garbage.jpg", "cannot identify image file"),
                         (f"{bad}/train/5/zz_truncated.png", "")):
        assert f"skipping unreadable image {path} ({reason}" in log
        assert log.count(f"skipping unreadable image {path}") == 1  # reported once
    assert "replaced by the next image of the epoch" in log
    assert f"skipping unreadable image {bad}/val/2/zz_garbage.jpg" in log and "left out of the metrics" in log
    assert "3 unreadable image(s) so far" in log
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert int(rows[-1]["step"]) == 11  # 22 // 2: the unreadable files were substituted, not dropped
    assert rows[-1]["val_top1"] != ""


def test_unreadable_val_images_are_not_counted(ws, tmp_path):
    """The same checkpoint on the clean and on the damaged val split: identical metrics over the 10 readable images."""
    def validate(data: str, out: Path) -> subprocess.CompletedProcess:
        return cli(*_command("validate.py", ["--data_dir", data, "--json", str(out), "--num_parallel_workers", "2"],
                             ws))

    clean, damaged = validate(ws["data"], tmp_path / "clean.json"), validate(ws["bad"], tmp_path / "bad.json")
    assert clean.returncode == 0 and damaged.returncode == 0, damaged.stderr[-3000:]
    a, b = json.loads((tmp_path / "clean.json").read_text()), json.loads((tmp_path / "bad.json").read_text())
    assert (a["num_samples"], a["skipped"], b["num_samples"], b["skipped"]) == (10, 0, 10, 1)
    assert (a["top1"], a["top5"]) == (b["top1"], b["top5"]) and a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert "skipped (unreadable) | 1" in damaged.stdout
    assert f"skipping unreadable image {ws['bad']}/val/2/zz_garbage.jpg" in damaged.stderr
    assert f"warning: 1 unreadable image(s) of {ws['bad']}/val were skipped" in damaged.stderr


@pytest.mark.parametrize("script", ["train.py", "validate.py"])
def test_strict_data_names_the_unreadable_file(ws, tmp_path, script):
    args = ["--data_dir", ws["bad"], "--strict_data", "True"]
    if script == "train.py":
        args += ["--ckpt_save_dir", str(tmp_path / "run"), "--overwrite", "False"]
    proc = cli(*_command(script, args, ws))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    split = "train" if script == "train.py" else "val"
    assert lines[0].startswith(f"{script}: error: strict_data: cannot read image {ws['bad']}/{split}/")
    assert "zz_" in lines[0] and "pass --strict_data False to skip unreadable images" in lines[0]


def test_convert_writes_safetensors_unless_told_otherwise(ws, tmp_path):
    assert "default" in cli("-m", "mindcv_poolformer.convert", "--help").stdout
    plain = cli("-m", "mindcv_poolformer.convert", ws["s12"], str(tmp_path / "s12_plain"))
    assert plain.returncode == 0, plain.stderr
    assert (tmp_path / "s12_plain.safetensors").is_file() and not (tmp_path / "s12_plain").exists()
    folder = tmp_path / "weights"
    folder.mkdir()
    into = cli("-m", "mindcv_poolformer.convert", ws["s12"], str(folder))
    assert into.returncode == 0, into.stderr
    assert [p.name for p in folder.iterdir()] == ["s12_10.safetensors"]
    assert f"wrote {folder / 's12_10.safetensors'}: poolformer_s12, 10 classes" in into.stdout
