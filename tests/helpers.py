"""Reference-model helpers for parity tests (HF transformers PoolFormer, the reference implementation)."""

from __future__ import annotations

import re

import numpy as np

from mindcv_poolformer.models.metaformer import POOLFORMER_VARIANTS

from conftest import require


def hf_poolformer(name: str, num_classes: int = 1000, seed: int = 0):
    """An HF PoolFormerForImageClassification for ``name`` with EVERY parameter randomised.

    Layer scales ~ N(1, 0.5) and norm affines around 1: with the default 1e-5 layer scale the
    token mixer would be invisible in the logits and a wrong mixer would still pass.
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
                value.copy_(1 + 0.5 * torch.randn(value.shape, generator=gen))
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
