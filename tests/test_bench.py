"""bench/bench.py's own logic: picking the median round, and refusing rows it does not know."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_script", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_median_round_reports_the_middle_round_and_keeps_every_round():
    bench = _bench_module()
    rounds = [{"status": "ok", "img_per_s": v, "first_call_s": i} for i, v in enumerate([30.0, 42.0, 35.0])]
    picked = bench._median_round(rounds)
    assert picked["img_per_s"] == 35.0 and picked["first_call_s"] == 2  # the whole round, not a mix
    assert picked["rounds_img_per_s"] == [30.0, 42.0, 35.0]
    failed = [{"status": "failed: boom"}, {"status": "ok", "img_per_s": 9.0}]
    assert bench._median_round(failed)["img_per_s"] == 9.0
    assert bench._median_round([{"status": "not installed (torch)"}])["status"] == "not installed (torch)"


def test_unknown_rows_and_rounds_are_one_line_errors(tmp_path):
    for flags, needle in ((["--rows", "ours-graph"], "unknown --rows ours-graph"), (["--rounds", "0"], "--rounds")):
        proc = subprocess.run([sys.executable, str(BENCH), *flags, "--out", str(tmp_path)], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr and "Traceback" not in proc.stderr
        assert not any(tmp_path.iterdir())  # nothing written


def test_table_gives_the_median_of_within_round_ratios():
    bench = _bench_module()
    base = {"model": "poolformer_s12", "task": "infer", "status": "ok", "first_call_s": 1.0, "peak_rss_mb": 900.0}
    ours = {**base, "framework": "ours-graph", "img_per_s": 40.0, "rounds_img_per_s": [44.0, 40.0, 30.0]}
    peer = {**base, "framework": "torch-compile", "img_per_s": 30.0, "rounds_img_per_s": [22.0, 32.0, 30.0]}
    row = bench._table([ours, peer], {"poolformer_s12": 1.8e9}).splitlines()[-1]
    assert row.endswith("| 1.33x | 1.25x |")  # 40/30; median of 2.0, 1.25, 1.0
