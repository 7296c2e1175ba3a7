"""bench/segmentation_speed.py's and bench/conv3x3.py's argument checks: one-line errors (exit code 2) before
anything is measured.

No end-to-end run here: even at 64x64, batch 1, without the ``torch.compile`` rows, the script took
over five minutes on the shared 2-core host (building mmseg's model, MindSpore's graph compile, a
subprocess per row), far above the suite's budget for a smoke test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "segmentation_speed.py"
CONV_SCRIPT = SCRIPT.with_name("conv3x3.py")


def test_bad_flags_are_one_line_errors(tmp_path):
    for flags, needle in ((["--rows", "ours-graph"], "unknown --rows ours-graph; accepted: all, or any of"),
                          (["--size", "100"], "--size must be a positive multiple of 32, got 100"),
                          (["--rounds", "0"], "--rounds must be >= 1, got 0")):
        proc = subprocess.run([sys.executable, str(SCRIPT), *flags, "--out", str(tmp_path)], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr and "Traceback" not in proc.stderr
        assert not any(tmp_path.iterdir())  # nothing written


def test_conv3x3_bench_bad_flags_are_one_line_errors(tmp_path):
    for flags, needle in ((["--rounds", "0"], "--rounds must be >= 1, got 0"),
                          (["--iters", "-1"], "--iters must be >= 1, got -1")):
        proc = subprocess.run([sys.executable, str(CONV_SCRIPT), *flags, "--out", str(tmp_path)], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr and "Traceback" not in proc.stderr
        assert not any(tmp_path.iterdir())
