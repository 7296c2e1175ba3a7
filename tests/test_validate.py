"""validate.py: every sample counted once, accuracy equal to a hand computation, AMP levels, clean errors."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mindcv_poolformer.amp import apply_amp
from mindcv_poolformer.config import ConfigError
from mindcv_poolformer.deploy.artifacts import load_network
from mindcv_poolformer.evaluation.classification import create_eval_dataset, evaluate
from mindcv_poolformer.evaluation.validate import main
from mindcv_poolformer.models.layers import GroupNorm1
from mindcv_poolformer.transforms import Preprocess, eval_transform_pil

from conftest import require_mpirun, require_tool
from deploy_helpers import IMAGE_SIZE, MODEL, REPO, deploy_assets, run_cli  # noqa: F401  (fixture)

BATCH = 4  # 13 images: 3 full batches and one of 1
S12_EVAL = Preprocess(IMAGE_SIZE, 0.9, "bicubic", (0.485 * 255, 0.456 * 255, 0.406 * 255),
                      (0.229 * 255, 0.224 * 255, 0.225 * 255))


@functools.cache
def _hand_metrics(data: Path, ckpt: Path) -> dict:
    """Top-1/top-3/loss computed image by image with the single-image transform, no dataset pipeline."""
    import mindspore as ms

    net, _ = load_network(MODEL, str(ckpt))
    classes = sorted(p.name for p in (data / "val").iterdir())
    logits, labels = [], []
    for label, cls in enumerate(classes):
        for file in sorted((data / "val" / cls).iterdir()):
            x = eval_transform_pil(Image.open(file), IMAGE_SIZE, 0.9)[None]
            logits.append(net(ms.Tensor(x)).asnumpy()[0].astype(np.float64))
            labels.append(label)
    logits, labels = np.stack(logits), np.array(labels)
    log_prob = logits - logits.max(1, keepdims=True)
    log_prob -= np.log(np.exp(log_prob).sum(1, keepdims=True))
    order = np.argsort(-logits, axis=1)
    return {"top1": 100.0 * np.mean(order[:, 0] == labels),
            "top3": 100.0 * np.mean([labels[i] in order[i, :3] for i in range(len(labels))]),
            "loss": float(-log_prob[np.arange(len(labels)), labels].mean()), "n": len(labels)}


def test_validate_cli_counts_every_sample_and_matches_hand_computation(deploy_assets, tmp_path):  # noqa: F811
    out = tmp_path / "metrics.json"
    proc = run_cli("validate.py", "--data_dir", str(deploy_assets["data"]), "--ckpt_path", str(deploy_assets["ckpt"]),
                   "--batch_size", str(BATCH), "--image_resize", str(IMAGE_SIZE), "--num_parallel_workers", "1",
                   "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "top-1 (%)" in proc.stdout
    record = json.loads(out.read_text())
    hand = _hand_metrics(deploy_assets["data"], deploy_assets["ckpt"])
    assert record["num_samples"] == hand["n"] == 13
    assert record["top1"] == pytest.approx(hand["top1"], abs=1e-9)
    assert record["top5"] == pytest.approx(hand["top3"], abs=1e-9)  # 3 classes: top-5 is top-3
    assert record["loss"] == pytest.approx(hand["loss"], abs=1e-4)
    assert 0 < hand["top1"] < 100  # a non-trivial accuracy, so a miscount would show
    assert {"model", "ckpt", "img_per_s"} <= set(record)


class _ImageStatNet:
    """A stand-in network: logits from per-channel image means, so each sample's answer is distinct and cheap."""

    def __init__(self) -> None:
        self.weights = np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32)

    def __call__(self, x):
        import mindspore as ms

        return ms.Tensor(x.asnumpy().mean(axis=(2, 3)) @ self.weights)


def test_sharded_evaluation_covers_each_sample_once(deploy_assets):  # noqa: F811
    """Strided shards of 13 samples over 2 and 5 ranks: the shard sums equal the unsharded result."""
    net = _ImageStatNet()
    data = str(deploy_assets["data"])

    def run(rank: int, group: int):
        dataset, _, total = create_eval_dataset(data, "val", BATCH, S12_EVAL, num_parallel_workers=1, rank=rank,
                                                group_size=group)
        assert total == 13
        return evaluate(net, dataset, pad_to=BATCH)

    whole = run(0, 1)
    assert whole.num_samples == 13 and 0 < whole.top1 < 100
    for group in (2, 5):
        parts = [run(rank, group) for rank in range(group)]
        assert [p.num_samples for p in parts] == [len(range(r, 13, group)) for r in range(group)]
        correct = sum(p.top1 * p.num_samples / 100 for p in parts)
        assert correct == pytest.approx(whole.top1 * 13 / 100)
        assert sum(p.loss * p.num_samples for p in parts) == pytest.approx(whole.loss * 13, rel=1e-6)
    empty, _, _ = create_eval_dataset(data, "val", BATCH, S12_EVAL, num_parallel_workers=1, rank=13, group_size=14)
    assert empty is None and evaluate(net, empty).num_samples == 0


def test_amp_levels_close_to_fp32(deploy_assets):  # noqa: F811
    data = str(deploy_assets["data"])
    dataset, _, _ = create_eval_dataset(data, "val", 16, S12_EVAL, num_parallel_workers=1)
    batches = list(dataset.create_tuple_iterator(output_numpy=True, num_epochs=1))  # one batch of 13
    results = {}
    for level in ("O0", "O2", "O3"):
        net, _ = load_network(MODEL, str(deploy_assets["ckpt"]))
        net = apply_amp(net, level)
        norm_types = {str(c.mixed_precision_type) for _, c in net.cells_and_names() if isinstance(c, GroupNorm1)}
        assert norm_types == {"O2": {"MixedPrecisionType.FP32"}, "O3": {"MixedPrecisionType.FP16"}}.get(level, {"None"})
        results[level] = evaluate(net, batches)
    for level in ("O2", "O3"):
        print(f"{level}: top-1 {results[level].top1:.2f} vs O0 {results['O0'].top1:.2f} "
              f"(delta {results[level].top1 - results['O0'].top1:+.2f}), loss delta "
              f"{results[level].loss - results['O0'].loss:+.2e}")
        assert results[level].num_samples == 13
        assert abs(results[level].top1 - results["O0"].top1) <= 100 / 13 + 1e-9  # at most one flip
        assert results[level].loss == pytest.approx(results["O0"].loss, abs=1e-2)


@pytest.mark.parametrize("launcher", ["msrun", "mpirun"])
@pytest.mark.two_ranks
def test_two_ranks_all_reduce(deploy_assets, tmp_path, launcher):  # noqa: F811
    """Real data-parallel validation (2 processes): 7 + 6 samples, all-reduced to the 13-sample result."""
    if launcher == "mpirun":
        exe = require_mpirun()
    else:
        exe = require_tool("msrun", "it ships with MindSpore: run from the venv", os.path.dirname(sys.executable))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "dist.json"
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(REPO), MS_SCHED_PORT=str(port),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PATH=f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}")
    script = [str(REPO / "validate.py"), "--data_dir", str(deploy_assets["data"]), "--ckpt_path",
              str(deploy_assets["ckpt"]), "--batch_size", str(BATCH), "--image_resize", str(IMAGE_SIZE),
              "--num_parallel_workers", "1", "--distribute", "True", "--json", str(out)]
    if launcher == "msrun":
        cmd = [exe, "--worker_num=2", "--local_worker_num=2", f"--master_port={port}",
               f"--log_dir={tmp_path / 'logs'}", "--join=True", *script]
    else:  # plain mpirun: validate bootstraps MindSpore's scheduler from the MPI environment
        cmd = [exe, "-n", "2", "--oversubscribe", "--allow-run-as-root", "-x", "PATH", "-x", "PYTHONPATH",
               "-x", "GLOG_v", "-x", "MS_SCHED_PORT", sys.executable, *script]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    record = json.loads(out.read_text())
    hand = _hand_metrics(deploy_assets["data"], deploy_assets["ckpt"])
    assert record["ranks"] == 2 and record["num_samples"] == 13
    assert record["top1"] == pytest.approx(hand["top1"], abs=1e-9)
    assert record["loss"] == pytest.approx(hand["loss"], abs=1e-4)


def test_distribute_without_a_launcher_is_a_one_line_error(deploy_assets, capsys):  # noqa: F811
    err = _error_line(capsys, ["--data_dir", str(deploy_assets["data"]), "--ckpt_path", str(deploy_assets["ckpt"]),
                               "--distribute", "True"])
    assert "distribute=True needs a launcher" in err


def _error_line(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_user_errors_are_one_line(deploy_assets, tmp_path, capsys):  # noqa: F811
    data, ckpt = str(deploy_assets["data"]), str(deploy_assets["ckpt"])
    assert "does not exist" in _error_line(capsys, ["--data_dir", str(tmp_path / "nope"), "--ckpt_path", ckpt])
    assert "val_split" in _error_line(capsys, ["--data_dir", data, "--val_split", "test", "--ckpt_path", ckpt])
    (tmp_path / "empty" / "val" / "a").mkdir(parents=True)
    assert "no images" in _error_line(capsys, ["--data_dir", str(tmp_path / "empty"), "--ckpt_path", ckpt])
    assert "does not exist" in _error_line(capsys, ["--data_dir", data, "--ckpt_path", str(tmp_path / "x.ckpt")])
    assert "unknown option --bogus" in _error_line(capsys, ["--bogus", "1"])
    assert "amp_level" in _error_line(capsys, ["--amp_level", "O5"])
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert "bad.ckpt" in _error_line(capsys, ["--data_dir", data, "--ckpt_path", str(bad)])
    with pytest.raises(ConfigError, match="nope"):  # --debug True shows the real exception
        main(["--data_dir", str(tmp_path / "nope"), "--ckpt_path", ckpt, "--debug", "True"])


def test_cli_error_has_no_traceback(tmp_path):
    proc = run_cli("validate.py", "--data_dir", str(tmp_path), "--ckpt_path", str(tmp_path / "missing.ckpt"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"validate.py: error: ckpt_path: '{tmp_path}/missing.ckpt' does not "
                                                "exist"]
