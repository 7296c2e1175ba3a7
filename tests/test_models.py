"""Model zoo: registry, exact parameter counts, MACs, shapes, modes, init and the token mixer's borders."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from mindcv_poolformer import count_macs, count_params, create_model, list_models, model_info, models
from mindcv_poolformer.backends import cpu as cpu_backend
from mindcv_poolformer.models.layers import DropPath, DropPathKey, GroupNorm1, Pooling, counter_uniform
from mindcv_poolformer.models.metaformer import POOLFORMER_VARIANTS, MetaFormerBlock

from conftest import require_kernel_library
from helpers import np_metaformer_block, randomise_parameters

PAPER_MACS_G = {"poolformer_s12": 1.8, "poolformer_s24": 3.4, "poolformer_s36": 5.0,
                "poolformer_m36": 8.8, "poolformer_m48": 11.6}
PARAMS = {"poolformer_s12": 11_915_176, "poolformer_s24": 21_388_968, "poolformer_s36": 30_862_760,
          "poolformer_m36": 56_172_520, "poolformer_m48": 73_473_448}


@pytest.fixture(autouse=True)
def _pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)


def test_registry_lists_the_five_variants_and_rejects_unknown_names():
    assert set(PARAMS) <= set(list_models())
    with pytest.raises(ValueError, match=r"unknown model 'poolformer_s13'.*available: "):
        create_model("poolformer_s13")


# REFERENCE.md's table (the official repository's models and training recipes), written out independently
PAPER_ROWS = {"poolformer_s12": ((2, 2, 6, 2), (64, 128, 320, 512), 1e-5, 0.90, 0.1, 77.2),
              "poolformer_s24": ((4, 4, 12, 4), (64, 128, 320, 512), 1e-5, 0.90, 0.1, 80.3),
              "poolformer_s36": ((6, 6, 18, 6), (64, 128, 320, 512), 1e-6, 0.90, 0.2, 81.4),
              "poolformer_m36": ((6, 6, 18, 6), (96, 192, 384, 768), 1e-6, 0.95, 0.3, 82.1),
              "poolformer_m48": ((8, 8, 24, 8), (96, 192, 384, 768), 1e-6, 0.95, 0.4, 82.5)}


def test_one_record_per_model_holds_the_paper_facts_and_builds_the_network():
    """The registry's record is the variant table's row, and the built network is what the record says."""
    from mindcv_poolformer.models.fpn import SEGMENTATION_VARIANTS
    from mindcv_poolformer.models.metaformer import METAFORMER_VARIANTS

    tables = {**POOLFORMER_VARIANTS, **METAFORMER_VARIANTS, **SEGMENTATION_VARIANTS}
    assert sorted(tables) == list_models()
    for name in list_models():
        assert model_info(name) is tables[name]
    for name, (depths, widths, scale, crop, drop_path, top1) in PAPER_ROWS.items():
        info = model_info(name)
        assert (info.depths, info.widths, info.layer_scale_init, info.crop_pct, info.drop_path_rate, info.top1,
                info.interpolation, info.task) == (depths, widths, scale, crop, drop_path, top1, "bicubic",
                                                   "classification")
        np.testing.assert_allclose(info.mean, [0.485 * 255, 0.456 * 255, 0.406 * 255], rtol=0, atol=0)
        np.testing.assert_allclose(info.std, [0.229 * 255, 0.224 * 255, 0.225 * 255], rtol=0, atol=0)
    seg = model_info("fpn_poolformer_s36")  # mmseg's ADE20K config: its normalisation, its backbone
    assert (seg.base, seg.depths, seg.layer_scale_init, seg.num_classes, seg.crop_size) == (
        "poolformer_s36", (6, 6, 18, 6), 1e-6, 150, 512)
    assert (seg.mean, seg.std) == ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
    ablation = model_info("metaformer_s12_pool5")
    assert (ablation.base, dict(ablation.overrides), ablation.drop_path_rate) == ("poolformer_s12", {"pool_size": 5},
                                                                                  0.1)
    assert create_model("metaformer_s12_pool5", num_classes=4).network[0][0].token_mixer.pool_size == 5
    net = create_model("metaformer_s12_pool5", num_classes=4, pool_size=7)  # a flag wins over the record
    assert net.depths == (2, 2, 6, 2) and net.network[0][0].token_mixer.pool_size == 7
    assert dict(model_info("metaformer_s12_pool5").overrides) == {"pool_size": 5}  # the build left the table alone
    built = create_model("fpn_poolformer_s36")
    assert (built.backbone.depths, built.num_classes) == ((6, 6, 18, 6), 150)
    assert np.all(built.backbone.network[0][0].layer_scale_1.asnumpy() == np.float32(1e-6))


@pytest.mark.parametrize("name", list(PARAMS))
def test_param_count_and_macs(name):
    net = create_model(name)
    assert count_params(net) == PARAMS[name] == model_info(name).params
    macs = count_macs(net, 224)
    print(f"{name}: {macs / 1e9:.3f} GMACs (paper {PAPER_MACS_G[name]})")
    # the paper prints one decimal (s12's 1.823G is "1.8"): equal after rounding, and within 1% of
    # the unrounded fvcore count of the reference implementation
    assert round(macs / 1e9, 1) == PAPER_MACS_G[name]
    assert abs(macs - model_info(name).macs) / model_info(name).macs < 0.01
    assert ms.get_context("mode") == ms.PYNATIVE_MODE


def test_macs_counter_matches_a_hand_count_for_s12():
    # stem + 4 stages of (2 GroupNorm + 2 MLP convs) + 3 downsamples + final norm + head, fvcore rules
    stages = [(64, 56, 2), (128, 28, 2), (320, 14, 6), (512, 7, 2)]
    hand = 56 * 56 * 64 * 3 * 49
    for c, s, d in stages:
        hand += d * (2 * 5 * c * s * s + 2 * s * s * c * 4 * c)
    hand += sum(c2 * s2 * s2 * c1 * 9 for (c1, _, _), (c2, s2, _) in zip(stages, stages[1:]))
    hand += 5 * 512 * 49 + 512 * 1000
    assert count_macs(create_model("poolformer_s12"), 224) == hand == 1_822_678_528


@pytest.mark.parametrize("size", [(224, 224), (96, 160), (256, 64)])
def test_output_and_feature_shapes(size):
    net = create_model("poolformer_s12", num_classes=10)
    net.set_train(False)
    x = ms.Tensor(np.zeros((2, 3) + size, np.float32))
    features = net.forward_features(x)
    assert features.shape == (2, 512, size[0] // 32, size[1] // 32)
    assert net.forward_head(features).shape == (2, 10)
    assert net(x).shape == (2, 10)


def test_headless_model_returns_pooled_features():
    net = create_model("poolformer_s12", num_classes=0)
    net.set_train(False)
    assert net(ms.Tensor(np.zeros((1, 3, 64, 64), np.float32))).shape == (1, 512)


def test_graph_and_pynative_give_the_same_logits():
    net = create_model("poolformer_s12", num_classes=5)
    for p in net.get_parameters():  # make the mixer and every norm visible in the output
        if "layer_scale" in p.name or p.name.endswith("gamma"):
            p.set_data(ms.Tensor(np.random.RandomState(0).uniform(0.5, 1.5, p.shape).astype(np.float32)))
    net.set_train(False)
    x = ms.Tensor(np.random.RandomState(1).randn(2, 3, 96, 64).astype(np.float32))
    eager = net(x).asnumpy()
    ms.set_context(mode=ms.GRAPH_MODE)
    graph = net(x).asnumpy()
    assert np.abs(eager - graph).max() < 1e-5


def _reference_avgpool(x: np.ndarray, k: int) -> np.ndarray:
    """AvgPool2d(k, stride 1, pad k//2, count_include_pad=False) by explicit loops."""
    n, c, h, w = x.shape
    r = k // 2
    out = np.zeros_like(x)
    for i in range(h):
        for j in range(w):
            window = x[:, :, max(0, i - r):i + r + 1, max(0, j - r):j + r + 1]
            out[:, :, i, j] = window.mean(axis=(2, 3))
    return out


@pytest.mark.parametrize("backend", ["none", "cpu"])
@pytest.mark.parametrize("k", [3, 5])
def test_pooling_token_mixer_border_values(k, backend):
    """The model's device-neutral form and the CPU backend's padded-AvgPool form, in PyNative and GRAPH."""
    x = np.random.RandomState(0).randn(2, 3, 7, 5).astype(np.float32) * 3 + 1
    expected = _reference_avgpool(x, k) - x
    for run_mode in (ms.PYNATIVE_MODE, ms.GRAPH_MODE):  # conftest restores the mode after the test
        ms.set_context(mode=run_mode)
        mixer = Pooling(k)
        if backend == "cpu":
            cpu_backend.apply(mixer, None)
            assert isinstance(mixer.pool, cpu_backend.CpuAvgPoolExcludePad)
        # corners average 4 (k=3) values, edges 6, the interior 9: all must match exactly
        assert np.abs(mixer(ms.Tensor(x)).asnumpy() - expected).max() < 1e-5


def test_groupnorm1_normalises_over_channels_and_space():
    x = np.random.RandomState(0).randn(2, 4, 3, 5).astype(np.float32) * 5 + 2
    norm = GroupNorm1(4)
    norm.gamma.set_data(ms.Tensor(np.array([1, 2, 3, 4], np.float32)))
    norm.beta.set_data(ms.Tensor(np.array([0, 1, 0, -1], np.float32)))
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    var = x.var(axis=(1, 2, 3), keepdims=True)
    expected = (x - mean) / np.sqrt(var + 1e-5) * np.array([1, 2, 3, 4]).reshape(1, 4, 1, 1) \
        + np.array([0, 1, 0, -1]).reshape(1, 4, 1, 1)
    assert np.abs(norm(ms.Tensor(x)).asnumpy() - expected).max() < 1e-4


@pytest.mark.parametrize("backend", ["none", "cpu"])
def test_block_computes_exact_erf_gelu(backend):
    """What a block computes, not what ``mlp.act`` would: the fused CPU block never calls ``mlp.act``.

    Against a numpy block with scipy's erf GELU, and far from the same block with the tanh approximation
    (MindSpore's ``nn.GELU()`` default), for the plain model and for the CPU backend's fused kernels (which
    fold GELU's constants into fc1 and have separate training and inference kernels).
    """
    factory = create_model if backend == "cpu" else models.create_model
    block = factory("poolformer_s12", num_classes=10).network[0][0]
    if backend == "cpu":
        require_kernel_library()
        assert isinstance(block, cpu_backend.FusedPoolFormerBlock)
    else:
        assert type(block) is MetaFormerBlock
    params = randomise_parameters(block, seed=0)  # by the block's own names (norm1.gamma, ...)
    x = np.random.default_rng(1).normal(0, 1, (2, 64, 7, 5)).astype(np.float32)
    exact = np_metaformer_block(x, params, act="gelu")
    tanh = np_metaformer_block(x, params, act="gelu_tanh")
    scale = np.abs(exact).max()
    gap = np.abs(exact - tanh).max()
    tol = 5e-6 * scale  # measured: 1.6e-6 (plain), 2.5e-6 (fused) at scale 4.4
    assert scale > 1
    assert gap > 10 * tol, f"erf and tanh GELU differ by only {gap:.2e}: the test could not tell them apart"
    for train in (False, True):  # drop path is 0 in block 0: both are the same function
        block.set_train(train)
        err = float(np.abs(block(ms.Tensor(x)).asnumpy() - exact).max())
        print(f"{backend} train={train}: max |block - erf GELU numpy| = {err:.2e}, erf vs tanh GELU {gap:.2e}, "
              f"output scale {scale:.2f}")
        assert err <= tol, f"block output differs from the erf-GELU block by {err:.2e} (erf vs tanh: {gap:.2e})"


def test_drop_path_schedule_is_linear_over_all_blocks():
    net = create_model("poolformer_s12", drop_path_rate=0.1)
    for attr in ("drop_path1", "drop_path2"):
        rates = [getattr(blk, attr).drop_prob if isinstance(getattr(blk, attr), DropPath) else 0.0
                 for stage in (0, 2, 4, 6) for blk in net.network[stage]]
        np.testing.assert_allclose(rates, [0.1 * i / 11 for i in range(12)], atol=1e-9)


def test_drop_path_drops_whole_samples_only_in_training():
    layer = DropPath(0.5)
    x = ms.Tensor(np.ones((64, 2, 2, 2), np.float32))
    layer.set_train(True)
    out = layer(x).asnumpy()
    per_sample = out.reshape(64, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all() and 0 < (per_sample[:, 0] == 0).sum() < 64
    layer.set_train(False)
    assert (layer(x).asnumpy() == 1).all()


def _lowbias32(x: np.ndarray) -> np.ndarray:
    """C. Wellons' lowbias32 in numpy uint32 (wrapping by definition): the reference of the graph's int32 form."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def _reference_uniform(key: int, counter: int, stream: int, count: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        base = _lowbias32(_lowbias32(np.uint32(key)) ^ np.uint32(counter))
        words = _lowbias32(base ^ (np.uint32(stream << 20) | np.arange(count, dtype=np.uint32)))
    return (words >> np.uint32(8)).astype(np.float32) / np.float32(1 << 24)


class _Uniform(ms.nn.Cell):
    """counter_uniform in a compiled graph, the key and counter as inputs."""

    def __init__(self, stream: int, count: int) -> None:
        super().__init__()
        self.stream, self.count = stream, count

    def construct(self, key, counter):
        return counter_uniform(key, counter, self.stream, self.count)


def test_counter_uniform_is_lowbias32_bit_for_bit():
    """The graph's int32 hash (wrapping products, masked arithmetic shifts) equals the uint32 reference exactly."""
    for key, counter, stream in [(0, 0, 0), (-1, 7, 3), (0x12345678, 2**31 - 1, 21), (-(2**31), 123456, 2047)]:
        got = _Uniform(stream, 257)(ms.Tensor(key, ms.int32), ms.Tensor(counter, ms.int32)).asnumpy()
        np.testing.assert_array_equal(got, _reference_uniform(key & 0xFFFFFFFF, counter, stream, 257))
    # the streams of one counter index disjoint words, so no two layers of a step share one
    words = np.concatenate([_Uniform(b, 4096)(ms.Tensor(5, ms.int32), ms.Tensor(9, ms.int32)).asnumpy()
                            for b in range(4)])
    assert len(np.unique(words)) > len(words) - 40  # 24-bit values of 16k distinct words: ~8 equal by chance
    for stream, count in ((2048, 4), (-1, 4), (0, (1 << 20) + 1)):
        with pytest.raises(ValueError, match="counter_uniform"):
            counter_uniform(ms.Tensor(0, ms.int32), ms.Tensor(0, ms.int32), stream, count)


def test_counter_masks_keep_rate_and_independence():
    """Over 20 counters x 2 streams x 4096 samples: keep rate 1 - p within 4 sigma, and no correlation between
    streams (blocks) or between consecutive counters (steps) beyond 4 sigma."""
    p, count = 0.3, 4096
    draws = {(c, b): _Uniform(b, count)(ms.Tensor(99, ms.int32), ms.Tensor(c, ms.int32)).asnumpy()
             for c in range(20) for b in (0, 1)}
    kept = {k: (v >= p).astype(np.float64) for k, v in draws.items()}
    all_kept = np.concatenate(list(kept.values()))
    sigma = np.sqrt(p * (1 - p) / all_kept.size)
    assert abs(all_kept.mean() - (1 - p)) < 4 * sigma, all_kept.mean()
    pairs = {"blocks": [(kept[c, 0], kept[c, 1]) for c in range(20)],
             "steps": [(kept[c, 0], kept[c + 1, 0]) for c in range(19)]}
    for name, items in pairs.items():
        a = np.concatenate([x for x, _ in items])
        b = np.concatenate([y for _, y in items])
        corr = np.corrcoef(a, b)[0, 1]
        assert abs(corr) < 4 / np.sqrt(a.size), (name, corr)
    uniform = np.concatenate(list(draws.values()))
    assert 0.0 <= uniform.min() and uniform.max() < 1.0
    counts = np.histogram(uniform, bins=16, range=(0, 1))[0]
    expected = uniform.size / 16
    assert ((counts - expected) ** 2 / expected).sum() < 50  # chi-square, 15 dof: p ~ 1e-5 above 50


def test_drop_path_key_is_a_pure_function_of_seed_rank_counter():
    """Exact resume needs masks that depend on (seed, rank, counter, layer, sample) only, not on the process history."""
    net = create_model("poolformer_s12", num_classes=10, drop_path_rate=0.5)
    key = DropPathKey(net, seed=3, rank=0)
    assert key.num_layers == 22  # 11 blocks with rate > 0, two branches each
    assert not any(DropPathKey.is_key_name(p.name) for p in net.trainable_params())
    twin = create_model("poolformer_s12", num_classes=10, drop_path_rate=0.5)
    ms.load_param_into_net(twin, {n: p for n, p in net.parameters_dict().items() if not DropPathKey.is_key_name(n)})
    twin_key = DropPathKey(twin, seed=3, rank=0)
    other_rank = create_model("poolformer_s12", num_classes=10, drop_path_rate=0.5)
    ms.load_param_into_net(other_rank, {n: p for n, p in net.parameters_dict().items()
                                        if not DropPathKey.is_key_name(n)})
    rank_key = DropPathKey(other_rank, seed=3, rank=1)
    x = ms.Tensor(np.random.default_rng(0).random((4, 3, 32, 32), np.float32))
    outputs = {}
    for name, model, source in (("net", net, key), ("twin", twin, twin_key), ("rank1", other_rank, rank_key)):
        model.set_train(True)
        for counter in (5, 6, 5):
            source.set_counter(counter)
            outputs.setdefault(name, []).append(model(x).asnumpy())
    np.testing.assert_array_equal(outputs["net"][0], outputs["net"][2])
    np.testing.assert_array_equal(outputs["net"][0], outputs["twin"][0])  # another process, same key: same masks
    assert np.abs(outputs["net"][0] - outputs["net"][1]).max() > 1e-6
    assert np.abs(outputs["net"][0] - outputs["rank1"][0]).max() > 1e-6
    # the masks are exactly floor(u + keep) of the reference uniforms: a branch whose u is >= drop_prob is kept
    layer = [c for _, c in net.cells_and_names() if isinstance(c, DropPath)][-1]
    key.set_counter(9)
    branch = ms.Tensor(np.ones((64, 2, 1, 1), np.float32))
    word = int(key.run_key.asnumpy()) & 0xFFFFFFFF
    expected = np.where(_reference_uniform(word, 9, key.num_layers - 1, 64) >= 0.5, 2.0, 0.0)
    np.testing.assert_array_equal(layer(branch).asnumpy()[:, 0, 0, 0], expected)


@pytest.mark.parametrize("name", ["poolformer_s12", "poolformer_m36"])
def test_initialisation(name):
    net = create_model(name)
    params = net.parameters_dict()
    scale = POOLFORMER_VARIANTS[name].layer_scale_init
    assert np.all(params["network.0.0.layer_scale_1"].asnumpy() == np.float32(scale))
    head = params["head.weight"].asnumpy()
    # trunc_normal(std .02) truncated at +-2 absolute, as timm's trunc_normal_: effectively N(0, .02)
    assert abs(head.std() - 0.02) < 0.002 and abs(head.mean()) < 0.002
    assert not params["head.bias"].asnumpy().any() and not params["network.0.0.mlp.fc1.bias"].asnumpy().any()
    fc1 = params["network.4.0.mlp.fc1.weight"].asnumpy()
    assert abs(fc1.std() - 0.02) < 0.002
    assert np.all(params["norm.gamma"].asnumpy() == 1) and not params["norm.beta"].asnumpy().any()
    assert isinstance(net.network[0][0].norm1, GroupNorm1) and isinstance(net.head, nn.Dense)
