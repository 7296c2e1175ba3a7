"""The training loop: build everything from one Config, train, validate, checkpoint, resume exactly.

Exact resume: a checkpoint holds the weights, the optimizer moments and ``global_step`` (which is
also the position in the precomputed learning-rate array), the EMA weights, the loss-scale state
and ``train_state.*`` (epoch, micro-batch within the epoch, the best validation score: top-1 or
mIoU). The data order and
augmentation RNG of every epoch depend only on (seed, rank, epoch) (see ``data.py``), so epoch
k+1 after a resume sees the same batches as without the interruption. Stochastic depth masks are
a pure function of (seed, rank, micro-step counter, layer, sample), drawn in the graph
(``DropPathKey``; the counter is ``global_step`` x accumulation + micro-batch) for the same reason:
MindSpore's kernel RNG state cannot be saved on CPU. Only dropout (``drop_rate > 0``, 0 in every recipe) still
draws from the kernel RNG, so its masks after a resume differ.

One loop for every task: ``tasks.py`` supplies the data, loss and validation of classification or
segmentation. A run is epoch-based (``epoch_size``) or iteration-based (``max_iters``, mmseg's
form): then the data restarts a new shuffled epoch when exhausted, ``val_interval`` and
``ckpt_save_interval`` count optimizer steps, and ``metrics.csv`` gets one row per validation,
keyed by step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import signal
import struct
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .._runtime import configure_device
from .._script import ScriptError
from ..amp import apply_amp
from ..backends import backend_all_finite
from ..checkpoint import CheckpointError, load_ms_checkpoint
from ..config import Config, ConfigError
from ..data.listing import augmentation_seed
from ..distributed import DistInfo, all_reduce_sum, init_distributed
from ..factory import create_model
from ..models.layers import DropPathKey
from .data import DataError
from .optim import OptimizerSettings, create_optimizer
from .run_io import (
    LOSS_LOG_FIELDS,
    METRIC_FIELDS,
    SEGMENTATION_METRIC_FIELDS,
    STATE_PREFIX,
    CheckpointManager,
    MetricsLog,
    Progress,
    check_run_dir,
    clear_run_dir,
    read_training_state,
    remove_stale_temp_files,
    resolve_resume,
)
from .schedule import ScheduleSettings, build_lr_schedule
from .step import ApplyAccumulated, LossScaleState, TrainStep, WithLoss, grad_reducer
from .tasks import make_task

__all__ = ["LossScalePlan", "plan_loss_scale", "validate_train_config", "has_training_state",
           "apply_mindcv_resume", "StopSignals", "TrainResult", "TrainingDiverged", "Trainer", "train"]

_LOG = logging.getLogger("mindcv_poolformer")


@dataclass(frozen=True)
class LossScalePlan:
    """The resolved loss scaling: initial value and whether it is dynamic."""
    value: float
    dynamic: bool


def plan_loss_scale(loss_scale_type: str, amp_level: str, loss_scale: float) -> LossScalePlan:
    """Resolve ``loss_scale_type`` (auto: dynamic under mixed precision, any ``amp_level`` but O0; fixed in fp32).

    Steps with non-finite gradients are skipped in every mode (see ``step.py``); a dynamic scale
    also halves on them and doubles after 1000 clean steps. It starts at ``loss_scale`` unless that
    is left at 1, where it starts at 2**16.
    """
    kind = loss_scale_type
    if kind == "auto":
        kind = "dynamic" if amp_level != "O0" else "fixed"
    value = float(loss_scale)
    if kind == "dynamic" and value == 1.0:
        value = 2.0 ** 16
    return LossScalePlan(value, kind == "dynamic")


def validate_train_config(cfg: Mapping[str, Any]) -> LossScalePlan:
    """Training-specific checks beyond the schema (one ConfigError naming the key)."""
    if cfg["amp_level"] != "O0" and cfg["device_target"] == "CPU" and cfg["amp_level"] == "O1":
        raise ConfigError("amp_level: O1 is not supported for training here; use O0, O2 or O3")
    if cfg["mode"] == 1 and cfg["device_target"] == "Ascend" and cfg["dataset_sink_mode"]:
        _LOG.info("dataset_sink_mode needs GRAPH_MODE (mode 0); running without sink")
    if cfg.get("val_amp_level") and cfg["val_amp_level"] != cfg["amp_level"] and cfg["val_while_train"]:
        _LOG.info("val_amp_level %s is validate.py's amp level (as in MindCV); validation during training runs at "
                  "amp_level %s, as MindCV's train.py does", cfg["val_amp_level"], cfg["amp_level"])
    return plan_loss_scale(cfg["loss_scale_type"], cfg["amp_level"], cfg["loss_scale"])


def has_training_state(path: str | os.PathLike) -> bool:
    """Whether a checkpoint file holds this trainer's ``train_state.*``: only ours can be resumed exactly.

    A safetensors header is plain JSON (no Parameters are built); a ``.ckpt`` is read for those entries only.
    """
    path = str(path)
    try:
        if path.endswith(".safetensors"):
            with open(path, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
            return any(name.startswith(STATE_PREFIX) for name in header)
        if not path.endswith(".ckpt"):
            return False
        return bool(load_ms_checkpoint(path, choice_func=lambda name: name.startswith(STATE_PREFIX)))
    except Exception as exc:  # struct/json/MindSpore raise several types for unreadable files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "empty after filter" in first:  # MindSpore's answer for a readable file without those entries
            return False
        raise CheckpointError(f"ckpt_path: {path} is not a readable checkpoint ({first})") from None


def apply_mindcv_resume(cfg: Config) -> None:
    """MindCV's resume form, ``--ckpt_path CKPT --resume_opt True``, becomes ``--resume CKPT`` for our checkpoints.

    MindCV restores its optimizer from ``optim_<model>.ckpt`` beside the weights and takes the epoch
    from the file name, not the data position or the best top-1; its AdamW keeps bias-correction
    powers our optimizer lacks. So a checkpoint without our ``train_state.*`` cannot be continued
    exactly, and that is a one-line error naming what works. Runs after ``init_distributed`` from
    train.py (reading a ``.ckpt`` creates Parameters); a no-op once applied.
    """
    source = cfg["ckpt_path"]
    if not (cfg["resume_opt"] and source):
        if cfg["resume_opt"] and not cfg["resume"]:
            _LOG.warning("resume_opt True has no effect without --ckpt_path (as in MindCV); to continue a run "
                         "use --resume auto")
        cfg["resume_opt"] = False
        return
    if not os.path.isfile(source):
        raise ConfigError(f"ckpt_path: {source} does not exist (resume_opt True resumes from it)")
    if not has_training_state(source):
        raise CheckpointError(f"resume_opt: {source} is not a training checkpoint of this trainer (no train_state.*; "
                              "MindCV's optimizer state cannot be continued here); drop --resume_opt to start from "
                              "its weights, or use --resume PATH|auto to continue a run of this trainer")
    _LOG.info("ckpt_path %s with resume_opt True (MindCV's resume form): resuming as --resume %s", source, source)
    cfg["resume"], cfg["ckpt_path"], cfg["resume_opt"] = source, "", False


class TrainingDiverged(ScriptError):
    """Too many consecutive steps with non-finite loss or gradients: a one-line error, exit code 2."""


@dataclass
class TrainResult:
    """What a run did: per-step losses of this process, per-epoch records (an iteration run: its metrics rows),
    the best validation score (top-1 or mIoU), files.

    ``interrupted`` names the signal (``"SIGTERM"``) when the run stopped early on one, after
    writing ``last_checkpoint``; ``skipped_steps`` counts steps whose gradients were not finite.
    """
    step_losses: list[tuple[int, float]] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    best_top1: float = 0.0
    last_checkpoint: str | None = None
    rank: int = 0
    world: int = 1
    interrupted: str | None = None
    skipped_steps: int = 0


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary; a second one aborts at once.

    Installed only in the main thread (where Python delivers signals); the previous handlers come
    back on exit. The compiled step is C++ code, so the handler runs when the current step returns.
    """
    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            _LOG.warning("second %s: aborting without a checkpoint", name)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.received = name
        _LOG.warning("%s received: stopping after the current step and writing a checkpoint (send it again to "
                     "abort at once)", name)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                signum = getattr(signal, name)
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def _setup_context(cfg: Config) -> None:
    """Device, mode and jit level; a no-op repeat when train.py's CLI has set them up already."""
    configure_device(cfg)


class _Pending(NamedTuple):
    """A micro-step not yet fetched: ``step`` is ``global_step`` before it, ``applied`` None within an accumulation."""
    step: int
    epoch: int
    step_in_epoch: int
    loss: Any
    applied: Any


def _fetch(tensors: list) -> np.ndarray:
    """The values of scalar device tensors as float32, in one device-to-host copy (after the last step is done)."""
    import mindspore as ms
    from mindspore import ops

    if not tensors:
        return np.zeros(0, np.float32)
    return ops.cast(ops.stack(tensors), ms.float32).asnumpy()


@contextmanager
def epoch_sink(step: Any, data: Any, enabled: bool) -> Iterator[Any]:
    """``ms.data_sink(step, data, sink_size=1)`` for one epoch, or None when not sinking; the transfer is closed after.

    ``data_sink`` starts a transfer thread that sends ``data`` to the device queue without end
    (``send(-1)``); left open, one epoch's thread would keep running beside the next. MindSpore's
    ``Model.train`` ends its own with ``stop_send`` and ``release``, and so does this, also when the
    epoch stops early (a signal, ``max_iters``, an error).
    """
    if not enabled:
        yield None
        return
    import mindspore as ms

    run_step = ms.data_sink(step, data, sink_size=1)
    try:
        yield run_step
    finally:
        transfer = getattr(data, "__transfer_dataset__", None)
        if transfer is not None:
            transfer.stop_send()
            transfer.release()


class Trainer:
    """Owns the network, the compiled step, the data and the run directory of one training run."""

    def __init__(self, cfg: Config, dist: DistInfo | None = None) -> None:
        import mindspore as ms
        from mindspore import ParameterTuple


        # seconds by phase, for the run's closing timing line (the demo's time budget is read from it)
        self.timing = {"setup": -time.perf_counter(), "first_step": 0.0, "validation": 0.0, "checkpoints": 0.0,
                       "outputs": 0.0}
        self.cfg = cfg
        apply_mindcv_resume(cfg)
        self.plan = validate_train_config(cfg)
        _setup_context(cfg)
        self.task = make_task(cfg)  # lists the data once: every epoch and validation use it
        self.dist = dist or init_distributed(cfg["distribute"], cfg["device_target"])
        rank, world = self.dist.rank, self.dist.world
        self.task.check_data(rank, world)  # shared over the ranks, all agreeing; before anything is written
        check_run_dir(cfg["ckpt_save_dir"], cfg["resume"], cfg["overwrite"])
        self.run_dir = Path(cfg["ckpt_save_dir"])
        if self.dist.is_main:
            if cfg["overwrite"] and not cfg["resume"]:
                clear_run_dir(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.dump(self.run_dir / "config.yaml")

        self.num_classes = self.task.num_classes()
        n_train = self.task.num_train()
        self.accum = int(cfg["gradient_accumulation_steps"])
        batch = int(cfg["batch_size"])
        micro = (n_train // world) // batch
        self.steps_per_epoch = micro // self.accum
        if self.steps_per_epoch < 1:
            raise DataError(f"{cfg['data_dir']}: {n_train} training images give no full optimizer step of "
                            f"{batch} x {world} ranks x {self.accum} accumulation steps")
        self.max_iters = int(cfg["max_iters"] or 0)
        if self.max_iters:
            self.total_epochs = -(-self.max_iters // self.steps_per_epoch)
        else:
            self.total_epochs = int(cfg["epoch_size"]) + int(cfg["cooldown_epochs"])
        self.global_batch = batch * world * self.accum
        self.lrs = build_lr_schedule(ScheduleSettings.from_config(cfg), self.steps_per_epoch, self.global_batch)

        ms.set_seed(int(cfg["seed"]))  # identical initial weights on every rank
        ckpt = cfg["ckpt_path"] or None
        head = {"dropout": float(cfg["head_dropout"]), "sync_bn": bool(cfg["sync_bn"]),
                "frozen_stages": int(cfg["frozen_stages"])} \
            if self.task.name == "segmentation" else {}
        self.net = create_model(cfg["model"], pretrained=cfg["pretrained"], num_classes=self.num_classes,
                                in_channels=cfg["in_channels"], checkpoint_path=ckpt,
                                drop_path_rate=cfg["drop_path_rate"], drop_rate=cfg["drop_rate"], **head)
        ms.set_seed(augmentation_seed(cfg["seed"], rank, 0))  # dropout differs per rank
        self.drop_path_key = DropPathKey(self.net, int(cfg["seed"]), rank)
        self.optimizer = create_optimizer(self.net, OptimizerSettings.from_config(cfg), self.lrs)
        self.net = apply_amp(self.net, cfg["amp_level"])
        self.scaler = LossScaleState(self.plan.value, self.plan.dynamic)
        reducer = None
        if world > 1:
            reducer = grad_reducer(self.optimizer.parameters, world, ms.get_context("device_target"))
        self.ema = None
        if cfg["ema"]:
            # same order as optimizer.parameters (grouped by weight decay), which the step zips them with
            self.ema = ParameterTuple(self.optimizer.parameters).clone(prefix="ema", init="same")
        clip = float(cfg["clip_value"]) if cfg["clip_grad"] else 0.0
        self.step = TrainStep(WithLoss(self.net, self.task.loss()), self.optimizer, self.scaler,
                              reducer, clip, self.accum, self.ema, float(cfg["ema_decay"]),
                              all_finite=backend_all_finite(),
                              drop_path_key=self.drop_path_key if self.drop_path_key.num_layers else None)
        self.apply_accumulated = ApplyAccumulated(self.step) if self.accum > 1 else None

        self.task.prepare_validation(rank, world)
        self.manager = CheckpointManager(self.run_dir, cfg["model"], cfg["ckpt_format"],
                                         int(cfg["keep_checkpoint_max"]), cfg["ckpt_save_policy"])
        self.metrics = MetricsLog(self.run_dir, SEGMENTATION_METRIC_FIELDS if self.task.name == "segmentation"
                                  else METRIC_FIELDS)
        self.loss_log = MetricsLog(self.run_dir, LOSS_LOG_FIELDS, name="loss.csv")
        self.log_window = (0.0, 0)  # an iteration run's loss since the last loss.csv row (sum, count)
        self.global_step = 0
        self.start_epoch = 0
        self.skip_micro = 0
        self.best_top1 = -1.0  # the best validation score (top-1 or mIoU, %): the name checkpoints carry
        self.epoch_loss = self.resumed_epoch_loss = (0.0, 0)
        # iteration runs: loss sum, loss count, images and start time since the last metrics row
        self.window = [0.0, 0, 0, time.perf_counter()]
        self.saved_step = -1
        self.resumed_from: str | None = None
        self.nonfinite_streak = 0
        self._pending: list[_Pending] = []  # steps run whose loss and flag are still on the device (_flush)
        self.scale_before = (self.plan.value, 0)
        if cfg["resume"] == "auto":
            self._resume_auto()
        elif cfg["resume"]:
            self._resume(resolve_resume(cfg["resume"]))
        self.timing["setup"] += time.perf_counter()

    # ------------------------------------------------------------------ checkpoint state

    def _state_parameters(self) -> dict:

        params = {}
        for cell in (self.step,) + ((self.apply_accumulated,) if self.apply_accumulated else ()):
            for param in cell.get_parameters():
                if not DropPathKey.is_key_name(param.name):  # the counter follows from global_step (fit)
                    params.setdefault(param.name, param)
        for param in self.optimizer.get_parameters():
            params.setdefault(param.name, param)
        return params

    def state_dict(self, epoch: int, micro_in_epoch: int) -> dict[str, np.ndarray]:
        state = {}
        for name, param in self._state_parameters().items():
            if name.startswith("accum."):
                continue  # checkpoints are written at optimizer-step boundaries, where buffers are zero
            value = param.asnumpy()
            state[name] = value if value.ndim else value.reshape(1)
        state[STATE_PREFIX + "epoch"] = np.array([epoch], np.int64)
        state[STATE_PREFIX + "micro_in_epoch"] = np.array([micro_in_epoch], np.int64)
        state[STATE_PREFIX + "global_step"] = np.array([self.global_step], np.int64)
        state[STATE_PREFIX + "best_top1"] = np.array([self.best_top1], np.float32)
        # a mid-epoch checkpoint carries the loss sum so far, so the resumed epoch's mean loss is the same
        # (an iteration run: the loss since the last metrics row, which may span epochs)
        kept = self.window[:2] if self.max_iters else (self.epoch_loss if micro_in_epoch else (0.0, 0))
        state[STATE_PREFIX + "epoch_loss_sum"] = np.array([kept[0]], np.float64)
        state[STATE_PREFIX + "epoch_loss_count"] = np.array([kept[1]], np.int64)
        state[STATE_PREFIX + "log_loss_sum"] = np.array([self.log_window[0]], np.float64)
        state[STATE_PREFIX + "log_loss_count"] = np.array([self.log_window[1]], np.int64)
        state[STATE_PREFIX + "world"] = np.array([self.dist.world], np.int64)
        return state

    def _resume_auto(self) -> None:
        """Resume from the newest checkpoint of the run that loads; skip (and report) unreadable ones.

        Checkpoints are written atomically, so an unreadable one means outside damage (a copy cut
        short, a full disk on another tool's write); falling back keeps a long run going.
        """
        if self.dist.is_main:
            removed = remove_stale_temp_files(self.run_dir)
            if removed:
                _LOG.info("resume: removed %d partial checkpoint file(s) of an interrupted write", removed)
        candidates = self.manager.candidates()
        if not candidates:
            _LOG.info("resume auto: no checkpoint in %s, starting a new run", self.run_dir)
            return
        for path in candidates:
            try:
                self._resume(path)
                return
            except CheckpointError as exc:
                _LOG.warning("resume auto: skipping %s (%s)", path.name, exc)
        raise CheckpointError(f"resume auto: none of the {len(candidates)} checkpoints in {self.run_dir} is readable "
                              f"(newest: {candidates[0].name}); pass --resume PATH or --overwrite True")

    def _resume(self, path: Path) -> None:
        import mindspore as ms

        fmt = "safetensors" if path.suffix == ".safetensors" else "ckpt"
        try:
            loaded = load_ms_checkpoint(str(path), format=fmt)
        except Exception as exc:  # MindSpore raises several types for unreadable files
            raise CheckpointError(f"resume: {path} is not a readable checkpoint ({str(exc).splitlines()[0]})") from None
        state = read_training_state(loaded)
        if "epoch" not in state:
            raise CheckpointError(f"resume: {path} is not a training checkpoint of this trainer (no train_state.*); "
                                  "to start from its weights use --ckpt_path")
        # the learning-rate array is derived from the config (a resume may extend epoch_size), not state
        lr = self.optimizer.learning_rate
        derived = {p.name for p in lr.get_parameters()} if hasattr(lr, "get_parameters") else {lr.name}
        targets = {n: p for n, p in self._state_parameters().items()
                   if not n.startswith("accum.") and n not in derived}
        missing = [n for n in targets if n not in loaded]
        if missing:
            raise CheckpointError(f"resume: {path} lacks {len(missing)} entries of this run "
                                  f"({', '.join(missing[:4])}); other model/optimizer/ema settings?")
        values = {n: loaded[n].asnumpy() for n in targets}
        wrong = [f"{n}: {tuple(v.shape)} vs {tuple(targets[n].shape)}" for n, v in values.items()
                 if v.size != int(np.prod(targets[n].shape))]
        if wrong:
            raise CheckpointError(f"resume: {path} does not fit this run ({len(wrong)} shapes differ: "
                                  f"{'; '.join(wrong[:3])}); another model or num_classes?")
        for name, param in targets.items():
            param.set_data(ms.Tensor(values[name].reshape(param.shape).astype(param.asnumpy().dtype)))
        self.start_epoch = int(state["epoch"])
        self.skip_micro = int(state["micro_in_epoch"])
        self.global_step = self.saved_step = int(state["global_step"])
        self.best_top1 = float(state["best_top1"])
        self.resumed_epoch_loss = (float(state.get("epoch_loss_sum", 0.0)), int(state.get("epoch_loss_count", 0)))
        self.log_window = (float(state.get("log_loss_sum", 0.0)), int(state.get("log_loss_count", 0)))
        if self.max_iters:
            self.window = [*self.resumed_epoch_loss, 0, time.perf_counter()]
            self.resumed_epoch_loss = (0.0, 0)
        self.resumed_from = str(path)
        if int(state.get("world", self.dist.world)) != self.dist.world:
            _LOG.warning("resume: the checkpoint was written by %d ranks, this run has %d; the data order differs",
                         int(state["world"]), self.dist.world)
        if float(self.cfg["drop_rate"]) > 0 or (self.task.name == "segmentation" and self.cfg["head_dropout"] > 0):
            _LOG.warning("resume: dropout (drop_rate %s, or the FPN head's head_dropout) draws from MindSpore's kernel "
                         "RNG, which cannot be restored; its masks differ from the uninterrupted run (drop path masks "
                         "do not)", self.cfg["drop_rate"])
        _LOG.info("resumed from %s: epoch %d, step %d", path, self.start_epoch + (1 if self.skip_micro else 0),
                  self.global_step)

    def _save(self, finished_epochs: int, micro_in_epoch: int, top1: float | None, is_best: bool,
              only_if_new: bool = False) -> None:
        """Checkpoint after ``finished_epochs`` epochs plus ``micro_in_epoch`` micro-batches of the next one."""
        self._flush()  # the losses, streak and position the checkpoint records
        if only_if_new and self.saved_step == self.global_step:
            return
        self.saved_step = self.global_step
        if not self.dist.is_main:
            return
        start = time.perf_counter()
        state = self.state_dict(finished_epochs, micro_in_epoch)
        label = finished_epochs + (1 if micro_in_epoch else 0)  # the epoch the file belongs to, from 1
        path = self.manager.save(state, label, self.global_step, top1, is_best)
        self.timing["checkpoints"] += time.perf_counter() - start
        self.result.last_checkpoint = str(path)
        if self.nonfinite_streak == 0:
            self.checkpoint_before_streak = str(path)

    # ------------------------------------------------------------------ evaluation

    def validate(self) -> tuple[dict[str, float | None], float | None, float | None]:
        """(the task's metric columns, score, EMA score or None) over the whole validation split, all ranks.

        The score (top-1 or mIoU, %) picks the best checkpoint; None when there is nothing to validate.
        """
        # a run that diverged stops before validating, as when each step was read at once; and the pending
        # steps' compute counts as training, not validation
        self._flush()
        start = time.perf_counter()
        try:
            return self._validate()
        finally:
            self.timing["validation"] += time.perf_counter() - start

    def _validate(self) -> tuple[dict[str, float | None], float | None, float | None]:
        distributed = self.dist.world > 1
        found = self.task.evaluate(self.net, distributed)
        if found is None:
            return {k: float("nan") for k in self.task.metric_columns}, None, None
        columns, score = found
        ema_score = None
        if self.ema is not None:
            import mindspore as ms

            weights = list(self.optimizer.parameters)
            backup = [w.asnumpy().copy() for w in weights]
            for w, e in zip(weights, self.ema):
                w.set_data(e.data.copy())
            ema_score = self.task.evaluate(self.net, distributed)[1]
            for w, b in zip(weights, backup):
                w.set_data(ms.Tensor(b))
        self.net.set_train(True)
        return columns, score, ema_score

    # ------------------------------------------------------------------ the loop

    def fit(self, stop_after_epoch: int | None = None, stop_after_step: int | None = None) -> TrainResult:
        """Train from the current position to the end (or to ``stop_after_epoch``/``stop_after_step``, for tests).

        ``stop_after_step`` stops (with a checkpoint) once ``global_step`` reaches it, like a signal would.

        SIGINT/SIGTERM stop the run at the next optimizer-step boundary with a checkpoint
        (``result.interrupted``); ``max_nonfinite_steps`` consecutive skipped steps raise
        ``TrainingDiverged`` naming the last checkpoint written before them.
        """
        cfg = self.cfg
        self.result = TrainResult(rank=self.dist.rank, world=self.dist.world)
        self.nonfinite_streak = 0
        self.checkpoint_before_streak = self.result.last_checkpoint = self.resumed_from
        self.stop_after_step = stop_after_step
        if self.dist.is_main:
            length = (f"{self.max_iters} iterations ({self.steps_per_epoch} a data epoch)" if self.max_iters else
                      f"{self.total_epochs} epochs x {self.steps_per_epoch} steps")
            _LOG.info("training %s (%s): %s, global batch %d, peak lr %.3e, %d rank(s)", cfg["model"],
                      self.task.name, length, self.global_batch, float(self.lrs.max()), self.dist.world)
        self.window[3] = fit_start = time.perf_counter()
        self._pending = []
        self._read_scale()
        self.drop_path_key.set_counter(self.global_step * self.accum)  # checkpoints are at optimizer steps
        with StopSignals() as self.signals:
            for epoch in range(self.start_epoch, self.total_epochs):
                record = self._train_epoch(epoch)
                if record is None:  # stopped by a signal; the checkpoint is written
                    break
                if self.max_iters and self.global_step >= self.max_iters:
                    break
                if not self.max_iters:  # an iteration run's records are its metrics rows (_log_row)
                    self.result.epochs.append(record)
                if self._stop_requested():
                    self._save(epoch + 1, 0, None, False, only_if_new=True)
                    self.result.interrupted = self.signals.received or "a signal on another rank"
                    break
                if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                    break
        if self.result.interrupted is None and (not self.max_iters or self.global_step >= self.max_iters):
            start = time.perf_counter()
            self.task.finish(self.net, self.run_dir)
            self.timing["outputs"] = time.perf_counter() - start
        self.result.best_top1 = self.best_top1
        self._log_timing(time.perf_counter() - fit_start)
        return self.result

    def _log_timing(self, fit_seconds: float) -> None:
        """One line of where the run's time went: the training steps are the rest of ``fit`` after the others."""
        t = self.timing
        steps = fit_seconds - t["first_step"] - t["validation"] - t["checkpoints"] - t["outputs"]
        if self.dist.is_main:
            _LOG.info("timing: setup %.1f s (data, model, optimizer), first step %.1f s (graph compile), training "
                      "steps %.1f s, validation %.1f s, checkpoints %.1f s, final outputs %.1f s", t["setup"],
                      t["first_step"], steps, t["validation"], t["checkpoints"], t["outputs"])

    def _stop_requested(self) -> bool:
        """Whether any rank got SIGINT/SIGTERM: ranks must agree, or the others would wait in the all-reduce."""
        local = self.signals.received is not None
        if self.dist.world == 1:
            return local
        return bool(all_reduce_sum(np.array([1.0 if local else 0.0], np.float32))[0] > 0)

    def _train_epoch(self, epoch: int) -> dict | None:
        """One epoch (from ``skip_micro`` on a mid-epoch resume); None when a signal stopped it.

        No step waits for the host: each step's loss and applied flag stay device tensors in
        ``_pending`` until ``_flush`` fetches them (every ``log_interval`` steps, before a checkpoint,
        a validation or a metrics row, at the epoch's end), and the ranks agree on a stop signal every
        ``stop_check_interval`` steps and at checkpoints (``_stop_check_due``).
        """
        cfg = self.cfg
        micro_per_epoch = self.steps_per_epoch * self.accum
        batch = int(cfg["batch_size"])
        log_every = int(cfg["log_interval"])
        sink = cfg["device_target"] == "Ascend" and cfg["dataset_sink_mode"] and cfg["mode"] == 0
        data = self.task.train_dataset(epoch, self.dist.rank, self.dist.world, self.num_classes)
        self.net.set_train(True)
        self.step.set_train(True)
        self.progress = Progress(self.steps_per_epoch, epoch + 1, self.total_epochs, log_every, self.dist.is_main)
        start = time.perf_counter()
        # the steps before a mid-epoch resume count towards this epoch's mean loss (see state_dict)
        self.epoch_loss = self.resumed_epoch_loss
        self.resumed_epoch_loss = (0.0, 0)
        images_seen = 0
        # Sink mode (Ascend) feeds the step from the device queue; a mid-epoch resume replays that epoch
        # through the host iterator so the skipped batches are consumed in order.
        with epoch_sink(self.step, data, sink and not self.skip_micro) as run_step:
            batches = ((None, None) for _ in range(micro_per_epoch)) if run_step is not None \
                else data.create_tuple_iterator(num_epochs=1)
            for micro, (images, targets) in enumerate(batches):
                if micro >= micro_per_epoch:
                    break
                if micro < self.skip_micro:
                    continue
                first = time.perf_counter() if micro == self.skip_micro and epoch == self.start_epoch else None
                loss, applied = run_step() if run_step is not None else self.step(images, targets)
                if first is not None:  # GRAPH mode compiles in this call; the kernels may still run after it
                    self.timing["first_step"] = time.perf_counter() - first
                boundary = (micro + 1) % self.accum == 0
                if self.apply_accumulated is not None and boundary:
                    applied = self.apply_accumulated()
                images_seen += batch * self.dist.world
                self._pending.append(_Pending(self.global_step, epoch, (micro + 1) // self.accum, loss,
                                              applied if boundary else None))
                if not boundary:
                    continue
                self.global_step += 1
                if ((micro + 1) // self.accum) % log_every == 0:
                    self._flush()
                if self.max_iters:
                    if self._iteration_boundary(epoch, micro + 1):
                        return None
                    if self.global_step >= self.max_iters or micro + 1 == micro_per_epoch:
                        break
                    continue  # signals and checkpoints of an iteration run: _iteration_boundary
                if micro + 1 == micro_per_epoch:
                    break
                every = int(cfg["ckpt_save_steps"])
                saving = bool(every) and self.global_step % every == 0
                if self._stop_check_due(saving) and self._stop_requested():
                    self._save(epoch, micro + 1, None, False)
                    self.result.interrupted = self.signals.received or "a signal on another rank"
                    return None
                if saving:
                    self._save(epoch, micro + 1, None, False)
        self._flush()
        loss_sum, loss_count = self.epoch_loss
        self.skip_micro = 0
        self.epoch_loss = (0.0, 0)
        return self._end_epoch(epoch, loss_sum / loss_count if loss_count else float("nan"), images_seen,
                               time.perf_counter() - start)

    def _stop_check_due(self, checkpoint_step: bool) -> bool:
        """Whether this optimizer step asks the ranks about a stop signal.

        The same answer on every rank (a function of ``global_step`` and the config), so all of them
        reach the all-reduce together; one process reads its own flag, which costs nothing, every step.
        """
        return (checkpoint_step or self.dist.world == 1
                or self.global_step % int(self.cfg["stop_check_interval"]) == 0)

    def _flush(self) -> None:
        """Fetch the pending steps' losses and applied flags (one transfer each) and account them in order.

        Exactly what reading them step by step did: ``step_losses``, the epoch's (or the metrics
        window's) loss sums, the progress lines and step log, the non-finite streak. The scale each
        step left is replayed on the host from the state at the previous flush (``LossScaleState.replay``).
        """
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        losses = _fetch([p.loss for p in pending])
        flags = [bool(f > 0.5) for f in _fetch([p.applied for p in pending if p.applied is not None])]
        scales = self.scaler.replay(*self.scale_before, flags)
        batch = int(self.cfg["batch_size"])
        loss_sum, loss_count = self.epoch_loss
        index = 0
        for record, loss in zip(pending, losses):
            value = float(loss)
            if math.isfinite(value):
                loss_sum += value
                loss_count += 1
            self.result.step_losses.append((record.step, value))
            if record.applied is None:
                continue
            self._check_finite(flags[index], value, record.epoch, record.step + 1, scales[index])
            index += 1
            lr = float(self.lrs[min(record.step, len(self.lrs) - 1)])
            self.progress.update(record.step_in_epoch, value, lr, batch * self.accum * self.dist.world)
            if self.max_iters:
                self.window[0] += value if math.isfinite(value) else 0.0
                self.window[1] += 1 if math.isfinite(value) else 0
                self.window[2] += batch * self.accum * self.dist.world
                self._log_loss(record, value, lr)
        self.epoch_loss = (loss_sum, loss_count)
        self._read_scale()

    def _log_loss(self, record: _Pending, value: float, lr: float) -> None:
        """Account one optimizer step's loss in ``loss.csv``: a row with the mean of the finite losses every
        ``log_interval`` steps (an iteration run validates rarely, so metrics.csv alone draws no loss curve)."""
        finite = math.isfinite(value)
        total, count = self.log_window[0] + (value if finite else 0.0), self.log_window[1] + int(finite)
        self.log_window = (total, count)
        if (record.step + 1) % int(self.cfg["log_interval"]):
            return
        if self.dist.is_main:
            self.loss_log.append({"epoch": record.epoch + 1, "step": record.step + 1,
                                  "train_loss": round(total / count, 6) if count else float("nan"),
                                  "lr": float(f"{lr:.6g}")}, key="step")
        self.log_window = (0.0, 0)

    def _read_scale(self) -> None:
        """The loss scale state on the host, where the next ``_flush`` replays from (no step pending here)."""
        if self.plan.dynamic:
            self.scale_before = (float(self.scaler.scale.asnumpy()), int(self.scaler.good_steps.asnumpy()))
        else:
            self.scale_before = (self.plan.value, 0)

    def _iteration_boundary(self, epoch: int, micro_done: int) -> bool:
        """An iteration run after an optimizer step: validate and checkpoint on their intervals, stop on a signal.

        Returns True when the run stops here (a signal, or ``stop_after_step``), its checkpoint written.
        """
        cfg, step = self.cfg, self.global_step
        at_end = micro_done == self.steps_per_epoch * self.accum  # the position is then the next epoch's start
        position = (epoch + 1, 0) if at_end else (epoch, micro_done)
        last = step >= self.max_iters
        score, is_best = None, False
        if cfg["val_while_train"] and (step % int(cfg["val_interval"]) == 0 or last):
            columns, score, ema_score = self.validate()
            is_best = self._log_row(epoch, columns, score, ema_score)
        elif last:
            self._log_row(epoch, {}, None, None)
        saved = False
        if step % int(cfg["ckpt_save_interval"]) == 0 or last or is_best:
            self._save(*position, score, is_best)
            saved = True
        stop = (self._stop_check_due(saved) and self._stop_requested()) or (
            self.stop_after_step is not None and step >= self.stop_after_step)
        if stop and not last:
            if not saved:
                self._save(*position, None, False)
            self.result.interrupted = self.signals.received or ("stop_after_step" if self.stop_after_step
                                                                 is not None and step >= self.stop_after_step
                                                                 else "a signal on another rank")
            return True
        return False

    def _log_row(self, epoch: int, columns: dict, score: float | None, ema_score: float | None) -> bool:
        """One metrics.csv row of an iteration run (keyed by step): the loss and speed since the previous row.

        Returns whether the score is the best so far.
        """
        self._flush()
        loss_sum, loss_count, images, start = self.window
        seconds = time.perf_counter() - start
        best = max(v for v in (score, ema_score, -1.0) if v is not None)
        is_best = score is not None and best > self.best_top1
        if is_best:
            self.best_top1 = best
        lr = float(self.lrs[min(max(self.global_step - 1, 0), len(self.lrs) - 1)])
        record = {"epoch": epoch + 1, "step": self.global_step,
                  "train_loss": round(loss_sum / loss_count, 6) if loss_count else float("nan"),
                  "lr": float(f"{lr:.6g}"), "img_per_s": round(images / seconds, 2) if seconds > 0 else 0.0,
                  "epoch_time": round(seconds, 3)}
        record.update({k: None if v is None else round(v, 4) for k, v in columns.items()})
        if self.dist.is_main:
            self.metrics.append(record, key="step")
            self.metrics.plot(x="step", columns=self.task.metric_columns, loss_log=self.loss_log)
            val = ", ".join(f"{k} {v:.2f}" for k, v in columns.items() if v is not None)
            _LOG.info("step %d/%d: loss %.4f, lr %.3e%s, %.1f img/s", self.global_step, self.max_iters,
                      record["train_loss"], lr, f", {val}" if val else "", record["img_per_s"])
        self.result.epochs.append(record)
        self.window = [0.0, 0, 0, time.perf_counter()]
        return is_best

    def _check_finite(self, applied: bool, loss: float, epoch: int, step: int, scale: float) -> None:
        """Count consecutive skipped steps; stop the run after ``max_nonfinite_steps`` of them.

        ``step`` is the optimizer step (from 1) and ``scale`` the loss scale it left. A skip that a
        dynamic loss scale absorbs (its scale was still above 1) is routine overflow handling under
        fp16 and does not count.
        """
        if applied and math.isfinite(loss):
            self.nonfinite_streak = 0
            return
        if not applied:
            self.result.skipped_steps += 1
        absorbed = not applied and self.plan.dynamic and scale > 1.0
        if absorbed:
            return
        self.nonfinite_streak += 1
        limit = int(self.cfg["max_nonfinite_steps"])
        if self.dist.is_main:
            _LOG.warning("step %d: loss %s, %s (%d/%d in a row)", step, loss,
                         "update skipped" if not applied else "gradients finite, update applied",
                         self.nonfinite_streak, limit)
        if self.nonfinite_streak >= limit:
            last = self.checkpoint_before_streak or "none written yet"
            raise TrainingDiverged(
                f"training diverged: loss or gradients not finite for {limit} consecutive steps (the last at "
                f"epoch {epoch + 1}, step {step}); last good checkpoint: {last}; lower --lr, enable "
                "--clip_grad True, or use amp_level O0, then resume from that checkpoint")

    def _end_epoch(self, epoch: int, train_loss: float, images: int, epoch_time: float) -> dict:
        cfg = self.cfg
        last = epoch + 1 == self.total_epochs
        lr = float(self.lrs[min(max(self.global_step - 1, 0), len(self.lrs) - 1)])
        record = {"epoch": epoch + 1, "step": self.global_step, "train_loss": round(train_loss, 6),
                  "lr": float(f"{lr:.6g}"), "img_per_s": round(images / epoch_time, 2) if epoch_time > 0 else 0.0,
                  "epoch_time": round(epoch_time, 3)}
        if self.max_iters:  # rows, validation and checkpoints of an iteration run are at step boundaries
            return record
        columns: dict = dict.fromkeys(self.task.metric_columns)
        top1 = ema_top1 = None
        if cfg["val_while_train"] and ((epoch + 1) % int(cfg["val_interval"]) == 0 or last):
            columns, top1, ema_top1 = self.validate()
        best_candidate = max(v for v in (top1, ema_top1, -1.0) if v is not None)
        is_best = top1 is not None and best_candidate > self.best_top1
        if is_best:
            self.best_top1 = best_candidate
        record.update({k: None if v is None else round(v, 4) for k, v in columns.items()})
        if self.dist.is_main:
            # the row goes first: a run killed before its checkpoint replays this epoch on resume, and
            # MetricsLog skips the replayed row instead of losing it
            self.metrics.append(record)
            self.metrics.plot(columns=self.task.metric_columns)
        if (epoch + 1) % int(cfg["ckpt_save_interval"]) == 0 or last or is_best:
            self._save(epoch + 1, 0, top1, is_best)
        if self.dist.is_main:
            name = self.task.score_name
            ema = f", ema {name} {ema_top1:.2f}%" if ema_top1 is not None else ""
            val = ", val " + ", ".join(f"{k[4:]} {v:.2f}%" for k, v in columns.items()) + ema if top1 is not None \
                else ""
            _LOG.info("epoch %d/%d: loss %.4f, lr %.3e%s, %.1f img/s, %.1f s", epoch + 1, self.total_epochs,
                      record["train_loss"], lr, val, record["img_per_s"], epoch_time)
        return record


def train(cfg: Config, stop_after_epoch: int | None = None) -> TrainResult:
    """Run a whole training (or resume one) as configured; returns what happened in this process."""
    if cfg["device_target"] == "CPU" and os.environ.get("MS_ROLE") == "MS_SCHED":
        raise ConfigError("train.py was started as the MindSpore scheduler; use msrun or the trainer's mpirun support")
    result = Trainer(cfg).fit(stop_after_epoch)
    if result.interrupted and result.rank == 0:
        _LOG.warning("stopped by %s at step %d; checkpoint: %s. Resume with: %s", result.interrupted,
                     result.step_losses[-1][0] + 1 if result.step_losses else 0, result.last_checkpoint,
                     resume_command())
    return result


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that continues this run: the same arguments with ``--resume auto``.

    MindCV's ``--resume_opt`` goes too: with ``--ckpt_path`` it would ask to resume a second time.
    """
    args = list(sys.argv if argv is None else argv)
    kept: list[str] = []
    skip = False
    for i, token in enumerate(args[1:], 1):
        if skip:
            skip = False
            continue
        if token == "--resume":
            skip = True
            continue
        if token == "--resume_opt":
            nxt = args[i + 1] if i + 1 < len(args) else "--"
            skip = not nxt.startswith("--")
            continue
        if token.startswith(("--resume=", "--resume_opt=")):
            continue
        kept.append(token)
    script = os.path.basename(args[0]) if args else "train.py"
    return " ".join(["python", shlex.quote(script), *(shlex.quote(t) for t in kept), "--resume", "auto"])
