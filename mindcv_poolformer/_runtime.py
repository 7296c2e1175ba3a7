"""Process-wide runtime settings that must be in place before MindSpore runs its first kernel."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, MutableMapping
from typing import Any

from .errors import ConfigError, ScriptError

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


DEVICE_TARGETS = ("Ascend", "GPU", "CPU")  # the order ``device_target: auto`` tries them in
_COUNTERS = {"Ascend": "ascend_get_device_count", "GPU": "gpu_get_device_count"}
_LOG = logging.getLogger("mindcv_poolformer")


@contextlib.contextmanager
def _native_stderr_discarded() -> Iterator[None]:
    """Drop what C++ writes to file descriptor 2 inside the block (a device probe's own error log)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _has_devices(target: str) -> bool:
    """Whether a loaded Ascend/GPU plugin sees at least one device.

    The unified wheel ships the Ascend and GPU plugins; a plugin loads wherever its libraries do
    (CANN, CUDA), with or without a chip, so a loaded plugin alone does not make a device. The
    plugin's own counter decides; without one (an older wheel) the loaded plugin is trusted.
    """
    from mindspore import _c_expression

    counter = getattr(_c_expression, _COUNTERS[target], None)
    if counter is None:
        return True
    try:
        with _native_stderr_discarded():
            return int(counter()) > 0
    except Exception:  # the counter raises when the driver finds no device
        return False


@functools.lru_cache(maxsize=1)
def _probe_device_targets() -> tuple[str, ...]:
    import mindspore as ms

    try:  # what mindspore.device_context.*.is_available() consult, minus their warnings on stderr
        from mindspore._c_expression import MSContext

        context = MSContext.get_instance()
        loaded = [t for t in DEVICE_TARGETS if context.is_pkg_support_device(t)]
    except (ImportError, AttributeError):
        modules = {"Ascend": "ascend", "GPU": "gpu", "CPU": "cpu"}
        loaded = [t for t in DEVICE_TARGETS if getattr(ms.device_context, modules[t]).is_available()]
    return tuple(t for t in loaded if t == "CPU" or _has_devices(t))


def available_device_targets() -> list[str]:
    """The backends this machine can run on: the plugin loaded at ``import mindspore`` and, for Ascend/GPU, a device.

    Probed once per process (plugins load only at import) and without logging.
    """
    return list(_probe_device_targets())


def check_device_target(target: str) -> None:
    """Refuse an absent backend in one line, before ``set_device`` prints a long C++ error and a stack.

    Raises ConfigError naming the target and the backends that are available.
    """
    available = available_device_targets()
    if target not in available:
        import mindspore as ms

        raise ConfigError(f"device_target: {target} is not available on this machine (this MindSpore "
                          f"{ms.__version__} can run on: {', '.join(available) or 'nothing'}); pass "
                          f"--device_target {available[0] if available else 'CPU'} or auto")


def resolve_device_target(value: str) -> str:
    """``auto``: the first of Ascend, GPU, CPU that is available; an explicit target must be available.

    MindCV recipes carry no ``device_target`` (MindCV defaults to Ascend): with auto they run on
    Ascend where there is one and still run on a CPU-only machine.
    """
    if value == "auto":
        available = available_device_targets()
        return next((t for t in DEVICE_TARGETS if t in available), "CPU")
    check_device_target(value)
    return value


def describe_device(value: str, target: str, jit_level: str = "auto") -> str:
    """The log line naming the device and why: ``device: CPU (auto: no Ascend or GPU found)``."""
    if value != "auto":
        why = "as configured"
    elif target == DEVICE_TARGETS[0]:
        why = f"auto: {target} found"
    else:
        why = f"auto: no {' or '.join(DEVICE_TARGETS[:DEVICE_TARGETS.index(target)])} found"
    jit = "" if jit_level == "auto" else f", jit_level {jit_level}"
    return f"device: {target} ({why}){jit}"


def _device_id(target: str) -> int | None:
    """The device of this rank where MindSpore would not pick it itself.

    ``ms.set_device`` without an id lets msrun negotiate one, but under every other launcher it
    means device 0 for all ranks; Open MPI's local rank, or a rank table's ``DEVICE_ID``, says which.
    """
    if target == "CPU" or os.environ.get("MS_ROLE"):
        return None
    for var in ("OMPI_COMM_WORLD_LOCAL_RANK", "DEVICE_ID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def _set_device(target: str) -> None:
    """``ms.set_device`` once per process; again with the same target it is a no-op.

    MindSpore fixes the device at the first ``set_device`` (a second one with another target or id
    raises) or at the first kernel run (then ``set_device`` raises even for the same target), so
    scripts called one after another in one process (tests, notebooks) must not set it twice.
    """
    import mindspore as ms
    from mindspore._c_expression import DeviceManagerConf, MSContext

    conf = DeviceManagerConf.get_instance()
    if conf.is_device_enable():
        current = conf.get_device_target()
        # msrun's scheduler process runs the script too; set_device puts it on the CPU instead of an NPU
        if current == target or (current == "CPU" and os.environ.get("MS_ROLE") == "MS_SCHED"):
            return
    else:
        current = ms.get_context("device_target")
        try:
            ms.set_device(target, _device_id(target))
            return
        except RuntimeError:  # kernels already ran on the context's device
            MSContext.get_instance().set_device_target_inner(current)  # set_device switched it before refusing
            if current == target:
                return
    raise ScriptError(f"device_target: this process already runs on {current} and MindSpore cannot switch it to "
                      f"{target}; start a new process for {target}")


def setup_device(target: str, mode: int, jit_level: str = "auto") -> None:
    """Device, execution mode (0 GRAPH, 1 PYNATIVE) and compile level, before any kernel or ``init()`` runs.

    ``jit_level`` auto leaves MindSpore's default (O0 on CPU, measured in its INFO log); the others
    go to ``set_context(jit_config=...)``, which every Cell compiled in GRAPH_MODE without its own
    ``set_jit_config`` inherits (MindSpore 2.10 logs "The jit_level is: O1" for such a Cell).
    """
    import mindspore as ms

    _set_device(target)
    ms.set_context(mode=ms.GRAPH_MODE if int(mode) == 0 else ms.PYNATIVE_MODE)
    jit_level = resolve_jit_level(jit_level, target)
    if jit_level != "auto":
        if jit_level == "O2":
            _warn_deprecated_o2()
        ms.set_context(jit_config={"jit_level": jit_level})


DVM_FEATURE = "graph_kernel_dvm"


def resolve_jit_level(jit_level: str, target: str) -> str:
    """``auto`` on Ascend: O1 where the SoC has O1's operator-fusion engine, else MindSpore's own default.

    MindSpore 2.10's compilation guide recommends O1 (operator fusion, "an average 15% performance
    acceleration compared to O0", most for memory-access-intensive networks, which PoolFormer's
    norm/pool/GELU/residual chain is). On Ascend that fusion is DVM, which MindSpore's SoC table gives
    to Atlas A2 (910B) and 910_93 only (feature ``graph_kernel_dvm``); for 910A the same table names
    O2 (the GE backend) its default (``jit_level_o2_default_ascend_jit``), and several aclnn-only
    kernels of our graphs (``tools/graph_primitives.py``: Divs, Muls, SumExt) have no GE-free form
    there, so 910A keeps MindSpore's choice. Other targets and explicit levels are returned as given.
    """
    if jit_level != "auto" or target != "Ascend":
        return jit_level
    from mindspore._c_expression import MSContext

    return "O1" if MSContext.get_instance().ascend_soc_supports_feature(DVM_FEATURE) else "auto"


@functools.lru_cache(maxsize=1)
def _warn_deprecated_o2() -> None:
    _LOG.warning("jit_level O2 (the GE backend) is deprecated since MindSpore 2.9 and runs only on Ascend; use O1")


def configure_device(cfg: MutableMapping[str, Any], mode: int | None = None) -> str:
    """Resolve ``cfg['device_target']`` in place (auto becomes the device), set it up, return the log line.

    ``mode`` overrides ``cfg['mode']`` for scripts that always compile (export, MINDIR inference).
    """
    requested = cfg["device_target"]
    target = resolve_device_target(requested)
    setup_device(target, cfg["mode"] if mode is None else mode, cfg["jit_level"])
    cfg["device_target"] = target
    return describe_device(requested, target, resolve_jit_level(cfg["jit_level"], target))


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
