"""Evaluate a checkpoint (or an exported MINDIR) on an ImageFolder: top-1, top-5, loss, img/s.

    python validate.py --config configs/poolformer_s12.yaml --data_dir DIR --ckpt_path CKPT [--json OUT]
"""

import sys

import mindcv_poolformer  # noqa: F401  (sets the fast oneDNN code path before any conv runs)
from mindcv_poolformer.evaluation.validate import main

if __name__ == "__main__":
    sys.exit(main())
