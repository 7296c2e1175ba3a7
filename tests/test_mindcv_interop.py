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
    for p in theirs.get_parameters():  # layer scales ~ N(1, .5) so the token mixer shows in the logits
        if "layer_scale" in p.name or p.name.endswith("gamma"):
            p.set_data(ms.Tensor((1 + 0.5 * rs.randn(*p.shape)).astype(np.float32)))
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
    diff = float(np.abs(theirs(x).asnumpy() - ours(x).asnumpy()).max())
    print(f"MindCV vs ours at {size}: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-5
