"""The compiled training step: loss scaling, gradient accumulation, all-reduce, clipping, EMA.

Order inside one optimizer step (the order matters for data-parallel exactness):
forward/backward on the scaled loss -> (accumulate micro-batches) -> all-reduce (mean over ranks)
-> unscale -> local finiteness check -> all-reduce of the overflow flag -> clip by global norm ->
optimizer -> EMA update, the dynamic loss scale advancing from the agreed flag. Clipping after the
all-reduce makes every rank clip the same global gradient, so weights stay identical across ranks.

A step whose gradients are not all finite is skipped on every rank (weights, optimizer moments and
EMA untouched; with a dynamic loss scale the scale also shrinks). The decision must be one for all
ranks: on Ascend 910A, and on 910B with ``MS_ASCEND_CHECK_OVERFLOW_MODE=SATURATION_MODE``, an
overflow saturates to finite values and shows only in the rank-local NPU float-status register
(which ``ms.amp.all_finite`` reads there), so the gradient all-reduce does not spread it. Each rank
therefore turns its local check into a 0/1 flag and the flags are summed over ranks (an OR), as
``nn.TrainOneStepWithLossScaleCell`` does; the register is cleared before every forward, as its
``start_overflow_check`` does (the cell's own 2.10 ``construct`` no longer calls it and relies on the
clear after each read, which leaves a stale flag from e.g. evaluation to skip the next step). With
accumulation each micro-batch's flag is kept in ``accum.overflow`` until the optimizer step, since
the register is cleared before the next micro-batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from mindspore.ops.operations.math_ops import NPUClearFloatStatusV2

__all__ = ["WithLoss", "TrainStep", "ApplyAccumulated", "LossScaleState", "OrderedGradReducer", "grad_reducer",
           "status_register_target"]

_grad_scale = ops.MultitypeFuncGraph("grad_scale")
_ema_update = ops.MultitypeFuncGraph("ema_update")
_accumulate = ops.MultitypeFuncGraph("accumulate")
_zero = ops.MultitypeFuncGraph("zero")
_flatten_f32 = ops.MultitypeFuncGraph("flatten_f32")
_unflatten_like = ops.MultitypeFuncGraph("unflatten_like")


@_flatten_f32.register("Tensor")
def _flatten_f32_tensor(grad: Tensor) -> Tensor:
    return ops.cast(grad, ms.float32).reshape(-1)


@_unflatten_like.register("Tensor", "Tensor")
def _unflatten_like_tensor(flat: Tensor, like: Tensor) -> Tensor:
    return ops.cast(flat, like.dtype).reshape(like.shape)


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


def status_register_target() -> bool:
    """Whether overflow is seen only through the NPU float-status register here.

    The same test as ``ms.amp.all_finite``'s (``mindspore/amp.py`` ``_all_finite``), so the clear
    before the forward happens exactly where that check reads (and clears) the register.
    """
    if not ms.amp._ascend_target():
        return False
    return bool(ms.amp._ascend_910a_target() or (
        ms.amp._ascend_910b_target() and os.environ.get("MS_ASCEND_CHECK_OVERFLOW_MODE") == "SATURATION_MODE"))


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

    def replay(self, scale: float, good_steps: int, finite: list[bool]) -> list[float]:
        """The scale after each of a run of steps, from the state before them: ``update`` on the host.

        The trainer fetches the steps' flags in batches (no per-step sync) and needs the scale each
        step left behind; float32 like the Parameter, so every value is the device's exactly.
        """
        value, good, factor, out = np.float32(scale), int(good_steps), np.float32(self.factor), []
        for ok in finite:
            if self.dynamic:
                good = good + 1 if ok else 0
                grow = good >= self.window
                value = (value * factor if grow else value) if ok else max(value / factor, np.float32(1.0))
                good = 0 if grow else good
            out.append(float(value))
        return out


class OrderedGradReducer(nn.Cell):
    """Mean of the gradients over ranks in a fixed number of AllReduces that run one after another.

    Why not ``nn.DistributedGradReducer`` on CPU: MindSpore's CPU collectives
    (``cluster/rpc/core/collective_ops_impl.cc``) pair messages between ranks by arrival, not by op,
    and only a mutex orders the AllReduce kernels inside one process. The reducer's per-gradient
    AllReduces are independent graph nodes, launched as the backward pass makes each gradient ready,
    so under load two ranks can take them in different orders: then rank 0's gradient A is summed
    with rank 1's gradient B (silently when their sizes match, or ``memcpy_s error ... dest size is 4,
    src size is 128`` and a crashed step when they differ; we saw both in 2-rank CPU runs). Here the
    gradients are packed, in parameter order, into flat float32 buckets of at most ``bucket`` elements,
    and each bucket's AllReduce waits for the previous one's result (``ops.depend``), so every rank
    issues the same collectives in the same order. The sum is the same per element, so the result
    equals ``DistributedGradReducer(mean=True)``'s (the mean is the sum times ``1/degree``, as there).
    HCCL/NCCL order collectives on a stream, so Ascend and GPU keep MindSpore's reducer.
    """

    def __init__(self, parameters: tuple, degree: int, bucket: int = 1 << 22) -> None:
        super().__init__(auto_prefix=False)
        sizes = [int(np.prod(p.shape)) for p in parameters]
        ranges: list[list[int]] = []  # [start, end) of each bucket, in parameter order
        filled = 0  # elements in the last bucket
        for i, size in enumerate(sizes):
            if not ranges or (filled and filled + size > bucket):
                ranges.append([i, i])
                filled = 0
            ranges[-1][1] = i + 1
            filled += size
        self.ranges = tuple((a, b) for a, b in ranges)
        # each gradient's [begin, end) in its bucket, sliced out statically: ``ops.split`` with a list of
        # sizes unrolls into a recursion past the graph compiler's depth limit at ~100 parameters, and
        # ``SplitV`` has no CPU kernel
        self.slices = tuple((int(sum(sizes[a:i])), int(sum(sizes[a:i + 1]))) for a, b in ranges for i in range(a, b))
        self.hyper_map = ops.HyperMap()
        self.allreduce = ops.AllReduce(ops.ReduceOp.SUM)
        self.degree_inv = Tensor(1.0 / degree, ms.float32)

    def construct(self, grads: tuple) -> tuple:
        pieces = ()
        previous = self.degree_inv
        for start, end in self.ranges:
            flat = ops.concat(self.hyper_map(_flatten_f32, grads[start:end]))
            summed = self.allreduce(ops.depend(flat, previous)) * self.degree_inv
            previous = summed
            for i in range(start, end):
                begin, stop = self.slices[i]
                pieces = pieces + (summed[begin:stop],)
        return self.hyper_map(_unflatten_like, pieces, grads)


def grad_reducer(parameters: tuple, degree: int, device_target: str) -> nn.Cell:
    """The gradient mean over ranks for ``device_target``: ordered buckets on CPU (see above), MindSpore's elsewhere."""
    if device_target == "CPU":
        return OrderedGradReducer(parameters, degree)
    return nn.DistributedGradReducer(parameters, mean=True, degree=degree)


class _Update(nn.Cell):
    """Shared tail of a step: all-reduce, unscale, overflow check and agreement, clip, optimizer, EMA.

    MindSpore's ``nn.TrainOneStepWithLossScaleCell`` is mirrored here, not called: its
    ``get_overflow_status`` takes the 910A register branch on every non-GPU, non-910B target (CPU
    included, where NPUGetFloatStatusV2 has no kernel), all-reduces the int32 status vector (CPU
    AllReduce has float sum only) and keys ``is_distributed`` on the auto-parallel context, while
    this project reduces gradients with an explicit ``DistributedGradReducer``. What is reused:
    ``ms.amp.all_finite`` for the local check (MindSpore's own per-device dispatch: register on
    910A/saturation mode, AllFinite or isfinite elsewhere), its SoC test for where to clear the
    register, and the cell's flag agreement (float32 AllReduce SUM of the flag, overflow if > 0).
    """

    def __init__(self, optimizer: nn.Optimizer, scaler: LossScaleState, reducer: nn.Cell | None,
                 clip_value: float, ema: ParameterTuple | None, ema_decay: float,
                 all_finite: Callable | None = None) -> None:
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.scaler = scaler
        self.reducer = reducer if reducer is not None else ops.identity
        self.distributed = reducer is not None
        # the ranks' 0/1 overflow flags summed over the world group (the group the trainer's reducer uses)
        self.flag_reducer = ops.AllReduce(ops.ReduceOp.SUM) if self.distributed else ops.identity
        self.clip = clip_value > 0
        self.clip_value = clip_value
        self.ema = ema
        self.use_ema = ema is not None
        self.ema_decay = Tensor(ema_decay, ms.float32)
        self.hyper_map = ops.HyperMap()
        # a fused kernel (the CPU one checks every gradient in one pass) handles float32/float16 only
        self.fused_all_finite = all_finite is not None and all(
            w.dtype in (ms.float32, ms.float16) for w in self.weights)
        if self.fused_all_finite:
            self.k_all_finite = all_finite
        self.status_register = status_register_target()
        self.clear_status_op = NPUClearFloatStatusV2()

    def clear_status(self, first_input: Tensor) -> Tensor:
        """``first_input`` once the NPU float-status register is cleared (TrainOneStepWithLossScaleCell's
        ``start_overflow_check``): a stale overflow, e.g. from evaluation, must not skip this step."""
        if self.status_register:
            clear = self.clear_status_op(Tensor([0] * 8, ms.int32))
            return ops.depend(first_input, clear)
        return first_input

    def _local_overflow(self, grads: tuple) -> Tensor:
        """This rank's overflow flag, float32 0/1 of shape ().

        Test seam: a subclass may override it (before compiling) to make one rank report overflow.
        """
        if self.fused_all_finite:
            finite = self.k_all_finite(*grads).reshape(())
        else:
            finite = ms.amp.all_finite(grads)
        return ops.cast(ops.logical_not(finite), ms.float32)

    def _agreed_finite(self, overflow: Tensor) -> Tensor:
        """One decision for all ranks: finite unless some rank overflowed (the OR as a sum > 0)."""
        if self.distributed:
            overflow = self.flag_reducer(overflow.reshape((1,))).reshape(())
        return ops.less_equal(overflow, ops.zeros_like(overflow))

    def apply(self, grads: tuple, scale_inv: Tensor, pending: Tensor | None = None) -> Tensor:
        """Reduce, unscale, check and (where every rank's gradients are finite) step; returns the agreed flag.

        ``pending`` is the overflow flag of the accumulated micro-batches (see ``TrainStep``).
        """
        if self.distributed:
            grads = self.reducer(grads)
        grads = self.hyper_map(ops.partial(_grad_scale, scale_inv), grads)
        overflow = self._local_overflow(grads)
        if pending is not None:
            overflow = ops.maximum(overflow, pending)
        finite = self._agreed_finite(overflow)
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
    optimizer step was applied on every rank (False when some rank's gradients were not finite).
    With accumulation the gradients are summed into buffers and each micro-batch's overflow flag
    into ``accum.overflow``, ``applied`` is True and ``ApplyAccumulated`` performs the step and
    returns its own flag. ``all_finite`` is a fused check over the gradient tuple returning a bool
    of one element (e.g. the CPU kernel); None means ``ms.amp.all_finite``. On a status-register
    target it must read overflow the way ``ms.amp.all_finite`` does there. ``drop_path_key`` (a
    ``DropPathKey`` of the network) is advanced after each micro-batch, in the graph.
    """

    def __init__(self, net_with_loss: nn.Cell, optimizer: nn.Optimizer, scaler: LossScaleState,
                 reducer: nn.Cell | None = None, clip_value: float = 0.0, accumulation_steps: int = 1,
                 ema: ParameterTuple | None = None, ema_decay: float = 0.9999,
                 all_finite: Callable | None = None, drop_path_key: nn.Cell | None = None) -> None:
        super().__init__(auto_prefix=False)
        self.net_with_loss = net_with_loss
        # models.layers.DropPathKey: its counter moves on in this graph after each micro-batch's masks are drawn
        self.keyed = drop_path_key is not None
        if self.keyed:
            self.drop_path_key = drop_path_key
        self.weights = optimizer.parameters
        self.scaler = scaler
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.accumulation_steps = accumulation_steps
        self.accumulate = accumulation_steps > 1
        self.hyper_map = ops.HyperMap()
        self.update = _Update(optimizer, scaler, reducer, clip_value, ema, ema_decay, all_finite)
        if self.accumulate:
            self.buffers = self.weights.clone(prefix="accum", init="zeros")
            # "accum." like the buffers: zero at optimizer-step boundaries, so checkpoints leave it out
            self.pending = Parameter(Tensor(0.0, ms.float32), name="accum.overflow", requires_grad=False)

    def construct(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        images = self.update.clear_status(images)
        loss = self.net_with_loss(images, targets)
        scale = self.scaler.scale
        sens = ops.fill(loss.dtype, loss.shape, 1.0) * scale
        if self.accumulate:
            sens = sens / self.accumulation_steps
        grads = self.grad(self.net_with_loss, self.weights)(images, targets, sens)
        if self.keyed:
            loss = ops.depend(loss, self.drop_path_key.advance())
        if self.accumulate:
            # the register is cleared before the next micro-batch: keep this one's overflow until the step
            flag = self.update._local_overflow(grads)
            marked = ops.assign(self.pending, ops.maximum(self.pending, flag))
            return ops.depend(loss, (self.hyper_map(_accumulate, self.buffers, grads), marked)), Tensor(True)
        applied = self.update.apply(grads, 1.0 / scale)
        return ops.depend(loss, applied), applied


class ApplyAccumulated(nn.Cell):
    """The optimizer step after ``accumulation_steps`` micro-batches; zeroes the buffers and the pending flag."""

    def __init__(self, step: TrainStep) -> None:
        super().__init__(auto_prefix=False)
        self.step = step
        self.hyper_map = ops.HyperMap()

    def construct(self) -> Tensor:
        finite = self.step.update.apply(self.step.buffers, 1.0 / self.step.scaler.scale, self.step.pending)
        cleared = ops.assign(self.step.pending, ops.zeros_like(self.step.pending))
        return ops.depend(finite, (self.hyper_map(_zero, self.step.buffers), cleared))
