"""MindCV 0.3.0 interop: its poolformer_s12 checkpoints load into ours by name and give the same logits."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from mindcv_poolformer import create_model, load_checkpoint_into

from conftest import require


@pytest.mark.parametrize("size", [64, 224])
def test_mindcv_checkpoint_loads_with_no_key_left_over_and_same_logits(tmp_path, size):
    mindcv = require("mindcv")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    theirs = mindcv.create_model("poolformer_s12")
    rs = np.random.RandomState(0)
    # every parameter random (seeded): layer scales ~ N(1, .5) so the token mixer shows in the logits, and
    # weights ~ N(0, 1/fan_in) so the logits are of order 1 (MindCV's head init, std .02, makes them ~0.5)
    for p in theirs.get_parameters():
        if "layer_scale" in p.name or p.name.endswith("gamma"):
            value = 1 + 0.5 * rs.randn(*p.shape)
        elif len(p.shape) == 1:
            value = 0.1 * rs.randn(*p.shape)
        else:
            value = rs.randn(*p.shape) / np.sqrt(np.prod(p.shape[1:]))
        p.set_data(ms.Tensor(value.astype(np.float32)))
    path = str(tmp_path / "mindcv_s12.ckpt")
    ms.save_checkpoint(theirs, path)
    ours = create_model("poolformer_s12")
    report = load_checkpoint_into(ours, path)
    assert len(report.loaded) == 132 and not report.ignored and not report.reinitialised
    assert report.layout == "mindspore"
    theirs.set_train(False)
    ours.set_train(False)
    x = ms.Tensor(rs.randn(2, 3, size, size).astype(np.float32))
    # MindCV pools with pad_mode="same"; ours divides by the true window count. Equal here, on CPU.
    ref = theirs(x).asnumpy()
    scale = float(np.abs(ref).max())
    diff = float(np.abs(ref - ours(x).asnumpy()).max())
    print(f"MindCV vs ours at {size}: max |logit diff| = {diff:.2e}, logit scale {scale:.2f}")
    # measured: 2.6e-6 at logit scale 3.6 (64), 9.5e-7 at 3.4 (224), i.e. 7e-7 relative: ~10x, relative to the scale
    assert scale > 1, f"MindCV's logits are at most {scale:.2e}: the comparison would prove nothing"
    assert diff <= 5e-6 * scale, f"max |logit diff| {diff:.2e} > 5e-6 x logit scale {scale:.2f}"
