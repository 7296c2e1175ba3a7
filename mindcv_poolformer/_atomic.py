"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one.

A write goes to a hidden temporary file (``.tmp-*`` with the destination's suffix, so writers that
pick a format from the name still do) in the destination's folder, which is renamed onto the
destination only when it is complete. ``durable`` also fsyncs the file and the folder, for
checkpoints a run must be able to resume from after a power cut. A failed write leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

__all__ = ["TEMP_PREFIX", "atomic_path", "atomic_write_json", "atomic_write_text", "fsync_path"]

TEMP_PREFIX = ".tmp-"  # what a resume removes as the remains of an interrupted write


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file or a folder entry to disk (where the platform allows it on folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike, durable: bool = False) -> Iterator[str]:
    """Yield a temporary path to write; it replaces ``dst`` when the block ends without an exception."""
    dst = os.fspath(dst)
    directory = os.path.dirname(os.path.abspath(dst))
    os.makedirs(directory, exist_ok=True)
    name = os.path.basename(dst)
    suffix = name[name.index("."):] if "." in name.lstrip(".") else ""
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, dst)
        if durable:
            fsync_path(directory)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(dst: str | os.PathLike, text: str, durable: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``dst`` atomically."""
    with atomic_path(dst, durable) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)


def atomic_write_json(dst: str | os.PathLike, obj: Any, durable: bool = False) -> None:
    """Write ``obj`` as indented JSON to ``dst`` atomically."""
    atomic_write_text(dst, json.dumps(obj, indent=2), durable)
