"""The Ascend SoC simulation answers as MindSpore 2.10 does on 910A / 910B, and leaves nothing behind."""

from __future__ import annotations

import pytest
from ascend_sim import SOCS, ascend_soc_fixture, simulate_ascend, soc_supports_feature  # noqa: F401 (fixture)
from mindspore import amp, nn
from mindspore._c_expression import MSContext
from mindspore.ops.operations import AvgPool3D

FEATURES = ("avg_pool2d_pad_constraint_train_successor", "amp_loss_scale_train_classic_target",
            "train_hq_dtype_line")


def _answers() -> tuple:
    ctx = MSContext.get_instance()
    return (ctx.get_ascend_soc_version(), *(ctx.ascend_soc_supports_feature(f) for f in FEATURES),
            amp._ascend_910a_target(), amp._ascend_910b_target(), amp._ascend_target())


def test_compiled_table_of_the_wheel():
    """The features MindSpore's Python layer asks about, as the wheel's C++ table assigns them."""
    assert [soc_supports_feature("ascend910", f) for f in FEATURES] == [False, True, False]
    assert [soc_supports_feature("ascend910b", f) for f in FEATURES] == [True, False, True]
    assert [soc_supports_feature("ascend910_93", f) for f in FEATURES] == [True, False, True]
    assert not soc_supports_feature("", "train_hq_dtype_line")  # the CPU's empty version
    assert not soc_supports_feature("ascend910b", "no_such_feature")


def test_910b_refuses_padded_avgpool2d():
    with simulate_ascend("910B") as version:
        assert version == "ascend910b"
        with pytest.raises(ValueError, match="pad_mod 'PAD' is not support in Ascend910B"):
            nn.AvgPool2d(3, 1, pad_mode="pad", padding=1)
        nn.AvgPool2d(3, 1, pad_mode="same")  # the unpadded form MindCV uses there
        assert amp._ascend_910b_target() and not amp._ascend_910a_target()


def test_910a_builds_padded_avgpool2d_as_avgpool3d():
    with simulate_ascend("910A") as version:
        assert version == "ascend910"
        pool = nn.AvgPool2d(3, 1, pad_mode="pad", padding=1)
        assert pool.is_expand and isinstance(pool.avg_pool, AvgPool3D)
        assert amp._ascend_910a_target() and not amp._ascend_910b_target()


@pytest.mark.parametrize("soc", sorted(SOCS))
def test_everything_restored_on_exit(soc):
    before = _answers()
    methods = {n: MSContext.__dict__[n] for n in ("ascend_soc_supports_feature", "get_ascend_soc_version")}
    target = amp._ascend_target
    assert before == ("", False, False, False, False, False, False)  # this CPU
    with pytest.raises(RuntimeError, match="inside"):
        with simulate_ascend(soc, device_target=True):
            assert _answers() != before and amp._ascend_target()
            raise RuntimeError("inside")
    assert _answers() == before
    assert amp._ascend_target is target
    assert all(MSContext.__dict__[n] is m for n, m in methods.items())


def test_unknown_chip():
    with pytest.raises(ValueError, match="unknown Ascend chip"):
        with simulate_ascend("310P"):
            pass


def test_fixture_runs_each_chip(ascend_soc):
    expected = SOCS[ascend_soc][0]
    assert MSContext.get_instance().get_ascend_soc_version() == expected
    assert amp._ascend_910b_target() == (ascend_soc == "910B")

