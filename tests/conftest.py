"""Shared test set-up: quiet MindSpore logs, CI detection, the MindSpore mode restored after every test,
reference packages / tools that may skip locally but never in CI, and the rules for running under
pytest-xdist (``-n 2 --dist loadgroup``, README's test command)."""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("GLOG_v", "3")
# MindSpore's CPU collectives give up on a peer after MS_NODE_TIMEOUT (30 s by default). The 2-rank tests'
# ranks compile their first step at different speeds on a loaded 2-core host, and one reached its first
# AllReduce more than 30 s after the other ("Ring ReduceScatter wait receiving [0,1] failed" at load 15);
# every subprocess the tests start inherits this.
os.environ.setdefault("MS_NODE_TIMEOUT", "180")

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


# ---------------------------------------------------------------- pytest-xdist: which tests may run side by side

# ``--dist loadfile``: a file's tests run on one worker, so its module fixtures (trained runs, compiled models,
# workspaces) are built once. (``loadgroup`` cannot group here: xdist 3.8 renames ``item._nodeid``, which pytest 9
# no longer reads.) Tests marked ``two_ranks`` (msrun, mpirun) run one at a time, so four ranks never compete for
# the two cores and their start-up stays far from the launches' timeouts.


def pytest_configure(config: pytest.Config) -> None:
    """xdist hands out files by their number of tests (many first) unless told not to: the order below rules."""
    if getattr(config.option, "loadscopereorder", None) is not None:
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, the files with most ``slow`` tests first (end-to-end runs, many subprocesses), so the run ends on
    short tests and neither worker is left alone with a long file; the order within a file is kept."""
    if getattr(config, "workerinput", None) is None:  # the workers collect; a run without xdist keeps file order
        return
    slow: dict[str, int] = {}
    for item in items:
        slow[item.path.name] = slow.get(item.path.name, 0) + (item.get_closest_marker("slow") is not None)
    rank = {name: (-count, position) for position, (name, count) in enumerate(slow.items())}
    items.sort(key=lambda item: rank[item.path.name])


class RunLocks:
    """File locks shared by the xdist workers of one run. A test marked ``serial`` runs alone (a readers-writer
    lock whose turnstile every test passes first, so a waiting ``serial`` test is not starved); ``two_ranks``
    tests exclude each other only."""

    def __init__(self, run_id: str) -> None:
        base = Path(tempfile.gettempdir()) / f"mindcv-poolformer-xdist-{run_id}"
        self.turnstile, self.lock, self.two_ranks = (Path(f"{base}.{name}") for name in ("turnstile", "lock", "ranks"))

    @contextlib.contextmanager
    def hold(self, exclusive: bool, two_ranks: bool) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            gate, lock = stack.enter_context(open(self.turnstile, "a")), stack.enter_context(open(self.lock, "a"))
            fcntl.flock(gate, fcntl.LOCK_EX)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            finally:
                fcntl.flock(gate, fcntl.LOCK_UN)
            stack.callback(fcntl.flock, lock, fcntl.LOCK_UN)
            if two_ranks:
                ranks = stack.enter_context(open(self.two_ranks, "a"))
                fcntl.flock(ranks, fcntl.LOCK_EX)
                stack.callback(fcntl.flock, ranks, fcntl.LOCK_UN)
            yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Hold the locks over set-up (module fixtures included), call and teardown; only in an xdist worker (not in
    a pytest a test starts, which inherits the worker's environment)."""
    worker = getattr(item.config, "workerinput", None)
    if worker is None:
        yield
        return
    locks = RunLocks(worker["testrunuid"])
    with locks.hold(exclusive=item.get_closest_marker("serial") is not None,
                    two_ranks=item.get_closest_marker("two_ranks") is not None):
        yield
