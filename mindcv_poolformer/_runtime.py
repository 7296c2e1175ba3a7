"""Process-wide runtime settings that must be in place before MindSpore runs its first kernel."""

from __future__ import annotations

import os

# MindSpore's bundled oneDNN picks its AVX-512 code path on AVX-512 CPUs, and for every conv
# except stride-1 1x1 that path falls back to a reference kernel: one 3x3/s2 conv of PoolFormer-S12
# takes ~1 s instead of ~10 ms. Capping the ISA at AVX2 selects the JIT kernels (~50x faster
# end to end; 1x1 convs get ~1.6x slower, a net win measured in bench/bench.py). oneDNN reads the
# variable lazily at its first primitive, so setting it at import time of this package works even
# after `import mindspore`, as long as no conv has run yet. A user's own setting always wins.
_ISA_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def configure_cpu_runtime() -> None:
    """Select the fast oneDNN code path unless the user has chosen one."""
    if os.environ.get("MINDCV_POOLFORMER_KEEP_ISA"):
        return
    if not any(os.environ.get(name) for name in _ISA_VARS):
        os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"
