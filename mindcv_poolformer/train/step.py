"""The compiled training step: loss scaling, gradient accumulation, all-reduce, clipping, EMA.

Order inside one optimizer step (the order matters for data-parallel exactness):
forward/backward on the scaled loss -> (accumulate micro-batches) -> all-reduce (mean over ranks)
-> unscale -> finiteness check -> clip by global norm -> optimizer -> EMA update. Clipping after
the all-reduce makes every rank clip the same global gradient, so weights stay identical across
ranks. A step whose gradients are not all finite is skipped on every device (weights, optimizer
moments and EMA untouched; with a dynamic loss scale the scale also shrinks): ``ms.amp.all_finite``
and the in-graph branch work on CPU too, unlike MindSpore's NPU overflow-status cells.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from ..kernels import cpu_kernels

__all__ = ["WithLoss", "TrainStep", "ApplyAccumulated", "LossScaleState"]

_grad_scale = ops.MultitypeFuncGraph("grad_scale")
_ema_update = ops.MultitypeFuncGraph("ema_update")
_accumulate = ops.MultitypeFuncGraph("accumulate")
_zero = ops.MultitypeFuncGraph("zero")


@_grad_scale.register("Tensor", "Tensor")
def _scale_grad(factor: Tensor, grad: Tensor) -> Tensor:
    return grad * ops.cast(factor, grad.dtype)


@_ema_update.register("Tensor", "Tensor", "Tensor")
def _ema(decay: Tensor, ema: Tensor, weight: Tensor) -> Tensor:
    return ops.assign(ema, ema * decay + weight * (1.0 - decay))


@_accumulate.register("Tensor", "Tensor")
def _acc(buffer: Tensor, grad: Tensor) -> Tensor:
    return ops.assign_add(buffer, grad)


@_zero.register("Tensor")
def _zeros(buffer: Tensor) -> Tensor:
    return ops.assign(buffer, ops.zeros_like(buffer))


class WithLoss(nn.Cell):
    """network + loss (logits cast to fp32 before the loss)."""

    def __init__(self, network: nn.Cell, loss_fn: nn.Cell) -> None:
        super().__init__(auto_prefix=False)
        self.network = network
        self.loss_fn = loss_fn

    def construct(self, images: Tensor, targets: Tensor) -> Tensor:
        return self.loss_fn(ops.cast(self.network(images), ms.float32), targets)


class LossScaleState(nn.Cell):
    """Loss scale as checkpointable parameters; ``dynamic`` halves on overflow and doubles after a window."""

    def __init__(self, value: float, dynamic: bool, factor: float = 2.0, window: int = 1000) -> None:
        super().__init__()
        self.dynamic = dynamic
        self.scale = Parameter(Tensor(value, ms.float32), name="loss_scale.value", requires_grad=False)
        self.good_steps = Parameter(Tensor(0, ms.int32), name="loss_scale.good_steps", requires_grad=False)
        self.factor = factor
        self.window = window

    def update(self, finite: Tensor) -> Tensor:
        """Advance the dynamic scale after a step whose gradients were (not) finite."""
        one = ops.ones_like(self.good_steps)
        good = ops.select(finite, self.good_steps + one, ops.zeros_like(self.good_steps))
        grow = good >= self.window
        grown = ops.select(grow, self.scale * self.factor, self.scale)
        shrunk = ops.maximum(self.scale / self.factor, ops.ones_like(self.scale))
        ops.assign(self.scale, ops.select(finite, grown, shrunk))
        return ops.assign(self.good_steps, ops.select(grow, ops.zeros_like(good), good))


class _Update(nn.Cell):
    """Shared tail of a step: all-reduce, unscale, overflow check, clip, optimizer, EMA."""

    def __init__(self, optimizer: nn.Optimizer, scaler: LossScaleState, reducer: nn.Cell | None,
                 clip_value: float, ema: ParameterTuple | None, ema_decay: float) -> None:
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.scaler = scaler
        self.reducer = reducer if reducer is not None else ops.identity
        self.distributed = reducer is not None
        self.clip = clip_value > 0
        self.clip_value = clip_value
        self.ema = ema
        self.use_ema = ema is not None
        self.ema_decay = Tensor(ema_decay, ms.float32)
        self.hyper_map = ops.HyperMap()
        # on the CPU one fused kernel checks every gradient (ms.amp.all_finite is two small ops per tensor)
        kernels = cpu_kernels()
        self.fused_all_finite = kernels is not None and all(
            w.dtype in (ms.float32, ms.float16) for w in self.weights)
        if self.fused_all_finite:
            self.k_all_finite = kernels.all_finite

    def apply(self, grads: tuple, scale_inv: Tensor) -> Tensor:
        if self.distributed:
            grads = self.reducer(grads)
        grads = self.hyper_map(ops.partial(_grad_scale, scale_inv), grads)
        if self.fused_all_finite:
            finite = self.k_all_finite(*grads).reshape(())
        else:
            finite = ms.amp.all_finite(grads)
        grads = self._clip(grads)
        if finite:
            finite = self._step(grads, finite)
        if self.scaler.dynamic:
            finite = ops.depend(finite, self.scaler.update(finite))
        return finite

    def _clip(self, grads: tuple) -> tuple:
        if self.clip:
            return ops.clip_by_global_norm(grads, self.clip_value)
        return grads

    def _step(self, grads: tuple, flag: Tensor) -> Tensor:
        flag = ops.depend(flag, self.optimizer(grads))
        if self.use_ema:
            flag = ops.depend(flag, self.hyper_map(ops.partial(_ema_update, self.ema_decay), self.ema, self.weights))
        return flag


class TrainStep(nn.Cell):
    """One micro-batch: forward/backward; with ``accumulation_steps == 1`` also the optimizer step.

    Returns ``(loss, applied)``: the unscaled loss of the micro-batch (fp32) and whether the
    optimizer step was applied (False when its gradients were not finite). With accumulation the
    gradients are summed into buffers, ``applied`` is True and ``ApplyAccumulated`` performs the
    step and returns its own flag.
    """

    def __init__(self, net_with_loss: nn.Cell, optimizer: nn.Optimizer, scaler: LossScaleState,
                 reducer: nn.Cell | None = None, clip_value: float = 0.0, accumulation_steps: int = 1,
                 ema: ParameterTuple | None = None, ema_decay: float = 0.9999) -> None:
        super().__init__(auto_prefix=False)
        self.net_with_loss = net_with_loss
        self.weights = optimizer.parameters
        self.scaler = scaler
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.accumulation_steps = accumulation_steps
        self.accumulate = accumulation_steps > 1
        self.hyper_map = ops.HyperMap()
        self.update = _Update(optimizer, scaler, reducer, clip_value, ema, ema_decay)
        if self.accumulate:
            self.buffers = self.weights.clone(prefix="accum", init="zeros")

    def construct(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        loss = self.net_with_loss(images, targets)
        scale = self.scaler.scale
        sens = ops.fill(loss.dtype, loss.shape, 1.0) * scale
        if self.accumulate:
            sens = sens / self.accumulation_steps
        grads = self.grad(self.net_with_loss, self.weights)(images, targets, sens)
        if self.accumulate:
            return ops.depend(loss, self.hyper_map(_accumulate, self.buffers, grads)), Tensor(True)
        applied = self.update.apply(grads, 1.0 / scale)
        return ops.depend(loss, applied), applied


class ApplyAccumulated(nn.Cell):
    """The optimizer step after ``accumulation_steps`` micro-batches; zeroes the buffers."""

    def __init__(self, step: TrainStep) -> None:
        super().__init__(auto_prefix=False)
        self.step = step
        self.hyper_map = ops.HyperMap()

    def construct(self) -> Tensor:
        finite = self.step.update.apply(self.step.buffers, 1.0 / self.step.scaler.scale)
        return ops.depend(finite, self.hyper_map(_zero, self.step.buffers))
