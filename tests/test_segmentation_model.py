"""Semantic FPN segmentation models against mmsegmentation 1.2.2 itself.

mmseg's EncoderDecoder (mmpretrain PoolFormer + FPN + FPNHead) is built from its own ADE20K configs
with every parameter and buffer randomised (``mmseg_reference``), saved as an mmseg checkpoint, read
by our converter, and the logits compared in eval mode, both the stride-4 output of the head and the
input-size logits that mmseg's ``encode_decode`` returns. Also here: parameter and MAC counts against
mmseg's model, the frozen stem, classification checkpoints as backbone init, and the one-line errors.
"""

from __future__ import annotations

import os
import re

import mindspore as ms
import numpy as np
import pytest
from mmseg_reference import mmseg_logits, mmseg_model

from mindcv_poolformer import (
    CheckpointError,
    convert_checkpoint,
    count_macs,
    count_params,
    create_model,
    list_models,
    load_checkpoint_into,
    model_info,
)
from mindcv_poolformer import models as zoo
from mindcv_poolformer.checkpoint import check_checkpoint, read_state_dict, save_state_dict, to_canonical
from mindcv_poolformer.models.fpn import SEGMENTATION_VARIANTS, Resize
from mindcv_poolformer.train.optim import param_groups

from conftest import require
from helpers import hf_poolformer, hf_to_official, official_to_timm

TOL = 1e-4  # max |logit diff| relative to the largest reference logit
FROZEN_STEM = 64 * 3 * 7 * 7 + 64  # the frozen 7x7 stem (patch_embed.proj) of an S model: 9,472


@pytest.fixture(autouse=True)
def _pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(scope="module")
def mmseg_s12():
    return mmseg_model("s12")


def _arch(name: str) -> str:
    return name.rsplit("_", 1)[1]


def _save_mmseg(model, path, **extra) -> str:
    """An mmseg-style checkpoint: ``meta`` + ``state_dict`` (+ whatever else a training run adds)."""
    torch = require("torch")
    torch.save({"meta": {"iter": 40000, "mmseg_version": "1.2.2"}, "state_dict": model.state_dict(), **extra}, path)
    return str(path)


def _state(net) -> dict[str, np.ndarray]:
    return {name: param.asnumpy() for name, param in net.parameters_and_names()}


def _relative_diff(net, model, x: np.ndarray) -> float:
    """max |ours - mmseg| over the stride-4 and the input-size logits, over the largest mmseg logit."""
    coarse, full = mmseg_logits(model, x)
    scale = float(np.abs(full).max())
    assert 1.0 < scale < 100.0, f"logit scale {scale}: a test input should give O(1..10) logits"
    inputs = ms.Tensor(x)
    diff = max(float(np.abs(net(inputs).asnumpy() - coarse).max()),
               float(np.abs(net.predict_logits(inputs).asnumpy() - full).max()))
    return diff / scale


@pytest.mark.parametrize("name", list(SEGMENTATION_VARIANTS))
def test_parity_with_mmseg_every_variant(name, tmp_path, request):
    model = request.getfixturevalue("mmseg_s12") if name == "fpn_poolformer_s12" else mmseg_model(_arch(name))
    net = create_model(name, num_classes=150, checkpoint_path=_save_mmseg(model, tmp_path / "mmseg.pth"))
    net.set_train(False)
    x = np.random.RandomState(1).randn(2, 3, 64, 96).astype(np.float32)
    diff = _relative_diff(net, model, x)
    print(f"{name} 64x96: max |logit diff| / logit scale = {diff:.2e}")
    assert diff <= TOL
    torch_params = sum(p.numel() for p in model.parameters())
    torch_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count_params(net, buffers=False) == torch_params == model_info(name).params
    stem = net.backbone.widths[0] * (3 * 7 * 7 + 1)
    assert count_params(net, trainable_only=True) == torch_trainable == torch_params - stem
    bn_channels = sum(int(p.shape[0]) for k, p in net.parameters_and_names() if k.endswith(".bn.gamma"))
    assert count_params(net) == torch_params + 2 * bn_channels  # MindSpore's BN statistics are Parameters


def test_s12_converted_parity_graph_mode_and_odd_sizes(mmseg_s12, tmp_path):
    # sizes not divisible by 32: the nearest top-down resizes are not x2 and the head's upsampled
    # maps are resized back to the stride-4 map, so a wrong resize rule shows here
    result = convert_checkpoint(_save_mmseg(mmseg_s12, tmp_path / "fpn_s12.pth"), str(tmp_path / "ours.safetensors"))
    assert (result.arch, result.layout, result.num_classes) == ("fpn_poolformer_s12", "mmseg", 150)
    net = create_model("fpn_poolformer_s12", num_classes=150, checkpoint_path=result.dst)
    net.set_train(False)
    for shape in [(1, 3, 70, 98), (2, 3, 100, 36)]:
        x = np.random.RandomState(2).randn(*shape).astype(np.float32)
        diff = _relative_diff(net, mmseg_s12, x)
        print(f"fpn_poolformer_s12 {shape[2]}x{shape[3]} PyNative: {diff:.2e}")
        assert diff <= TOL
    ms.set_context(mode=ms.GRAPH_MODE)
    x = np.random.RandomState(3).randn(2, 3, 64, 96).astype(np.float32)
    diff = _relative_diff(net, mmseg_s12, x)
    print(f"fpn_poolformer_s12 64x96 GRAPH: {diff:.2e}")
    assert diff <= TOL


def test_s12_parity_at_512(mmseg_s12, tmp_path):
    src = _save_mmseg(mmseg_s12, tmp_path / "s12.pth")
    net = create_model("fpn_poolformer_s12", num_classes=150, checkpoint_path=src)
    net.set_train(False)
    x = np.random.RandomState(4).randn(1, 3, 512, 512).astype(np.float32)
    diff = _relative_diff(net, mmseg_s12, x)
    print(f"fpn_poolformer_s12 512x512: {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_resize_is_pytorch_interpolate(mode):
    torch = require("torch")
    rng = np.random.RandomState(0)
    resize = Resize(mode)
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    for (h, w), size in [((2, 3), (4, 6)), ((4, 7), (7, 13)), ((13, 25), (26, 50)), ((26, 50), (25, 49)),
                         ((7, 13), (25, 49)), ((5, 3), (11, 7)), ((8, 8), (8, 8))]:
        x = rng.randn(2, 3, h, w).astype(np.float32)
        ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode=mode, **kwargs).numpy()
        ours = resize(ms.Tensor(x), size).asnumpy()
        tol = 0.0 if mode == "nearest" else 5e-6  # the same taps: only float rounding differs
        assert np.abs(ours - ref).max() <= tol, (mode, (h, w), size)
    doubled = Resize(mode, scale_factor=2)(ms.Tensor(rng.randn(1, 2, 5, 3).astype(np.float32)))
    assert doubled.shape == (1, 2, 10, 6)


def test_macs_equal_mmengine_flop_analyzer(mmseg_s12):
    torch = require("torch")
    require("mmengine")
    from mmengine.analysis import FlopAnalyzer

    class Logits(torch.nn.Module):
        def __init__(self, model) -> None:
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model.decode_head(self.model.extract_feat(x))

    net = zoo.create_model("fpn_poolformer_s12", num_classes=150)
    for size in [(64, 96), (70, 98)]:
        analyzer = FlopAnalyzer(Logits(mmseg_s12), torch.zeros(1, 3, *size))
        analyzer.unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        assert count_macs(net, size) == analyzer.total(), size
    macs = count_macs(net, 512)
    print(f"fpn_poolformer_s12 at 512x512: {macs / 1e9:.3f} GMACs")
    assert macs == model_info("fpn_poolformer_s12").macs


def test_registry_facts():
    assert list_models("fpn_") == sorted(SEGMENTATION_VARIANTS)
    anchors = {"s12": 36.68, "s24": 40.12, "s36": 41.61, "m36": 41.95, "m48": 42.43}
    for name in SEGMENTATION_VARIANTS:
        info = model_info(name)
        assert (info.task, info.miou, info.crop_size, info.top1) == ("segmentation", anchors[_arch(name)], 512, None)
    assert model_info("poolformer_s12").task == "classification"


def test_default_class_count_is_the_models_own():
    """Without num_classes a segmentation model has ADE20K's 150 classes and a classifier ImageNet's 1000."""
    from mindcv_poolformer import create_model

    assert create_model("fpn_poolformer_s12", depths=(1, 1, 1, 1)).decode_head.conv_seg.out_channels == 150
    assert create_model("poolformer_s12", depths=(1, 1, 1, 1)).head.out_channels == 1000


def test_initialisation_as_mmseg():
    # neck: Xavier-uniform (its init_cfg); scale heads: mmcv ConvModule's Kaiming-normal (fan_out, ReLU);
    # conv_seg: N(0, 0.01); biases 0; BN 1/0 with statistics 0/1. Compared as per-tensor spreads.
    reference = {k: v.numpy() for k, v in mmseg_model("s12", seed=None).state_dict().items()}
    ours = _state(zoo.create_model("fpn_poolformer_s12", num_classes=150))
    names = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
    for key, value in reference.items():
        if key.startswith("backbone.") or key.endswith("num_batches_tracked"):
            continue
        head, leaf = key.rsplit(".", 1)
        mine = ours[f"{head}.{names[leaf]}" if head.endswith(".bn") else key]
        if value.std() == 0:
            np.testing.assert_array_equal(mine, value, err_msg=key)
        else:
            assert abs(mine.mean()) < 0.05 * value.std() + 1e-4, key
            assert abs(mine.std() / value.std() - 1) < 0.05, (key, mine.std(), value.std())


def _canonical_names(names) -> set[str]:
    return set(to_canonical({name: np.zeros(1) for name in names}, "mmseg")[0])


@pytest.mark.parametrize("frozen_stages", [0, 2])
def test_frozen_stages_as_mmpretrain(frozen_stages, mmseg_s12):
    model = mmseg_s12 if frozen_stages == 0 else mmseg_model("s12", frozen_stages=frozen_stages)
    net = zoo.create_model("fpn_poolformer_s12", num_classes=150, frozen_stages=frozen_stages)
    frozen = {k for k, p in net.parameters_and_names() if not p.requires_grad and ".moving_" not in k}
    assert frozen == _canonical_names(k for k, p in model.named_parameters() if not p.requires_grad)
    trainable = {p.name for p in net.trainable_params()}
    assert not frozen & trainable
    grouped = {p.name for group in param_groups(net, 1e-4) for p in group["params"]}
    assert grouped == trainable  # no gradient and no weight decay for a frozen parameter
    if frozen_stages == 0:
        assert frozen == {"backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias"}
        assert count_params(net, buffers=False) - count_params(net, trainable_only=True) == FROZEN_STEM == 9_472


def test_frozen_stages_minus_one_trains_everything():
    net = zoo.create_model("fpn_poolformer_s12", num_classes=150, frozen_stages=-1)
    assert count_params(net, trainable_only=True) == count_params(net, buffers=False)
    net.freeze_stages(0)
    assert count_params(net, buffers=False) - count_params(net, trainable_only=True) == FROZEN_STEM


@pytest.fixture(scope="module")
def classification_states():
    """One randomised S12 classifier in every classification layout the converter reads."""
    hf = {k: v.numpy() for k, v in hf_poolformer("poolformer_s12").state_dict().items()}
    official = hf_to_official(hf)
    mindspore, _ = to_canonical(official)
    return {"hf": hf, "official": official, "timm": official_to_timm(official), "mindspore": mindspore}


@pytest.mark.parametrize("layout", ["hf", "official", "timm", "mindspore"])
def test_classification_checkpoint_initialises_the_backbone(layout, classification_states):
    net = zoo.create_model("fpn_poolformer_s12", num_classes=150)
    fresh = _state(net)
    report = load_checkpoint_into(net, classification_states[layout])
    assert report.layout == layout
    expected_fresh = {k for k in fresh if not k.startswith("backbone.") or re.match(r"backbone\.norm\d\.", k)}
    assert set(report.reinitialised) == expected_fresh
    assert {"backbone.norm0.gamma", "backbone.norm6.beta", "neck.fpn_convs.3.conv.weight",
            "decode_head.conv_seg.bias", "decode_head.scale_heads.3.4.bn.moving_variance"} <= expected_fresh
    assert {"norm.gamma", "norm.beta", "head.weight", "head.bias"} <= set(report.ignored)
    assert len(report.loaded) == len(classification_states["mindspore"]) - 4
    after = _state(net)
    source = classification_states["mindspore"]
    np.testing.assert_array_equal(after["backbone.network.4.3.mlp.fc1.weight"], source["network.4.3.mlp.fc1.weight"])
    np.testing.assert_array_equal(after["backbone.network.6.1.norm2.gamma"], source["network.6.1.norm2.gamma"])
    for key in expected_fresh:
        np.testing.assert_array_equal(after[key], fresh[key])
    assert "backbone.norm0.gamma" in report.summary()


def test_classification_file_through_create_model(classification_states, tmp_path):
    torch = require("torch")
    path = tmp_path / "poolformer_s12.pth.tar"
    torch.save({k: torch.from_numpy(v) for k, v in classification_states["official"].items()}, path)
    net = create_model("fpn_poolformer_s12", num_classes=150, checkpoint_path=str(path))
    np.testing.assert_array_equal(net.backbone.patch_embed.proj.weight.asnumpy(),
                                  classification_states["official"]["patch_embed.proj.weight"])


def _one_line_error(call, pattern: str) -> str:
    with pytest.raises(CheckpointError, match=pattern) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_task_and_size_misfits_are_one_line_errors(tmp_path):
    seg_s12 = _state(zoo.create_model("fpn_poolformer_s12", num_classes=150))
    seg_s24 = _state(zoo.create_model("fpn_poolformer_s24", num_classes=150))
    cls_s24 = _state(zoo.create_model("poolformer_s24"))
    fpn_s12 = zoo.create_model("fpn_poolformer_s12", num_classes=150)
    print(_one_line_error(lambda: load_checkpoint_into(zoo.create_model("poolformer_s12"), seg_s12),
                          r"holds a Semantic FPN fpn_poolformer_s12 \(backbone depths \(2, 2, 6, 2\).*"
                          r"a segmentation checkpoint that a classifier cannot load; use model fpn_poolformer_s12$"))
    _one_line_error(lambda: load_checkpoint_into(zoo.create_model("poolformer_s12", features_only=True), seg_s12),
                    r"use model fpn_poolformer_s12$")
    print(_one_line_error(lambda: load_checkpoint_into(fpn_s12, cls_s24),
                          r"holds a poolformer_s24 \(depths \(4, 4, 12, 4\).* but the model is a Semantic FPN "
                          r"fpn_poolformer_s12 \(backbone depths \(2, 2, 6, 2\).*; use model fpn_poolformer_s24$"))
    _one_line_error(lambda: load_checkpoint_into(fpn_s12, seg_s24),
                    r"holds a Semantic FPN fpn_poolformer_s24 .* but the model is a Semantic FPN fpn_poolformer_s12 "
                    r".*; use model fpn_poolformer_s24$")
    path = save_state_dict(seg_s12, tmp_path / "fpn_s12.safetensors")
    _one_line_error(lambda: check_checkpoint(path, "poolformer_s12"), r"pass --model fpn_poolformer_s12$")
    _one_line_error(lambda: check_checkpoint(path, "fpn_poolformer_s24"), r"pass --model fpn_poolformer_s12$")
    assert check_checkpoint(path, "fpn_poolformer_s12").task == "segmentation"
    _one_line_error(lambda: convert_checkpoint(path, str(tmp_path / "out.safetensors"), arch="fpn_poolformer_s24"),
                    r"holds a fpn_poolformer_s12 \(backbone depths .*\), not fpn_poolformer_s24$")


def test_mmseg_training_checkpoint_and_other_class_count(mmseg_s12, tmp_path):
    # a training run's file: mmengine's message hub (HistoryBuffer objects, numpy scalars) and the
    # optimizer beside state_dict; torch's weights-only unpickler refuses those classes
    torch = require("torch")
    require("mmengine")
    from mmengine.logging import MessageHub

    hub = MessageHub.get_instance("fpn_parity")
    hub.update_scalar("train/loss", 1.5)
    hub.update_scalar("train/lr", np.float64(2e-4))
    optimizer = torch.optim.AdamW(mmseg_s12.parameters(), lr=2e-4)
    path = _save_mmseg(mmseg_s12, tmp_path / "iter_40000.pth", message_hub=hub.state_dict(),
                       optimizer=optimizer.state_dict(), meta={"seed": np.int64(0), "iter": 40000})
    net = zoo.create_model("fpn_poolformer_s12", num_classes=19)
    fresh = _state(net)
    report = load_checkpoint_into(net, path)
    assert report.layout == "mmseg"
    assert report.reinitialised == ["decode_head.conv_seg.weight", "decode_head.conv_seg.bias"]
    assert len(report.loaded) == len(fresh) - 2  # num_batches_tracked is dropped, the rest all loads
    np.testing.assert_array_equal(_state(net)["decode_head.conv_seg.weight"], fresh["decode_head.conv_seg.weight"])
    moving = mmseg_s12.state_dict()["decode_head.scale_heads.3.2.bn.running_var"].numpy()
    np.testing.assert_array_equal(_state(net)["decode_head.scale_heads.3.2.bn.moving_variance"], moving)


_PWNED = "/tmp/mindcv_poolformer_fpn_pwned"


class _EvalExploit:
    def __reduce__(self):
        return (eval, (f"__import__('os').system('touch {_PWNED}')",))


class _SystemExploit:
    def __reduce__(self):
        return (os.system, (f"touch {_PWNED}",))


def test_refused_globals_are_inert_stand_ins(tmp_path):
    # the stand-ins that let mmengine's metadata through must not let a hostile callable run either:
    # builtins.eval becomes an inert object; os.system is a module torch blocks outright
    torch = require("torch")
    if os.path.exists(_PWNED):
        os.remove(_PWNED)
    path = tmp_path / "hostile.pth"
    torch.save({"meta": _EvalExploit(), "state_dict": {"decode_head.conv_seg.bias": torch.ones(3)}}, path)
    assert list(read_state_dict(path)) == ["decode_head.conv_seg.bias"]
    torch.save({"state_dict": _EvalExploit()}, path)
    with pytest.raises(CheckpointError, match="holds no tensors"):
        read_state_dict(path)
    torch.save({"meta": _SystemExploit(), "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not a loadable PyTorch weights file"):
        read_state_dict(path)
    assert not os.path.exists(_PWNED)


def test_sync_bn_flag_keeps_names_and_eval_output():
    small = {"depths": (1, 1, 1, 1), "num_classes": 5}
    plain = zoo.create_model("fpn_poolformer_s12", **small)
    synced = zoo.create_model("fpn_poolformer_s12", sync_bn=True, **small)
    norms = [cell for _, cell in synced.cells_and_names() if isinstance(cell, ms.nn.SyncBatchNorm)]
    assert len(norms) == 7 and not any(isinstance(c, ms.nn.SyncBatchNorm) for _, c in plain.cells_and_names())
    assert [k for k, _ in plain.parameters_and_names()] == [k for k, _ in synced.parameters_and_names()]
    load_checkpoint_into(synced, _state(plain))
    plain.set_train(False)
    synced.set_train(False)
    x = ms.Tensor(np.random.RandomState(0).randn(1, 3, 64, 64).astype(np.float32))
    np.testing.assert_array_equal(plain(x).asnumpy(), synced(x).asnumpy())


def test_every_backend_gives_the_model_as_written(mmseg_s12, tmp_path):
    src = _save_mmseg(mmseg_s12, tmp_path / "s12.pth")
    x = ms.Tensor(np.random.RandomState(5).randn(1, 3, 64, 64).astype(np.float32))
    outputs = []
    for backend in ("none", "cpu"):
        net = create_model("fpn_poolformer_s12", num_classes=150, checkpoint_path=src, backend=backend)
        net.set_train(False)
        outputs.append(net(x).asnumpy())
    assert np.abs(outputs[0] - outputs[1]).max() <= TOL * np.abs(outputs[0]).max()


@pytest.mark.slow  # one mmseg backward and one compiled MindSpore backward of FPN-S12: ~1 min
def test_training_gradients_equal_mmseg(tmp_path):
    """Train mode (BatchNorm on batch statistics), head dropout off, the stem trained: the loss and the gradient
    of every parameter, through the compiled graph and the device backend a training run uses, against
    mmseg's decode-head loss (``avg_non_ignore=False``) backpropagated in torch. Logit parity alone would
    not see a wrong backward (a kernel's, a resize's, the loss's)."""
    torch = require("torch")
    import torch.nn.functional as F

    from mindcv_poolformer.train.loss import SegmentationCrossEntropy
    from mindcv_poolformer.train.step import WithLoss

    model = mmseg_model("s12", seed=0, frozen_stages=-1).train()
    model.decode_head.dropout = None
    rng = np.random.RandomState(0)
    x = rng.randn(2, 3, 64, 64).astype(np.float32)
    label = rng.randint(0, 150, size=(2, 64, 64)).astype(np.int64)
    label[:, :8] = 255
    path = _save_mmseg(model, tmp_path / "mmseg.pth")
    logits = model.decode_head(model.extract_feat(torch.from_numpy(x)))
    up = F.interpolate(logits, size=label.shape[1:], mode="bilinear", align_corners=False)
    ref_loss = F.cross_entropy(up, torch.from_numpy(label), ignore_index=255, reduction="none").mean()
    ref_loss.backward()
    named = dict(model.named_parameters())
    grads = {k: named[k].grad.numpy() if k in named else v.numpy() for k, v in model.state_dict().items()}
    ref, _ = to_canonical(grads, "mmseg")

    ms.set_context(mode=ms.GRAPH_MODE)
    net = create_model("fpn_poolformer_s12", num_classes=150, checkpoint_path=path, frozen_stages=-1, dropout=0.0)
    net.set_train(True)
    with_loss = WithLoss(net, SegmentationCrossEntropy(255))
    params = ms.ParameterTuple(net.trainable_params())
    assert len(params) == len(named)
    inputs, targets = ms.Tensor(x), ms.Tensor(label.astype(np.int32))
    loss = float(with_loss(inputs, targets).asnumpy())
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    ours = ms.ops.GradOperation(get_by_list=True)(with_loss, params)(inputs, targets)
    worst, name = 0.0, ""
    for p, g in zip(params, ours):
        scale = float(np.abs(ref[p.name]).max())
        if scale < 1e-6:  # exactly zero analytically (norm1's shift: pool(x) - x cancels it), rounding in both
            assert float(np.abs(g.asnumpy()).max()) < 1e-6, p.name
            continue
        diff = float(np.abs(g.asnumpy() - ref[p.name]).max()) / scale
        worst, name = max((worst, name), (diff, p.name))
    print(f"loss {loss:.6f} vs mmseg {ref_loss.item():.6f}; worst gradient |diff| / max|g|: {worst:.2e} ({name})")
    assert worst <= 1e-4, f"{name}: gradient differs from mmseg's by {worst:.2e} of its scale"
