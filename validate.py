"""Evaluate a checkpoint (or an exported MINDIR) on an ImageFolder: top-1, top-5, loss, img/s; or a Semantic FPN
checkpoint on an ADE20K-layout folder: mIoU, aAcc, mAcc, per-class IoU.

    python validate.py --config configs/poolformer_s12.yaml --data_dir DIR --ckpt_path CKPT [--json OUT]
    python validate.py --config configs/demo/texture_mosaics_cpu.yaml --data_dir ADE20K_LAYOUT_DIR --ckpt_path CKPT
"""


import mindcv_poolformer  # noqa: F401  (sets the fast oneDNN code path before any conv runs)
from mindcv_poolformer.distributed import exit_process
from mindcv_poolformer.evaluation.validate import main

if __name__ == "__main__":
    exit_process(main())
