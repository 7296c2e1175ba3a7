"""``train.py`` with test hooks that park the process at a chosen moment, for the kill/resume tests.

``KILL_HOOK=save:N`` writes the N-th checkpoint's temp file only halfway, then parks;
``KILL_HOOK=validate:N`` parks at the start of the N-th validation. Parking creates the file
``KILL_MARKER`` and sleeps until the test kills the process. Without ``KILL_HOOK`` this is train.py.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import mindcv_poolformer  # noqa: F401  (the oneDNN setting, as train.py)


def _park() -> None:
    Path(os.environ["KILL_MARKER"]).write_text(str(os.getpid()))
    while True:
        time.sleep(1)


def _install(hook: str) -> None:
    kind, _, nth = hook.partition(":")
    target = int(nth or 1)
    calls = {"n": 0}
    if kind == "save":
        import mindspore as ms

        real_save = ms.save_checkpoint

        def save_half(items, path, *args, **kwargs):
            real_save(items, path, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] == target:
                size = os.path.getsize(path)
                with open(path, "r+b") as fh:
                    fh.truncate(size // 2)
                _park()

        ms.save_checkpoint = save_half
    elif kind == "validate":
        import mindcv_poolformer.train.tasks as evaluate_module  # the name the classification task calls

        real_evaluate = evaluate_module.evaluate

        def parked_evaluate(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == target:
                _park()
            return real_evaluate(*args, **kwargs)

        evaluate_module.evaluate = parked_evaluate
    else:
        raise SystemExit(f"unknown KILL_HOOK {hook!r}")


if __name__ == "__main__":
    if os.environ.get("KILL_HOOK"):
        _install(os.environ["KILL_HOOK"])
    from mindcv_poolformer.train.cli import main

    sys.argv[0] = "train.py"
    sys.exit(main(sys.argv[1:]))
