"""Training: data pipeline, optimizer/schedule/loss, distributed launch, the compiled step and the loop."""

from ..distributed import DistInfo, detect_launcher, init_distributed
from .data import TrainDataSettings, augmentation_seed, build_train_dataset, materialize_digits
from .optim import OptimizerSettings, create_optimizer, param_groups, split_decay
from .schedule import ScheduleSettings, build_lr_schedule, scaled_lr
from .trainer import Trainer, TrainResult, plan_loss_scale, train, validate_train_config

__all__ = [
    "DistInfo",
    "OptimizerSettings",
    "ScheduleSettings",
    "TrainDataSettings",
    "TrainResult",
    "Trainer",
    "augmentation_seed",
    "build_lr_schedule",
    "build_train_dataset",
    "create_optimizer",
    "detect_launcher",
    "init_distributed",
    "materialize_digits",
    "param_groups",
    "plan_loss_scale",
    "scaled_lr",
    "split_decay",
    "train",
    "validate_train_config",
]
