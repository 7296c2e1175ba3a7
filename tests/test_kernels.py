"""The fused CPU kernels of the PoolFormer block: same outputs and gradients as MindSpore's ops, and fallbacks."""

from __future__ import annotations

import logging
import os
import warnings

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from mindcv_poolformer import create_model, kernels, models
from mindcv_poolformer.backends import applied_backend
from mindcv_poolformer.backends import cpu as cpu_backend
from mindcv_poolformer.models import MetaFormer
from mindcv_poolformer.models.layers import DropPathKey

from conftest import in_ci, require_kernel_library
from deploy_helpers import IMAGE_SIZE, MODEL, deploy_assets  # noqa: F401  (fixture)

CONFIGS = {
    "default": {},
    "pool5-no-layer-scale": {"pool_size": 5, "layer_scale_init": None},
    "pool7": {"pool_size": 7},  # windows wider than the 2x2 last-stage map
    "drop-path": {"drop_path_rate": 0.5},
    # the 1x1 convs on oneDNN (a CPU without AVX-512): separate GELU and residual kernels around them
    "gemm-off": {"gemm": False},
    # no kernel library (no compiler, switched off): the same folds on MindSpore's ops
    "ops-folds": {"library": False},
    "ops-folds-drop-path": {"library": False, "drop_path_rate": 0.5},
}


@pytest.fixture(scope="module")
def library():
    return require_kernel_library()


def _avx512f() -> bool:
    try:
        return any(line.startswith("flags") and " avx512f" in line for line in open("/proc/cpuinfo"))
    except OSError:
        return False


@pytest.fixture(scope="module")
def gemm_kernels(library):
    """The kernels with the AVX-512 GEMM (the library's 1x1 convs and fused MLP).

    Where they cannot run, the GEMM tests skip and say why in one warning line, which pytest's summary
    shows even without ``-rs`` (module scope: once, not once per test). A CPU without AVX-512 is not a
    fault of the checkout, so CI does not fail on it (many CI runners are AMD EPYC Zen 2/3, without
    AVX-512): those machines run the oneDNN path, which ``test_kernels_match_mindspore_ops[gemm-off]``
    covers everywhere. A library built without the GEMM on a CPU that has AVX-512 is a build fault: CI fails.
    """
    fast = kernels.cpu_kernels()
    if fast.conv1x1 is None:
        if os.environ.get("MINDCV_POOLFORMER_CPU_GEMM", "1").strip().lower() in ("0", "false", "off", "no"):
            why = "MINDCV_POOLFORMER_CPU_GEMM switches the GEMM off"
        elif not _avx512f():
            why = "this CPU has no AVX-512 (no avx512f in /proc/cpuinfo)"
        else:
            message = "the kernel library was built without the AVX-512 GEMM on a CPU with avx512f (check $CXX)"
            if in_ci():
                pytest.fail(message, pytrace=False)
            why = message
        message = f"AVX-512 GEMM tests skipped: {why}; the 1x1 convs run on oneDNN"
        warnings.warn(message, stacklevel=1)
        pytest.skip(message)
    return fast


def _fused_blocks(net) -> int:
    return sum(isinstance(cell, cpu_backend.FusedPoolFormerBlock) for _, cell in net.cells_and_names())


def _pair(gemm: bool = True, library: bool = True, **overrides):
    """Two equal tiny MetaFormers (perturbed from their init): one in the CPU backend, one as the model is written.

    ``library=False`` applies the backend without its kernel library: the folded MindSpore-ops blocks.
    """
    settings = {"layer_scale_init": 0.5, **overrides}
    fast = MetaFormer((1, 2, 1, 1), (8, 16, 24, 32), num_classes=5, **settings)
    slow = MetaFormer((1, 2, 1, 1), (8, 16, 24, 32), num_classes=5, **settings)
    fast_kernels = kernels.cpu_kernels() if library else None
    if not gemm:
        os.environ["MINDCV_POOLFORMER_CPU_GEMM"] = "0"
        try:
            fast_kernels = kernels.CpuKernels(kernels.library_path())
        finally:
            del os.environ["MINDCV_POOLFORMER_CPU_GEMM"]
    assert cpu_backend.apply(fast, fast_kernels) == (5 if library else 0)
    folded = [cell for _, cell in fast.cells_and_names() if isinstance(cell, cpu_backend.FoldedPoolFormerBlock)]
    assert len(folded) == 5
    blocks = [cell for _, cell in fast.cells_and_names() if isinstance(cell, cpu_backend.FusedPoolFormerBlock)]
    assert all(block.fuse_mlp == (gemm and fast_kernels.conv1x1 is not None) for block in blocks)
    assert applied_backend(slow) == "none"
    rng = np.random.default_rng(1)
    for a, b in zip(fast.get_parameters(), slow.get_parameters()):
        value = (a.asnumpy() + rng.normal(0, 0.3, a.shape)).astype(np.float32)
        a.set_data(Tensor(value))
        b.set_data(Tensor(value))
    return fast, slow


@pytest.mark.parametrize(("config", "mode"), [(name, "GRAPH") for name in CONFIGS] + [("default", "PYNATIVE")])
def test_kernels_match_mindspore_ops(library, config, mode):
    ms.set_context(mode=getattr(ms, f"{mode}_MODE"))
    fast, slow = _pair(**CONFIGS[config])
    rng = np.random.default_rng(2)
    x = Tensor(rng.normal(0, 1, (3, 3, 64, 48)).astype(np.float32))  # stage maps 16x12 .. 2x2 (odd-free borders)
    fast.set_train(False)
    slow.set_train(False)
    np.testing.assert_allclose(fast(x).asnumpy(), slow(x).asnumpy(), rtol=0, atol=2e-6)

    fast.set_train(True)
    slow.set_train(True)
    for net in (fast, slow):
        DropPathKey(net, seed=7).set_counter(1)
    target = Tensor(rng.normal(0, 1, (3, 5)).astype(np.float32))

    def grads(net):
        def loss_fn(inputs):
            return ((net(inputs) - target) ** 2).sum()

        loss, (dx, dparams) = ms.value_and_grad(loss_fn, 0, net.trainable_params())(x)
        return float(loss), dx.asnumpy(), [g.asnumpy() for g in dparams]

    loss_f, dx_f, dp_f = grads(fast)
    loss_s, dx_s, dp_s = grads(slow)
    assert loss_f == pytest.approx(loss_s, rel=1e-6)
    np.testing.assert_allclose(dx_f, dx_s, rtol=0, atol=1e-6 * np.abs(dx_s).max())
    # norm1's beta cancels in pool(n + beta) - (n + beta): the kernels give it exactly 0, the model's ops
    # a rounding residue, so the floor of every tolerance is relative to the largest gradient
    floor = 1e-7 * max(np.abs(g).max() for g in dp_s)
    for (name, _), gf, gs in zip(fast.parameters_and_names(), dp_f, dp_s):
        np.testing.assert_allclose(gf, gs, rtol=0, atol=max(1e-5 * np.abs(gs).max(), floor), err_msg=name)


def test_models_use_kernels_by_default_and_only_where_they_apply(library, monkeypatch):
    net = create_model("poolformer_s12", num_classes=3)
    assert _fused_blocks(net) == 12
    assert _fused_blocks(models.create_model("poolformer_s12", num_classes=3)) == 0  # the model itself is neutral
    # channel LayerNorm, ReLU or no residual: not the block the kernels implement
    for name in ("metaformer_s12_ln", "metaformer_s12_relu", "metaformer_s12_no_residual"):
        assert cpu_backend.apply(models.create_model(name, num_classes=3), kernels.cpu_kernels()) == 0, name
    cpu_backend.remove(net)
    assert _fused_blocks(net) == 0 and applied_backend(net) == "none"
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert not kernels.kernels_enabled()
    off = create_model("poolformer_s12", num_classes=3)
    assert _fused_blocks(off) == 0
    assert sum(isinstance(c, cpu_backend.FoldedPoolFormerBlock) for _, c in off.cells_and_names()) == 12


def test_float16_inputs_use_mindspore_ops(library):
    """AMP O2/O3 hands the blocks float16: the float32-only kernels step aside."""
    from mindspore import amp

    fast, slow = _pair()
    assert cpu_backend.apply(slow, None) == 0  # the CPU backend's op forms without its kernels
    x = Tensor(np.random.default_rng(3).normal(0, 1, (2, 3, 64, 64)).astype(np.float32))
    fast_half = amp.auto_mixed_precision(fast, "O3")
    slow_half = amp.auto_mixed_precision(slow, "O3")
    out_fast, out_slow = fast_half(x).asnumpy(), slow_half(x).asnumpy()
    np.testing.assert_array_equal(out_fast, out_slow)


def test_kernels_refuse_float16_instead_of_misreading_it(library):
    fast = kernels.cpu_kernels()
    half = Tensor(np.ones((1, 8, 4, 4), np.float16))
    with pytest.raises(RuntimeError):
        fast.gelu_bias(half, Tensor(np.zeros(8, np.float16))).asnumpy()


def test_export_graph_does_not_name_the_library(library, deploy_assets, tmp_path):  # noqa: F811
    from mindcv_poolformer.deploy.artifacts import load_network
    from mindcv_poolformer.deploy.export import export_model

    # the check can fail: a graph compiled with the kernels does carry the library path
    net, _ = load_network(MODEL, str(deploy_assets["ckpt"]))
    ms.export(net, Tensor(np.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)), file_name=str(tmp_path / "raw"),
              file_format="MINDIR")
    assert os.path.basename(library).encode() in (tmp_path / "raw.mindir").read_bytes()
    result = export_model(model=MODEL, ckpt_path=str(deploy_assets["ckpt"]), file_format="MINDIR",
                          file_name=str(tmp_path / "clean"), image_size=IMAGE_SIZE)
    assert os.path.basename(library).encode() not in open(result.path, "rb").read()


@pytest.mark.parametrize("broken", ["no-compiler", "failing-compiler"])
def test_without_a_working_compiler_models_fall_back(broken, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MINDCV_POOLFORMER_HOME", str(tmp_path))
    kernels.library_path.cache_clear()
    try:
        if broken == "no-compiler":
            monkeypatch.setattr(kernels, "_compiler", lambda: None)
        else:
            script = tmp_path / "cxx"
            script.write_text("#!/bin/sh\necho 'fatal error: simulated' >&2\nexit 1\n")
            script.chmod(0o755)
            monkeypatch.setenv("CXX", str(script))
        with caplog.at_level(logging.WARNING, logger="mindcv_poolformer"):
            assert kernels.library_path() is None
            assert not kernels.kernels_enabled()
        assert "generic CPU ops" in caplog.text
        assert not list((tmp_path / "kernels").glob("*.so")), "a failed build must leave no library behind"
        net = create_model("poolformer_s12", num_classes=3, depths=(1, 1, 1, 1), widths=(8, 16, 24, 32))
        assert _fused_blocks(net) == 0
        assert net(Tensor(np.zeros((1, 3, 64, 64), np.float32))).shape == (1, 3)
    finally:
        kernels.library_path.cache_clear()


def test_library_is_cached_by_source_and_built_atomically(tmp_path, monkeypatch, library):
    monkeypatch.setenv("MINDCV_POOLFORMER_HOME", str(tmp_path))
    kernels.library_path.cache_clear()
    try:
        first = kernels.library_path()
        assert first is not None and first.startswith(str(tmp_path))
        built = os.path.getmtime(first)
        kernels.library_path.cache_clear()
        assert kernels.library_path() == first and os.path.getmtime(first) == built  # reused, not rebuilt
        assert [p.name for p in (tmp_path / "kernels").iterdir()] == [os.path.basename(first)]  # no temp files
    finally:
        kernels.library_path.cache_clear()


# (batch, channels, height, width, rows). The GEMM runs over the batch's pixels as one index in
# 48-column panels, 64-row blocks and 128-deep slices: these cover 49-, 15- and 144-pixel maps (panels
# crossing image boundaries, every tail width), depth 300 (three slices, the last partial), 72 rows
# (a partial row block), 4800 columns (more panels than one block, split between threads), and 12
# channels (the input gradient falls back to a conv: the transposed GEMM tiles 8 channels at a time).
GEMM_SHAPES = [(2, 16, 7, 7, 24), (3, 8, 5, 3, 8), (1, 40, 16, 9, 64), (2, 300, 5, 5, 72), (3, 16, 40, 40, 16),
               (2, 12, 7, 7, 24)]


def _close(actual, expected, scale_tol=2e-6):
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=scale_tol * np.abs(expected).max())


def _check_conv(op, shape, weight_tail, seed, reference, scale_tol=2e-6):
    """``op(x, w)``, and its input and weight gradients through ``ms.grad``, against ``reference(x, w, dy)``
    (within ``scale_tol`` of each result's largest magnitude)."""
    batch, channels, height, width, rows = shape
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (batch, channels, height, width)).astype(np.float32)
    w = rng.normal(0, 1, (rows, channels, *weight_tail)).astype(np.float32)
    dy = rng.normal(0, 1, (batch, rows, height, width)).astype(np.float32)
    y, dx, dw = reference(x, w, dy)

    def loss(inputs, weight):
        return (op(inputs, weight) * Tensor(dy)).sum()

    _close(op(Tensor(x), Tensor(w)).asnumpy(), y, scale_tol)
    got_dx, got_dw = ms.grad(loss, (0, 1))(Tensor(x), Tensor(w))
    _close(got_dx.asnumpy(), dx, scale_tol)
    _close(got_dw.asnumpy(), dw, scale_tol)


@pytest.mark.parametrize("shape", GEMM_SHAPES)
def test_gemm_matches_numpy(gemm_kernels, shape):
    """The 1x1 conv on the AVX-512 GEMM, its input gradient (transposed GEMM) and its weight gradient."""
    def reference(x, w, dy):
        return (np.einsum("kc,bchw->bkhw", w, x), np.einsum("kc,bkhw->bchw", w, dy),
                np.einsum("bkhw,bchw->kc", dy, x))

    _check_conv(gemm_kernels.conv1x1, shape, (), 4, reference)


# (batch, C, H, W, hidden): fc1 C -> hidden and fc2 hidden -> C, both multiples of 8 (the GEMM's row
# tile); 136/144 go past one 128-deep slice and one 64-row block in both GEMMs
MLP_SHAPES = [(2, 16, 7, 7, 24), (3, 8, 5, 3, 8), (1, 40, 16, 9, 64), (2, 136, 5, 5, 144), (3, 16, 40, 40, 16)]


def _mlp_reference(n, w1, b1, w2, b2, y, drop, dout):
    """The fused MLP kernels' contract in float64 numpy: forward outputs and every input's gradient."""
    from scipy.special import erf

    n, w1, b1, w2, b2, y, drop, dout = (v.astype(np.float64) for v in (n, w1, b1, w2, b2, y, drop, dout))
    per_channel = (None, slice(None), None, None)
    acc = np.einsum("kc,bchw->bkhw", w1, n)
    z = acc + b1[per_channel]
    h = z * (erf(z) + 1)
    out = y + drop[:, None, None, None] * (np.einsum("ck,bkhw->bchw", w2, h) + b2[per_channel])
    dacc2 = drop[:, None, None, None] * dout
    dz = np.einsum("ck,bchw->bkhw", w2, dacc2) * (erf(z) + 1 + z * 2 / np.sqrt(np.pi) * np.exp(-z * z))
    grads = {"n": np.einsum("kc,bkhw->bchw", w1, dz), "w1": np.einsum("bkhw,bchw->kc", dz, n),
             "b1": dz.sum((0, 2, 3)), "w2": np.einsum("bchw,bkhw->ck", dacc2, h), "b2": dacc2.sum((0, 2, 3)),
             "y": dout}
    return out, acc, h, grads


@pytest.mark.parametrize("shape", MLP_SHAPES)
def test_fused_mlp_matches_numpy(gemm_kernels, shape):
    """The channel MLP in two GEMMs: training forward and every gradient, and the inference kernel."""
    fast = gemm_kernels
    batch, channels, height, width, hidden = shape
    rng = np.random.default_rng(6)
    y = rng.normal(0.5, 2, (batch, channels, height, width)).astype(np.float32)
    flat = y.reshape(batch, -1).astype(np.float64)
    n = ((y - flat.mean(1)[:, None, None, None]) / np.sqrt(flat.var(1) + 1e-5)[:, None, None, None]).astype(np.float32)
    w1 = rng.normal(0, 0.3, (hidden, channels)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (channels, hidden)).astype(np.float32)
    b1, b2 = (rng.normal(0, 1, size).astype(np.float32) for size in (hidden, channels))
    drop = np.array([0.0, 2.0, 1.0][:batch], np.float32)  # drop path 0.5: dropped and kept samples
    dout = rng.normal(0, 1, y.shape).astype(np.float32)
    out, acc, h, grads = _mlp_reference(n, w1, b1, w2, b2, y, drop, dout)

    args = [Tensor(v) for v in (n, w1, b1, w2, b2, y, drop)]
    got = fast.mlp(*args)
    for actual, expected in zip(got, (out, acc, h)):
        _close(actual.asnumpy(), expected)

    def loss(*inputs):
        return (fast.mlp(*inputs)[0] * Tensor(dout)).sum()

    dgrads = ms.grad(loss, tuple(range(6)))(*args)
    for name, actual in zip(("n", "w1", "b1", "w2", "b2", "y"), dgrads):
        np.testing.assert_allclose(actual.asnumpy(), grads[name], rtol=1e-5, atol=1e-5 * np.abs(grads[name]).max(),
                                   err_msg=name)

    # inference: norm2 from the image's moments inside fc1's packing, drop path off
    mean, rstd = fast.moments(Tensor(y))
    np.testing.assert_allclose(mean.asnumpy(), flat.mean(1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rstd.asnumpy(), 1 / np.sqrt(flat.var(1) + 1e-5), rtol=1e-5)
    out_eval, _, h_eval, _ = _mlp_reference(n, w1, b1, w2, b2, y, np.ones(batch, np.float32), dout)
    got_out, got_h = fast.mlp_inference(Tensor(y), Tensor(w1), Tensor(b1), mean, rstd, Tensor(w2), Tensor(b2))
    _close(got_h.asnumpy(), h_eval)
    _close(got_out.asnumpy(), out_eval)


def test_gemm_switch_keeps_fc1_on_onednn(library, monkeypatch):
    monkeypatch.setenv("MINDCV_POOLFORMER_CPU_GEMM", "0")
    net = MetaFormer((1, 1, 1, 1), (8, 16, 24, 32), num_classes=3)
    assert cpu_backend.apply(net, kernels.CpuKernels(library)) == 4
    assert not any(getattr(b, "use_fast_gemm", False) for _, b in net.cells_and_names())


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("bad", [None, np.inf, -np.inf, np.nan])
def test_all_finite_kernel(library, dtype, bad):
    """The training step's non-finite check: one bad element anywhere, in a large (threaded) or small tensor."""
    check = kernels.cpu_kernels().all_finite
    rng = np.random.default_rng(5)
    tensors = [rng.normal(0, 1e3, (3, 5)).astype(dtype), rng.normal(0, 1, (600_000,)).astype(dtype),
               np.full((7,), 65504 if dtype == np.float16 else 3e38, dtype)]  # the largest finite values
    assert bool(check(*[Tensor(t) for t in tensors]).asnumpy())
    if bad is None:
        return
    for index, position in ((1, 599_999), (1, 123_456), (0, 0), (2, 6)):
        broken = [t.copy() for t in tensors]
        broken[index].reshape(-1)[position] = bad
        assert not bool(check(*[Tensor(t) for t in broken]).asnumpy()), (index, position)


# (logits (B, C, h, w), labels (H, W)): mmseg's x4 (stride-4 logits, label-size crop), a non-integer upsample
# with a label width that is not a multiple of the kernel's 64-pixel runs, a downsample (source rows skipped)
# and one source row or column (every label pixel reads the same row), with 150 and with 3 classes
NLL_SHAPES = [((2, 150, 16, 16), (64, 64)), ((1, 7, 9, 13), (31, 70)), ((3, 5, 20, 12), (7, 9)),
              ((2, 3, 1, 5), (6, 130)), ((1, 4, 6, 1), (17, 3))]


@pytest.mark.parametrize(("shape", "label_size"), NLL_SHAPES)
def test_resized_pixel_nll_matches_torch(library, shape, label_size):
    """The fused segmentation loss (resize, log_softmax, NLL) and its gradient against torch in float64,
    compiled (GRAPH): per-image sums over labelled pixels with a different upstream gradient per image.

    Logits up to +-60 apart (classes far below the maximum, where a clamped exp would show), one class
    at 300 on every third source pixel (exp overflows unless the maximum goes first), labels 0 and C - 1,
    and ignored pixels (255) that must count nothing either way.
    """
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    from mindspore import nn

    rng = np.random.default_rng(3)
    x = rng.normal(0, 20, shape).astype(np.float32)
    x[:, 1].reshape(shape[0], -1)[:, ::3] = 300.0
    labels = rng.integers(0, shape[1], (shape[0], *label_size)).astype(np.int32)
    labels[:, ::2, ::3] = 255
    labels[0, 0, :2] = (0, shape[1] - 1)
    weights = rng.normal(1, 0.5, shape[0]).astype(np.float32)
    op = kernels.cpu_kernels().resized_pixel_nll
    ignore = Tensor([255], ms.int32)

    class Weighted(nn.Cell):
        def construct(self, logits, target, w):
            return (op(logits, target, ignore)[0] * w).sum()

    ms.set_context(mode=ms.GRAPH_MODE)
    sums = op(Tensor(x), Tensor(labels), ignore)[0].asnumpy()
    grad = ms.grad(Weighted())(Tensor(x), Tensor(labels), Tensor(weights)).asnumpy()
    tx = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    up = F.interpolate(tx, size=label_size, mode="bilinear", align_corners=False)
    nll = F.cross_entropy(up, torch.from_numpy(labels.astype(np.int64)), ignore_index=255, reduction="none")
    expected = nll.sum((1, 2))
    (expected * torch.from_numpy(weights.astype(np.float64))).sum().backward()
    np.testing.assert_allclose(sums, expected.detach().numpy(), rtol=2e-6, atol=1e-3)
    np.testing.assert_allclose(grad, tx.grad.numpy(), rtol=1e-5, atol=1e-5 * np.abs(tx.grad.numpy()).max())


def test_resized_pixel_nll_refuses_labels_out_of_range(library):
    op = kernels.cpu_kernels().resized_pixel_nll
    logits = Tensor(np.zeros((1, 3, 4, 4), np.float32))
    ignore = Tensor([255], ms.int32)
    assert op(logits, Tensor(np.full((1, 8, 8), 255, np.int32)), ignore)[0].asnumpy()[0] == 0.0
    for bad in (3, -1, 254):
        labels = np.zeros((1, 8, 8), np.int32)
        labels[0, 5, 7] = bad
        with pytest.raises(RuntimeError):
            op(logits, Tensor(labels), ignore)[0].asnumpy()
    with pytest.raises(RuntimeError):  # labels for two images, logits for one
        op(logits, Tensor(np.zeros((2, 8, 8), np.int32)), ignore)[0].asnumpy()


# (batch, C, H, W, K) of a 3x3 conv on the GEMM: its depth is the 9 C taps (72 for C 8: partial 48-wide
# weight-gradient panels and 16-channel transposes; 360 for C 40: three 128-deep slices), maps one pixel
# wide or high (every tap but the centre row or column off the map), panels and 256-pixel weight-gradient
# chunks crossing image boundaries (15x7 and 40x40), and 72 output rows (a partial 64-row block)
CONV3X3_SHAPES = [(2, 8, 5, 7, 16), (3, 16, 1, 9, 8), (2, 8, 11, 1, 24), (3, 40, 15, 7, 72), (2, 16, 40, 40, 8)]


def _conv3x3_reference(x, w, dy):
    """A zero-padded 3x3 conv, its input gradient and its weight gradient, in float64 numpy from the shifted maps."""
    x, w, dy = (v.astype(np.float64) for v in (x, w, dy))
    height, width = x.shape[2:]
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    dy_padded = np.pad(dy, ((0, 0), (0, 0), (1, 1), (1, 1)))
    y = np.zeros((x.shape[0], w.shape[0], height, width))
    dx = np.zeros_like(x)
    dw = np.zeros_like(w)
    for i in range(3):
        for j in range(3):
            window = padded[:, :, i:i + height, j:j + width]  # x at (h + i - 1, w + j - 1)
            y += np.einsum("kc,bchw->bkhw", w[:, :, i, j], window)
            dw[:, :, i, j] = np.einsum("bkhw,bchw->kc", dy, window)
            dx += np.einsum("kc,bkhw->bchw", w[:, :, i, j], dy_padded[:, :, 2 - i:2 - i + height, 2 - j:2 - j + width])
    return y, dx, dw


@pytest.mark.parametrize("shape", CONV3X3_SHAPES)
def test_conv3x3_matches_numpy(gemm_kernels, shape):
    """The 3x3 conv on the GEMM (taps read shifted as it packs), its input gradient and its weight gradient."""
    _check_conv(gemm_kernels.conv3x3_direct, shape, (3, 3), 8, _conv3x3_reference)


# (batch, C, H, W, K) for the Winograd form: whole 4x4 tiles (48x48), partial tiles on both axes (49x50), 216 tiles
# an image so the 48-tile chunks start mid-row and span images (48x70, with a partial 64-row block of 72), a map
# 24 high, 1,040 tiles (64x52 on 5 images: the weight gradient's 256-tile chunks, the last one partial, two a
# thread or more on 2 threads), one tile an image on 48 images (4x4: fewer tiles than two chunks a thread, so each
# step is split across threads instead), and partial tiles on small maps (6x10, 96 tiles)
WINOGRAD_SHAPES = [(2, 8, 48, 48, 16), (3, 16, 49, 50, 8), (2, 24, 48, 70, 72), (2, 16, 24, 64, 8),
                   (5, 8, 64, 52, 16), (48, 16, 4, 4, 24), (16, 8, 6, 10, 16)]
# and where it would save too little: 16 tiles, a third of one 48-column GEMM panel (4x4 at batch 16: 0.75 of the
# direct form's multiply-adds), so the forward and input gradient stay direct while the weight gradient, whose
# GEMMs take the tiles as their depth, is Winograd; and a 2x2 map's one tile (as many as direct): all direct
WINOGRAD_PARTLY_DIRECT_SHAPES = {(16, 16, 4, 4, 24): (True, True, False), (5, 16, 2, 2, 8): (True, True, True)}


def _output_and_grads(op, x, w, dy):
    def loss(inputs, weight):
        return (op(inputs, weight) * dy).sum()

    return [op(x, w).asnumpy(), *(g.asnumpy() for g in ms.grad(loss, (0, 1))(x, w))]


@pytest.mark.parametrize("shape", WINOGRAD_SHAPES + list(WINOGRAD_PARTLY_DIRECT_SHAPES))
def test_conv3x3_winograd_matches_numpy(gemm_kernels, shape):
    """The Winograd F(4x4, 3x3) forward, input gradient and weight gradient within 2e-5 of the results' scale
    (float32 rounding of the transforms: ~5e-6 at 40 channels); a wrong transform coefficient is off by a whole
    term. Where the map allows it, each really is the other form: not bit-equal to the direct one."""
    _check_conv(gemm_kernels.conv3x3_winograd, shape, (3, 3), 8, _conv3x3_reference, scale_tol=2e-5)
    rng = np.random.default_rng(1)
    x = Tensor(rng.normal(0, 1, shape[:4]).astype(np.float32))
    w = Tensor(rng.normal(0, 1, (shape[4], shape[1], 3, 3)).astype(np.float32))
    dy = Tensor(rng.normal(0, 1, (shape[0], shape[4], *shape[2:4])).astype(np.float32))
    results = [_output_and_grads(op, x, w, dy) for op in (gemm_kernels.conv3x3_winograd, gemm_kernels.conv3x3_direct)]
    same = tuple(bool(np.array_equal(a, b)) for a, b in zip(*results))
    assert same == WINOGRAD_PARTLY_DIRECT_SHAPES.get(shape, (False, False, False))


def test_conv3x3_winograd_is_the_default_and_can_be_switched_off(library, monkeypatch):
    for value, form in (("1", "conv3x3_winograd"), ("0", "conv3x3_direct")):
        monkeypatch.setenv("MINDCV_POOLFORMER_CPU_WINOGRAD", value)
        fast = kernels.CpuKernels(library)
        if fast.conv3x3 is None:
            pytest.skip("the GEMM is off on this CPU")
        assert fast.conv3x3 is getattr(fast, form)


class _WeightedSum(ms.nn.Cell):
    def __init__(self, net, weights):
        super().__init__()
        self.net = net
        self.weights = weights

    def construct(self, x):
        return (self.net(x) * self.weights).sum()


def test_fpn_3x3_convs_move_to_the_gemm_and_back(gemm_kernels):
    """The FPN's 3x3 convs (4 in the neck, 7 in the head) run on the GEMM in the CPU backend, compiled (GRAPH)
    with the same Parameters, eval logits and training gradients as the model as written, and ``remove`` gives
    back plain convs; the strided and 1x1 convs stay MindSpore's."""
    ms.set_context(mode=ms.GRAPH_MODE)
    small = {"num_classes": 8, "depths": (1, 1, 1, 1), "backend": "none", "dropout": 0.0}
    fast, slow = (create_model("fpn_poolformer_s12", **small) for _ in range(2))
    rng = np.random.default_rng(9)
    for a, b in zip(fast.get_parameters(), slow.get_parameters()):
        value = Tensor((a.asnumpy() + rng.normal(0, 0.1, a.shape)).astype(np.float32))
        a.set_data(value)
        b.set_data(value.copy())
    params = [(p.name, id(p)) for p in fast.get_parameters()]
    cpu_backend.apply(fast, gemm_kernels)
    moved = [name for name, cell in fast.cells_and_names() if isinstance(cell, cpu_backend.CpuConv3x3)]
    assert len(moved) == 11 and all(name.startswith(("neck.fpn_convs", "decode_head.scale_heads")) for name in moved)
    assert [(p.name, id(p)) for p in fast.get_parameters()] == params
    x = Tensor(rng.normal(0, 1, (2, 3, 64, 96)).astype(np.float32))
    for net in (fast, slow):
        net.set_train(False)
    # the 3x3 convs at these maps (16x24 and coarser) take the Winograd form: ~10x the direct form's rounding
    _close(fast(x).asnumpy(), slow(x).asnumpy(), scale_tol=1e-5)
    # AMP O3 hands the convs float16: MindSpore's conv computes them, exactly as in the CPU backend's op forms
    # without the kernels (whose blocks step aside for float16 as well)
    from mindspore import amp

    # (own copies: the cast is in place, and the training pass below leaves the two nets' BatchNorm statistics
    # apart by rounding)
    halves = []
    for kernel_library in (gemm_kernels, None):
        net = create_model("fpn_poolformer_s12", **small)
        cpu_backend.apply(net, kernel_library)
        for a, b in zip(net.get_parameters(), slow.get_parameters()):
            a.set_data(Tensor(b.asnumpy()))
        net.set_train(False)
        halves.append(amp.auto_mixed_precision(net, "O3")(x).asnumpy())
    np.testing.assert_array_equal(halves[0], halves[1])
    weights = Tensor(rng.normal(0, 1, (2, 8, 16, 24)).astype(np.float32))
    grads = []
    for net in (fast, slow):
        net.set_train(True)
        weighted = _WeightedSum(net, weights)
        grads.append(ms.grad(weighted, None, weighted.trainable_params())(x))
    names = [p.name for p in fast.trainable_params()]  # no frozen stem, no BatchNorm statistics
    assert len(names) == len(grads[0]) == 93 and any(n.endswith("neck.fpn_convs.0.conv.weight") for n in names)
    for name, got, expected in zip(names, grads[0], grads[1]):
        # norm1's beta cancels in pool(x) - x: its gradient is rounding noise around 0, hence the floor; the
        # Winograd convs' rounding reaches 1.6e-5 of a gradient's scale here (MindSpore's own CPU ops vary by
        # rounding from run to run on top of it), hence 5e-5
        np.testing.assert_allclose(got.asnumpy(), expected.asnumpy(), rtol=1e-4,
                                   atol=max(5e-5 * np.abs(expected.asnumpy()).max(), 1e-6), err_msg=name)
    cpu_backend.remove(fast)
    assert not any(isinstance(cell, cpu_backend.CpuConv3x3) for _, cell in fast.cells_and_names())
    assert not any(hasattr(cell, "k_conv3x3") for _, cell in fast.cells_and_names())
