"""Classification evaluation: the eval dataset and exact top-1/top-5/loss over one or many ranks.

Every readable sample is counted exactly once; an unreadable image file is skipped (counted in
``EvalMetrics.skipped``, never in the top-1 denominator) or, with ``strict_data``, an error. The
last partial batch is padded on the host to the batch size (so a fixed-shape graph or MINDIR never
recompiles) and the padding is masked out. Sharded evaluation gives rank ``r`` the samples
``r, r + g, r + 2g, ...`` (no repeated samples, unlike ``num_shards``, which pads shards to equal
length by repeating some) and all-reduces the sums.
Softmax, loss and top-k are computed on the host in float64 from the (float32) logits.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..data.listing import list_image_folder, shard_indices
from ..distributed import all_reduce_sum
from ..errors import ConfigError
from ..transforms import ImageReader, Preprocess

__all__ = ["EvalMetrics", "create_eval_dataset", "evaluate"]


@dataclass
class EvalMetrics:
    """Top-k accuracies in percent, the mean cross-entropy, and how many samples they cover.

    ``img_per_s`` is the steady-state throughput: the first batch (graph compilation) is excluded
    when there is more than one batch. ``seconds`` is the whole loop. ``skipped`` counts unreadable
    images left out of every metric.
    """
    top1: float
    top5: float
    loss: float
    num_samples: int
    seconds: float
    img_per_s: float
    skipped: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def create_eval_dataset(
    data_dir: str,
    split: str,
    batch_size: int,
    preprocess: Preprocess,
    num_parallel_workers: int = 4,
    rank: int = 0,
    group_size: int = 1,
    *,
    strict: bool = False,
    class_names: Sequence[str] | None = None,
):
    """The validation ImageFolder of ``data_dir/split`` through the reference eval transform ``preprocess``, batched.

    Returns ``(dataset, class_names, num_samples_total)``; ``dataset`` holds this rank's shard only
    (``None`` when the shard is empty, i.e. more ranks than images). No sample is ever dropped; an
    unreadable image comes out with label -1 (see ``ImageReader``), or raises with ``strict``.
    ``class_names`` (the training classes) fixes the labels when the split has only some of them.
    """
    images = list_image_folder(data_dir, split, class_names)
    total = len(images.files)
    workers = max(1, min(num_parallel_workers, os.cpu_count() or 1))
    rows = np.arange(total)
    if group_size > 1:
        rows = shard_indices(rows, rank, group_size, even=False)
        if not len(rows):
            return None, images.classes, total
    reader = ImageReader([images.files[i] for i in rows], images.labels[rows], strict=strict, substitute=False)
    dataset = reader.dataset(workers).map(preprocess.transforms(decode=False), input_columns="image",
                                          num_parallel_workers=workers)
    dataset = dataset.batch(batch_size, drop_remainder=False)
    return dataset, images.classes, total


def _batch_metrics(logits: np.ndarray, labels: np.ndarray) -> tuple[int, int, float]:
    logits = logits.astype(np.float64)
    num_classes = logits.shape[1]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(f"label {int(labels.max())} is out of range for a model with {num_classes} classes "
                          "(set num_classes to the dataset's class count)")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_prob = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_prob[np.arange(len(labels)), labels].sum())
    k = min(5, num_classes)
    # A sample is top-k correct when fewer than k classes score strictly higher than the true one.
    true_score = logits[np.arange(len(labels)), labels][:, None]
    rank_of_true = (logits > true_score).sum(axis=1)
    return int((rank_of_true < 1).sum()), int((rank_of_true < k).sum()), loss


def evaluate(net, dataset: Iterable | None, pad_to: int | None = None, distributed: bool = False,
             log_every: int = 0) -> EvalMetrics:
    """Top-1/top-5 (percent), mean cross-entropy and throughput of ``net`` on ``dataset``.

    Args:
        net: a callable taking an NCHW float32 ``Tensor`` and returning logits (Cell or GraphCell).
        dataset: yields ``(images, labels)`` batches (a MindSpore dataset or any iterable of numpy
            pairs); ``None`` for an empty shard.
        pad_to: pad every smaller batch to this size and mask the padding (for fixed-shape graphs);
            default: the size of the first batch.
        distributed: all-reduce the sums over the launched processes (``mindspore.communication``
            must be initialised); every rank gets the global result.
        log_every: print a progress line every that many batches (0 = quiet).
    """
    import mindspore as ms

    if hasattr(net, "set_train"):
        net.set_train(False)
    if dataset is None:
        batches: Iterable = ()
    elif hasattr(dataset, "create_tuple_iterator"):
        batches = dataset.create_tuple_iterator(output_numpy=True, num_epochs=1)
    else:
        batches = dataset
    correct1 = correct5 = count = skipped = 0
    loss_sum = 0.0
    start = time.perf_counter()
    warm_start, warm_count = start, 0
    for step, (images, labels) in enumerate(batches, 1):
        images = np.asarray(images, dtype=np.float32)
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        n = len(labels)
        if pad_to is None:
            pad_to = n
        if n < pad_to:
            images = np.concatenate([images, np.zeros((pad_to - n,) + images.shape[1:], np.float32)])
        logits = net(ms.Tensor(images)).asnumpy()[:n]
        readable = labels >= 0  # -1 marks an unreadable image (ImageReader): in no metric, counted as skipped
        if not readable.all():
            skipped += int(n - readable.sum())
            logits, labels, n = logits[readable], labels[readable], int(readable.sum())
        c1, c5, loss = _batch_metrics(logits, labels)
        correct1, correct5, count, loss_sum = correct1 + c1, correct5 + c5, count + n, loss_sum + loss
        if step == 1:
            warm_start, warm_count = time.perf_counter(), count
        if log_every and step % log_every == 0:
            print(f"  batch {step}: {count} samples, top-1 {100.0 * correct1 / count:.2f}%", flush=True)
    end = time.perf_counter()
    seconds = end - start
    if count > warm_count:
        timed_seconds, timed_count = end - warm_start, count - warm_count
    else:
        timed_seconds, timed_count = seconds, count
    img_per_s = timed_count / timed_seconds if timed_seconds > 0 else 0.0
    if distributed:
        # MindSpore's CPU AllReduce takes float16/float32 only; float32 holds counts exactly below 2**24.
        counts = all_reduce_sum(np.array([correct1, correct5, count, skipped], dtype=np.float32))
        correct1, correct5, count, skipped = (int(round(float(v))) for v in counts)
        # CPU AllReduce only sums: seconds becomes the mean over ranks; throughput adds up over ranks.
        sums = all_reduce_sum(np.array([loss_sum, img_per_s, seconds, 1.0], dtype=np.float32))
        loss_sum, img_per_s, seconds = float(sums[0]), float(sums[1]), float(sums[2] / sums[3])
    if count == 0:
        return EvalMetrics(0.0, 0.0, float("nan"), 0, seconds, 0.0, skipped)
    return EvalMetrics(
        top1=100.0 * correct1 / count,
        top5=100.0 * correct5 / count,
        loss=loss_sum / count,
        num_samples=count,
        seconds=seconds,
        img_per_s=img_per_s,
        skipped=skipped,
    )
