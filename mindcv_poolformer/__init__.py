"""mindcv-poolformer: PoolFormer / MetaFormer for MindSpore (train, fine-tune, validate, deploy)."""

from ._runtime import configure_cpu_runtime

configure_cpu_runtime()  # must run before MindSpore executes its first conv

from .backends import apply_backend  # noqa: E402
from .checkpoint import CheckpointError, LoadReport, load_checkpoint_into  # noqa: E402
from .factory import create_model  # noqa: E402
from .flops import count_macs, count_params  # noqa: E402
from .models import MetaFormer, ModelInfo, list_models, model_info, register_model  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported lazily so that `python -m mindcv_poolformer.convert` does not import itself twice.
    if name == "convert_checkpoint":
        from .convert import convert_checkpoint

        return convert_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CheckpointError",
    "LoadReport",
    "MetaFormer",
    "apply_backend",
    "ModelInfo",
    "__version__",
    "configure_cpu_runtime",
    "convert_checkpoint",
    "count_macs",
    "count_params",
    "create_model",
    "list_models",
    "load_checkpoint_into",
    "model_info",
    "register_model",
]
