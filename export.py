"""Export a checkpoint to MINDIR (dynamic batch), ONNX or AIR (Ascend), verified, with a JSON sidecar.

    python export.py --model poolformer_s12 --ckpt_path CKPT --file_format MINDIR --file_name OUT
"""

import sys

import mindcv_poolformer  # noqa: F401  (sets the fast oneDNN code path before any conv runs)
from mindcv_poolformer.deploy.export import main

if __name__ == "__main__":
    sys.exit(main())
