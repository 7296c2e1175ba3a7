"""Reference-model helpers for parity tests (HF transformers PoolFormer, the reference implementation)."""

from __future__ import annotations

import re

import numpy as np

from mindcv_poolformer.models.metaformer import POOLFORMER_VARIANTS

from conftest import require


def hf_poolformer(name: str, num_classes: int = 1000, seed: int = 0, activation_scale: float = 1.0):
    """An HF PoolFormerForImageClassification for ``name`` with EVERY parameter randomised.

    Layer scales ~ N(1, 0.5) and norm affines around 1: with the default 1e-5 layer scale the
    token mixer would be invisible in the logits and a wrong mixer would still pass.
    ``activation_scale`` s multiplies the layer scales and the stem/downsample biases: fed an input of
    scale s, every GroupNorm then sees a variance of order s**2, so with s**2 near the norms' eps (1e-5)
    a wrong eps changes the logits (at the default s = 1 the variances are large and it barely shows).
    """
    torch = require("torch")
    transformers = require("transformers")
    variant = POOLFORMER_VARIANTS[name]
    config = transformers.PoolFormerConfig(
        num_labels=num_classes, depths=list(variant.depths), hidden_sizes=list(variant.widths),
        layer_scale_init_value=variant.layer_scale_init,
    )
    model = transformers.PoolFormerForImageClassification(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if "layer_scale" in key:
                value.copy_(activation_scale * (1 + 0.5 * torch.randn(value.shape, generator=gen)))
            elif "patch_embeddings" in key and key.endswith("bias"):
                value.copy_(activation_scale * 0.1 * torch.randn(value.shape, generator=gen))
            elif "norm" in key and key.endswith("weight"):
                value.copy_(1 + 0.3 * torch.randn(value.shape, generator=gen))
            elif value.ndim == 1:
                value.copy_(0.1 * torch.randn(value.shape, generator=gen))
            else:
                fan_in = int(np.prod(value.shape[1:]))
                value.copy_(torch.randn(value.shape, generator=gen) / np.sqrt(fan_in))
    return model


def hf_logits(model, x: np.ndarray) -> np.ndarray:
    torch = require("torch")
    with torch.no_grad():
        return model(torch.from_numpy(x)).logits.numpy()


def hf_to_official(state: dict) -> dict:
    """Rename an HF state dict to the official sail-sg names (written independently of the converter)."""
    out = {}
    for key, value in state.items():
        if m := re.match(r"poolformer\.encoder\.patch_embeddings\.(\d+)\.projection\.(\w+)", key):
            k = int(m[1])
            out[f"patch_embed.proj.{m[2]}" if k == 0 else f"network.{2 * k - 1}.proj.{m[2]}"] = value
        elif m := re.match(r"poolformer\.encoder\.block\.(\d+)\.(\d+)\.(.+)", key):
            stage, block, rest = int(m[1]), m[2], m[3]
            rest = (rest.replace("before_norm", "norm1").replace("after_norm", "norm2")
                    .replace("output.conv1", "mlp.fc1").replace("output.conv2", "mlp.fc2"))
            out[f"network.{2 * stage}.{block}.{rest}"] = value
        elif key.startswith("classifier."):
            out["head." + key.split(".", 1)[1]] = value
        else:
            out[key] = value  # norm.weight / norm.bias
    return out


def official_to_timm(state: dict, linear_mlp: bool = False) -> dict:
    """Rename official keys to timm 1.x metaformer.py names."""
    out = {}
    for key, value in state.items():
        if key.startswith("patch_embed.proj."):
            out["stem.conv." + key.rsplit(".", 1)[1]] = value
        elif m := re.match(r"network\.(\d+)\.proj\.(\w+)", key):
            out[f"stages.{(int(m[1]) + 1) // 2}.downsample.conv.{m[2]}"] = value
        elif m := re.match(r"network\.(\d+)\.(\d+)\.(.+)", key):
            rest = m[3].replace("layer_scale_1", "layer_scale1.scale").replace("layer_scale_2", "layer_scale2.scale")
            if linear_mlp and rest.endswith("weight") and "mlp" in rest:
                value = value.reshape(value.shape[:2])
            out[f"stages.{int(m[1]) // 2}.blocks.{m[2]}.{rest}"] = value
        elif key.startswith("norm."):
            out["head.norm." + key.split(".", 1)[1]] = value
        elif key.startswith("head."):
            out["head.fc." + key.split(".", 1)[1]] = value
    return out


# ------------------------------------------------------------ a numpy MetaFormer block (float64)
# Written from the paper and the official code (sail-sg/poolformer, its metaformer hybrids), not from
# mindcv_poolformer: x = x + ls1 * mixer(norm1(x)); x = x + ls2 * fc2(act(fc1(norm2(x)))), all NCHW.

EPS = 1e-5  # GroupNorm, channel LayerNorm and BatchNorm2d of the official code and of MindSpore


def randomise_parameters(cell, seed: int = 0) -> dict[str, np.ndarray]:
    """Set EVERY parameter of ``cell`` to random values (returned by name, float32 as set).

    Norm scales, layer scales and BatchNorm variances around 1 (positive), shifts, biases and running
    means ~ N(0, 0.3), weights ~ N(0, 1/fan_in): with identity-like defaults (gamma 1, beta 0, layer
    scale 1e-5, running stats 0/1) a norm or mixer that is wrong, or never called, would still match.
    """
    from mindspore import Tensor

    rng = np.random.default_rng(seed)
    values = {}
    for name, param in cell.parameters_and_names():
        shape = param.shape
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("gamma", "moving_variance") or "layer_scale" in leaf:
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf in ("beta", "bias", "moving_mean"):
            value = rng.normal(0, 0.3, shape)
        else:
            value = rng.normal(0, 1, shape) / np.sqrt(np.prod(shape[1:]))
        values[name] = value.astype(np.float32)
        param.set_data(Tensor(values[name]))
    return values


def _per_channel(v: np.ndarray) -> np.ndarray:
    return v.reshape(1, -1, 1, 1)


def np_norm(kind: str, x: np.ndarray, p: dict, prefix: str) -> np.ndarray:
    """gn1: GroupNorm(1, C) over (C, H, W) per sample; ln: LayerNorm over C per pixel; bn: BatchNorm2d (eval)."""
    if kind == "bn":
        mean, var = _per_channel(p[prefix + "moving_mean"]), _per_channel(p[prefix + "moving_variance"])
    else:
        axes = (1, 2, 3) if kind == "gn1" else (1,)
        mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * _per_channel(p[prefix + "gamma"]) + _per_channel(p[prefix + "beta"])


def np_avgpool_exclude_pad(x: np.ndarray, k: int) -> np.ndarray:
    """AvgPool2d(k, stride 1, padding k//2, count_include_pad=False), by explicit windows."""
    r = k // 2
    out = np.empty_like(x)
    for i in range(x.shape[2]):
        for j in range(x.shape[3]):
            out[:, :, i, j] = x[:, :, max(0, i - r):i + r + 1, max(0, j - r):j + r + 1].mean(axis=(2, 3))
    return out


def _softmax_last(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_mixer(kind: str, x: np.ndarray, p: dict, prefix: str, pool_size: int = 3, head_dim: int = 32) -> np.ndarray:
    """The token mixers of the paper's ablations, on an NCHW map."""
    b, c, h, w = x.shape
    if kind == "pooling":
        return np_avgpool_exclude_pad(x, pool_size) - x
    if kind == "identity":
        return x
    tokens = x.reshape(b, c, h * w)
    if kind in ("random", "mlp"):  # y[:, :, m] = sum_n M[m, n] x[:, :, n]: a fixed or learnt token matrix
        matrix = p[prefix + ("matrix" if kind == "random" else "fc.weight")]
        return np.einsum("mn,bcn->bcm", matrix, tokens).reshape(x.shape)
    if kind == "dwconv":  # k x k, zero padding k//2, one filter per channel, bias
        weight, bias = p[prefix + "weight"], p[prefix + "bias"]
        k = weight.shape[-1]
        r = k // 2
        padded = np.pad(x, ((0, 0), (0, 0), (r, r), (r, r)))
        out = np.zeros_like(x)
        for di in range(k):
            for dj in range(k):
                out += weight[None, :, 0, di, dj, None, None] * padded[:, :, di:di + h, dj:dj + w]
        return out + _per_channel(bias)
    if kind == "attention":  # qkv without bias; q, k, v = thirds of the 3C outputs, heads = slices of head_dim
        t = tokens.transpose(0, 2, 1)  # (B, N, C)
        qkv = t @ p[prefix + "qkv.weight"].T
        heads = []
        for start in range(0, c, head_dim):
            q, k, v = (qkv[:, :, part * c + start:part * c + start + head_dim] for part in range(3))
            attn = _softmax_last(q @ k.transpose(0, 2, 1) * head_dim ** -0.5)  # (B, N, N), rows sum to 1
            heads.append(attn @ v)
        out = np.concatenate(heads, axis=-1) @ p[prefix + "proj.weight"].T + p[prefix + "proj.bias"]
        return out.transpose(0, 2, 1).reshape(x.shape)
    raise ValueError(kind)


def np_activation(kind: str, z: np.ndarray) -> np.ndarray:
    """gelu: exact erf form (the official code's nn.GELU()); gelu_tanh: the tanh approximation; relu; silu."""
    from scipy.special import erf

    if kind == "gelu":
        return 0.5 * z * (1 + erf(z / np.sqrt(2)))
    if kind == "gelu_tanh":
        return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
    if kind == "relu":
        return np.maximum(z, 0)
    if kind == "silu":
        return z / (1 + np.exp(-z))
    raise ValueError(kind)


def _conv1x1(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return np.einsum("kc,bchw->bkhw", weight.reshape(weight.shape[:2]), x) + _per_channel(bias)


def np_metaformer_block(x: np.ndarray, p: dict, prefix: str = "", mixer: str = "pooling", norm: str = "gn1",
                        act: str = "gelu", residual: bool = True, mlp: bool = True, **mixer_options) -> np.ndarray:
    """One MetaFormer block in float64; ``p`` holds the block's parameters by name, ``prefix`` their common start."""
    x = x.astype(np.float64)
    p = {k: v.astype(np.float64) for k, v in p.items() if k.startswith(prefix)}
    branch = _per_channel(p[prefix + "layer_scale_1"]) * np_mixer(
        mixer, np_norm(norm, x, p, prefix + "norm1."), p, prefix + "token_mixer.", **mixer_options)
    x = x + branch if residual else branch
    if not mlp:
        return x
    hidden = np_activation(act, _conv1x1(np_norm(norm, x, p, prefix + "norm2."), p[prefix + "mlp.fc1.weight"],
                                         p[prefix + "mlp.fc1.bias"]))
    branch = _per_channel(p[prefix + "layer_scale_2"]) * _conv1x1(hidden, p[prefix + "mlp.fc2.weight"],
                                                                  p[prefix + "mlp.fc2.bias"])
    return x + branch if residual else branch
