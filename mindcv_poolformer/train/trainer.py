"""The training loop: build everything from one Config, train, validate, checkpoint, resume exactly.

Exact resume: a checkpoint holds the weights, the optimizer moments and ``global_step`` (which is
also the position in the precomputed learning-rate array), the EMA weights, the loss-scale state
and ``train_state.*`` (epoch, micro-batch within the epoch, best top-1). The data order and
augmentation RNG of every epoch depend only on (seed, rank, epoch) (see ``data.py``), so epoch
k+1 after a resume sees the same batches as without the interruption. Stochastic depth masks are
keyed by (seed, rank, global_step, micro-batch) (``DropPathNoise``) for the same reason: MindSpore's
kernel RNG state cannot be saved on CPU. Only dropout (``drop_rate > 0``, 0 in every recipe) still
draws from the kernel RNG, so its masks after a resume differ.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import CheckpointError
from ..config import Config, ConfigError
from .data import DataError, augmentation_seed, build_train_dataset, prepare_data_dir
from .distributed import DistInfo, init_distributed
from .run_io import (
    STATE_PREFIX,
    CheckpointManager,
    MetricsLog,
    Progress,
    check_run_dir,
    clear_run_dir,
    read_training_state,
    resolve_resume,
)
from .schedule import build_lr_schedule

__all__ = ["LossScalePlan", "plan_loss_scale", "validate_train_config", "TrainResult", "Trainer", "train"]

_LOG = logging.getLogger("mindcv_poolformer")


@dataclass(frozen=True)
class LossScalePlan:
    """The resolved loss-scaling mode: initial value, dynamic or not, skip overflowed steps or not."""

    value: float
    dynamic: bool
    skip_overflow: bool


def plan_loss_scale(cfg: Mapping[str, Any]) -> LossScalePlan:
    """Resolve ``loss_scale_type``/``drop_overflow_update`` for the device, or raise a ConfigError.

    MindSpore on CPU has no overflow-status kernels for loss scaling: only a fixed scale without
    skipping works there, so asking for more on CPU is a configuration error, not a crash later.
    """
    kind = cfg["loss_scale_type"]
    device = cfg["device_target"]
    mixed = cfg["amp_level"] != "O0"
    if kind == "auto":
        kind = "dynamic" if (device != "CPU" and mixed) else "fixed"
        value = float(cfg["loss_scale"]) if cfg["loss_scale"] != 1.0 or kind == "fixed" else 2.0 ** 16
    else:
        value = float(cfg["loss_scale"])
    skip = kind == "dynamic" or bool(cfg["drop_overflow_update"])
    if device == "CPU" and skip:
        what = "loss_scale_type=dynamic" if kind == "dynamic" else "drop_overflow_update=True"
        raise ConfigError(f"{what} needs Ascend or GPU: MindSpore on CPU supports only a fixed loss scale without "
                          "overflow skipping (use --loss_scale_type fixed --drop_overflow_update False, or auto)")
    return LossScalePlan(value, kind == "dynamic", skip)


def validate_train_config(cfg: Mapping[str, Any]) -> LossScalePlan:
    """Training-specific checks beyond the schema (one ConfigError naming the key)."""
    if cfg["amp_level"] != "O0" and cfg["device_target"] == "CPU" and cfg["amp_level"] == "O1":
        raise ConfigError("amp_level: O1 is not supported for training here; use O0, O2 or O3")
    if cfg["mode"] == 1 and cfg["device_target"] == "Ascend" and cfg["dataset_sink_mode"]:
        _LOG.info("dataset_sink_mode needs GRAPH_MODE (mode 0); running without sink")
    return plan_loss_scale(cfg)


@dataclass
class TrainResult:
    """What a run did: per-step losses of this process, per-epoch records, the best top-1, files."""

    step_losses: list[tuple[int, float]] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    best_top1: float = 0.0
    last_checkpoint: str | None = None
    rank: int = 0
    world: int = 1


def _setup_context(cfg: Mapping[str, Any]) -> None:
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE if cfg["mode"] == 0 else ms.PYNATIVE_MODE, device_target=cfg["device_target"])


class Trainer:
    """Owns the network, the compiled step, the data and the run directory of one training run."""

    def __init__(self, cfg: Config, dist: DistInfo | None = None) -> None:
        import mindspore as ms
        from mindspore import ParameterTuple, nn

        from ..evaluate import apply_amp, create_eval_dataset, scan_image_folder
        from ..models import create_model
        from ..models.layers import DropPathNoise
        from .loss import create_loss
        from .optim import create_optimizer
        from .step import ApplyAccumulated, LossScaleState, TrainStep, WithLoss

        self.cfg = cfg
        self.plan = validate_train_config(cfg)
        _setup_context(cfg)
        prepare_data_dir(cfg)
        check_run_dir(cfg)
        self.dist = dist or init_distributed(cfg["distribute"], cfg["device_target"])
        rank, world = self.dist.rank, self.dist.world
        self.run_dir = Path(cfg["ckpt_save_dir"])
        if self.dist.is_main:
            if cfg["overwrite"] and not cfg["resume"]:
                clear_run_dir(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.dump(self.run_dir / "config.yaml")

        _, classes, n_train = scan_image_folder(cfg["data_dir"], cfg["train_split"])
        self.num_classes = cfg["num_classes"] or len(classes)
        if cfg["num_samples"]:
            n_train = min(n_train, int(cfg["num_samples"]))
        self.accum = int(cfg["gradient_accumulation_steps"])
        batch = int(cfg["batch_size"])
        micro = (n_train // world) // batch
        self.steps_per_epoch = micro // self.accum
        if self.steps_per_epoch < 1:
            raise DataError(f"{cfg['data_dir']}: {n_train} training images give no full optimizer step of "
                            f"{batch} x {world} ranks x {self.accum} accumulation steps")
        self.total_epochs = int(cfg["epoch_size"]) + int(cfg["cooldown_epochs"])
        self.global_batch = batch * world * self.accum
        self.lrs = build_lr_schedule(cfg, self.steps_per_epoch, self.global_batch)

        ms.set_seed(int(cfg["seed"]))  # identical initial weights on every rank
        ckpt = cfg["ckpt_path"] or None
        self.net = create_model(cfg["model"], pretrained=cfg["pretrained"], num_classes=self.num_classes,
                                in_channels=cfg["in_channels"], checkpoint_path=ckpt,
                                drop_path_rate=cfg["drop_path_rate"], drop_rate=cfg["drop_rate"])
        ms.set_seed(augmentation_seed(cfg["seed"], rank, 0))  # dropout differs per rank
        self.drop_path_noise = DropPathNoise(self.net, batch, int(cfg["seed"]), rank)
        self.optimizer = create_optimizer(self.net, cfg, self.lrs)
        self.net = apply_amp(self.net, cfg["amp_level"])
        self.scaler = LossScaleState(self.plan.value, self.plan.dynamic, self.plan.skip_overflow)
        reducer = None
        if world > 1:
            reducer = nn.DistributedGradReducer(self.optimizer.parameters, mean=True, degree=world)
        self.ema = None
        if cfg["ema"]:
            # same order as optimizer.parameters (grouped by weight decay), which the step zips them with
            self.ema = ParameterTuple(self.optimizer.parameters).clone(prefix="ema", init="same")
        clip = float(cfg["clip_value"]) if cfg["clip_grad"] else 0.0
        self.step = TrainStep(WithLoss(self.net, create_loss(cfg["loss"])), self.optimizer, self.scaler,
                              reducer, clip, self.accum, self.ema, float(cfg["ema_decay"]))
        self.apply_accumulated = ApplyAccumulated(self.step) if self.accum > 1 else None

        self.eval_data = None
        if cfg["val_while_train"]:
            self.eval_data, _, _ = create_eval_dataset(
                cfg["data_dir"], cfg["val_split"], batch, cfg["image_resize"], cfg["crop_pct"], cfg["interpolation"],
                cfg["mean"], cfg["std"], cfg["num_parallel_workers"], rank, world)
        self.manager = CheckpointManager(self.run_dir, cfg["model"], cfg["ckpt_format"],
                                         int(cfg["keep_checkpoint_max"]), cfg["ckpt_save_policy"])
        self.metrics = MetricsLog(self.run_dir)
        self.global_step = 0
        self.start_epoch = 0
        self.skip_micro = 0
        self.best_top1 = -1.0
        resume_path = resolve_resume(cfg["resume"], self.manager)
        if resume_path is not None:
            self._resume(resume_path)

    # ------------------------------------------------------------------ checkpoint state

    def _state_parameters(self) -> dict:
        from ..models.layers import DropPathNoise

        params = {}
        for cell in (self.step,) + ((self.apply_accumulated,) if self.apply_accumulated else ()):
            for param in cell.get_parameters():
                if not DropPathNoise.is_noise_name(param.name):  # per-step scratch, refilled from the step key
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
        state[STATE_PREFIX + "world"] = np.array([self.dist.world], np.int64)
        return state

    def _resume(self, path: Path) -> None:
        import mindspore as ms

        fmt = "safetensors" if path.suffix == ".safetensors" else "ckpt"
        try:
            loaded = ms.load_checkpoint(str(path), format=fmt)
        except Exception as exc:  # MindSpore raises several types for unreadable files
            raise CheckpointError(f"resume: {path} is not a readable checkpoint ({str(exc).splitlines()[0]})") from None
        state = read_training_state(loaded)
        if "epoch" not in state:
            raise CheckpointError(f"resume: {path} is not a training checkpoint of this trainer (no train_state.*); "
                                  "to start from its weights use --ckpt_path")
        targets = self._state_parameters()
        missing = [n for n in targets if n not in loaded and not n.startswith("accum.")]
        if missing:
            raise CheckpointError(f"resume: {path} lacks {len(missing)} entries of this run "
                                  f"({', '.join(missing[:4])}); other model/optimizer/ema settings?")
        for name, param in targets.items():
            if name in loaded:
                value = loaded[name].asnumpy().reshape(param.shape).astype(param.asnumpy().dtype)
                param.set_data(ms.Tensor(value))
        self.start_epoch = int(state["epoch"])
        self.skip_micro = int(state["micro_in_epoch"])
        self.global_step = int(state["global_step"])
        self.best_top1 = float(state["best_top1"])
        if int(state.get("world", self.dist.world)) != self.dist.world:
            _LOG.warning("resume: the checkpoint was written by %d ranks, this run has %d; the data order differs",
                         int(state["world"]), self.dist.world)
        if float(self.cfg["drop_rate"]) > 0:
            _LOG.warning("resume: dropout (drop_rate %s) draws from MindSpore's kernel RNG, which cannot be restored; "
                         "its masks differ from the uninterrupted run (drop path masks do not)", self.cfg["drop_rate"])
        _LOG.info("resumed from %s: epoch %d, step %d", path, self.start_epoch + (1 if self.skip_micro else 0),
                  self.global_step)

    def _save(self, epoch: int, micro_in_epoch: int, top1: float | None, is_best: bool) -> None:
        if not self.dist.is_main:
            return
        # train_state.epoch counts finished epochs; a mid-epoch checkpoint also records the micro-batch reached
        state = self.state_dict(epoch if micro_in_epoch else epoch + 1, micro_in_epoch)
        path = self.manager.save(state, epoch + 1, self.global_step, top1, is_best)
        self.result.last_checkpoint = str(path)

    # ------------------------------------------------------------------ evaluation

    def validate(self) -> tuple[float, float, float | None]:
        """(top1, top5, ema top1 or None) over the whole validation split, all-reduced over ranks."""
        from ..evaluate import evaluate

        if self.eval_data is None and not self.dist.world > 1:
            return float("nan"), float("nan"), None
        metrics = evaluate(self.net, self.eval_data, distributed=self.dist.world > 1)
        ema_top1 = None
        if self.ema is not None:
            weights = list(self.optimizer.parameters)
            backup = [w.asnumpy().copy() for w in weights]
            for w, e in zip(weights, self.ema):
                w.set_data(e.data.copy())
            ema_top1 = evaluate(self.net, self.eval_data, distributed=self.dist.world > 1).top1
            import mindspore as ms

            for w, b in zip(weights, backup):
                w.set_data(ms.Tensor(b))
        return metrics.top1, metrics.top5, ema_top1

    # ------------------------------------------------------------------ the loop

    def fit(self, stop_after_epoch: int | None = None) -> TrainResult:
        """Train from the current position to the last epoch (or to ``stop_after_epoch``, for tests)."""
        import mindspore as ms

        cfg = self.cfg
        self.result = TrainResult(rank=self.dist.rank, world=self.dist.world)
        micro_per_epoch = self.steps_per_epoch * self.accum
        batch = int(cfg["batch_size"])
        sink = cfg["device_target"] == "Ascend" and cfg["dataset_sink_mode"] and cfg["mode"] == 0
        if self.dist.is_main:
            _LOG.info("training %s: %d epochs x %d steps, global batch %d, peak lr %.3e, %d rank(s)",
                      cfg["model"], self.total_epochs, self.steps_per_epoch, self.global_batch,
                      float(self.lrs.max()), self.dist.world)
        for epoch in range(self.start_epoch, self.total_epochs):
            data = build_train_dataset(cfg, epoch, self.dist.rank, self.dist.world, self.num_classes)
            self.net.set_train(True)
            self.step.set_train(True)
            progress = Progress(self.steps_per_epoch, epoch + 1, self.total_epochs, int(cfg["log_interval"]),
                                self.dist.is_main)
            start = time.perf_counter()
            losses: list[float] = []
            # Sink mode (Ascend) feeds the step from the device queue; a mid-epoch resume replays that epoch
            # through the host iterator so the skipped batches are consumed in order.
            run_step = ms.data_sink(self.step, data.dataset, sink_size=1) if sink and not self.skip_micro else None
            if run_step is not None:
                batches = ((None, None) for _ in range(micro_per_epoch))
            else:
                batches = data.dataset.create_tuple_iterator(num_epochs=1)
            for micro, (images, targets) in enumerate(batches):
                if micro >= micro_per_epoch:
                    break
                if micro < self.skip_micro:
                    continue
                self.drop_path_noise.refill(self.global_step, micro % self.accum)
                loss = run_step() if run_step is not None else self.step(images, targets)
                if self.apply_accumulated is not None and (micro + 1) % self.accum == 0:
                    self.apply_accumulated()
                value = float(loss.asnumpy())
                if not math.isfinite(value) and not self.plan.skip_overflow:
                    raise FloatingPointError(f"loss is {value} at epoch {epoch + 1} step {self.global_step + 1}; "
                                             "lower lr or use amp_level O0")
                losses.append(value)
                self.result.step_losses.append((self.global_step, value))
                if (micro + 1) % self.accum == 0:
                    self.global_step += 1
                    lr = float(self.lrs[min(self.global_step - 1, len(self.lrs) - 1)])
                    progress.update((micro + 1) // self.accum, value, lr, batch * self.accum * self.dist.world)
                    every = int(cfg["ckpt_save_steps"])
                    if every and self.global_step % every == 0 and micro + 1 < micro_per_epoch:
                        self._save(epoch, micro + 1, None, False)
            self.skip_micro = 0
            epoch_time = time.perf_counter() - start
            record = self._end_epoch(epoch, losses, epoch_time)
            self.result.epochs.append(record)
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
        self.result.best_top1 = self.best_top1
        return self.result

    def _end_epoch(self, epoch: int, losses: list[float], epoch_time: float) -> dict:
        cfg = self.cfg
        last = epoch + 1 == self.total_epochs
        top1 = top5 = ema_top1 = None
        if cfg["val_while_train"] and ((epoch + 1) % int(cfg["val_interval"]) == 0 or last):
            top1, top5, ema_top1 = self.validate()
        best_candidate = max(v for v in (top1, ema_top1, -1.0) if v is not None)
        is_best = top1 is not None and best_candidate > self.best_top1
        if is_best:
            self.best_top1 = best_candidate
        images = len(losses) * int(cfg["batch_size"]) * self.dist.world
        lr = float(self.lrs[min(max(self.global_step - 1, 0), len(self.lrs) - 1)])
        record = {"epoch": epoch + 1, "step": self.global_step,
                  "train_loss": round(float(np.mean(losses)), 6) if losses else float("nan"),
                  "lr": float(f"{lr:.6g}"), "val_top1": None if top1 is None else round(top1, 4),
                  "val_top5": None if top5 is None else round(top5, 4),
                  "img_per_s": round(images / epoch_time, 2) if epoch_time > 0 else 0.0,
                  "epoch_time": round(epoch_time, 3)}
        if (epoch + 1) % int(cfg["ckpt_save_interval"]) == 0 or last or is_best:
            self._save(epoch, 0, top1, is_best)
        if self.dist.is_main:
            self.metrics.append(record)
            self.metrics.plot()
            ema = f", ema top-1 {ema_top1:.2f}%" if ema_top1 is not None else ""
            val = f", val top-1 {top1:.2f}% top-5 {top5:.2f}%{ema}" if top1 is not None else ""
            _LOG.info("epoch %d/%d: loss %.4f, lr %.3e%s, %.1f img/s, %.1f s", epoch + 1, self.total_epochs,
                      record["train_loss"], lr, val, record["img_per_s"], epoch_time)
        return record


def train(cfg: Config, stop_after_epoch: int | None = None) -> TrainResult:
    """Run a whole training (or resume one) as configured; returns what happened in this process."""
    if cfg["device_target"] == "CPU" and os.environ.get("MS_ROLE") == "MS_SCHED":
        raise ConfigError("train.py was started as the MindSpore scheduler; use msrun or the trainer's mpirun support")
    return Trainer(cfg).fit(stop_after_epoch)
