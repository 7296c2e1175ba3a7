"""Worker for the segmentation data-parallel test: one SGD step of FPN-S12 through the real Trainer, weights per rank.

    python tests/seg_train_dist_worker.py DATA_DIR OUT_DIR BATCH DISTRIBUTE

Plain SGD without momentum or clipping: the update is ``-lr * (g + wd * w)``, linear in the gradient, so a
gradient of the wrong scale (ranks summed instead of averaged) moves the weights by the update itself. The
crops are the whole 32x32 images (no resize, flip, photometric or crop draws), so one process on 2 x BATCH
images sees exactly the pixels the two ranks see. The head's BatchNorm normalises with its moving statistics
here (CPU has no SyncBatchNorm; per-rank batch statistics would differ from the full batch's by design, which
is what SyncBN on Ascend removes), and its dropout is off (MindSpore's kernel RNG differs per process).
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from seg_train_helpers import seg_overrides  # noqa: E402

from mindcv_poolformer.config import load_config  # noqa: E402
from mindcv_poolformer.train.trainer import Trainer  # noqa: E402


def main() -> None:
    from mindspore import nn

    data_dir, out_dir, batch, distribute = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "True"
    cfg = load_config(overrides=seg_overrides(Path(data_dir), out_dir / "run", batch_size=batch, distribute=distribute,
                                              max_iters=1, val_interval=1, opt="sgd", momentum=0.0, lr=0.05,
                                              weight_decay=1e-4, clip_grad=False, head_dropout=0.0,
                                              cat_max_ratio=1.0, num_samples=8))
    trainer = Trainer(cfg)
    for _, cell in trainer.net.cells_and_names():
        if isinstance(cell, nn.BatchNorm2d):
            cell.use_batch_statistics = False
    if trainer.dist.rank == 0:
        np.savez(out_dir / "init.npz", **{p.name: p.asnumpy() for p in trainer.net.trainable_params()})
    result = trainer.fit()
    np.savez(out_dir / f"rank{trainer.dist.rank}.npz", **{p.name: p.asnumpy() for p in trainer.net.trainable_params()})
    (out_dir / f"rank{trainer.dist.rank}.txt").write_text(
        f"{trainer.dist.world} {trainer.dist.launcher} {result.epochs[-1]['val_miou']}\n")


if __name__ == "__main__":
    main()
