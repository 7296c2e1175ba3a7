"""Checkpoint loading, fine-tune head re-initialisation, clear errors, converter CLI and safety."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest

from mindcv_poolformer import CheckpointError, convert_checkpoint, create_model, load_checkpoint_into
from mindcv_poolformer.checkpoint import read_state_dict, save_state_dict

from conftest import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(scope="module")
def s12_ckpt(tmp_path_factory) -> str:
    """A 1000-class S12 checkpoint with non-default values everywhere."""
    net = create_model("poolformer_s12")
    rs = np.random.RandomState(0)
    for p in net.get_parameters():
        p.set_data(ms.Tensor(rs.randn(*p.shape).astype(np.float32) * 0.05 + (1 if "scale" in p.name else 0)))
    path = str(tmp_path_factory.mktemp("ckpt") / "s12.ckpt")
    ms.save_checkpoint(net, path)
    return path


def test_finetune_load_keeps_every_backbone_tensor_bit_equal(s12_ckpt):
    source = read_state_dict(s12_ckpt)
    net = create_model("poolformer_s12", num_classes=10)
    fresh_head = net.parameters_dict()["head.weight"].asnumpy().copy()
    report = load_checkpoint_into(net, s12_ckpt)
    assert report.reinitialised == ["head.weight", "head.bias"]
    assert len(report.loaded) == 130
    params = net.parameters_dict()
    for name in report.loaded:
        np.testing.assert_array_equal(params[name].asnumpy(), source[name])
    assert params["head.weight"].shape == (10, 512)
    np.testing.assert_array_equal(params["head.weight"].asnumpy(), fresh_head)
    assert "re-initialised" in report.summary() and "head.weight" in report.summary()


def test_create_model_with_checkpoint_path_and_same_classes_loads_everything(s12_ckpt):
    net = create_model("poolformer_s12", checkpoint_path=s12_ckpt)
    np.testing.assert_array_equal(net.parameters_dict()["head.bias"].asnumpy(), read_state_dict(s12_ckpt)["head.bias"])


def test_another_poolformer_is_named_and_other_misfits_name_the_keys(s12_ckpt):
    for model in ("poolformer_m36", "poolformer_s24"):  # shapes differ / blocks missing
        with pytest.raises(CheckpointError, match=rf"s12\.ckpt holds a poolformer_s12 \(depths \(2, 2, 6, 2\), "
                                                  rf"widths \(64, 128, 320, 512\)\) but the model is a {model} "
                                                  rf".*use model poolformer_s12$"):
            create_model(model, checkpoint_path=s12_ckpt)
    state = read_state_dict(s12_ckpt)
    state["network.2.0.mlp.fc1.weight"] = np.zeros((8, 128, 1, 1), np.float32)
    with pytest.raises(CheckpointError, match=r"shapes do not match.*network\.2\.0\.mlp\.fc1\.weight: "
                                              r"checkpoint \(8, 128, 1, 1\)"):
        load_checkpoint_into(create_model("poolformer_s12"), state)


def test_missing_and_unexpected_keys_are_errors(s12_ckpt):
    state = read_state_dict(s12_ckpt)
    del state["network.4.5.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"missing from checkpoint: network\.4\.5\.mlp\.fc2\.bias"):
        load_checkpoint_into(create_model("poolformer_s12"), state)
    state = read_state_dict(s12_ckpt)
    state["network.0.9.norm1.gamma"] = state["network.0.0.norm1.gamma"]
    with pytest.raises(CheckpointError, match=r"not in model: network\.0\.9\.norm1\.gamma"):
        load_checkpoint_into(create_model("poolformer_s12"), state)


def test_training_checkpoint_entries_are_ignored(tmp_path, s12_ckpt):
    state = read_state_dict(s12_ckpt)
    state.update({"adam_m.head.weight": np.zeros((1000, 512), np.float32),
                  "global_step": np.array([7], np.int32), "learning_rate": np.array(1e-3, np.float32)})
    path = save_state_dict(state, tmp_path / "train.ckpt")
    report = load_checkpoint_into(create_model("poolformer_s12"), path)
    assert len(report.loaded) == 132 and set(report.ignored) == {"adam_m.head.weight", "global_step", "learning_rate"}


def test_unreadable_files_are_one_line_errors(tmp_path, s12_ckpt):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_state_dict(tmp_path / "nope.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(open(s12_ckpt, "rb").read()[:5000])
    with pytest.raises(CheckpointError, match="not a readable ckpt checkpoint") as info:
        read_state_dict(truncated)
    assert "\n" not in str(info.value)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        read_state_dict(junk)
    with pytest.raises(CheckpointError, match="unknown checkpoint type '.npz'"):
        read_state_dict(tmp_path.joinpath("w.npz").write_bytes(b"x") and tmp_path / "w.npz")


def test_pth_without_torch_says_torch_is_needed(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    path.write_bytes(b"\x80\x02}q\x00.")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointError, match="needs torch, which is not installed"):
        read_state_dict(path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mindcv_poolformer_pwned",))


def test_pth_loading_never_unpickles_code(tmp_path):
    require("torch")
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": _Exploit()}, fh)
    if os.path.exists("/tmp/mindcv_poolformer_pwned"):
        os.remove("/tmp/mindcv_poolformer_pwned")
    with pytest.raises(CheckpointError, match="not a loadable PyTorch weights file"):
        read_state_dict(path)
    assert not os.path.exists("/tmp/mindcv_poolformer_pwned")


def test_pretrained_without_local_weights_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("MINDCV_POOLFORMER_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match=rf"no pretrained weights for poolformer_s12 in {tmp_path}.*"
                                              r"sail-sg/poolformer/releases.*poolformer_s12\.pth\.tar"):
        create_model("poolformer_s12", pretrained=True)


def test_pretrained_finds_weights_in_the_cache_and_in_a_given_directory(tmp_path, monkeypatch, s12_ckpt):
    monkeypatch.setenv("MINDCV_POOLFORMER_HOME", str(tmp_path))
    os.symlink(s12_ckpt, tmp_path / "poolformer_s12-5be5c4e4.ckpt")  # MindCV's released file name
    expected = read_state_dict(s12_ckpt)["network.6.1.layer_scale_2"]
    net = create_model("poolformer_s12", pretrained=True, num_classes=3)
    np.testing.assert_array_equal(net.parameters_dict()["network.6.1.layer_scale_2"].asnumpy(), expected)
    other = tmp_path / "elsewhere"
    other.mkdir()
    save_state_dict(read_state_dict(s12_ckpt), other / "poolformer_s12.safetensors")
    net = create_model("poolformer_s12", pretrained=str(other))
    np.testing.assert_array_equal(net.parameters_dict()["network.6.1.layer_scale_2"].asnumpy(), expected)


def test_converter_refuses_to_overwrite_and_checks_arch(tmp_path, s12_ckpt):
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="already exists"):
        convert_checkpoint(s12_ckpt, str(dst))
    assert dst.read_bytes() == b"precious"
    with pytest.raises(CheckpointError, match="holds a poolformer_s12 .* not poolformer_s24"):
        convert_checkpoint(s12_ckpt, str(tmp_path / "x.ckpt"), arch="poolformer_s24")
    result = convert_checkpoint(s12_ckpt, str(dst), overwrite=True)
    assert result.arch == "poolformer_s12" and read_state_dict(dst).keys() == read_state_dict(s12_ckpt).keys()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, GLOG_v="3")
    return subprocess.run([sys.executable, "-m", "mindcv_poolformer.convert", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_convert_cli(tmp_path, s12_ckpt):
    torch = require("torch")
    official = {k.replace("gamma", "weight").replace("beta", "bias"): torch.from_numpy(v)
                for k, v in read_state_dict(s12_ckpt).items()}
    src = tmp_path / "poolformer_s12.pth.tar"
    torch.save({"state_dict": official}, src)
    ok = _cli(str(src), str(tmp_path / "s12.safetensors"), "--arch", "poolformer_s12")
    assert ok.returncode == 0, ok.stderr
    assert "wrote" in ok.stdout and "poolformer_s12, 1000 classes, 132 tensors (from official layout)" in ok.stdout
    again = _cli(str(src), str(tmp_path / "s12.safetensors"))
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0 and "already exists" in again.stderr
    bad = _cli(str(tmp_path / "missing.pth"), str(tmp_path / "o.ckpt"))
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"convert: error: checkpoint not found: {tmp_path / 'missing.pth'}"


def test_ckpt_loads_when_only_the_page_cache_is_free(tmp_path, monkeypatch):
    """MindSpore's .ckpt memory guard counts free pages only; ours counts MemAvailable (free + reclaimable cache)."""
    import mindspore as ms
    from mindspore.train import serialization

    from mindcv_poolformer.checkpoint import load_ms_checkpoint, read_state_dict

    path = str(tmp_path / "w.ckpt")
    ms.save_checkpoint([{"name": "w", "data": ms.Tensor(np.arange(4096, dtype=np.float32))}], path)
    real_sysconf = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 1 if name == "SC_AVPHYS_PAGES" else real_sysconf(name))
    assert serialization._get_available_memory() == os.sysconf("SC_PAGE_SIZE")  # one free page, as MindSpore sees it
    with pytest.raises(Exception, match="exceeds current available memory"):
        ms.load_checkpoint(path)
    np.testing.assert_array_equal(load_ms_checkpoint(path)["w"].asnumpy(), np.arange(4096, dtype=np.float32))
    np.testing.assert_array_equal(read_state_dict(path)["w"], np.arange(4096, dtype=np.float32))
    assert serialization._get_available_memory() == os.sysconf("SC_PAGE_SIZE")  # MindSpore's own guard restored
