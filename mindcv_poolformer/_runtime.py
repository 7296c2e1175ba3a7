"""Process-wide runtime settings that must be in place before MindSpore runs its first kernel."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

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


DEVICE_TARGETS = ("Ascend", "GPU", "CPU")


def available_device_targets() -> list[str]:
    """The backends this MindSpore installation can run on (its plugins loaded at import), without logging."""
    import mindspore as ms

    try:  # what mindspore.device_context.*.is_available() consult, minus their warnings on stderr
        from mindspore._c_expression import MSContext

        context = MSContext.get_instance()
        return [t for t in DEVICE_TARGETS if context.is_pkg_support_device(t)]
    except (ImportError, AttributeError):
        modules = {"Ascend": "ascend", "GPU": "gpu", "CPU": "cpu"}
        return [t for t in DEVICE_TARGETS if getattr(ms.device_context, modules[t]).is_available()]


def check_device_target(target: str) -> None:
    """Refuse an absent backend in one line, before ``set_context`` prints a long C++ error and a stack.

    Raises ConfigError naming the target and the backends that are available.
    """
    from .config import ConfigError

    available = available_device_targets()
    if target not in available:
        import mindspore as ms

        raise ConfigError(f"device_target: {target} is not available on this machine (this MindSpore "
                          f"{ms.__version__} can run on: {', '.join(available) or 'nothing'}); pass "
                          f"--device_target {available[0] if available else 'CPU'}")


@contextlib.contextmanager
def native_stderr_only_on_success() -> Iterator[None]:
    """Hold back what is written to file descriptor 2 inside the block; pass it on only if the block succeeds.

    MindSpore's C++ loaders log an ``[ERROR]`` line for a damaged file and then raise; the caller
    turns the exception into one error line, which that log line would duplicate.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    succeeded = False
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
            succeeded = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if succeeded:
                held.seek(0)
                text = held.read()
                if text:
                    os.write(2, text)
