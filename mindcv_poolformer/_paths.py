"""Where the package keeps files between runs: the weights cache and, beside it, the built CPU kernels."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["weights_home"]


def weights_home() -> Path:
    """Where ``pretrained=True`` looks for weights: ``$MINDCV_POOLFORMER_HOME`` or ~/.cache/mindcv_poolformer."""
    return Path(os.environ.get("MINDCV_POOLFORMER_HOME", Path.home() / ".cache" / "mindcv_poolformer"))
