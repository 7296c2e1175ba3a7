"""Reading, converting, saving and loading PoolFormer checkpoints of every known layout.

Layouts understood (auto-detected from the keys):

- ``mindspore``: ours, identical to MindCV (``patch_embed.proj``, ``network.N.M.norm1.gamma`` ...);
- ``official``: sail-sg/poolformer and timm < 0.9 (GroupNorm ``weight``/``bias``);
- ``timm``: timm 1.x ``metaformer.py`` (``stem.conv``, ``stages.N.blocks.M``, ``head.fc``);
- ``hf``: HuggingFace transformers (``poolformer.encoder.patch_embeddings.K.projection`` ...);
- ``mmseg``: Semantic FPN segmentation checkpoints of mmsegmentation 1.x and 0.x (the official
  sail-sg ones are mmseg 0.x files with the same names): ``backbone.*`` in the official/mmpretrain
  names, ``neck.{lateral,fpn}_convs.{i}.conv``, ``decode_head.scale_heads.{i}.{j}.{conv,bn}`` with
  PyTorch's BatchNorm names, ``decode_head.conv_seg``. Ours for the same models is ``mindspore``
  with the prefixes kept and MindSpore's names (``gamma/beta/moving_mean/moving_variance``).

Every layout is mapped to ours ("canonical" below) as float32 numpy arrays. File types: MindSpore
``.ckpt``, ``.safetensors`` (any layout; read by MindSpore itself, bf16/fp16 included) and PyTorch
``.pth``/``.pth.tar``/``.pt``/``.bin`` (needs torch; loaded with ``weights_only=True`` so no
pickled code can run; the metadata objects of mmengine training checkpoints are read as inert
stand-ins, see ``_read_torch``).

A classification checkpoint of any layout initialises the backbone of a segmentation model; a
segmentation checkpoint and a classifier do not mix, and a backbone of another size does not fit:
each is a one-line ``CheckpointError`` naming the model to use.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ._atomic import atomic_path
from ._paths import weights_home
from .errors import CheckpointError
from .models.fpn import SEGMENTATION_VARIANTS
from .models.metaformer import POOLFORMER_VARIANTS
from .models.registry import model_info

__all__ = [
    "CheckpointError",
    "load_ms_checkpoint",
    "LoadReport",
    "check_architecture",
    "check_checkpoint",
    "read_state_dict",
    "detect_layout",
    "to_canonical",
    "infer_architecture",
    "save_state_dict",
    "load_checkpoint_into",
    "resolve_pretrained",
    "weights_home",
]

_LOG = logging.getLogger("mindcv_poolformer")

TORCH_SUFFIXES = (".pth", ".pth.tar", ".pt", ".bin", ".tar")
# Keys of a canonical model state; everything else in a MindSpore training checkpoint (adam_m.*,
# global_step, learning_rate, loss-scale state, ...) is optimizer/training state.
_MODEL_KEY = re.compile(r"^(patch_embed|network|norm\d*|head|backbone|neck|decode_head)\.")
# Top-level names of a Semantic FPN's state (ours and mmseg's alike).
SEGMENTATION_PREFIXES = ("backbone.", "neck.", "decode_head.")
_SEG_HEAD = "decode_head.conv_seg."


@dataclass
class LoadReport:
    """What ``load_checkpoint_into`` did."""
    source: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"loaded {len(self.loaded)} tensors from {self.source} ({self.layout} layout)"
        if self.reinitialised:
            text += f"; re-initialised (new in the model or shape differs): {', '.join(self.reinitialised)}"
        if self.ignored:
            text += f"; ignored {len(self.ignored)} non-model entries"
        return text


def _suffix(path: str | os.PathLike) -> str:
    name = str(path).lower()
    if name.endswith(".pth.tar"):
        return ".pth.tar"
    return Path(name).suffix


def _ms_to_numpy(value) -> np.ndarray:
    import mindspore as ms

    if value.dtype in (ms.float16, ms.bfloat16, ms.float64):
        value = value.astype(ms.float32)
    return value.asnumpy()


class _Opaque:
    """Inert stand-in for a non-tensor object in a checkpoint's metadata: accepts any state, runs no code."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


def _torch_load(torch, path: str):
    """``torch.load(weights_only=True)``; classes it refuses are read as ``_Opaque`` stand-ins.

    mmengine training checkpoints (mmseg 1.x) carry a ``message_hub`` of ``HistoryBuffer`` objects
    and numpy scalars beside ``state_dict``; the weights-only unpickler refuses those globals. Allowing
    each refused name as ``_Opaque`` keeps the guarantee (no class or function of the file runs) and
    the tensors load; the stand-ins are dropped with the rest of the non-tensor entries.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as refused:
        try:  # only torch.save's zip format can be listed; a bare pickle keeps the refusal
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # any failure to list them: report the original refusal
            raise refused from None
        if not names:
            raise
        _LOG.info("%s: objects of %s read as inert stand-ins", path, ", ".join(names))
        with torch.serialization.safe_globals([(_Opaque, name) for name in names]):
            return torch.load(path, map_location="cpu", weights_only=True)


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path}: reading a PyTorch checkpoint needs torch, which is not installed "
            "(pip install torch, or convert it elsewhere with `python -m mindcv_poolformer.convert`)"
        ) from None
    try:
        obj = _torch_load(torch, path)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a loadable PyTorch weights file ({first})") from None
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    out = {}
    for name, tensor in obj.items():
        if isinstance(tensor, torch.Tensor):
            out[str(name)] = tensor.detach().to(torch.float32).numpy() if tensor.is_floating_point() \
                else tensor.detach().numpy()
    return out


def _mem_available() -> int | None:
    """Bytes the kernel can give without swapping (``MemAvailable``: free pages plus reclaimable cache)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def load_ms_checkpoint(path: str, **kwargs) -> dict:
    """``ms.load_checkpoint``, with its memory guard counting reclaimable page cache as available.

    MindSpore 2.10 refuses a ``.ckpt`` larger than ``sysconf(SC_AVPHYS_PAGES)`` (free pages only,
    ``train/serialization.py::_get_available_memory``). On a host whose page cache is warm that is a few
    hundred MB while GBs are available: an M48 checkpoint (294 MB) was refused with 248 MB "available"
    during the test suite. Where ``/proc/meminfo`` gives ``MemAvailable`` the guard uses it instead.
    """
    import mindspore as ms
    from mindspore.train import serialization

    available = _mem_available()
    original = getattr(serialization, "_get_available_memory", None)
    if available is None or original is None:
        return ms.load_checkpoint(path, **kwargs)
    serialization._get_available_memory = lambda: max(available, original() or 0)
    try:
        return ms.load_checkpoint(path, **kwargs)
    finally:
        serialization._get_available_memory = original


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a checkpoint file into ``{name: array}`` in its own layout (floats as float32)."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    suffix = _suffix(path)
    if suffix in TORCH_SUFFIXES:
        state = _read_torch(path)
    elif suffix in (".ckpt", ".safetensors"):
        fmt = "safetensors" if suffix == ".safetensors" else "ckpt"
        try:
            params = load_ms_checkpoint(path, format=fmt)
        except Exception as exc:  # MindSpore raises ValueError/RuntimeError for corrupt files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path}: not a readable {fmt} checkpoint ({first})") from None
        state = {name: _ms_to_numpy(value) for name, value in params.items()}
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint type {suffix!r}; accepted: .ckpt, .safetensors, .pth, .pth.tar, .pt, .bin"
        )
    if not state:
        raise CheckpointError(f"{path}: the file holds no tensors")
    return {name[len("module."):] if name.startswith("module.") else name: value for name, value in state.items()}


def is_segmentation_state(state: Mapping[str, np.ndarray]) -> bool:
    """Whether ``state`` is a Semantic FPN's (keys under ``backbone.``/``neck.``/``decode_head.``)."""
    return any(k.startswith(SEGMENTATION_PREFIXES) for k in state)


def _split_backbone(state: Mapping) -> tuple[dict, dict]:
    """(``backbone.*`` without the prefix, everything else) of a segmentation state."""
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return backbone, {k: v for k, v in state.items() if not k.startswith("backbone.")}


def detect_layout(state: Mapping[str, np.ndarray]) -> str:
    """Which naming scheme ``state`` uses: ``mindspore``, ``official``, ``timm``, ``hf`` or ``mmseg``."""
    keys = list(state)
    if is_segmentation_state(state):
        if any(re.search(r"\.(gamma|beta|moving_mean|moving_variance)$", k) for k in keys):
            return "mindspore"
        return "mmseg"
    if any(k.startswith(("poolformer.encoder.", "encoder.patch_embeddings.")) for k in keys):
        return "hf"
    if any(k.startswith(("stem.conv.", "stages.")) for k in keys):
        return "timm"
    if any(k.startswith("patch_embed.proj.") for k in keys):
        if any(re.search(r"norm\d*\.(gamma|beta)$", k) for k in keys):
            return "mindspore"
        return "official"
    sample = ", ".join(keys[:3])
    raise CheckpointError(f"unrecognised checkpoint layout (first keys: {sample}); accepted: MindSpore/MindCV, "
                          "official sail-sg, timm metaformer, HF transformers, mmsegmentation Semantic FPN")


_GN_AFFINE = {"weight": "gamma", "bias": "beta"}

_HF_RULES = [
    (re.compile(r"^(?:poolformer\.)?encoder\.patch_embeddings\.0\.projection\.(\w+)$"),
     lambda m: f"patch_embed.proj.{m[1]}"),
    (re.compile(r"^(?:poolformer\.)?encoder\.patch_embeddings\.(\d+)\.projection\.(\w+)$"),
     lambda m: f"network.{2 * int(m[1]) - 1}.proj.{m[2]}"),
    (re.compile(r"^(?:poolformer\.)?encoder\.block\.(\d+)\.(\d+)\.before_norm\.(weight|bias)$"),
     lambda m: f"network.{2 * int(m[1])}.{m[2]}.norm1.{_GN_AFFINE[m[3]]}"),
    (re.compile(r"^(?:poolformer\.)?encoder\.block\.(\d+)\.(\d+)\.after_norm\.(weight|bias)$"),
     lambda m: f"network.{2 * int(m[1])}.{m[2]}.norm2.{_GN_AFFINE[m[3]]}"),
    (re.compile(r"^(?:poolformer\.)?encoder\.block\.(\d+)\.(\d+)\.output\.conv([12])\.(\w+)$"),
     lambda m: f"network.{2 * int(m[1])}.{m[2]}.mlp.fc{m[3]}.{m[4]}"),
    (re.compile(r"^(?:poolformer\.)?encoder\.block\.(\d+)\.(\d+)\.(layer_scale_[12])$"),
     lambda m: f"network.{2 * int(m[1])}.{m[2]}.{m[3]}"),
    (re.compile(r"^norm\.(weight|bias)$"), lambda m: f"norm.{_GN_AFFINE[m[1]]}"),
    (re.compile(r"^classifier\.(\w+)$"), lambda m: f"head.{m[1]}"),
]

_TIMM_RULES = [
    (re.compile(r"^stem\.conv\.(\w+)$"), lambda m: f"patch_embed.proj.{m[1]}"),
    (re.compile(r"^stages\.(\d+)\.downsample\.conv\.(\w+)$"), lambda m: f"network.{2 * int(m[1]) - 1}.proj.{m[2]}"),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(norm[12])\.(weight|bias)$"),
     lambda m: f"network.{2 * int(m[1])}.{m[2]}.{m[3]}.{_GN_AFFINE[m[4]]}"),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.(fc[12])\.(\w+)$"),
     lambda m: f"network.{2 * int(m[1])}.{m[2]}.mlp.{m[3]}.{m[4]}"),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.layer_scale([12])\.scale$"),
     lambda m: f"network.{2 * int(m[1])}.{m[2]}.layer_scale_{m[3]}"),
    (re.compile(r"^head\.norm\.(weight|bias)$"), lambda m: f"norm.{_GN_AFFINE[m[1]]}"),
    (re.compile(r"^head\.fc\.(\w+)$"), lambda m: f"head.{m[1]}"),
]

_OFFICIAL_RULES = [
    (re.compile(r"^(network\.\d+\.\d+\.norm[12]|norm\d*)\.(weight|bias)$"), lambda m: f"{m[1]}.{_GN_AFFINE[m[2]]}"),
    (re.compile(r"^(.*)$"), lambda m: m[1]),
]


_BN_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}

# The neck and head of an mmseg Semantic FPN; its backbone is converted as a classification state.
_MMSEG_RULES = [
    (re.compile(r"^(decode_head\.scale_heads\.\d+\.\d+\.bn)\.(weight|bias|running_mean|running_var)$"),
     lambda m: f"{m[1]}.{_BN_NAMES[m[2]]}"),
    (re.compile(r"^(neck\.(?:lateral|fpn)_convs\.\d+\.conv\.(?:weight|bias))$"), lambda m: m[1]),
    (re.compile(r"^(decode_head\.scale_heads\.\d+\.\d+\.conv\.weight)$"), lambda m: m[1]),
    (re.compile(r"^(decode_head\.conv_seg\.(?:weight|bias))$"), lambda m: m[1]),
]


def _apply_rules(state: Mapping[str, np.ndarray], rules) -> tuple[dict[str, np.ndarray], list[str]]:
    out: dict[str, np.ndarray] = {}
    unmapped: list[str] = []
    for name, value in state.items():
        for pattern, target in rules:
            match = pattern.match(name)
            if match:
                out[target(match)] = value
                break
        else:
            unmapped.append(name)
    return out, unmapped


def to_canonical(state: Mapping[str, np.ndarray], layout: str | None = None) -> tuple[dict[str, np.ndarray], str]:
    """Rename ``state`` to our (MindCV) names; return it with the detected layout.

    1x1-conv MLP weights stored as Linear (timm's ``Mlp`` with ``use_conv=False``) get their
    trailing 1x1 dims back. Keys of another layout that map to nothing raise, naming them.
    """
    layout = layout or detect_layout(state)
    if layout == "mindspore":
        return dict(state), layout
    if layout == "mmseg":
        return _mmseg_to_canonical(state), layout
    rules = {"hf": _HF_RULES, "timm": _TIMM_RULES, "official": _OFFICIAL_RULES}[layout]
    out, unmapped = _apply_rules(state, rules)
    if unmapped:
        raise CheckpointError(f"{layout} checkpoint has keys with no PoolFormer counterpart: {', '.join(unmapped[:8])}")
    for name, value in out.items():
        if re.search(r"\.mlp\.fc[12]\.weight$", name) and value.ndim == 2:
            out[name] = value.reshape(value.shape + (1, 1))
    return out, layout


def _mmseg_to_canonical(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An mmseg Semantic FPN state in our names; BatchNorm's ``num_batches_tracked`` counters are dropped."""
    backbone, rest = _split_backbone({k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")})
    if not backbone:
        raise CheckpointError("mmseg checkpoint has no backbone.* tensors")
    canonical, _ = to_canonical(backbone)
    out = {"backbone." + k: v for k, v in canonical.items()}
    converted, unmapped = _apply_rules(rest, _MMSEG_RULES)
    if unmapped:
        raise CheckpointError(f"mmseg checkpoint has keys with no Semantic FPN counterpart: {', '.join(unmapped[:8])}")
    out.update(converted)
    return out


def split_model_state(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Separate model tensors from optimizer/training entries of a MindSpore training checkpoint."""
    model = {k: v for k, v in state.items() if _MODEL_KEY.match(k)}
    return model, [k for k in state if k not in model]


@dataclass(frozen=True)
class Architecture:
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    num_classes: int
    in_channels: int
    task: str = "classification"


def infer_architecture(state: Mapping[str, np.ndarray]) -> Architecture:
    """Depths, widths, classes and input channels of a canonical state dict (a classifier's or a Semantic FPN's)."""
    if is_segmentation_state(state):
        backbone = infer_architecture(_split_backbone(state)[0])
        seg = state.get(_SEG_HEAD + "weight")
        return Architecture(backbone.depths, backbone.widths, int(seg.shape[0]) if seg is not None else 0,
                            backbone.in_channels, "segmentation")
    depths, widths = [], []
    stage = 0
    while f"network.{2 * stage}.0.norm1.gamma" in state:
        blocks = {int(m[1]) for k in state if (m := re.match(rf"^network\.{2 * stage}\.(\d+)\.", k))}
        depths.append(len(blocks))
        widths.append(int(state[f"network.{2 * stage}.0.norm1.gamma"].shape[0]))
        stage += 1
    if not depths or "patch_embed.proj.weight" not in state:
        raise CheckpointError("checkpoint holds no PoolFormer stem/blocks (patch_embed.proj, network.0.0.*)")
    head = state.get("head.weight")
    return Architecture(tuple(depths), tuple(widths), int(head.shape[0]) if head is not None else 0,
                        int(state["patch_embed.proj.weight"].shape[1]))


def match_variant(arch: Architecture) -> str | None:
    """The registered PoolFormer whose depths and widths equal ``arch``'s, if any."""
    for name, variant in POOLFORMER_VARIANTS.items():
        if variant.depths == arch.depths and variant.widths == arch.widths:
            return name
    return None


def model_name(arch: Architecture) -> str | None:
    """The registered model for ``arch``: its PoolFormer, or that PoolFormer's Semantic FPN for a segmentation state."""
    variant = match_variant(arch)
    if variant is None or arch.task != "segmentation":
        return variant
    return next((name for name, seg in SEGMENTATION_VARIANTS.items() if seg.base == variant), None)


def _describe(arch: Architecture) -> str:
    name = model_name(arch)
    shape = f"depths {arch.depths}, widths {arch.widths}"
    if arch.task == "segmentation":
        return f"a Semantic FPN {name} (backbone {shape})" if name else f"a Semantic FPN with backbone {shape}"
    return f"a {name} ({shape})" if name else f"a PoolFormer with {shape}"


def _use(found: Architecture, task: str, verb: str = "use model") -> str:
    """'; use model NAME' for the registered ``task`` model whose backbone is ``found``'s ('' if none)."""
    name = model_name(replace(found, task=task))
    return f"; {verb} {name}" if name else ""


def _segmentation_into_classifier(label: str, found: Architecture, verb: str = "use model") -> str:
    return f"{label} holds {_describe(found)}, a segmentation checkpoint that a classifier cannot load" + \
        _use(found, "segmentation", verb)


def _architecture_mismatch(label: str, state: Mapping[str, np.ndarray], params: Mapping) -> str | None:
    """'X holds a poolformer_s24 (...) but the model is a poolformer_s12 (...)', when that explains a misfit.

    A checkpoint of another registered PoolFormer is the usual cause of missing keys and shape
    mismatches, and saying so beats a list of key names; anything else keeps the key listing.
    """
    try:
        found, wanted = infer_architecture(state), infer_architecture(params)
    except CheckpointError:
        return None
    hint = _use(found, wanted.task)
    if not hint or (found.depths, found.widths) == (wanted.depths, wanted.widths):
        return None
    return f"{label} holds {_describe(found)} but the model is {_describe(wanted)}{hint}"


def check_architecture(state: Mapping[str, np.ndarray], model: str, label: str) -> Architecture | None:
    """Check that a canonical model ``state`` has the depths and widths of ``model`` (one of the five PoolFormers).

    Entry points call it before building the model, so a checkpoint of another PoolFormer is one
    line naming both and the ``--model`` to pass. Other registered models are not checked here
    (``load_checkpoint_into`` still is) and give None; else the checkpoint's architecture.
    """
    segmentation = model in SEGMENTATION_VARIANTS
    variant = POOLFORMER_VARIANTS.get(SEGMENTATION_VARIANTS[model].base if segmentation else model)
    if variant is None:
        return None
    found = infer_architecture(state)
    if found.task == "segmentation" and not segmentation:
        raise CheckpointError(_segmentation_into_classifier(label, found, "pass --model"))
    if (found.depths, found.widths) != (variant.depths, variant.widths):
        task = "segmentation" if segmentation else "classification"
        wanted = Architecture(variant.depths, variant.widths, found.num_classes, found.in_channels, task)
        raise CheckpointError(f"{label} holds {_describe(found)} but the model is {_describe(wanted)}"
                              + _use(found, task, "pass --model"))
    return found


def check_checkpoint(path: str | os.PathLike, model: str) -> Architecture | None:
    """Read ``path`` and check that it can initialise ``model``, without building the model.

    For entry points that must fail before writing anything: every read error, and a checkpoint of
    another PoolFormer, is a ``CheckpointError`` here. The class count is not checked (a different
    one is fine-tuning). Returns the checkpoint's architecture (None for models other than the five).
    """
    state, _ = to_canonical(read_state_dict(path))
    state, _ = split_model_state(state)
    return check_architecture(state, model, str(path))


def save_state_dict(state: Mapping[str, np.ndarray], dst: str | os.PathLike) -> str:
    """Write ``state`` as ``.ckpt`` or ``.safetensors`` (by suffix), atomically: temp file + rename.

    The temp file is flushed to disk before the rename and the directory after it, so a crash or
    power loss leaves either the complete new file or none, never a named partial one.
    """
    import mindspore as ms

    dst = str(dst)
    suffix = _suffix(dst)
    if suffix not in (".ckpt", ".safetensors"):
        raise CheckpointError(f"{dst}: output must end in .ckpt or .safetensors, got {suffix!r}")
    items = [{"name": k, "data": ms.Tensor(np.ascontiguousarray(v))} for k, v in state.items()]
    with atomic_path(dst, durable=True) as tmp:
        ms.save_checkpoint(items, tmp, format="safetensors" if suffix == ".safetensors" else "ckpt")
    return dst


def load_checkpoint_into(net, source: str | os.PathLike | Mapping[str, np.ndarray], strict: bool = True) -> LoadReport:
    """Load a checkpoint of any known layout into ``net`` by name, checking every shape.

    A classifier head (``head.*``, or a Semantic FPN's ``decode_head.conv_seg``) whose shape differs
    (another ``num_classes``) keeps its fresh initialisation and is reported; any other missing key
    or shape mismatch raises ``CheckpointError`` naming the keys, or naming the model to use when
    the checkpoint is of another PoolFormer or task. A classification checkpoint loads into a
    Semantic FPN's backbone (its ``norm``/``head`` ignored; ``norm0..6``, neck and head reported as
    initialised). Optimizer/training entries of a MindSpore training checkpoint are ignored.
    """
    import mindspore as ms

    label = str(source) if isinstance(source, (str, os.PathLike)) else "<state dict>"
    raw = read_state_dict(source) if isinstance(source, (str, os.PathLike)) else dict(source)
    state, layout = to_canonical(raw)
    state, ignored = split_model_state(state)
    params = dict(net.parameters_and_names())
    report = LoadReport(source=label, layout=layout, ignored=ignored)
    segmentation_net = is_segmentation_state(params)
    if is_segmentation_state(state) and not segmentation_net:
        raise CheckpointError(_segmentation_into_classifier(label, infer_architecture(state)))
    fresh: list[str] = []
    checkpoint_state = state  # what the checkpoint holds, for naming its architecture
    if segmentation_net and not is_segmentation_state(state):
        # a classification checkpoint initialises the backbone; its final norm and head have no place here
        report.ignored += [k for k in state if k.startswith(("norm.", "head."))]
        state = {"backbone." + k: v for k, v in state.items() if not k.startswith(("norm.", "head."))}
        fresh = [k for k in params if not k.startswith("backbone.") or re.match(r"^backbone\.norm\d+\.", k)]

    head_keys = [k for k in params if k.startswith(_SEG_HEAD if segmentation_net else "head.")]
    mismatched = [k for k in params if k in state and tuple(state[k].shape) != tuple(params[k].shape)]
    head_mismatch = [k for k in mismatched if k in head_keys]
    other_mismatch = [k for k in mismatched if k not in head_keys]
    expected = [k for k in params if k not in fresh]
    misfit = other_mismatch or (strict and (any(k not in state for k in expected)
                                            or any(k not in params for k in state)))
    if misfit and (mismatch := _architecture_mismatch(label, checkpoint_state, params)):
        raise CheckpointError(mismatch)
    if other_mismatch:
        details = "; ".join(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(params[k].shape)}"
                            for k in other_mismatch[:5])
        raise CheckpointError(f"{label}: shapes do not match the model ({len(other_mismatch)} tensors): {details}")
    missing = [k for k in expected if k not in state]
    if not segmentation_net:
        if not head_keys:  # a headless model (num_classes=0) leaves the checkpoint's head unused
            report.ignored += [k for k in state if k.startswith("head.")]
        # A features_only backbone (no final ``norm``, per-stage ``norm0``..``norm6``) loading a
        # classification checkpoint: the stage norms keep their fresh init, the final norm is unused.
        if not any(k.startswith("norm.") for k in params):
            fresh = [k for k in missing if re.match(r"^norm\d+\.", k)]
            missing = [k for k in missing if k not in fresh]
            report.ignored += [k for k in state if k.startswith("norm.")]
    unexpected = [k for k in state if k not in params and not k.startswith("head.") and k not in report.ignored]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing from checkpoint: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append(f"not in model: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
        raise CheckpointError(f"{label}: checkpoint does not fit the model ({'; '.join(parts)})")

    for name, param in params.items():
        if name in state and name not in head_mismatch:
            param.set_data(ms.Tensor(state[name], dtype=param.dtype))
            report.loaded.append(name)
    report.reinitialised = head_mismatch + fresh
    _LOG.info(report.summary())
    return report


def resolve_pretrained(name: str, pretrained: bool | str) -> str:
    """Find local weights for ``name``; nothing is downloaded (no network is assumed)."""
    if isinstance(pretrained, (str, os.PathLike)) and os.path.isfile(pretrained):
        return str(pretrained)
    directory = Path(pretrained) if isinstance(pretrained, (str, os.PathLike)) else weights_home()
    candidates = [directory / f"{name}{ext}" for ext in (".safetensors", ".ckpt", ".pth.tar", ".pth")]
    candidates += sorted(directory.glob(f"{name}-*.ckpt"))  # MindCV's released names carry a hash
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    url = model_info(name).url
    fetch = f"download {url} into it" if url else f"put {name}'s weights there"
    raise CheckpointError(
        f"no pretrained weights for {name} in {directory} (looked for {name}.safetensors/.ckpt/.pth.tar/.pth and "
        f"{name}-*.ckpt); {fetch}, set MINDCV_POOLFORMER_HOME to the folder that holds them, or pass --ckpt_path "
        "FILE (checkpoint_path= in Python)"
    )
