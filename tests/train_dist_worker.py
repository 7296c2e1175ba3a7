"""Worker for the distributed-training tests: one optimizer step through the real Trainer, weights saved per rank.

    python tests/train_dist_worker.py DATA_DIR OUT_DIR BATCH DISTRIBUTE [OPT]

SGD-momentum by default, without clipping: its first update is ``-lr * (g + wd * w)``, linear in the
gradient, so a gradient of the wrong scale (ranks summed instead of averaged) moves the weights by the
size of the update itself. Clipping by a global norm below ``||g||`` would hide that (the clipped update is
``g * clip / ||g||`` whatever the scale of ``g``), and so would Adam, whose first step is ~``lr * sign(g)``.
The initial weights are saved too (``init.npz``), so the test can compare the difference with the update.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_helpers import tiny_overrides  # noqa: E402

from mindcv_poolformer.config import load_config  # noqa: E402
from mindcv_poolformer.distributed import exit_process  # noqa: E402
from mindcv_poolformer.train.trainer import Trainer  # noqa: E402


def main() -> None:
    data_dir, out_dir, batch, distribute = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "True"
    opt = sys.argv[5] if len(sys.argv) > 5 else "momentum"
    cfg = load_config(overrides=tiny_overrides(Path(data_dir), out_dir / "run", batch_size=batch, num_samples=16,
                                               epoch_size=1, distribute=distribute, shuffle=True, clip_grad=False,
                                               label_smoothing=0.1, val_while_train=True,
                                               opt=opt, lr=0.05 if opt == "momentum" else 2e-3))
    trainer = Trainer(cfg)
    if trainer.dist.rank == 0:
        np.savez(out_dir / "init.npz", **{p.name: p.asnumpy() for p in trainer.net.trainable_params()})
    result = trainer.fit()
    weights = {p.name: p.asnumpy() for p in trainer.net.trainable_params()}
    np.savez(out_dir / f"rank{trainer.dist.rank}.npz", **weights)
    (out_dir / f"rank{trainer.dist.rank}.txt").write_text(
        f"{trainer.dist.world} {trainer.dist.launcher} {result.epochs[-1]['val_top1']}\n")


if __name__ == "__main__":
    main()
    exit_process(0)  # as train.py ends: under our mpirun scheduler without MindSpore's cluster finalisation
