"""Shared test set-up: quiet MindSpore logs, and reference packages that may skip locally but never in CI."""

from __future__ import annotations

import importlib
import os

import pytest

os.environ.setdefault("GLOG_v", "3")

import mindcv_poolformer  # noqa: E402,F401  (sets the fast oneDNN ISA before any conv runs)


def require(module: str):
    """Import a reference/test dependency: skip when it is missing on a dev machine, fail in CI."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module)
