"""mmsegmentation's own Semantic FPN PoolFormer, built on the CPU as a parity reference.

mmseg 1.2.2's package import needs ``mmcv.ops`` (compiled ops, absent from ``mmcv-lite``) and
mmpretrain's needs ``torchvision`` (deliberately not installed: it pulls CUDA). Neither is used by
the EncoderDecoder + PoolFormer + FPN + FPNHead graph, so stub modules stand in for them while
importing: any attribute is a dummy class, dunder names raise AttributeError as a real module's
missing attributes do (``hasattr``/``inspect``/pickle rely on that).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.machinery
import sys
import types

import numpy as np

try:
    from conftest import require
except ImportError:  # loaded by bench/segmentation_speed.py, outside pytest: a missing package is an ImportError
    require = importlib.import_module

_STUBS = ("mmcv.ops", "mmcv.ops.multi_scale_deform_attn", "mmcv.ops.point_sample", "mmcv.ops.nms",
          "mmcv.ops.roi_align", "mmcv.ops.carafe", "torchvision", "torchvision.ops", "torchvision.ops.boxes",
          "torchvision.transforms", "torchvision.transforms.functional")

# mmseg 1.2.2's configs/poolformer/ file of each backbone (S36's is named in the older style)
CONFIGS = {"s12": "fpn_poolformer_s12_8xb4-40k_ade20k-512x512.py",
           "s24": "fpn_poolformer_s24_8xb4-40k_ade20k-512x512.py",
           "s36": "fpn_poolformer_s36_8x4_512x512_40k_ade20k.py",
           "m36": "fpn_poolformer_m36_8xb4-40k_ade20k-512x512.py",
           "m48": "fpn_poolformer_m48_8xb4-40k_ade20k-512x512.py"}


class _Dummy:
    """Stands in for any class or function of a stubbed module; fails only if it is actually used."""

    def __init__(self, *args, **kwargs) -> None:
        pass


def _stub_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so its submodules can be imported
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)  # find_spec() looks at it

    def __getattr__(attr: str):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return type(attr, (_Dummy,), {})

    module.__getattr__ = __getattr__
    return module


@contextlib.contextmanager
def _stubs(*packages: str):
    """Stub each of ``packages`` that is not installed (with its listed submodules) while the block runs.

    The stubs leave ``sys.modules`` afterwards: other libraries probe for torchvision
    (transformers checks ``find_spec`` and would take a stub for the real package); the modules
    imported meanwhile keep their references to the stubs.
    """
    added = []
    for package in packages:
        try:
            importlib.import_module(package)  # the real package where it is installed
            continue
        except ImportError:
            pass
        for name in _STUBS:
            if (name == package or name.startswith(package + ".")) and name not in sys.modules:
                sys.modules[name] = _stub_module(name)
                added.append(name)
                parent, _, child = name.rpartition(".")
                if parent in sys.modules:
                    setattr(sys.modules[parent], child, sys.modules[name])
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


@functools.cache
def _import_mmseg():
    """Import mmseg and mmpretrain with the stubs in place; return mmseg's MODELS registry."""
    require("torch")
    require("mmcv")
    with contextlib.suppress(ImportError):
        import transformers  # noqa: F401  (imported now, it sees no torchvision; mmengine imports it too)
    with _stubs("mmcv.ops", "torchvision"):
        require("mmseg")
        require("mmpretrain")
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules

        register_all_modules()
        import mmpretrain.models  # noqa: F401  (registers mmpretrain.PoolFormer)
    return MODELS


def mmseg_model(arch: str, seed: int | None = 0, frozen_stages: int = 0):
    """mmseg's EncoderDecoder from its own ADE20K config for ``arch``, every parameter and buffer randomised, eval mode.

    The config is used as shipped (150 classes, neck channels, ``frozen_stages=0``: the stem) except:
    no pretrained download, SyncBN as BN (same parameters and eval maths, no process group needed)
    and ``frozen_stages`` if given.
    With ``seed=None`` the parameters are mmseg's own initialisation (``init_weights()``), else randomised:
    layer scales ~ N(1, 0.5) and norm scales around 1 (at their 1e-5/1e-6 init the token
    mixers would not show in the logits), BN running means ~ N(0, 0.1) and variances in [0.5, 1.5],
    other vectors ~ N(0, 0.1), weights ~ N(0, 1/fan_in).
    """
    registry = _import_mmseg()
    torch = require("torch")
    import mmseg
    from mmengine.config import Config

    cfg = Config.fromfile(f"{mmseg.__path__[0]}/.mim/configs/poolformer/{CONFIGS[arch]}").model
    cfg.backbone.pop("init_cfg")
    cfg.backbone.frozen_stages = frozen_stages
    cfg.decode_head.norm_cfg = dict(type="BN", requires_grad=True)
    model = registry.build(cfg)
    if seed is None:
        model.init_weights()
        return model.eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if not value.is_floating_point():
                continue  # BN's num_batches_tracked
            if "layer_scale" in key:
                value.copy_(1 + 0.5 * torch.randn(value.shape, generator=gen))
            elif key.endswith("running_var"):
                value.copy_(0.5 + torch.rand(value.shape, generator=gen))
            elif ("norm" in key or ".bn." in key) and key.endswith("weight"):
                value.copy_(1 + 0.3 * torch.randn(value.shape, generator=gen))
            elif value.ndim == 1:
                value.copy_(0.1 * torch.randn(value.shape, generator=gen))
            else:
                fan_in = int(np.prod(value.shape[1:]))
                value.copy_(torch.randn(value.shape, generator=gen) / np.sqrt(fan_in))
    return model.eval()


def mmseg_logits(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(stride-4 logits of the decode head, logits resized to the input as ``encode_decode`` returns them)."""
    torch = require("torch")
    inputs = torch.from_numpy(x)
    metas = [{"img_shape": tuple(x.shape[2:]), "pad_shape": tuple(x.shape[2:])}] * x.shape[0]
    with torch.no_grad():
        coarse = model.decode_head(model.extract_feat(inputs))
        full = model.encode_decode(inputs, metas)
    return coarse.numpy(), full.numpy()
