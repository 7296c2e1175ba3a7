"""Worker for the overflow-agreement test: only rank 1 reports overflow at chosen steps, both must skip them.

    msrun --worker_num=2 --local_worker_num=2 ... tests/train_overflow_worker.py OUT_DIR

On Ascend 910A (and 910B in saturation mode) an overflow is visible only in the rank-local float-status
register; ``InjectedOverflow`` stands in for it on the CPU by OR-ing a per-rank ``inject`` flag into
``_Update._local_overflow``. Two runs share one launch: a plain step (the fused CPU all-finite kernel where
it is built) and a 2-micro-batch accumulated step (``ms.amp.all_finite``), the latter with overflow once in
a micro-batch (kept in ``accum.overflow``) and once in ``ApplyAccumulated``. Every optimizer step's full
state (weights, AdamW moments, step counters, loss scale) is saved per rank to ``rank{r}.npz``. No gradient
clipping: it would hide gradient-scale errors.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mindspore as ms  # noqa: E402
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops  # noqa: E402

from mindcv_poolformer.train import step as step_mod  # noqa: E402

# optimizer step -> micro-batch index (or "apply") at which rank 1 alone reports overflow
PLAIN_STEPS = 6
PLAIN_BAD = {1: "apply", 4: "apply"}
ACCUM_STEPS = 4
ACCUM_BAD = {1: 0, 2: "apply"}
BATCH, FEATURES, CLASSES = 4, 8, 4


class InjectedOverflow(step_mod._Update):
    """``_Update`` whose local overflow flag is also raised by ``inject`` (set from Python between calls)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.inject = Parameter(Tensor(0.0, ms.float32), name="test.inject", requires_grad=False)

    def _local_overflow(self, grads: tuple) -> ms.Tensor:
        return ops.maximum(super()._local_overflow(grads), self.inject)


def tiny_net(seed: int) -> nn.Cell:
    """A 2-layer MLP with the same initial weights on every rank."""
    ms.set_seed(seed)
    return nn.SequentialCell([nn.Dense(FEATURES, 16), nn.ReLU(), nn.Dense(16, CLASSES)])


def build(seed: int, make_reducer: Callable[[ParameterTuple], nn.Cell] | None, accum: int,
          all_finite: Callable | None) -> tuple[step_mod.TrainStep, InjectedOverflow]:
    """A TrainStep with AdamW and a dynamic loss scale (window 2, so it also grows during the run)."""
    net = tiny_net(seed)
    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    opt = nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-2, weight_decay=0.01)
    grad_reducer = make_reducer(opt.parameters) if make_reducer is not None else None
    scaler = step_mod.LossScaleState(2.0 ** 12, dynamic=True, window=2)
    step = step_mod.TrainStep(step_mod.WithLoss(net, loss), opt, scaler, grad_reducer, clip_value=0.0,
                              accumulation_steps=accum, all_finite=all_finite)
    step.set_train(True)
    assert isinstance(step.update, InjectedOverflow)
    return step, step.update


def state_of(step: nn.Cell) -> dict[str, np.ndarray]:
    """Every parameter of the step (weights, moments, global step, loss scale, buffers) but the test flag."""
    return {p.name: p.asnumpy().copy() for p in step.get_parameters() if p.name != "test.inject"}


def _inject(update: InjectedOverflow, overflow: bool) -> None:
    update.inject.set_data(Tensor(1.0 if overflow else 0.0, ms.float32))


def run(step: step_mod.TrainStep, update: InjectedOverflow, apply_acc: nn.Cell | None, steps: int,
        bad: dict, rank: int, accum: int) -> tuple[list[bool], list[dict]]:
    """Drive ``steps`` optimizer steps on rank-specific data; rank 1 injects overflow where ``bad`` says."""
    rng = np.random.default_rng(100 + rank)
    applied, states = [], [state_of(step)]
    for k in range(steps):
        flag = None
        for micro in range(accum):
            # without accumulation the micro-batch's own call is the optimizer step ("apply")
            _inject(update, rank == 1 and bad.get(k) == (micro if apply_acc is not None else "apply"))
            x = Tensor(rng.standard_normal((BATCH, FEATURES)).astype(np.float32))
            y = Tensor(rng.integers(0, CLASSES, BATCH).astype(np.int32))
            _, flag = step(x, y)
        if apply_acc is not None:
            _inject(update, rank == 1 and bad.get(k) == "apply")
            flag = apply_acc()
        applied.append(bool(flag.asnumpy()))
        states.append(state_of(step))
    return applied, states


def main() -> None:
    out = Path(sys.argv[1])
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    from mindcv_poolformer.distributed import init_distributed
    from mindcv_poolformer.kernels import cpu_kernels

    dist = init_distributed(True, "CPU")
    step_mod._Update = InjectedOverflow
    kernels = cpu_kernels()
    record: dict[str, np.ndarray] = {"world": np.array(dist.world),
                                     "fused": np.array(kernels is not None)}
    def reducer(params: ParameterTuple) -> nn.Cell:
        return nn.DistributedGradReducer(params, mean=True, degree=dist.world)

    plain, plain_update = build(1, reducer, 1, kernels.all_finite if kernels is not None else None)
    accum, accum_update = build(2, reducer, 2, None)
    for name, (step, update, apply_acc, steps, bad, n_micro) in {
            "plain": (plain, plain_update, None, PLAIN_STEPS, PLAIN_BAD, 1),
            "accum": (accum, accum_update, step_mod.ApplyAccumulated(accum), ACCUM_STEPS, ACCUM_BAD, 2)}.items():
        applied, states = run(step, update, apply_acc, steps, bad, dist.rank, n_micro)
        record[f"{name}/applied"] = np.array(applied)
        for param in states[0]:
            record[f"{name}/state/{param}"] = np.stack([s[param] for s in states])
    np.savez(out / f"rank{dist.rank}.npz", **record)


def check_flag_or() -> None:
    """With a fake flag all-reduce (this rank's flag + the other ranks' summed flags), any rank's overflow skips
    the step, and only then: weights and AdamW moments untouched, the dynamic loss scale halved."""

    class OtherRanks(nn.Cell):
        """Stands in for the flag AllReduce SUM: this rank's flag plus the other ranks' summed flags."""

        def __init__(self) -> None:
            super().__init__()
            self.others = Parameter(Tensor(np.zeros(1, np.float32)), name="test.others", requires_grad=False)

        def construct(self, flag: Tensor) -> Tensor:
            return flag + self.others

    class SameGradients(nn.Cell):
        """A gradient 'all-reduce' over identical ranks: the identity; it makes the step distributed."""

        def construct(self, grads: tuple) -> tuple:
            return grads

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    step_mod._Update = InjectedOverflow
    step, update = build(3, lambda params: SameGradients(), 1, None)
    assert update.distributed
    update.flag_reducer = OtherRanks()
    rng = np.random.default_rng(0)
    cases = ((0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (0, 0))
    for local, others in cases:
        update.inject.set_data(Tensor(float(local), ms.float32))
        update.flag_reducer.others.set_data(Tensor(np.full(1, others, np.float32)))
        before = {p.name: p.asnumpy().copy() for p in step.get_parameters()}
        x = Tensor(rng.standard_normal((BATCH, FEATURES)).astype(np.float32))
        y = Tensor(rng.integers(0, CLASSES, BATCH).astype(np.int32))
        _, applied = step(x, y)
        expect = local == 0 and others == 0
        assert bool(applied.asnumpy()) is expect, (local, others)
        after = {p.name: p.asnumpy() for p in step.get_parameters()}
        assert bool(np.array_equal(after["0.weight"], before["0.weight"])) is not expect, (local, others)
        assert bool(np.array_equal(after["adam_m.0.weight"], before["adam_m.0.weight"])) is not expect
        if not expect:
            assert float(after["loss_scale.value"]) == float(before["loss_scale.value"]) / 2
    print(f"flag-or: {len(cases)} cases ok")


if __name__ == "__main__":
    if sys.argv[1:] == ["--flag-or"]:
        check_flag_or()
    else:
        main()
