"""``train.py`` run from the tests folder, for the signal and failure tests of ``test_failures_interrupt.py``.

The kills at chosen moments (mid-step, mid-validation, mid-write) are ``tools/kill_soak.py``'s.
"""

from __future__ import annotations

import sys

import mindcv_poolformer  # noqa: F401  (the oneDNN setting, as train.py)

if __name__ == "__main__":
    from mindcv_poolformer.train.cli import main

    sys.argv[0] = "train.py"
    sys.exit(main(sys.argv[1:]))
