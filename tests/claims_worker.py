"""Worker for the stop-signal claims: the real Trainer, a real SIGTERM delivered to one chosen process.

    python tests/claims_worker.py DATA_DIR OUT_DIR DISTRIBUTE SIGNAL_RANK SIGNAL_STEP COUNT

Before optimizer step ``SIGNAL_STEP`` (0-based) the process of rank ``SIGNAL_RANK`` sends itself SIGTERM
``COUNT`` times (the other rank gets none). The handler runs at once (Python code between steps), so the
signal lands where a ``kill`` from outside during that step would take effect. Each rank then writes
``rank{r}.json``: what the Trainer reports (interrupted, steps run, checkpoint), if it got that far.
"""

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_helpers import tiny_overrides  # noqa: E402

from mindcv_poolformer.config import load_config  # noqa: E402
from mindcv_poolformer.train.trainer import Trainer  # noqa: E402


def main() -> None:
    data_dir, out_dir, distribute = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "True"
    signal_rank, signal_step, count = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    cfg = load_config(overrides=tiny_overrides(data_dir, out_dir / "run", batch_size=4, epoch_size=1,
                                               distribute=distribute, mode=int(os.environ.get("CLAIMS_MODE", "1")),
                                               stop_check_interval=int(os.environ.get("CLAIMS_STOP_CHECK", "50"))))
    trainer = Trainer(cfg)
    rank = trainer.dist.rank
    train_dataset = trainer.task.train_dataset

    class SignalBefore:
        """The epoch's batches, with the signals sent just before batch ``signal_step`` goes to its step."""

        def __init__(self, data) -> None:
            self.data = data

        def create_tuple_iterator(self, num_epochs: int):
            for index, batch in enumerate(self.data.create_tuple_iterator(num_epochs=num_epochs)):
                if rank == signal_rank and index == signal_step:
                    for _ in range(count):
                        os.kill(os.getpid(), signal.SIGTERM)
                yield batch

    trainer.task.train_dataset = lambda *args: SignalBefore(train_dataset(*args))
    (out_dir / f"rank{rank}.started").write_text(str(trainer.steps_per_epoch))
    result = trainer.fit()
    (out_dir / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": trainer.dist.world, "interrupted": result.interrupted,
        "steps": [s for s, _ in result.step_losses], "global_step": trainer.global_step,
        "steps_per_epoch": trainer.steps_per_epoch, "last_checkpoint": result.last_checkpoint}))


if __name__ == "__main__":
    main()
