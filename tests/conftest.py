"""Shared test set-up: quiet MindSpore logs, CI detection, the MindSpore mode restored after every test,
and reference packages / tools that may skip locally but never in CI."""

from __future__ import annotations

import importlib
import os
import shutil

import pytest

os.environ.setdefault("GLOG_v", "3")

import mindspore as ms  # noqa: E402

import mindcv_poolformer  # noqa: E402,F401  (sets the fast oneDNN ISA before any conv runs)

# What a CI variable holds when it says "not CI"; anything else it is set to (true, 1, yes, or a system's
# own name, e.g. Woodpecker's CI=woodpecker) means CI.
_NOT_CI = ("", "0", "false", "no", "off", "n", "f")


def in_ci() -> bool:
    """Whether the tests run in CI: ``$CI`` is set to anything but an empty/false value (case-insensitive)."""
    return os.environ.get("CI", "").strip().lower() not in _NOT_CI


def require(module: str):
    """Import a reference/test dependency: skip when it is missing on a dev machine, fail in CI."""
    if in_ci():
        return importlib.import_module(module)
    return pytest.importorskip(module)


def require_tool(name: str, install: str, path: str | None = None) -> str:
    """The path of executable ``name``: skip when it is missing on a dev machine, fail in CI; ``install`` says how."""
    found = (shutil.which(name, path=path) if path else None) or shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed ({install})"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_mpirun() -> str:
    """``mpirun`` for the 2-rank tests: Open MPI (MindSpore reads Open MPI's environment variables only)."""
    return require_tool("mpirun", "Open MPI: apt-get install openmpi-bin, as .ci/run does")


def require_kernel_library() -> str:
    """The fused CPU kernels' library: skip when it cannot be built on a dev machine, fail in CI."""
    from mindcv_poolformer import kernels

    path = kernels.library_path()
    if path is None:
        message = "the fused CPU kernels did not build (no working C++ compiler: install g++)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(autouse=True)
def _restore_mindspore_mode():
    """Tests switch between GRAPH and PYNATIVE mode: each one leaves the mode as it found it."""
    mode = ms.get_context("mode")
    yield
    if ms.get_context("mode") != mode:
        ms.set_context(mode=mode)
