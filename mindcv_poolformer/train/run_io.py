"""Run-directory bookkeeping: the overwrite guard, checkpoints (keep-last-K + best), metrics.csv, curves.png."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import CheckpointError, save_state_dict
from ..config import ConfigError

__all__ = ["LOSS_LOG_FIELDS", "METRIC_FIELDS", "SEGMENTATION_METRIC_FIELDS", "RUN_FILES", "STEP_LOG_ENV",
           "check_run_dir", "CheckpointManager", "MetricsLog", "Progress", "read_training_state", "read_step_log",
           "remove_stale_temp_files"]

_LOG = logging.getLogger("mindcv_poolformer")

METRIC_FIELDS = ("epoch", "step", "train_loss", "lr", "val_top1", "val_top5", "img_per_s", "epoch_time")
SEGMENTATION_METRIC_FIELDS = ("epoch", "step", "train_loss", "lr", "val_miou", "val_aacc", "val_macc", "img_per_s",
                              "epoch_time")
# an iteration run's training loss, one row per log_interval steps (its metrics.csv has a row per validation only)
LOSS_LOG_FIELDS = ("epoch", "step", "train_loss", "lr")
RUN_FILES = ("metrics.csv", "curves.png", "checkpoints.json", "config.yaml", "predictions.png", "loss.csv")
_CKPT_NAME = re.compile(r"^(?P<model>.+)-e(?P<epoch>\d+)-s(?P<step>\d+)\.(?P<fmt>safetensors|ckpt)$")
_TEMP_PREFIX = ".tmp-"  # save_state_dict's temp files: complete only once renamed
STATE_PREFIX = "train_state."
# Debug/test switch: a path to append one JSON line per optimizer step to (tools/kill_soak.py reads it to
# compare the loss of every step, replays included, with an uninterrupted run's, and to see where a
# resumed process started). Off unless set.
STEP_LOG_ENV = "MINDCV_POOLFORMER_STEP_LOG"


def _checkpoints_in(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".ckpt") and
                  not p.name.startswith(_TEMP_PREFIX))


def remove_stale_temp_files(directory: str | os.PathLike) -> int:
    """Delete the temp files of checkpoint writes that a killed process never renamed; returns how many."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    stale = [p for p in directory.iterdir() if p.name.startswith(_TEMP_PREFIX) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def _check_writable(directory: Path) -> None:
    """Create ``directory`` and a probe file in it now, before hours of compute depend on it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=_TEMP_PREFIX, dir=directory):
            pass
    except OSError as exc:
        raise ConfigError(f"ckpt_save_dir: {directory} is not writable ({exc.strerror or exc}); "
                          "pass a directory you can write to") from None


def check_run_dir(ckpt_save_dir: str | os.PathLike, resume: str | None = None, overwrite: bool = False) -> None:
    """Refuse to write into a ckpt_save_dir that holds another run, unless resuming or overwriting.

    With ``overwrite`` the previous run's checkpoints and run files are removed (by the caller on
    rank 0, via ``clear_run_dir``), so metrics.csv never mixes two runs.
    """
    directory = Path(ckpt_save_dir)
    existing = _checkpoints_in(directory) + [directory / f for f in RUN_FILES[:3] if (directory / f).exists()]
    if existing and not resume and not overwrite:
        raise ConfigError(f"ckpt_save_dir: {directory} already holds a run ({existing[0].name}, ...); "
                          "pass --resume auto to continue it, --overwrite True to replace it, or another "
                          "--ckpt_save_dir")
    _check_writable(directory)


def clear_run_dir(directory: str | os.PathLike) -> None:
    """Remove a previous run's checkpoints and run files (``--overwrite True``)."""
    directory = Path(directory)
    for path in _checkpoints_in(directory) + [directory / f for f in RUN_FILES]:
        if path.exists():
            path.unlink()


def read_training_state(params: Mapping[str, Any]) -> dict[str, float]:
    """The ``train_state.*`` scalars of a loaded checkpoint."""
    out = {}
    for name, value in params.items():
        if name.startswith(STATE_PREFIX):
            arr = value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)
            out[name[len(STATE_PREFIX):]] = float(arr.reshape(-1)[0])
    return out


class CheckpointManager:
    """Writes checkpoints atomically, keeps the newest ``keep`` (or the ``keep`` best for top_k) and ``best``.

    ``checkpoints.json`` indexes them (with their top-1); files a killed process wrote but never
    indexed are adopted on start, so pruning still sees every checkpoint.
    """

    def __init__(self, directory: str | os.PathLike, model: str, fmt: str, keep: int, policy: str) -> None:
        self.directory = Path(directory)
        self.model = model
        self.fmt = fmt
        self.keep = keep
        self.policy = policy
        self.index_path = self.directory / "checkpoints.json"
        self.entries: list[dict] = []
        if self.index_path.exists():
            try:
                self.entries = json.loads(self.index_path.read_text()).get("checkpoints", [])
            except (ValueError, AttributeError):
                _LOG.warning("%s is not valid JSON; rebuilding the checkpoint index from the file names",
                             self.index_path)
        present = {path.name: match for path, match in self._named()}
        self.entries = [e for e in self.entries if e.get("file") in present]
        indexed = {e["file"] for e in self.entries}
        for name, match in present.items():
            if name not in indexed:
                self.entries.append({"file": name, "epoch": int(match["epoch"]), "step": int(match["step"]),
                                     "top1": None, "time": None})

    @property
    def best_path(self) -> Path:
        return self.directory / f"{self.model}-best.{self.fmt}"

    def _named(self) -> list[tuple[Path, re.Match]]:
        return [(p, m) for p in _checkpoints_in(self.directory) if (m := _CKPT_NAME.match(p.name))]

    def candidates(self) -> list[Path]:
        """This run's step checkpoints, newest (highest global step) first."""
        return [p for _, p in sorted(((int(m["step"]), p) for p, m in self._named()), reverse=True)]

    def latest(self) -> Path | None:
        """Newest checkpoint of this run (by global step), from the file names."""
        found = self.candidates()
        return found[0] if found else None

    def save(self, state: Mapping[str, np.ndarray], epoch: int, step: int, top1: float | None,
             is_best: bool) -> Path:
        """Write one checkpoint (and ``best``); an OSError (disk full) leaves the earlier ones intact.

        ``best`` is written first: the step checkpoint records the new best top-1, so a process killed
        between the two writes must not leave it behind without ``best``, or no later epoch would
        rewrite ``best``. Killed after ``best`` instead, the resume replays from the previous
        checkpoint and writes the same ``best`` again.
        """
        path = self.directory / f"{self.model}-e{epoch:04d}-s{step:08d}.{self.fmt}"
        try:
            if is_best:
                save_state_dict(state, self.best_path)
            save_state_dict(state, path)
        except Exception as exc:  # OSError, MindSpore's RuntimeError, SafetensorError: all "not written"
            previous = self.latest()
            kept = f"the newest complete checkpoint {previous} is intact" if previous else "no checkpoint was written"
            raise CheckpointError(f"could not write checkpoint {path} ({_reason(exc)}); {kept}") from None
        self.entries = [e for e in self.entries if e["file"] != path.name]
        self.entries.append({"file": path.name, "epoch": epoch, "step": step, "top1": top1, "time": time.time()})
        self._prune()
        tmp = self.directory / f"{_TEMP_PREFIX}checkpoints.json"
        try:
            tmp.write_text(json.dumps({"checkpoints": self.entries, "best": self.best_path.name if
                                       self.best_path.exists() else None}, indent=1))
            os.replace(tmp, self.index_path)
        except OSError as exc:  # the checkpoint itself is complete; the index is rebuilt from names on resume
            tmp.unlink(missing_ok=True)
            _LOG.warning("could not update %s (%s)", self.index_path, _reason(exc))
        return path

    def _prune(self) -> None:
        if self.policy == "top_k":
            ranked = sorted(self.entries, key=lambda e: (e["top1"] if e["top1"] is not None else -1.0, e["step"]))
        else:
            ranked = sorted(self.entries, key=lambda e: e["step"])
        while len(ranked) > self.keep:
            victim = ranked.pop(0)
            (self.directory / victim["file"]).unlink(missing_ok=True)
            self.entries.remove(victim)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}, errno {exc.errno}"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def resolve_resume(resume: str) -> Path:
    """An explicit ``--resume PATH`` (``auto`` is the trainer's: newest loadable checkpoint first)."""
    if not os.path.isfile(resume):
        raise CheckpointError(f"resume: checkpoint not found: {resume}")
    return Path(resume)


class MetricsLog:
    """``metrics.csv`` (appended one row per epoch, or per validation of an iteration run, never rewritten) and
    ``curves.png`` beside it. ``fields`` are the columns of a new file; an existing file keeps its header.
    ``name`` gives the same append-once log under another file name (``loss.csv``)."""

    def __init__(self, directory: str | os.PathLike, fields: tuple[str, ...] = METRIC_FIELDS,
                 name: str = "metrics.csv") -> None:
        self.csv_path = Path(directory) / name
        self.png_path = Path(directory) / "curves.png"
        self.fields = fields

    def _header(self) -> list[str]:
        with open(self.csv_path, encoding="utf-8", newline="") as fh:
            return next(csv.reader(fh), []) or list(self.fields)

    def append(self, row: Mapping[str, Any], key: str = "epoch") -> None:
        """Append one row; a row whose ``key`` (epoch, or step) is already logged (replayed after a kill) is skipped."""
        if any(r[key] == str(row[key]) for r in self.rows()):
            return
        new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        fields = list(self.fields) if new else self._header()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in fields})
        text = buffer.getvalue()
        if not new and not self._ends_with_newline():
            text = "\n" + text  # a row cut short by a kill stays behind as one unparsable line
        # one write() on an O_APPEND descriptor: the row lands whole or (killed mid-call) not at all
        fd = os.open(self.csv_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, text.encode("utf-8"))
        finally:
            os.close(fd)

    def _ends_with_newline(self) -> bool:
        with open(self.csv_path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"

    def rows(self) -> list[dict]:
        """The complete rows (a partial line left by a killed write is ignored)."""
        if not self.csv_path.exists():
            return []
        with open(self.csv_path, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
        return [r for r in rows if None not in r and None not in r.values() and r["epoch"].isdigit()
                and r["step"].isdigit()]

    def plot(self, x: str = "epoch", columns: tuple[str, ...] = ("val_top1", "val_top5"),
             loss_log: MetricsLog | None = None) -> None:
        """Loss and the validation ``columns`` (%) versus ``x`` (epoch or step; matplotlib, Agg backend);
        skipped with a note if unavailable. With ``loss_log`` (x = step) the loss panel draws its rows, one per
        log_interval steps, instead of one point per row of this file."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            _LOG.info("matplotlib is not installed: curves.png not written")
            return
        rows = self.rows()
        loss_rows = (loss_log.rows() if loss_log is not None else []) or rows
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ax1.plot([int(r[x]) for r in loss_rows], [float(r["train_loss"]) for r in loss_rows], marker=".")
        ax1.set_xlabel(x)
        ax1.set_ylabel("train loss")
        ax1.grid(alpha=0.3)
        for column in columns:
            val = [(int(r[x]), float(r[column])) for r in rows if r.get(column)]
            if val:
                ax2.plot([v[0] for v in val], [v[1] for v in val], marker=".", label=column.replace("_", " "))
        if ax2.get_legend_handles_labels()[0]:
            ax2.legend()
        ax2.set_xlabel(x)
        ax2.set_ylabel("%")
        ax2.grid(alpha=0.3)
        fig.tight_layout()
        tmp = self.png_path.with_name(".curves.tmp.png")
        fig.savefig(tmp, dpi=80)
        plt.close(fig)
        os.replace(tmp, self.png_path)


class Progress:
    """A progress bar (loss, lr, img/s, ETA) on a TTY; one line every ``interval`` steps otherwise.

    With ``$MINDCV_POOLFORMER_STEP_LOG`` set, every step is also appended to that file as one JSON
    line (``pid``, ``epoch``, global ``step`` counted from 1, ``loss`` as an exact float, ``lr``).
    """

    def __init__(self, total: int, epoch: int, epochs: int, interval: int, enabled: bool = True) -> None:
        self.total = total
        self.epoch = epoch
        self.prefix = f"epoch {epoch}/{epochs}"
        self.interval = interval
        self.enabled = enabled
        self.tty = sys.stdout.isatty()
        self.start = time.perf_counter()
        self.done = 0
        self.step_log = os.environ.get(STEP_LOG_ENV) if enabled else None

    def update(self, step: int, loss: float, lr: float, images: int) -> None:
        if not self.enabled:
            return
        if self.step_log:
            self._log_step(step, loss, lr)
        self.done += images
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = elapsed / max(step, 1) * (self.total - step)
        text = (f"{self.prefix} step {step}/{self.total} loss {loss:.4f} lr {lr:.3e} {rate:.1f} img/s "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        if self.tty:
            width = 24
            filled = int(width * step / max(self.total, 1))
            sys.stdout.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\x1b[K")
            if step == self.total:
                sys.stdout.write("\n")
            sys.stdout.flush()
        elif step % self.interval == 0 or step == self.total:
            print(text, flush=True)

    def _log_step(self, step: int, loss: float, lr: float) -> None:
        record = {"pid": os.getpid(), "epoch": self.epoch, "step": (self.epoch - 1) * self.total + step,
                  "loss": float(loss), "lr": float(lr)}
        # one write() on an O_APPEND descriptor, as MetricsLog: a kill leaves whole lines (or one cut-off last line)
        fd = os.open(self.step_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
        finally:
            os.close(fd)


def read_step_log(path: str | os.PathLike) -> list[dict]:
    """The complete records of a ``$MINDCV_POOLFORMER_STEP_LOG`` file, in order (a cut-off line is dropped)."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records
