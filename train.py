"""Train or fine-tune a PoolFormer on an ImageFolder (or the built-in digits demo), or a Semantic FPN.

    python train.py --config configs/demo/digits_cpu.yaml
    mpirun -n 8 python train.py --config configs/poolformer/poolformer_s12_ascend.yaml --data_dir /path/to/imagenet
    msrun --worker_num=8 --local_worker_num=8 train.py --config configs/poolformer/poolformer_s12_ascend.yaml ...

Semantic FPN segmentation on ADE20K (the same trainer; iteration-based, mIoU validation), and its CPU demo:
    mpirun -n 8 python train.py --config configs/segmentation/fpn_poolformer_s12_ade20k_ascend.yaml \
        --data_dir /data/ADEChallengeData2016 --ckpt_path poolformer_s12.safetensors
    python train.py --config configs/demo/texture_mosaics_cpu.yaml
"""


import mindcv_poolformer  # noqa: F401  (sets the fast oneDNN code path before any conv runs)
from mindcv_poolformer.distributed import exit_process
from mindcv_poolformer.train.cli import main

if __name__ == "__main__":
    exit_process(main())
