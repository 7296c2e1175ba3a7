"""The CPU gradient reducer: ordered flat buckets that give back every gradient in its own place, shape and dtype.

Why it exists (MindSpore's CPU collectives pair messages by arrival, so independent per-gradient AllReduces
can be matched across ranks in different orders) is in ``OrderedGradReducer``'s docstring; the 2-rank tests
in test_train_distributed.py check the reduced step against one process. Here the collective is replaced by
an exact stand-in (x2, as if both ranks held the same gradients), so the mean must give each input back:
a wrong offset, a swapped bucket or a lost reshape shows as a changed value.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, ParameterTuple, Tensor, nn

from mindcv_poolformer.train.step import OrderedGradReducer, grad_reducer

SHAPES = [(3, 4), (5,), (2, 2, 2), (7, 1), (1,), (6, 6)]


class _TwoEqualRanks(nn.Cell):
    def construct(self, x):
        return x * 2.0


def _params(shapes, dtype=np.float32) -> ParameterTuple:
    return ParameterTuple([Parameter(Tensor(np.zeros(s, dtype)), name=f"p{i}") for i, s in enumerate(shapes)])


def test_buckets_cover_the_parameters_in_order():
    sizes = [int(np.prod(s)) for s in SHAPES]  # 12, 5, 8, 7, 1, 36
    red = OrderedGradReducer(_params(SHAPES), degree=2, bucket=20)
    assert red.ranges == ((0, 2), (2, 5), (5, 6))  # 17 | 8+7+1 | 36 alone (larger than a bucket)
    flat = [i for a, b in red.ranges for i in range(a, b)]
    assert flat == list(range(len(SHAPES)))
    for a, b in red.ranges:
        assert b - a == 1 or sum(sizes[a:b]) <= 20
    assert red.slices == ((0, 12), (12, 17), (0, 8), (8, 15), (15, 16), (0, 36))


@pytest.mark.parametrize("bucket", [1 << 22, 50])
def test_mean_gives_every_gradient_back_in_graph_mode(bucket):
    """180 parameters in one bucket (``ops.split`` would exceed the compiler's depth limit), or 60 buckets."""
    ms.set_context(mode=ms.GRAPH_MODE)
    shapes = SHAPES * 30
    red = OrderedGradReducer(_params(shapes), degree=2, bucket=bucket)
    red.allreduce = _TwoEqualRanks()
    rng = np.random.default_rng(0)
    grads = tuple(Tensor(rng.normal(size=s).astype(np.float32)) for s in shapes)
    out = red(grads)
    assert len(out) == len(grads)
    for g, o in zip(grads, out):
        assert o.shape == g.shape and o.dtype == g.dtype
        np.testing.assert_array_equal(o.asnumpy(), g.asnumpy())


def test_float16_gradients_keep_their_dtype():
    ms.set_context(mode=ms.GRAPH_MODE)
    red = OrderedGradReducer(_params(SHAPES, np.float16), degree=4)
    red.allreduce = _TwoEqualRanks()
    grads = tuple(Tensor(np.full(s, 1.5, np.float16)) for s in SHAPES)
    for o in red(grads):
        assert o.dtype == ms.float16
        np.testing.assert_array_equal(o.asnumpy(), np.full(o.shape, 0.75, np.float16))  # x2 (sum) / 4 (ranks)


def test_cpu_gets_the_ordered_reducer():
    assert isinstance(grad_reducer(_params(SHAPES), 2, "CPU"), OrderedGradReducer)
