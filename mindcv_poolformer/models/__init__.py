"""Model zoo: the registry and the MetaFormer/PoolFormer family (importing registers them)."""

from . import fpn, metaformer  # noqa: F401  (registers the models)
from .metaformer import POOLFORMER_VARIANTS, MetaFormer, MetaFormerBlock
from .registry import ModelInfo, create_model, list_models, model_info, register_model

__all__ = [
    "POOLFORMER_VARIANTS",
    "MetaFormer",
    "MetaFormerBlock",
    "ModelInfo",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
]
