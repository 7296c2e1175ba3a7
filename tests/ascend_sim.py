"""Make MindSpore's Python-level Ascend SoC queries answer as a 910A or 910B would, on the CPU.

MindSpore 2.10 decides several Ascend-only code paths in Python from two queries of its context
(``mindspore._c_expression.MSContext``): ``ascend_soc_supports_feature(name)`` and
``get_ascend_soc_version()``. Every caller in the 2.10.0 wheel (``grep -rn`` over its ``*.py``):

- ``nn/layer/pooling.py`` ``AvgPool2d.__init__``: ``avg_pool2d_pad_constraint_train_successor``
  (a padded AvgPool2d is refused there).
- ``amp.py`` ``_ascend_910a_target``: ``amp_loss_scale_train_classic_target``;
  ``_ascend_910b_target``: ``train_hq_dtype_line`` (``train/data_sink.py`` imports the former).
- ``nn/wrap/loss_scale.py`` ``TrainOneStepWithLossScaleCell`` and ``boost/boost_cell_wrapper.py``:
  the same two amp features.
- ``get_ascend_soc_version()``: ``train/model.py`` ``_check_tft`` (refuses ``ascend910``) and
  ``ops/operations/_custom_ops_utils.py`` (op-info file names ``aic-<version>-ops-info``).

Where the answers come from. The feature table is C++: ``mindspore::ascend_soc::
SocSupportsAscendFeatureForSocVersion(soc_version, feature)``, compiled into
``mindspore/lib/libmindspore_core.so`` of the 2.10.0 wheel (``mindspore/.commit_id``:
``2d550373``, branch ``r2.10``; its ``MsContext::AscendSocSupportsFeature`` calls it with
``ascend_soc_version()``). Its source could not be read: the ``mindspore-ai/mindspore`` mirror is
over the 500 MiB fetch limit and the code index holds no copy of that file. So this module does
not copy a table: it calls that exported function of the installed wheel through ctypes (the
wheel is built with the pre-C++11 libstdc++ ABI, a ``std::string`` there being one pointer to
characters preceded by length, capacity and refcount), i.e. the simulation answers exactly as the
wheel's own table does on that SoC. Enumerating the table's feature strings found in
``libmindspore_core.so`` this way gives, among others: ``ascend910`` (910A) has
``amp_loss_scale_train_classic_target``, ``jit_level_o2_default_ascend_jit`` and the other
``*_train_classic*`` features; ``ascend910b`` (910B) has ``train_hq_dtype_line``,
``avg_pool2d_pad_constraint_train_successor``, ``graph_kernel_dvm`` and the other
``*_successor`` features (shared with ``ascend910_93``).

The version strings are those MindSpore's Ascend plugin maps SoC names to (the name/version table
in ``lib/plugin/libmindspore_ascend.so.2``): ``Ascend910A``, ``Ascend910B``, ``Ascend910ProA``,
``Ascend910ProB``, ``Ascend910PremiumA`` -> ``ascend910``; ``Ascend910B1``..``Ascend910B4``,
``Ascend910B2C``, ``Ascend910B4-1`` -> ``ascend910b``.

The patch sets the two methods on the pybind class ``MSContext`` itself (pybind classes accept
attribute assignment), so every module that imported ``MSContext`` sees it; both are restored on
exit. With ``device_target=True`` ``mindspore.amp._ascend_target`` (``device_target == "Ascend"``)
answers True as well, so ``ms.amp.all_finite`` and the training step take their Ascend branches
(the NPU float-status register on 910A, ``AllFinite`` on 910B); MindSpore itself keeps running
on the CPU, so graphs with Ascend-only kernels compile through the frontend only.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import struct
from collections.abc import Callable, Iterator

import pytest
from mindspore._c_expression import MSContext

__all__ = ["SOCS", "ascend_soc_fixture", "simulate_ascend", "soc_supports_feature"]

# chip -> (MindSpore's SoC version string, a SoC name of that version)
SOCS: dict[str, tuple[str, str]] = {"910A": ("ascend910", "Ascend910A"), "910B": ("ascend910b", "Ascend910B1")}

_FEATURE_SYMBOL = "_ZN9mindspore10ascend_soc37SocSupportsAscendFeatureForSocVersionERKSsS2_"
_PATCHED = ("ascend_soc_supports_feature", "get_ascend_soc_version")


@functools.lru_cache(maxsize=1)
def _feature_function() -> Callable[[int, int], bool]:
    """The wheel's compiled SoC feature lookup (bool f(const std::string& soc, const std::string& feature))."""
    import mindspore

    lib = ctypes.CDLL(os.path.join(os.path.dirname(mindspore.__file__), "lib", "libmindspore_core.so"))
    try:
        fn = getattr(lib, _FEATURE_SYMBOL)
    except AttributeError:
        raise RuntimeError(f"libmindspore_core.so has no {_FEATURE_SYMBOL}: not the MindSpore 2.10 wheel this "
                           "simulation was written against") from None
    fn.restype = ctypes.c_bool
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    return fn


class _CowString:
    """A read-only pre-C++11-ABI ``std::string`` (header, characters, NUL) that C++ can take by const reference."""

    def __init__(self, text: str) -> None:
        raw = text.encode()
        # _Rep: length, capacity, refcount (int, padded to 8), then the characters
        self._rep = ctypes.create_string_buffer(struct.pack("<QQi4x", len(raw), len(raw), 0) + raw + b"\0")
        self._object = ctypes.c_void_p(ctypes.addressof(self._rep) + 24)

    @property
    def ref(self) -> int:
        """Address of the std::string object (what a ``const std::string&`` parameter receives)."""
        return ctypes.addressof(self._object)


def soc_supports_feature(soc_version: str, feature: str) -> bool:
    """Whether MindSpore 2.10's compiled table gives ``feature`` to the SoC version (e.g. ``ascend910b``)."""
    soc, name = _CowString(soc_version), _CowString(feature)
    return bool(_feature_function()(soc.ref, name.ref))


def _soc_version(soc: str) -> str:
    if soc not in SOCS:
        raise ValueError(f"unknown Ascend chip {soc!r}; simulated: {', '.join(SOCS)}")
    return SOCS[soc][0]


@contextlib.contextmanager
def simulate_ascend(soc: str, device_target: bool = False) -> Iterator[str]:
    """Within the block MindSpore's SoC queries answer as ``soc`` ("910A" or "910B"); yields the version string.

    Build cells (their ``__init__`` reads the SoC) and compile graphs (constexpr SoC checks run at
    compile time) inside the block. ``device_target=True`` also makes ``mindspore.amp._ascend_target``
    True (see the module docstring).
    """
    import mindspore.amp as amp

    version = _soc_version(soc)
    saved = {name: MSContext.__dict__[name] for name in _PATCHED}
    saved_target = amp._ascend_target

    def supports(_self: MSContext, feature: str) -> bool:
        return soc_supports_feature(version, feature)

    def soc_version(_self: MSContext) -> str:
        return version

    MSContext.ascend_soc_supports_feature = supports
    MSContext.get_ascend_soc_version = soc_version
    if device_target:
        amp._ascend_target = _always_ascend
    try:
        yield version
    finally:
        for name, method in saved.items():
            setattr(MSContext, name, method)
        amp._ascend_target = saved_target


def _ascend_target_true() -> bool:
    """``mindspore.amp._ascend_target`` of a process whose device target is Ascend."""
    return True


def _make_always_ascend() -> Callable[[], bool]:
    from mindspore.ops import constexpr

    # constexpr like the original, so graphs that call it fold it at compile time
    return constexpr(_ascend_target_true)


_always_ascend = _make_always_ascend()


@pytest.fixture(params=sorted(SOCS), name="ascend_soc")
def ascend_soc_fixture(request: pytest.FixtureRequest) -> Iterator[str]:
    """Fixture ``ascend_soc``: the test runs once per chip ("910A", "910B") inside ``simulate_ascend``; yields it.

    A test module gets it with ``from ascend_sim import ascend_soc_fixture  # noqa: F401``.
    """
    with simulate_ascend(request.param):
        yield request.param
