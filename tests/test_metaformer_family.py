"""MetaFormer family: per-stage token mixers, norms, activations, failure cases, the registered
ablations/hybrid, MAC rules, the dense-prediction backbone and the recipes. Tiny inputs only."""

from __future__ import annotations

import glob
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from mindcv_poolformer import count_macs, count_params, create_model, list_models, load_checkpoint_into
from mindcv_poolformer.models.layers import GroupNorm1, LayerNormChannel
from mindcv_poolformer.models.metaformer import METAFORMER_VARIANTS, MetaFormer
from mindcv_poolformer.summary import main as summary_main

from helpers import np_metaformer_block, randomise_parameters

DEPTHS = (1, 1, 1, 1)
WIDTHS = (32, 32, 64, 64)
CLASSES = 10
SIDE = 64
TOKENS = (16 * 16, 8 * 8, 4 * 4, 2 * 2)  # token count per stage for a 64x64 input (strides 4..32)
RECIPES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "metaformer", "*.yaml")))


@pytest.fixture(autouse=True)
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)  # conftest restores the mode after each test


def tiny(**kwargs) -> MetaFormer:
    # layer_scale 1.0 so the mixer's gradient is not scaled down to nothing by the 1e-5 default.
    kwargs.setdefault("layer_scale_init", 1.0)
    return MetaFormer(DEPTHS, WIDTHS, num_classes=CLASSES, **kwargs)


def expected_params(mixer: str = "pooling", norm: str = "gn1", use_mlp: bool = True, kernel: int = 3,
                    head_dim: int = 32) -> int:
    """Parameter count of ``tiny(...)`` from the architecture, independently of the code under test."""
    def norm_params(c: int) -> int:
        return 4 * c if norm == "bn" else 2 * c  # BatchNorm also stores moving mean/variance

    total = 3 * WIDTHS[0] * 7 * 7 + WIDTHS[0]
    total += sum(WIDTHS[i] * WIDTHS[i + 1] * 9 + WIDTHS[i + 1] for i in range(3))
    for depth, c, n in zip(DEPTHS, WIDTHS, TOKENS):
        block = norm_params(c) + c
        if use_mlp:
            block += norm_params(c) + c + (c * 4 * c + 4 * c) + (4 * c * c + c)
        block += {"pooling": 0, "identity": 0, "dwconv": c * kernel * kernel + c,
                  "attention": 4 * c * c + c, "random": n * n, "mlp": n * n}[mixer]
        total += depth * block
    return total + norm_params(WIDTHS[-1]) + WIDTHS[-1] * CLASSES + CLASSES


def train_step(net: nn.Cell) -> tuple[float, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One SGD step on a 2x3x64x64 batch; returns the loss and all parameters before/after."""
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((2, 3, SIDE, SIDE)).astype(np.float32))
    y = ms.Tensor(np.array([1, 3], np.int32))
    loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    opt = nn.SGD(net.trainable_params(), learning_rate=0.5)
    before = {k: p.asnumpy().copy() for k, p in net.parameters_and_names()}

    def forward(images, labels):
        return loss_fn(net(images), labels)

    grad_fn = ms.value_and_grad(forward, None, opt.parameters)
    net.set_train(True)
    loss, grads = grad_fn(x, y)
    opt(grads)
    after = {k: p.asnumpy().copy() for k, p in net.parameters_and_names()}
    return float(loss.asnumpy()), before, after


CASES = {
    "pooling": (dict(), dict()),
    "pool5": (dict(pool_size=5), dict()),
    "identity": (dict(token_mixers="identity"), dict(mixer="identity")),
    "random": (dict(token_mixers="random", image_size=SIDE), dict(mixer="random")),
    "dwconv5": (dict(token_mixers="dwconv", mixer_kwargs={"kernel_size": 5}), dict(mixer="dwconv", kernel=5)),
    "attention": (dict(token_mixers="attention"), dict(mixer="attention")),
    "mlp": (dict(token_mixers="mlp", image_size=SIDE), dict(mixer="mlp")),
    "ln": (dict(norm="ln"), dict(norm="ln")),
    "bn": (dict(norm="bn"), dict(norm="bn")),
    "relu": (dict(act="relu"), dict()),
    "silu": (dict(act="silu"), dict()),
    "no_residual": (dict(use_residual=False), dict()),
    "no_mlp": (dict(use_mlp=False), dict(use_mlp=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_variant_builds_counts_and_trains(case):
    kwargs, expect = CASES[case]
    # no drop path here: with a batch of 2 it can drop a branch for both samples (then its weights
    # rightly get no gradient) depending on the global RNG state; DropPath has its own tests
    net = tiny(**kwargs)
    assert count_params(net) == expected_params(**expect)
    loss, before, after = train_step(net)
    assert np.isfinite(loss)
    trainable = {p.name for p in net.trainable_params()}
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert "head.weight" in changed
    mixer_params = {k for k in trainable if ".token_mixer." in k}
    assert mixer_params <= changed, f"mixer weights not trained: {sorted(mixer_params - changed)}"
    assert changed <= trainable | {k for k in before if "moving_" in k}


def test_random_matrix_is_frozen():
    net = tiny(token_mixers="random", image_size=SIDE, mixer_kwargs={"seed": 7})
    frozen = [k for k, p in net.parameters_and_names() if k.endswith("token_mixer.matrix")]
    assert len(frozen) == sum(DEPTHS)
    assert not any(p.name.endswith("token_mixer.matrix") for p in net.trainable_params())
    _, before, after = train_step(net)
    for key in frozen:
        np.testing.assert_array_equal(before[key], after[key])
        np.testing.assert_allclose(before[key].sum(axis=1), 1.0, rtol=1e-5)  # rows are convex mixes
    assert count_params(net) - count_params(net, trainable_only=True) == sum(n * n for n in TOKENS)


def test_new_activation_and_norm_types():
    block = tiny(act="relu", norm="ln").network[0][0]
    assert isinstance(block.mlp.act, nn.ReLU) and isinstance(block.norm1, LayerNormChannel)
    # the default activation is the exact erf GELU, as the block computes it (not as mlp.act alone would)
    block = tiny().network[0][0]
    params = randomise_parameters(block, seed=2)
    x = np.random.default_rng(3).standard_normal((2, 32, 7, 5)).astype(np.float32)
    block.set_train(False)
    exact = np_metaformer_block(x, params, act="gelu")
    tol = 5e-6 * np.abs(exact).max()
    assert np.abs(exact - np_metaformer_block(x, params, act="gelu_tanh")).max() > 10 * tol
    err = float(np.abs(block(ms.Tensor(x)).asnumpy() - exact).max())
    assert err <= tol, f"the block differs from an erf-GELU block by {err:.2e} (tolerance {tol:.2e})"
    assert isinstance(tiny(act="silu").network[0][0].mlp.act, nn.SiLU)
    assert isinstance(tiny(norm="bn").network[0][0].norm2, nn.BatchNorm2d)


def test_channel_layernorm_matches_numpy():
    x = np.random.default_rng(1).standard_normal((2, 8, 3, 5)).astype(np.float32)
    got = LayerNormChannel(8)(ms.Tensor(x)).asnumpy()
    mean, var = x.mean(axis=1, keepdims=True), x.var(axis=1, keepdims=True)
    np.testing.assert_allclose(got, (x - mean) / np.sqrt(var + 1e-5), atol=1e-5)


def test_mac_rules_count_token_matmuls():
    base = count_macs(tiny(token_mixers="identity"), SIDE)
    heads = [c // 32 for c in WIDTHS]
    attention = sum(n * c * 3 * c + n * c * c + 2 * h * n * n * 32 for c, n, h in zip(WIDTHS, TOKENS, heads))
    assert count_macs(tiny(token_mixers="attention"), SIDE) == base + attention
    mixing = sum(c * n * n for c, n in zip(WIDTHS, TOKENS))
    assert count_macs(tiny(token_mixers="random", image_size=SIDE), SIDE) == base + mixing
    assert count_macs(tiny(token_mixers="mlp", image_size=SIDE), SIDE) == base + mixing
    dw = sum(n * c * 9 for c, n in zip(WIDTHS, TOKENS))
    assert count_macs(tiny(token_mixers="dwconv"), SIDE) == base + dw


def test_poolformer_s12_unchanged():
    net = create_model("poolformer_s12")
    assert count_params(net) == 11_915_176
    assert len(list(net.parameters_and_names())) == 132
    assert count_macs(net) == 1_822_678_528


def test_hybrid_matches_paper():
    net = create_model("poolformer_s12_pool_attn")
    assert net.token_mixers == ("pooling", "pooling", "attention", "attention")
    params = count_params(net)
    assert abs(params / 16.5e6 - 1) < 0.01
    # 6 blocks at 14x14 (C=320, 10 heads) and 2 at 7x7 (C=512, 16 heads) replace pooling by attention.
    attention = 6 * (196 * 320 * 960 + 196 * 320 * 320 + 2 * 10 * 196 * 196 * 32)
    attention += 2 * (49 * 512 * 1536 + 49 * 512 * 512 + 2 * 16 * 49 * 49 * 32)
    macs = count_macs(net)
    assert macs == 1_822_678_528 + attention
    assert abs(macs / 2.5e9 - 1) < 0.03


def test_registered_ablations_are_data():
    names = set(list_models("metaformer_s12_")) | {"poolformer_s12_pool_attn"}
    assert names == set(METAFORMER_VARIANTS)
    assert len(names) == 12


@pytest.mark.parametrize("kwargs, message", [
    (dict(token_mixers="conv"), "unknown token mixer 'conv'"),
    (dict(token_mixers=("pooling", "attention")), "one entry per stage"),
    (dict(norm="rms"), "unknown norm 'rms'"),
    (dict(act="tanh"), "unknown activation 'tanh'"),
    (dict(token_mixers="mlp"), "image_size"),
    (dict(token_mixers="attention", mixer_kwargs={"head_dim": 24}), "head_dim"),
    (dict(token_mixers="pooling", mixer_kwargs={"kernel_size": 3}), "unknown option"),
    (dict(out_indices=(0, 4)), "out_indices"),
])
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


def test_fixed_size_mixer_rejects_other_sizes():
    net = tiny(token_mixers="mlp", image_size=SIDE)
    net.set_train(False)
    with pytest.raises(ValueError, match="built for a 16x16 token map, got 24x24"):
        net(ms.Tensor(np.zeros((1, 3, 96, 96), np.float32)))


def test_features_only_graph_mode_shapes():
    ms.set_context(mode=ms.GRAPH_MODE)
    net = create_model("poolformer_s12", features_only=True)
    net.set_train(False)
    names = {k for k, _ in net.parameters_and_names()}
    assert {"norm0.gamma", "norm2.gamma", "norm4.gamma", "norm6.gamma"} <= names
    assert not any(k.startswith(("norm.", "head.")) for k in names)
    assert all(isinstance(getattr(net, f"norm{i}"), GroupNorm1) for i in (0, 2, 4, 6))
    assert net.feature_channels == (64, 128, 320, 512) and net.feature_strides == (4, 8, 16, 32)
    for height, width in ((224, 224), (96, 160)):
        outs = net(ms.Tensor(np.random.default_rng(0).standard_normal((1, 3, height, width)).astype(np.float32)))
        assert isinstance(outs, tuple)
        assert [o.shape for o in outs] == [(1, c, height // s, width // s) for c, s in
                                          zip((64, 128, 320, 512), (4, 8, 16, 32))]
    subset = create_model("poolformer_s12", out_indices=(1, 3))
    assert subset.features_only and subset.out_layers == (2, 6)
    assert [o.shape[1] for o in subset(ms.Tensor(np.zeros((1, 3, 64, 64), np.float32)))] == [128, 512]


def test_classification_checkpoint_into_features_only():
    cls = create_model("poolformer_s12")
    state = {k: p.asnumpy() for k, p in cls.parameters_and_names()}
    state["network.0.0.norm1.gamma"] = np.full_like(state["network.0.0.norm1.gamma"], 3.0)
    backbone = create_model("poolformer_s12", features_only=True)
    report = load_checkpoint_into(backbone, state, strict=True)
    assert sorted(report.reinitialised) == sorted(f"norm{i}.{a}" for i in (0, 2, 4, 6) for a in ("gamma", "beta"))
    assert sorted(report.ignored) == ["head.bias", "head.weight", "norm.beta", "norm.gamma"]
    assert len(report.loaded) == 132 - 4
    params = dict(backbone.parameters_and_names())
    np.testing.assert_array_equal(params["network.0.0.norm1.gamma"].asnumpy(), 3.0)
    np.testing.assert_array_equal(params["norm6.gamma"].asnumpy(), 1.0)
    assert "norm0.gamma" in report.summary()


def test_summary_command(capsys):
    assert summary_main(["--models", "metaformer_s12_identity", "poolformer_s12_pool_attn", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "| metaformer_s12_identity | 11,915,176 |" in out
    assert "poolformer_s12_pool_attn" in out and "16.500M" in out


def test_recipes_name_buildable_models():
    assert len(RECIPES) == len(METAFORMER_VARIANTS)
    try:
        from mindcv_poolformer.config import load_config
    except ImportError:
        load_config = None
    import yaml

    for path in RECIPES:
        name = os.path.splitext(os.path.basename(path))[0]
        model = load_config(path).model if load_config else yaml.safe_load(open(path, encoding="utf-8"))["model"]
        assert model == name and model in list_models()
        net = create_model(model)
        assert count_params(net, trainable_only=True) > 0
