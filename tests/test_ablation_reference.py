"""The ablation blocks compute what the paper says: each MetaFormerBlock against an independent numpy block.

Every token mixer (pooling, identity, random matrix, depthwise conv, attention, spatial MLP), norm
(GroupNorm(1), channel LayerNorm, BatchNorm in eval), activation (exact GELU, ReLU, SiLU) and the two
failure cases (no residual, no channel MLP), with every parameter random (norm affines, running
statistics and layer scales included), in eval mode on a 2 x C x 7 x 5 map, at two input scales: 1, and
3e-3, where norm1's input variance (BatchNorm: its running variance) is of the order of eps, so that a
wrong eps shows too (norm2 then sees the O(1) mixer branch). The numpy block
(``helpers.np_metaformer_block``) follows the official code's semantics, not this package's code:
attention has no qkv bias, heads of 32 channels, softmax(q k^T / sqrt(32)) v and a biased projection;
BatchNorm uses its running statistics; LayerNorm normalises the channels of each pixel (eps 1e-5);
the depthwise conv is 3x3, zero padding 1, one filter per channel, with bias.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from mindcv_poolformer.backends import apply_backend
from mindcv_poolformer.backends import cpu as cpu_backend
from mindcv_poolformer.models.layers import make_token_mixer
from mindcv_poolformer.models.metaformer import MetaFormerBlock

from conftest import require_kernel_library
from helpers import np_metaformer_block, randomise_parameters

SHAPE = (7, 5)
DIM = 16

# name: (block options, mixer options). Attention runs at 64 channels: 2 heads of 32.
CASES = {
    "pooling": ({}, {}),
    "pooling5": ({"mixer": "pooling"}, {"pool_size": 5}),
    "identity": ({"mixer": "identity"}, {}),
    "random": ({"mixer": "random"}, {"seed": 3}),
    "dwconv": ({"mixer": "dwconv"}, {"kernel_size": 3}),
    "attention": ({"mixer": "attention", "dim": 64}, {"head_dim": 32}),
    "mlp": ({"mixer": "mlp"}, {}),
    "ln": ({"norm": "ln"}, {}),
    "bn": ({"norm": "bn"}, {}),
    "relu": ({"act": "relu"}, {}),
    "silu": ({"act": "silu"}, {}),
    "no_residual": ({"residual": False}, {}),
    "no_mlp": ({"mlp": False}, {}),
}
TOL = 5e-6  # relative to the output scale; measured up to 6e-7 (attention; float32 against float64)
INPUT_SCALES = {"unit": 1.0, "eps": 3e-3}


def _block(mixer: str = "pooling", norm: str = "gn1", act: str = "gelu", residual: bool = True, mlp: bool = True,
           dim: int = DIM, **mixer_options) -> MetaFormerBlock:
    token_mixer = make_token_mixer(mixer, dim, SHAPE, **mixer_options)
    return MetaFormerBlock(dim, layer_scale_init=1.0, token_mixer=token_mixer, norm=norm, act=act,
                           use_residual=residual, use_mlp=mlp)


@pytest.mark.parametrize("input_scale", list(INPUT_SCALES))
@pytest.mark.parametrize("backend", ["none", "cpu"])
@pytest.mark.parametrize("case", list(CASES))
def test_block_matches_numpy_reference(case, backend, input_scale):
    options, mixer_options = CASES[case]
    s = INPUT_SCALES[input_scale]
    block = _block(**options, **mixer_options)
    if backend == "cpu":
        require_kernel_library()
        apply_backend(block, "cpu")
        fused = case in ("pooling", "pooling5")  # the PoolFormer block; the others keep the model's forward
        assert isinstance(block, cpu_backend.FusedPoolFormerBlock) is fused
    params = randomise_parameters(block, seed=sorted(CASES).index(case))
    for name, param in block.parameters_and_names():  # norm1's running statistics follow the input scale
        if name.startswith("norm1.moving_"):
            params[name] = (params[name] * (s if name.endswith("mean") else s * s)).astype(np.float32)
            param.set_data(ms.Tensor(params[name]))
    block.set_train(False)
    dim = options.get("dim", DIM)
    x = (s * np.random.default_rng(7).normal(0.3, 1.5, (2, dim) + SHAPE)).astype(np.float32)
    reference_options = {k: v for k, v in options.items() if k != "dim"}
    if "pool_size" in mixer_options:
        reference_options["pool_size"] = mixer_options["pool_size"]
    if "head_dim" in mixer_options:
        reference_options["head_dim"] = mixer_options["head_dim"]
    expected = np_metaformer_block(x, params, **reference_options)
    got = block(ms.Tensor(x)).asnumpy()
    scale = float(np.abs(expected).max())
    err = float(np.abs(got - expected).max())
    print(f"{case} ({backend}, input scale {s}): max |block - numpy| = {err:.2e}, output scale {scale:.2f}, "
          f"relative {err / scale:.1e}")
    assert scale > 1
    assert err <= TOL * scale, f"{case}: max |block - numpy| = {err:.2e} at output scale {scale:.2f}"
