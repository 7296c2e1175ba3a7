"""Logit parity with the reference PoolFormer (HF transformers, bit-identical to sail-sg's code).

Every parameter of the reference is randomised (layer scales ~ N(1, 0.5)), converted through our
converter from each checkpoint layout and file type, and the logits compared on random input.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from mindcv_poolformer import convert_checkpoint, create_model
from mindcv_poolformer.models.metaformer import POOLFORMER_VARIANTS

from conftest import require
from helpers import hf_logits, hf_poolformer, hf_to_official, official_to_timm

TOL = 1e-4


def _ours_logits(path, name: str, x: np.ndarray, num_classes: int = 1000) -> np.ndarray:
    net = create_model(name, num_classes=num_classes, checkpoint_path=str(path))
    net.set_train(False)
    return net(ms.Tensor(x)).asnumpy()


@pytest.fixture(autouse=True)
def _pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.mark.parametrize("name", list(POOLFORMER_VARIANTS))
def test_hf_safetensors_parity_every_variant(name, tmp_path):
    torch_st = require("safetensors.torch")
    hf = hf_poolformer(name)
    src = tmp_path / "hf.safetensors"
    torch_st.save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(src))
    result = convert_checkpoint(str(src), str(tmp_path / "ours.ckpt"))
    assert (result.arch, result.layout, result.num_classes) == (name, "hf", 1000)
    x = np.random.RandomState(1).randn(2, 3, 64, 96).astype(np.float32)
    ref = hf_logits(hf, x)
    diff = float(np.abs(_ours_logits(result.dst, name, x) - ref).max())
    print(f"{name}: max |logit diff| = {diff:.2e} (logit scale {np.abs(ref).max():.2f})")
    assert diff <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
def test_s12_parity_at_224(mode, tmp_path):
    torch = require("torch")
    hf = hf_poolformer("poolformer_s12", seed=3)
    src = tmp_path / "hf.pth"
    torch.save(hf.state_dict(), src)
    dst = convert_checkpoint(str(src), str(tmp_path / "s12.safetensors")).dst
    x = np.random.RandomState(2).randn(2, 3, 224, 224).astype(np.float32)
    ms.set_context(mode=mode)
    diff = float(np.abs(_ours_logits(dst, "poolformer_s12", x) - hf_logits(hf, x)).max())
    print(f"poolformer_s12 224x224 mode {mode}: max |logit diff| = {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_official_pth_tar_parity(wrapper, tmp_path):
    torch = require("torch")
    hf = hf_poolformer("poolformer_s12", seed=4)
    official = hf_to_official(hf.state_dict())
    assert len(official) == 132 and "network.0.0.norm1.weight" in official
    src = tmp_path / "poolformer_s12.pth.tar"
    torch.save(official if wrapper is None else {wrapper: official, "epoch": 300}, src)
    result = convert_checkpoint(str(src), str(tmp_path / "s12.safetensors"), arch="poolformer_s12")
    assert result.layout == "official"
    x = np.random.RandomState(5).randn(1, 3, 64, 64).astype(np.float32)
    assert np.abs(_ours_logits(result.dst, "poolformer_s12", x) - hf_logits(hf, x)).max() <= TOL


@pytest.mark.parametrize("linear_mlp", [False, True])
def test_timm_keys_parity(linear_mlp, tmp_path):
    torch = require("torch")
    torch_st = require("safetensors.torch")
    hf = hf_poolformer("poolformer_s24", num_classes=7, seed=6)
    timm_state = official_to_timm(hf_to_official(hf.state_dict()), linear_mlp=linear_mlp)
    assert "stages.2.blocks.11.layer_scale1.scale" in timm_state and "head.fc.weight" in timm_state
    if linear_mlp:
        src = tmp_path / "timm.safetensors"
        torch_st.save_file({k: v.contiguous() for k, v in timm_state.items()}, str(src))
    else:
        src = tmp_path / "timm.pth"
        torch.save(timm_state, src)
    result = convert_checkpoint(str(src), str(tmp_path / "s24.ckpt"))
    assert (result.arch, result.layout, result.num_classes) == ("poolformer_s24", "timm", 7)
    x = np.random.RandomState(7).randn(2, 3, 64, 64).astype(np.float32)
    ours = _ours_logits(result.dst, "poolformer_s24", x, num_classes=7)
    assert np.abs(ours - hf_logits(hf, x)).max() <= TOL


def test_half_precision_safetensors_are_read_as_float32(tmp_path):
    torch = require("torch")
    torch_st = require("safetensors.torch")
    hf = hf_poolformer("poolformer_s12", seed=8)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in hf.state_dict().items()}
    src = tmp_path / "bf16.safetensors"
    torch_st.save_file(state, str(src))
    dst = convert_checkpoint(str(src), str(tmp_path / "s12.ckpt")).dst
    net = create_model("poolformer_s12", checkpoint_path=dst)
    expected = state["poolformer.encoder.block.2.3.layer_scale_1"].float().numpy()
    np.testing.assert_array_equal(net.parameters_dict()["network.4.3.layer_scale_1"].asnumpy(), expected)
