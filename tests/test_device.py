"""Device choice (``device_target: auto``), ``jit_level``, launcher checks, and ``init()`` before the first Parameter.

On this CPU the Ascend/GPU branches are reached by replacing what MindSpore reports
(``available_device_targets``, the plugin's device counters, ``setup_device``); the CPU paths run for real.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ascend_sim import simulate_ascend
from train_helpers import REPO, make_tiny_folder, run_python

from mindcv_poolformer import _runtime, distributed
from mindcv_poolformer.config import ConfigError, load_config
from mindcv_poolformer.deploy.export import main as export_main
from mindcv_poolformer.deploy.predict import main as predict_main
from mindcv_poolformer.evaluation.validate import main as validate_main
from mindcv_poolformer.train.cli import main as train_main

from deploy_helpers import IMAGE_SIZE, deploy_assets  # noqa: F401  (fixture)

DATA = Path(__file__).parent / "data"
ASCEND_RECIPES = sorted((REPO / "configs" / "poolformer").glob("*_ascend.yaml"))
DEPRECATED_DEVICE = ("'device_target' will be deprecated", "'device_id' will be deprecated")


@pytest.fixture
def no_launcher(monkeypatch):
    """No MPI/msrun/rank-table variables, and no communication world left over from another test."""
    for var in [k for k in os.environ if k.startswith(("OMPI_", "PMI_", "PMIX_"))]:
        monkeypatch.delenv(var)
    for var in ("MS_ROLE", "RANK_TABLE_FILE", "RANK_SIZE", "RANK_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(distributed, "_ACTIVE", None)


def _available(monkeypatch, *targets: str) -> None:
    monkeypatch.setattr(_runtime, "available_device_targets", lambda: list(targets))


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


# ---------------------------------------------------------------- device_target: auto


@pytest.mark.parametrize("available,expected,why", [
    (("Ascend", "GPU", "CPU"), "Ascend", "auto: Ascend found"),
    (("Ascend", "CPU"), "Ascend", "auto: Ascend found"),
    (("GPU", "CPU"), "GPU", "auto: no Ascend found"),
    (("CPU",), "CPU", "auto: no Ascend or GPU found"),
])
def test_auto_takes_ascend_then_gpu_then_cpu(monkeypatch, available, expected, why):
    _available(monkeypatch, *available)
    assert _runtime.resolve_device_target("auto") == expected
    assert _runtime.describe_device("auto", expected) == f"device: {expected} ({why})"
    assert _runtime.describe_device("CPU", "CPU", "O1") == "device: CPU (as configured), jit_level O1"


def test_auto_is_the_default_and_resolves_in_place(monkeypatch):
    cfg = load_config()
    assert (cfg.device_target, cfg.jit_level) == ("auto", "auto")
    _available(monkeypatch, "GPU", "CPU")
    calls = []
    monkeypatch.setattr(_runtime, "setup_device", lambda *args: calls.append(args))
    assert _runtime.configure_device(cfg, mode=0) == "device: GPU (auto: no Ascend found)"
    assert cfg.device_target == "GPU" and calls == [("GPU", 0, "auto")]  # the run dir's config.yaml says GPU


class _AllPluginsLoaded:
    """MSContext of a wheel whose three plugins all loaded (CANN and CUDA libraries present)."""

    @staticmethod
    def get_instance():
        return _AllPluginsLoaded()

    def is_pkg_support_device(self, target: str) -> bool:
        return True


def test_a_loaded_plugin_without_a_device_is_not_available(monkeypatch):
    from mindspore import _c_expression

    def no_gpu() -> int:
        raise RuntimeError("cudaGetDeviceCount: no CUDA-capable device is detected")

    monkeypatch.setattr(_c_expression, "MSContext", _AllPluginsLoaded)
    monkeypatch.setattr(_c_expression, "ascend_get_device_count", lambda: 0, raising=False)
    monkeypatch.setattr(_c_expression, "gpu_get_device_count", no_gpu, raising=False)
    _runtime._probe_device_targets.cache_clear()
    try:
        assert _runtime.available_device_targets() == ["CPU"]
        monkeypatch.setattr(_c_expression, "gpu_get_device_count", lambda: 2)
        _runtime._probe_device_targets.cache_clear()
        assert _runtime.available_device_targets() == ["GPU", "CPU"]
        monkeypatch.setattr(_c_expression, "ascend_get_device_count", lambda: 8)
        _runtime._probe_device_targets.cache_clear()
        assert _runtime.resolve_device_target("auto") == "Ascend"
    finally:
        _runtime._probe_device_targets.cache_clear()


def test_this_machine_always_has_the_cpu():
    assert _runtime.available_device_targets()[-1] == "CPU"


def test_mindcv_recipe_runs_on_the_device_that_is_there(monkeypatch):
    """MindCV defaults device_target to Ascend and its recipe has no such key: auto keeps it on Ascend there."""
    cfg = load_config(DATA / "mindcv_poolformer_s12_ascend.yaml")
    assert cfg.device_target == "auto"
    _available(monkeypatch, "Ascend", "CPU")
    assert _runtime.resolve_device_target(cfg.device_target) == "Ascend"
    _available(monkeypatch, "CPU")
    assert _runtime.resolve_device_target(cfg.device_target) == "CPU"


def test_an_absent_explicit_device_is_one_line_in_every_script(monkeypatch, capsys, no_launcher):
    _available(monkeypatch, "CPU")
    scripts = ((train_main, "train.py", []), (validate_main, "validate.py", []), (export_main, "export.py", []),
               (predict_main, "predict", [str(REPO / "README.md"), "--ckpt_path", str(REPO / "pyproject.toml")]))
    for main, prog, argv in scripts:
        for target in ("Ascend", "GPU"):
            assert main([*argv, "--device_target", target]) == 2
            line = _one_error_line(capsys)
            assert line.startswith(f"{prog}: error: device_target: {target} is not available on this machine")
            assert "can run on: CPU" in line and "pass --device_target CPU or auto" in line


def test_set_device_twice_in_one_process_is_a_no_op():
    import mindspore as ms

    from mindcv_poolformer._script import ScriptError

    mode = ms.get_context("mode")
    try:
        (ms.Tensor(np.ones(2, np.float32)) + 1).asnumpy()  # a kernel ran: now set_device refuses even the same
        _runtime.setup_device("CPU", mode)
        _runtime.setup_device("CPU", mode)
        with pytest.raises(ScriptError, match="already runs on CPU and MindSpore cannot switch it to GPU"):
            _runtime.setup_device("GPU", mode)
        assert ms.get_context("device_target") == "CPU"
        assert (ms.Tensor(np.ones(2, np.float32)) + 1).asnumpy().tolist() == [2.0, 2.0]
    finally:
        ms.set_context(mode=mode)


# ---------------------------------------------------------------- jit_level


@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("O0", "O0"), ("o1", "O1"), ("O2", "O2")])
def test_jit_level_takes_mindspores_levels(value, expected):
    assert load_config(cli_overrides={"jit_level": value}).jit_level == expected


def test_a_bad_jit_level_is_one_line(capsys):
    with pytest.raises(ConfigError, match="jit_level: 'O3' is not one of auto, O0, O1, O2"):
        load_config(overrides={"jit_level": "O3"})
    assert train_main(["--jit_level", "fast"]) == 2
    assert _one_error_line(capsys) == "train.py: error: jit_level: 'fast' is not one of auto, O0, O1, O2"


def test_jit_level_goes_to_the_global_jit_config(monkeypatch, caplog):
    import mindspore as ms

    calls: list[dict] = []
    monkeypatch.setattr(ms, "set_context", lambda **kw: calls.append(kw))
    monkeypatch.setattr(_runtime, "_set_device", lambda target: calls.append({"device": target}))
    _runtime.setup_device("Ascend", 0, "O1")
    assert calls == [{"device": "Ascend"}, {"mode": ms.GRAPH_MODE}, {"jit_config": {"jit_level": "O1"}}]
    calls.clear()
    _runtime.setup_device("CPU", 1, "auto")  # auto: MindSpore's own level (O0 on CPU), as before this key existed
    assert calls == [{"device": "CPU"}, {"mode": ms.PYNATIVE_MODE}]
    _runtime._warn_deprecated_o2.cache_clear()
    with caplog.at_level(logging.WARNING, logger="mindcv_poolformer"):
        _runtime.setup_device("Ascend", 0, "O2")
    assert "jit_level O2 (the GE backend) is deprecated since MindSpore 2.9" in caplog.text


@pytest.mark.parametrize("recipe", ASCEND_RECIPES, ids=lambda p: p.stem)
def test_ascend_recipes_compile_at_o1_where_the_soc_fuses(recipe):
    cfg = load_config(recipe)
    assert (cfg.device_target, cfg.jit_level) == ("Ascend", "auto")
    assert "memory access-intensive" in recipe.read_text()  # the doc text behind the choice
    for soc, level in (("910B", "O1"), ("910A", "auto")):  # 910A: MindSpore's own default (O2 in its SoC table)
        with simulate_ascend(soc):
            assert _runtime.resolve_jit_level(cfg.jit_level, "Ascend") == level, soc
    assert _runtime.resolve_jit_level("auto", "CPU") == "auto"
    assert _runtime.resolve_jit_level("O0", "Ascend") == "O0"


# ---------------------------------------------------------------- launchers


def test_mpich_on_ascend_is_one_line(monkeypatch, capsys, no_launcher):
    _available(monkeypatch, "Ascend", "CPU")
    monkeypatch.setattr(_runtime, "setup_device", lambda *args: None)  # no NPU here
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setenv("PMI_SIZE", "8")
    assert distributed.detect_launcher() == "mpirun"
    assert train_main(["--distribute", "True"]) == 2  # auto picks Ascend
    line = _one_error_line(capsys)
    assert line.startswith("train.py: error: mpirun: MindSpore on Ascend starts only under Open MPI's mpirun")
    assert "MPICH or Intel MPI (PMI_RANK set, no OMPI_COMM_WORLD_RANK)" in line and "msrun --worker_num=N" in line
    distributed.check_launcher("mpirun", "CPU")  # on CPU our scheduler bootstrap serves any MPI
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "8")
    distributed.check_launcher("mpirun", "Ascend")  # Open MPI: accepted


@pytest.mark.parametrize("env,launcher", [({"MS_ROLE": "MS_WORKER"}, "msrun"),
                                          ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "8"}, "mpirun")])
def test_a_rank_table_next_to_msrun_or_mpirun_warns(monkeypatch, caplog, no_launcher, env, launcher):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RANK_TABLE_FILE", "/etc/hccl_8p.json")
    assert distributed.detect_launcher() == launcher
    with caplog.at_level(logging.WARNING, logger="mindcv_poolformer"):
        distributed.check_launcher(launcher, "Ascend")
    assert f"RANK_TABLE_FILE=/etc/hccl_8p.json is set, but {launcher} needs no rank table" in caplog.text
    caplog.clear()
    monkeypatch.delenv("RANK_TABLE_FILE")
    with caplog.at_level(logging.WARNING, logger="mindcv_poolformer"):
        distributed.check_launcher(launcher, "Ascend")
    assert caplog.text == ""


_ORDER_PROBE = """
import json, sys
import mindspore as ms
import mindspore.communication as comm

events = []


class Stop(BaseException):
    pass


def fake_init(backend_name=None):
    events.append("init")


def first(kind):
    def record(self, *args, **kwargs):
        events.append(kind)
        raise Stop
    return record


comm.init, comm.get_rank, comm.get_group_size = fake_init, lambda group=None: 0, lambda group=None: 1
ms.Tensor.__init__, ms.Parameter.__init__ = first("Tensor"), first("Parameter")
try:
    if sys.argv[1] == "train.py":
        from mindcv_poolformer.train.cli import main
    else:
        from mindcv_poolformer.evaluation.validate import main
    main(sys.argv[2:])
except Stop:
    pass
print(json.dumps(events))
"""


@pytest.mark.parametrize("script", ["train.py", "validate.py"])
def test_init_comes_before_the_first_tensor_or_parameter(tmp_path, script):
    """MindSpore on Ascend wants init() before any Tensor/Parameter; --ckpt_path is read after it, still before
    the trainer touches the run directory."""
    import mindspore as ms

    data = make_tiny_folder(tmp_path / "data", per_class_train=1, per_class_val=1)
    ckpt = tmp_path / "w.safetensors"
    ms.save_checkpoint([{"name": "w", "data": ms.Tensor(np.ones(2, np.float32))}], str(ckpt), format="safetensors")
    run = tmp_path / "run"
    argv = [script, "--data_dir", str(data), "--ckpt_path", str(ckpt), "--distribute", "True", "--image_resize", "32",
            "--num_parallel_workers", "1", "--device_target", "CPU"]
    if script == "train.py":
        argv += ["--ckpt_save_dir", str(run), "--batch_size", "2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "PMIX_", "RANK_"))}
    env.update(PYTHONPATH=str(REPO), GLOG_v="3", MS_ROLE="MS_WORKER")  # an msrun worker whose init() is faked
    done = subprocess.run([sys.executable, "-c", _ORDER_PROBE, *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    events = json.loads(done.stdout.strip().splitlines()[-1])
    assert events[0] == "init" and len(events) == 2, events
    assert not run.exists()


# ---------------------------------------------------------------- a short run of every script


@pytest.mark.slow
def test_every_script_names_the_device_first_and_uses_set_device(tmp_path, deploy_assets, monkeypatch,  # noqa: F811
                                                                   capsys, no_launcher):
    """train.py (its own process, MindSpore's warnings on), then validate/export/predict in this process."""
    expected = _runtime.describe_device("auto", _runtime.resolve_device_target("auto"))
    data = make_tiny_folder(tmp_path / "digits", per_class_train=1, per_class_val=1)
    done = run_python(["train.py", "--data_dir", str(data), "--ckpt_save_dir", str(tmp_path / "run"),
                       "--image_resize", "32", "--crop_pct", "1.0", "--batch_size", "5", "--num_parallel_workers", "1",
                       "--epoch_size", "1", "--warmup_epochs", "0", "--mode", "1", "--val_while_train", "False"],
                      env={"GLOG_v": "2"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.splitlines()[0].endswith(f" INFO {expected}"), done.stdout[:500]
    assert not any(text in done.stderr for text in DEPRECATED_DEVICE), done.stderr[-3000:]

    import mindspore.log

    warned: list[str] = []
    real_warning = mindspore.log.warning
    monkeypatch.setattr(mindspore.log, "warning", lambda msg, *a, **k: (warned.append(str(msg)),
                                                                         real_warning(msg, *a, **k))[1])
    ckpt, size = str(deploy_assets["ckpt"]), str(IMAGE_SIZE)
    image = str(next((deploy_assets["data"] / "val" / "cat").iterdir()))
    runs = ((validate_main, ["--data_dir", str(deploy_assets["data"]), "--ckpt_path", ckpt, "--image_resize", size,
                             "--batch_size", "4", "--num_parallel_workers", "1", "--mode", "1"]),
            (export_main, ["--ckpt_path", ckpt, "--image_resize", size, "--file_name", str(tmp_path / "s12")]),
            (predict_main, [image, "--ckpt_path", ckpt, "--image_resize", size, "--mode", "1"]))
    for main, argv in runs:
        assert main(argv) == 0
        assert capsys.readouterr().out.splitlines()[0] == expected
    assert not [w for w in warned if any(text in w for text in DEPRECATED_DEVICE)], warned
