"""Everything a user builds on Ascend constructs on a simulated 910A and 910B (no construction-time rejection).

MindSpore 2.10 raises several Ascend constraints in Python while cells are built (``nn.AvgPool2d``
refuses padding on 910B/910_93, read from the SoC's feature table): ``ascend_sim`` makes those
queries answer as each chip would, and these tests build every registered model, the
``features_only`` backbone, the training-step cell and the export graphs in the Ascend backend.
"""

from __future__ import annotations

import numpy as np
import pytest
from ascend_sim import ascend_soc_fixture  # noqa: F401  (the ascend_soc fixture)

from mindcv_poolformer import backends, create_model, list_models
from mindcv_poolformer.amp import apply_amp
from mindcv_poolformer.backends import ascend as ascend_backend
from mindcv_poolformer.config import load_config
from mindcv_poolformer.deploy.export import make_onnx_exportable
from mindcv_poolformer.models.layers import Pooling
from mindcv_poolformer.train.loss import create_loss
from mindcv_poolformer.train.optim import OptimizerSettings, create_optimizer
from mindcv_poolformer.train.step import LossScaleState, TrainStep, WithLoss

SMALL = {"depths": (1, 1, 1, 1)}  # every architecture at one block per stage: construction is what is tested


def _small(name: str) -> dict:
    # the fixed-size mixers are tied to one token-map size; the paper's 224 is the registered one
    return {} if name in ("metaformer_s12_random", "poolformer_s12_pool_attn") else SMALL


def test_every_registered_model_builds(ascend_soc):
    for name in list_models():
        net = create_model(name, num_classes=10, backend="ascend", **_small(name))
        pools = [cell.pool for _, cell in net.cells_and_names() if isinstance(cell, Pooling)]
        native = [isinstance(pool, ascend_backend.AscendAvgPoolExcludePad) for pool in pools]
        # the aclnn count_include_pad=False pooling exactly where MindSpore refuses padded AvgPool2d
        assert all(native) if ascend_soc == "910B" else not any(native), name


def test_features_only_backbone_builds(ascend_soc):
    net = create_model("poolformer_s12", features_only=True, backend="ascend")
    assert net.feature_channels == (64, 128, 320, 512)
    assert backends.applied_backend(net) == ("ascend" if ascend_soc == "910B" else "none")


@pytest.mark.parametrize("amp_level", ["O0", "O2"])
def test_training_step_builds(ascend_soc, amp_level):
    cfg = load_config(overrides={"amp_level": amp_level})
    net = create_model("poolformer_s12", num_classes=10, backend="ascend", drop_path_rate=0.1, **SMALL)
    optimizer = create_optimizer(net, OptimizerSettings.from_config(cfg), np.full(4, 1e-3, np.float32))
    net = apply_amp(net, amp_level)
    step = TrainStep(WithLoss(net, create_loss(cfg["loss"])), optimizer, LossScaleState(2.0 ** 16, True),
                     all_finite=backends.backend_all_finite("ascend"))
    assert step.update.optimizer is optimizer


def test_export_graphs_build(ascend_soc):
    net = create_model("poolformer_s12", num_classes=10, backend="ascend", **SMALL)
    backends.apply_backend(net, "none")  # what MINDIR export writes
    assert backends.applied_backend(net) == "none"
    make_onnx_exportable(create_model("poolformer_s12", num_classes=10, backend="ascend", **SMALL))
