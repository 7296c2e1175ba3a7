"""Segmentation training in the one trainer (issue 17): poly schedule and loss against mmengine/mmseg, a short
run whose mIoU rises above chance, exact resume mid-run, and bad input through the real train.py CLI."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from seg_train_helpers import make_tiny_ade, seg_overrides
from train_helpers import run_python

from mindcv_poolformer.config import ConfigError, load_config

from conftest import require


def test_poly_schedule_is_mmengine_poly_lr():
    """Every step's learning rate equals mmengine's PolyLR (power 0.9, eta_min, by iteration) driving torch AdamW."""
    torch = require("torch")
    from mmengine.optim.scheduler import PolyLR

    from mindcv_poolformer.train.schedule import ScheduleSettings, build_lr_schedule

    peak = 2e-4
    for total, eta_min in ((50, 0.0), (50, 1e-6), (2, 0.0), (1, 0.0)):  # 1 and 2: the span's floor of 1
        cfg = load_config(overrides={"model": "fpn_poolformer_s12", "scheduler": "poly", "lr": peak, "min_lr": eta_min,
                                     "warmup_epochs": 0, "max_iters": total, "lr_power": 0.9})
        ours = build_lr_schedule(ScheduleSettings.from_config(cfg), steps_per_epoch=7, global_batch=32)
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
        sched = PolyLR(opt, power=0.9, eta_min=eta_min, begin=0, end=total, by_epoch=False)
        reference = []
        for _ in range(total):
            reference.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert len(ours) == total
        np.testing.assert_allclose(ours, reference, rtol=2e-6, atol=1e-12)
        assert ours[0] == np.float32(peak) and (total == 1 or ours[-1] == np.float32(eta_min))


@pytest.mark.parametrize("backend", ["cpu", "none"])  # the fused CPU kernel, and MindSpore's ops (Ascend's path)
def test_loss_is_mmseg_decode_head_loss(backend):
    """Bilinear resize to the label size + cross-entropy with ignore 255, averaged over all pixels (mmseg's default)."""
    torch = require("torch")
    import mindspore as ms
    from mmseg_reference import _import_mmseg

    from mindcv_poolformer.train.loss import SegmentationCrossEntropy

    _import_mmseg()
    from mmseg.models.losses import CrossEntropyLoss
    from mmseg.models.utils import resize

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 5, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 5, (2, 32, 32)).astype(np.int64)
    labels[rng.random(labels.shape) < 0.3] = 255
    up = resize(torch.from_numpy(logits), size=(32, 32), mode="bilinear", align_corners=False)
    expected = CrossEntropyLoss(avg_non_ignore=False)(up, torch.from_numpy(labels), ignore_index=255).item()
    loss = SegmentationCrossEntropy(255, backend=backend)
    assert loss.use_fused == (backend == "cpu")
    ours = loss(ms.Tensor(logits), ms.Tensor(labels.astype(np.int32))).asnumpy()
    assert float(ours) == pytest.approx(expected, rel=1e-5)
    non_ignore = CrossEntropyLoss(avg_non_ignore=True)(up, torch.from_numpy(labels), ignore_index=255).item()
    assert abs(non_ignore - expected) > 1e-2  # the two averages differ here, so the check above tells them apart


_LOSS_GRAD_CHILD = """
import json, sys
from pathlib import Path
import numpy as np
import mindspore as ms
from mindspore import nn, ops
from mindcv_poolformer.train.loss import SegmentationCrossEntropy

def peak_mb():
    line = [s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith("VmHWM")][0]
    return int(line.split()[1]) / 1024

class Grad(nn.Cell):
    def __init__(self):
        super().__init__()
        self.loss = SegmentationCrossEntropy(255, backend=sys.argv[3])
        self.grad = ops.GradOperation()

    def construct(self, logits, labels):
        return self.grad(self.loss)(logits, labels)

ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
data = np.load(sys.argv[1])
logits, labels = ms.Tensor(data["logits"]), ms.Tensor(data["labels"].astype(np.int32))
before = peak_mb()
np.save(sys.argv[2], Grad()(logits, labels).asnumpy())
print(json.dumps({"peak_increase_mb": peak_mb() - before}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpu", "none"])
def test_loss_gradient_is_mmseg_and_keeps_few_full_size_maps(tmp_path, backend):
    """The loss's gradient (GRAPH mode) equals mmseg's in torch, and its backward holds few label-size logit maps.

    The resized logits (150 classes at the label size) are a training step's largest tensors: the
    loss's forward + backward may hold at most 6 of them at once (it holds ~4; ``ops.cross_entropy``
    with ``ignore_index``, which the segmentation bench once used, held 16-18 and made batch 8 at
    512x512 exceed 24 GB); the CPU backend's fused kernel holds none. Own process: the peak resident set is the
    process's.
    """
    torch = require("torch")
    from mmseg_reference import _import_mmseg

    _import_mmseg()
    from mmseg.models.losses import CrossEntropyLoss
    from mmseg.models.utils import resize

    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (2, 150, 64, 64)).astype(np.float32)
    labels = rng.integers(0, 150, (2, 256, 256)).astype(np.int64)
    labels[rng.random(labels.shape) < 0.2] = 255
    np.savez(tmp_path / "inputs.npz", logits=logits, labels=labels)
    (tmp_path / "loss_grad.py").write_text(_LOSS_GRAD_CHILD)  # GRAPH mode compiles from a source file, not -c
    proc = run_python([str(tmp_path / "loss_grad.py"), str(tmp_path / "inputs.npz"), str(tmp_path / "grad.npy"),
                       backend])
    assert proc.returncode == 0, proc.stderr[-2000:]
    increase = json.loads(proc.stdout.strip().splitlines()[-1])["peak_increase_mb"]

    x = torch.from_numpy(logits).requires_grad_(True)
    up = resize(x, size=(256, 256), mode="bilinear", align_corners=False)
    CrossEntropyLoss(avg_non_ignore=False)(up, torch.from_numpy(labels), ignore_index=255).backward()
    expected = x.grad.numpy()
    np.testing.assert_allclose(np.load(tmp_path / "grad.npy"), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    full_size_mb = labels.size * 150 * 4 / 2**20
    # the fused CPU kernel writes none of them (measured: 0.24 maps' worth, its lse and gradient); the ops ~3.6
    bound = 1 if backend == "cpu" else 6
    assert increase < bound * full_size_mb, f"{increase:.0f} MB = {increase / full_size_mb:.1f} full-size logit maps"


def test_config_selects_the_task():
    cfg = load_config(overrides={"model": "fpn_poolformer_s12"})
    assert (cfg.task, cfg.dataset) == ("segmentation", "ade20k")
    assert load_config(overrides={"model": "poolformer_s12"}).task == "classification"
    with pytest.raises(ConfigError, match="task: segmentation does not fit model poolformer_s12"):
        load_config(overrides={"model": "poolformer_s12", "task": "segmentation"})
    with pytest.raises(ConfigError, match="dataset: digits is a classification dataset"):
        load_config(overrides={"model": "fpn_poolformer_s12", "dataset": "digits"})
    assert load_config(overrides={"model": "fpn_poolformer_s12"})["frozen_stages"] == 0  # mmseg's: the stem
    assert load_config(overrides={"model": "fpn_poolformer_s12", "frozen_stages": 7})["frozen_stages"] == 7
    with pytest.raises(ConfigError, match="frozen_stages: 8 is more than the 7 backbone entries"):
        load_config(overrides={"model": "fpn_poolformer_s12", "frozen_stages": 8})
    with pytest.raises(ConfigError, match="frozen_stages: -1 applies to segmentation models only"):
        load_config(overrides={"model": "poolformer_s12", "frozen_stages": -1})


def test_metrics_log_rows_by_step_and_old_files(tmp_path):
    """Iteration rows are keyed by step (a replayed one is skipped); a file of the old header still reads and
    appends in its own columns."""
    from mindcv_poolformer.train.run_io import METRIC_FIELDS, SEGMENTATION_METRIC_FIELDS, MetricsLog

    log = MetricsLog(tmp_path / "seg", SEGMENTATION_METRIC_FIELDS)
    (tmp_path / "seg").mkdir()
    row = {"epoch": 1, "step": 4, "train_loss": 0.5, "lr": 1e-3, "val_miou": 50.0, "val_aacc": 80.0,
           "val_macc": 60.0, "img_per_s": 10.0, "epoch_time": 1.0}
    log.append(row, key="step")
    log.append(dict(row, step=8, val_miou=55.0), key="step")  # same data epoch, another row
    log.append(dict(row, step=8, val_miou=99.0), key="step")  # replayed after a kill: skipped
    assert [(r["step"], r["val_miou"]) for r in log.rows()] == [("4", "50.0"), ("8", "55.0")]
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.csv").write_text(",".join(METRIC_FIELDS) + "\n1,10,2.0,0.001,50.0,90.0,12.0,3.0\n")
    log = MetricsLog(old, SEGMENTATION_METRIC_FIELDS)
    assert [r["val_top1"] for r in log.rows()] == ["50.0"]
    log.append({"epoch": 2, "step": 20, "train_loss": 1.5, "lr": 1e-3, "val_top1": 60.0, "val_top5": 95.0,
                "img_per_s": 12.0, "epoch_time": 3.0})
    lines = (old / "metrics.csv").read_text().splitlines()
    assert lines[0] == ",".join(METRIC_FIELDS) and len(lines) == 3 and [r["epoch"] for r in log.rows()] == ["1", "2"]


@pytest.fixture(scope="module")
def ade(tmp_path_factory) -> Path:
    return make_tiny_ade(tmp_path_factory.mktemp("ade") / "ADEChallengeData2016")


def _weights(run: Path) -> dict:
    from mindcv_poolformer.checkpoint import read_state_dict

    final = sorted(run.glob("fpn_poolformer_s12-e*-s*.safetensors"))[-1]
    return {k: np.asarray(v) for k, v in read_state_dict(str(final)).items() if not k.startswith("train_state.")}


def test_task_reads_the_configs_test_and_train_preprocessing(ade, tmp_path, monkeypatch):
    """Validation, the prediction grid and the training batches use the config's seg_scale/divisor/mean/std."""
    import mindcv_poolformer.train.tasks as tasks
    from mindcv_poolformer.data.ade20k import SegPreprocess

    mean, std = [100.0, 110.0, 120.0], [50.0, 51.0, 52.0]
    cfg = load_config(overrides=seg_overrides(ade, tmp_path / "run", seg_scale=[96, 64], seg_size_divisor=16,
                                              mean=mean, std=std, reduce_zero_label=False, num_classes=4))
    want = SegPreprocess((96, 64), 16, (100.0, 110.0, 120.0), (50.0, 51.0, 52.0))
    seen: dict = {}

    def fake_eval(net, images, labels, num_classes, **kw):
        seen["eval"] = kw
        raise ConfigError("stop")

    def fake_predict(net, image, preprocess):
        seen["grid"] = preprocess
        return np.zeros(image.shape[:2], np.int64)

    monkeypatch.setattr(tasks, "evaluate_segmentation", fake_eval)
    monkeypatch.setattr(tasks, "predict_map", fake_predict)
    monkeypatch.setattr(tasks, "build_segmentation_train_dataset", lambda pairs, **kw: seen.setdefault("train", kw))
    task = tasks.make_task(cfg)
    with pytest.raises(ConfigError, match="stop"):
        task.evaluate(None, distributed=False)
    assert seen["eval"]["preprocess"] == want and seen["eval"]["reduce_zero_label"] is False
    task.finish(type("Net", (), {"set_train": lambda self, mode: None})(), tmp_path, count=1)
    assert seen["grid"] == want
    task.train_dataset(0, 0, 1, 4)
    train = seen["train"]
    assert (train["scale"], train["crop_size"], list(train["mean"]), list(train["std"])) == ((96, 64), (32, 32), mean,
                                                                                             std)
    assert train["reduce_zero_label"] is False and train["batch_size"] == 4 and train["num_classes"] == 4


@pytest.mark.slow  # three short FPN-S12 runs, each compiling the step (about 1-3 min each on 2 busy cores)
def test_short_run_learns_and_resumes_exactly(ade, tmp_path):
    """12 iterations: mIoU above what any constant prediction reaches, rows per validation, loss.csv rows per
    log_interval, the PNG grid; then a run stopped at step 7 (mid data epoch, between validations and between
    loss.csv rows) and resumed gives the same losses, rows and weights."""
    from mindcv_poolformer.train.trainer import Trainer

    # head_dropout 0: the head's Dropout2d draws from MindSpore's kernel RNG, which a resume cannot restore
    extra = {"max_iters": 12, "val_interval": 6, "ckpt_save_interval": 3, "seg_ratio_range": [0.75, 1.5],
             "hflip": 0.5, "seg_photometric": True, "head_dropout": 0.0, "log_interval": 4}
    full_dir = tmp_path / "full"
    full = Trainer(load_config(overrides=seg_overrides(ade, full_dir, **extra))).fit()
    rows = list(csv.DictReader(open(full_dir / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [6, 12]
    assert {"val_miou", "val_aacc", "val_macc"} <= set(rows[0])
    # a constant prediction has IoU = its class share for one class and 0 for the others: mIoU <= 1/3
    assert float(rows[-1]["val_miou"]) > 40.0, rows
    assert (full_dir / "predictions.png").stat().st_size > 2000 and (full_dir / "curves.png").exists()
    assert (full_dir / "fpn_poolformer_s12-best.safetensors").exists()
    loss_rows = list(csv.DictReader(open(full_dir / "loss.csv")))
    assert [int(r["step"]) for r in loss_rows] == [4, 8, 12]
    step_losses = [loss for _, loss in sorted(full.step_losses)]
    assert [float(r["train_loss"]) for r in loss_rows] == pytest.approx(
        [np.mean(step_losses[i:i + 4]) for i in (0, 4, 8)], abs=2e-6)

    part_dir = tmp_path / "part"
    first = Trainer(load_config(overrides=seg_overrides(ade, part_dir, **extra))).fit(stop_after_step=7)
    assert first.interrupted and first.step_losses[-1][0] == 6  # 16 images / batch 4: step 7 is in data epoch 2
    resumed = Trainer(load_config(overrides=seg_overrides(ade, part_dir, resume="auto", **extra)))
    assert resumed.global_step == 7 and resumed.skip_micro == 3
    second = resumed.fit()
    losses = dict(full.step_losses)
    assert dict(first.step_losses) | dict(second.step_losses) == pytest.approx(losses, rel=1e-5, abs=1e-6)
    rows_part = list(csv.DictReader(open(part_dir / "metrics.csv")))
    assert [r["train_loss"] for r in rows_part] == [r["train_loss"] for r in rows]
    assert [r["val_miou"] for r in rows_part] == [r["val_miou"] for r in rows]
    loss_rows_part = list(csv.DictReader(open(part_dir / "loss.csv")))
    assert [int(r["step"]) for r in loss_rows_part] == [4, 8, 12]
    assert [float(r["train_loss"]) for r in loss_rows_part] == pytest.approx(
        [float(r["train_loss"]) for r in loss_rows], rel=1e-5, abs=1e-6)
    a, b = _weights(full_dir), _weights(part_dir)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.slow  # two one-step FPN-S12 runs, each compiling the step
@pytest.mark.parametrize("frozen_stages", [0, -1])
def test_frozen_stages_key_freezes_the_stem_or_trains_it(ade, tmp_path, frozen_stages, caplog):
    """``frozen_stages: 0`` (the default, mmseg's) keeps the stem out of the optimizer, so one AdamW step with
    decay on every parameter leaves it bit-identical while the stage after it moves; -1 updates the stem too.
    The run's closing timing line names the compile of its first step."""
    import logging
    import re

    from mindcv_poolformer.train.trainer import Trainer

    cfg = load_config(overrides=seg_overrides(ade, tmp_path / "run", max_iters=1, val_while_train=False,
                                              frozen_stages=frozen_stages))
    trainer = Trainer(cfg)
    backbone = trainer.net.backbone
    before = {p.name: p.asnumpy().copy() for p in backbone.get_parameters()}
    optimized = {p.name for p in trainer.optimizer.parameters}
    with caplog.at_level(logging.INFO, logger="mindcv_poolformer"):
        trainer.fit()
    timing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("timing: setup ")]
    assert len(timing) == 1 and float(re.search(r"first step ([0-9.]+) s \(graph compile\)", timing[0])[1]) > 1
    stem = [p.name for p in backbone.patch_embed.get_parameters()]
    later = [p.name for p in backbone.network[0].get_parameters()]
    assert stem and later
    moved = {p.name for p in backbone.get_parameters() if not np.array_equal(p.asnumpy(), before[p.name])}
    # (norm1's shift gets no gradient, exactly: average pooling minus identity cancels a per-channel constant)
    assert moved & set(later) and set(later) <= optimized
    if frozen_stages == 0:
        assert not moved & set(stem) and not optimized & set(stem)
    else:
        assert set(stem) <= moved and set(stem) <= optimized


def _bad_run(args: list[str], run: Path) -> str:
    proc = run_python(["train.py", *args, "--ckpt_save_dir", str(run)], timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("train.py: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not run.exists() or not any(run.iterdir()), sorted(p.name for p in run.iterdir())
    return errors[0]


def _cli(data: Path) -> list[str]:
    return ["--model", "fpn_poolformer_s12", "--device_target", "CPU", "--data_dir", str(data), "--train_split",
            "training", "--val_split", "validation", "--num_classes", "3", "--max_iters", "2", "--batch_size", "2"]


@pytest.mark.parametrize("case", ["no_annotations", "unpaired_image", "label_out_of_range", "num_classes"])
def test_bad_input_is_one_line_exit2_nothing_written(ade, tmp_path, case):
    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(ade, data)
    args = _cli(data)
    if case == "no_annotations":
        shutil.rmtree(data / "annotations" / "training")
        expect = ["annotations/training is missing"]
    elif case == "unpaired_image":
        (data / "annotations" / "training" / "ADE_train_00000003.png").unlink()
        expect = ["ADE_train_00000003.jpg has no annotation"]
    elif case == "label_out_of_range":
        bad = data / "annotations" / "validation" / "ADE_valid_00000001.png"
        label = np.asarray(Image.open(bad)).copy()
        label[5, 5] = 9
        Image.fromarray(label).save(bad)
        expect = ["ADE_valid_00000001.png has label value 9", "num_classes 3"]
    else:
        args[args.index("--num_classes") + 1] = "2"
        expect = ["has label value 3", "out of range for num_classes 2"]
    error = _bad_run(args, tmp_path / "run")
    for text in expect:
        assert text in error, error


DIST_WORKER = str(Path(__file__).resolve().parent / "seg_train_dist_worker.py")


@pytest.mark.slow  # three FPN-S12 processes (one alone, two under msrun), each compiling one step: ~1-3 min
@pytest.mark.two_ranks
def test_msrun_two_ranks_equal_one_process_on_the_concatenated_batch(ade, tmp_path):
    """Weights after one unclipped SGD step: equal on both ranks and to one process on both ranks' images,
    and the mIoU of the split validation set (histograms all-reduced) equals the single process's."""
    import os
    import socket
    import sys

    single = tmp_path / "single"
    single.mkdir()
    done = run_python([DIST_WORKER, str(ade), str(single), "8", "False"], timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    msrun = shutil.which("msrun", path=os.path.dirname(sys.executable)) or shutil.which("msrun")
    assert msrun, "msrun not found"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist = tmp_path / "dist"
    dist.mkdir()
    done = run_python([msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={port}",
                       f"--log_dir={tmp_path / 'logs'}", "--join=True", DIST_WORKER, str(ade), str(dist), "4", "True"],
                      env={"PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}"}, timeout=1500)
    logs = "".join(p.read_text()[-2000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert done.returncode == 0, done.stderr[-2000:] + logs
    ref, init = dict(np.load(single / "rank0.npz")), dict(np.load(single / "init.npz"))
    ranks = [dict(np.load(dist / f"rank{r}.npz")) for r in range(2)]
    start = dict(np.load(dist / "init.npz"))
    worst = update = 0.0
    for name, value in ref.items():
        assert np.array_equal(start[name], init[name]), f"{name}: the ranks started from other weights"
        assert np.array_equal(ranks[0][name], ranks[1][name]), name
        worst = max(worst, float(np.max(np.abs(ranks[0][name] - value))))
        update = max(update, float(np.max(np.abs(value - init[name]))))
    assert update > 1e-3, f"the step barely moved the weights ({update:.1e}): the comparison would prove nothing"
    assert worst <= 1e-3 * update, f"2 ranks differ from 1 process by {worst:.3e} (largest update {update:.3e})"
    texts = [(d / f"rank{r}.txt").read_text().split() for d, r in ((single, 0), (dist, 0), (dist, 1))]
    assert [t[0] for t in texts] == ["1", "2", "2"]
    assert float(texts[1][2]) == float(texts[2][2]) == pytest.approx(float(texts[0][2]), abs=0.2)


def _simulated_ranks(world: int, run, monkeypatch) -> list[str | None]:
    """``run(rank)`` in ``world`` threads whose ``all_reduce_sum`` is a float32 sum across them (as MindSpore's CPU
    AllReduce); the error message each rank raised (None: it passed)."""
    import threading

    import mindcv_poolformer.train.tasks as tasks

    barrier, parts, lock = threading.Barrier(world, timeout=60), {}, threading.Lock()

    def all_reduce(values: np.ndarray) -> np.ndarray:
        assert values.dtype == np.float32
        with lock:
            parts[threading.get_ident()] = values.copy()
        barrier.wait()
        total = np.sum(np.stack(list(parts.values())), axis=0, dtype=np.float32)
        barrier.wait()
        return total

    monkeypatch.setattr(tasks, "all_reduce_sum", all_reduce)
    messages: list[str | None] = [None] * world

    def rank_main(rank: int) -> None:
        try:
            run(rank)
        except ConfigError as exc:
            messages[rank] = str(exc)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return messages


@pytest.mark.parametrize("world, n, bad", [
    (2, 9, {7: "value"}),                   # only rank 1 reads it
    (3, 9, {8: "value", 4: "unreadable"}),  # the lowest index is rank 1's, the other rank 2's
    (3, 9, {5: "unreadable"}),              # ranks 0 and 1 learn the reason by reading that one file
    (2, 9, {3: "value", 6: "value"}),       # rank 1's 3 before rank 0's 6
    (2, 9, {}),
    (2, 4200, {4151: "value"}),             # an index past the 12-bit low part of the all-reduced slot
])
def test_label_check_shared_over_ranks_names_the_lowest_bad_file(tmp_path, monkeypatch, world, n, bad):
    """Each rank reads labels[rank::world]; all raise the error one process raises: the lowest failing index."""
    from PIL import Image

    from mindcv_poolformer.train.tasks import check_segmentation_labels

    good = tmp_path / "good.png"
    Image.fromarray(np.array([[0, 1], [2, 3]], np.uint8)).save(good)  # classes 0..2 after reduce_zero_label
    labels = [str(good)] * n
    for index, kind in bad.items():
        path = tmp_path / f"bad{index}.png"
        if kind == "value":
            Image.fromarray(np.array([[1, 4 + index % 7], [255, 0]], np.uint8)).save(path)
        else:
            path.write_bytes(b"not a png")
        labels[index] = str(path)
    read: list[str] = []
    import mindcv_poolformer.train.tasks as tasks

    real_top = tasks._label_top
    monkeypatch.setattr(tasks, "_label_top", lambda p, rzl: read.append(p) or real_top(p, rzl))
    messages = _simulated_ranks(world, lambda r: check_segmentation_labels(labels, 3, True, 2, r, world), monkeypatch)
    if not bad:
        assert messages == [None] * world
        assert len(read) == n  # every file read once over all ranks, not once per rank
        return
    lowest = min(bad)
    expect = (f"has label value {4 + lowest % 7}" if bad[lowest] == "value" else "is not a readable PNG")
    assert len(set(messages)) == 1, messages
    assert messages[0].startswith(f"data: {tmp_path / f'bad{lowest}.png'} {expect}"), messages[0]
    assert "\n" not in messages[0]
    with pytest.raises(ConfigError) as single:
        check_segmentation_labels(labels, 3, True, 2)
    assert str(single.value) == messages[0]
