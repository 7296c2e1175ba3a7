"""The locks by which tests/conftest.py lets xdist workers run tests side by side (README's ``-n 2``).

flock locks belong to an open file, so two ``hold`` calls in threads of one process exclude each other as two
workers do; the probes below open the lock files once more and try them without blocking.
"""

from __future__ import annotations

import fcntl
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import RunLocks


@pytest.fixture
def locks(tmp_path, monkeypatch) -> RunLocks:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return RunLocks("run")


def _free(path: Path, mode: int) -> bool:
    """Whether ``mode`` (LOCK_SH or LOCK_EX) could be taken on ``path`` now."""
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def test_a_plain_test_shares_a_serial_test_excludes_two_ranks_tests_exclude_each_other(locks):
    with locks.hold(exclusive=False, two_ranks=False):
        assert _free(locks.lock, fcntl.LOCK_SH) and not _free(locks.lock, fcntl.LOCK_EX)
        assert _free(locks.two_ranks, fcntl.LOCK_EX) and _free(locks.turnstile, fcntl.LOCK_EX)
    with locks.hold(exclusive=True, two_ranks=False):
        assert not _free(locks.lock, fcntl.LOCK_SH)
    with locks.hold(exclusive=False, two_ranks=True):
        assert not _free(locks.two_ranks, fcntl.LOCK_EX) and _free(locks.lock, fcntl.LOCK_SH)
    assert all(_free(p, fcntl.LOCK_EX) for p in (locks.turnstile, locks.lock, locks.two_ranks))  # all released


def test_a_waiting_serial_test_goes_before_the_next_plain_one(locks):
    """Worker 1 runs a test; worker 2 asks for a serial one, then worker 1 for its next: serial comes first."""
    events: list[str] = []
    running, finish = threading.Event(), threading.Event()

    def first() -> None:
        with locks.hold(exclusive=False, two_ranks=False):
            events.append("first in")
            running.set()
            finish.wait(60)
            events.append("first out")

    def run(name: str, exclusive: bool) -> threading.Thread:
        def body() -> None:
            with locks.hold(exclusive=exclusive, two_ranks=False):
                events.append(f"{name} in")
        thread = threading.Thread(target=body)
        thread.start()
        return thread

    threads = [threading.Thread(target=first)]
    threads[0].start()
    assert running.wait(60)
    threads.append(run("serial", True))
    deadline = time.monotonic() + 60
    while _free(locks.turnstile, fcntl.LOCK_EX):  # the serial test waits for the lock, holding the turnstile
        assert time.monotonic() < deadline, "the waiting serial test does not hold the turnstile"
        threads[1].join(0.01)
    threads.append(run("next", False))
    threads[2].join(0.5)
    assert events == ["first in"], "a test ran beside the one the serial test waits for"
    finish.set()
    for thread in threads:
        thread.join(60)
    assert events == ["first in", "first out", "serial in", "next in"]
