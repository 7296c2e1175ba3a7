"""The one atomic-write helper: the destination holds the old file or the whole new one, never a part."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mindcv_poolformer._atomic import TEMP_PREFIX, atomic_path, atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def test_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    dst = tmp_path / "sub" / "out.json"
    atomic_write_json(dst, {"a": 1})
    atomic_write_json(dst, {"a": 2}, durable=True)
    assert json.loads(dst.read_text()) == {"a": 2}
    assert sorted(p.name for p in dst.parent.iterdir()) == ["out.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    dst = tmp_path / "config.yaml"
    atomic_write_text(dst, "old: 1\n")
    with pytest.raises(RuntimeError), atomic_path(dst) as tmp:
        Path(tmp).write_text("new: half")
        raise RuntimeError("disk full")
    assert dst.read_text() == "old: 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_the_temp_file_keeps_the_suffix_and_the_hidden_prefix(tmp_path):
    """Writers that choose a format by name (PIL, MindSpore's save_checkpoint) see the real suffix."""
    with atomic_path(tmp_path / "a.b.safetensors") as tmp:
        name = Path(tmp).name
        assert name.startswith(TEMP_PREFIX) and name.endswith(".b.safetensors")
        assert Path(tmp).parent == tmp_path
        Path(tmp).write_bytes(b"x")
    assert (tmp_path / "a.b.safetensors").read_bytes() == b"x"


def test_a_process_killed_mid_write_leaves_the_old_file_whole(tmp_path):
    dst = tmp_path / "out.json"
    atomic_write_json(dst, {"complete": True})
    code = (f"import os; from mindcv_poolformer._atomic import atomic_path\n"
            f"with atomic_path({str(dst)!r}) as tmp:\n"
            f"    open(tmp, 'w').write('{{\"compl')\n"
            f"    os._exit(9)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert json.loads(dst.read_text()) == {"complete": True}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out.json"]
    assert len(leftovers) == 1 and leftovers[0].startswith(TEMP_PREFIX)  # what a resume clears
