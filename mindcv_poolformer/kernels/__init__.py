"""Fused CPU kernels of the PoolFormer block, as MindSpore ``Custom`` "aot" ops with their gradients.

MindSpore's CPU backend runs the block's elementwise work as one memory pass per op, and its Erf
kernel is scalar and single-threaded (a quarter of the S12 forward). ``poolformer_cpu.cc`` fuses the
block into threaded, vectorised kernels, each with a backward kernel: norm1 + pooling mixer +
LayerScale + drop path + residual; norm2; the MLP's weight folds; and, where the CPU has AVX-512,
the whole channel MLP as two cache-blocked GEMMs whose stores apply the bias + exact GELU and the
bias + drop path + residual (fc1 also normalises its input at inference), and on the same GEMM the
3x3 stride-1 convs of the Semantic FPN neck and head. Without AVX-512 the convs stay on oneDNN,
with separate bias + GELU and bias + residual kernels around the 1x1 ones. One more
kernel checks a training step's gradients for non-finite values, and one pair is the segmentation
loss (resize to the label size, log_softmax, NLL) and its gradient.

The library is compiled on first use with the system C++ compiler (``$CXX``, else ``g++``/``c++``)
for this CPU (``-march=native``) and cached under ``$MINDCV_POOLFORMER_HOME/kernels`` (default
``~/.cache/mindcv_poolformer/kernels``), keyed by the source, the compiler and the CPU's flags. Where there
is no compiler, or the device target is not CPU, or ``MINDCV_POOLFORMER_CPU_KERNELS=0``, the model
runs MindSpore's own ops instead: same parameters, same results to float rounding, just slower.
Exported files (MINDIR/AIR/ONNX) never contain these ops: they name a local ``.so``.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from mindspore import ops
from mindspore.common import dtype as mstype

from .._paths import weights_home

__all__ = ["CpuKernels", "cpu_kernels", "kernels_enabled", "library_path"]

_LOG = logging.getLogger("mindcv_poolformer")
SOURCE = Path(__file__).with_name("poolformer_cpu.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")
ENV_SWITCH = "MINDCV_POOLFORMER_CPU_KERNELS"


def _cache_dir() -> Path:
    """``$MINDCV_POOLFORMER_HOME/kernels`` (default ``~/.cache/mindcv_poolformer/kernels``), beside the weights."""
    return weights_home() / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """The CPU model and flags: ``-march=native`` code is only valid on a CPU with the same features."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    keep = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(keep))


def _build(source_path: Path, flags: Sequence[str], without: str) -> str | None:
    """Compile ``source_path`` into the cache home (once per source, compiler, flags and CPU); its path, or None.

    ``without`` says, in the one warning, what runs instead when it cannot be built.
    """
    compiler = _compiler()
    if compiler is None:
        _LOG.warning("no C++ compiler found ($CXX, g++, c++): %s; install g++ to enable the CPU kernels", without)
        return None
    source = source_path.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(flags).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"{source_path.stem}-{key}.so"
    if target.is_file():
        return str(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        directory = str(target.parent)
    except OSError:  # read-only home: build into a private temporary directory
        directory = tempfile.mkdtemp(prefix="mindcv_poolformer_kernels_")
        target = Path(directory) / target.name
    fd, partial = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=directory)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags, "-o", partial, str(source_path)], capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            _LOG.warning("building %s failed (%s: %s): %s", source_path.name, compiler, detail, without)
            return None
        os.replace(partial, target)  # atomic: concurrent ranks each build and the last rename wins
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return str(target)


@cache
def library_path() -> str | None:
    """Path of the compiled kernel library, building it if needed; None (with one warning) if it cannot be built."""
    return _build(SOURCE, FLAGS, "the PoolFormer blocks run MindSpore's generic CPU ops (correct, several times "
                                 "slower)")


def kernels_enabled() -> bool:
    """Whether new models use the fused kernels: CPU device target, not switched off, library built."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    import mindspore as ms

    if ms.get_context("device_target") != "CPU":
        return False
    return library_path() is not None


def _per_sample(shape):
    return [shape[0]]


class CpuKernels:
    """The fused block kernels as ``Custom`` primitives, each with a ``bprop`` made of its gradient kernel.

    Call ``cpu_kernels()`` for the shared instance. The primitives are float32-only; callers fall
    back to MindSpore's ops for other dtypes (AMP).
    """

    def __init__(self, library: str) -> None:
        def custom(name, out_shape, out_dtype, bprop=None):
            return ops.Custom(f"{library}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot",
                              bprop=bprop)

        mixer_grad = custom("PoolMixerGrad", lambda x, s, *_: (x, s), lambda x, s, *_: (x, s))

        def mixer_bprop(x, scale, drop, pool_size, out, dout):
            dx, dscale = mixer_grad(x, scale, drop, pool_size, out[1], out[2], dout[0])
            return dx, dscale, ops.zeros_like(drop), ops.zeros_like(pool_size)

        self.pool_mixer = custom("PoolMixer", lambda x, *_: (x, _per_sample(x), _per_sample(x)),
                                 lambda x, *_: (x, x, x), mixer_bprop)

        normalize_grad = custom("NormalizeGrad", lambda n, *_: n, lambda n, *_: n)

        def normalize_bprop(x, out, dout):
            return (normalize_grad(out[0], out[2], dout[0]),)

        self.normalize = custom("Normalize", lambda x: (x, _per_sample(x), _per_sample(x)), lambda x: (x, x, x),
                                normalize_bprop)

        gelu_grad = custom("GeluBiasGrad", lambda acc, bias, _: (acc, bias), lambda acc, bias, _: (acc, bias))

        def gelu_bprop(acc, bias, out, dout):
            return gelu_grad(acc, bias, dout)

        self.gelu_bias = custom("GeluBias", lambda acc, bias: acc, lambda acc, bias: acc, gelu_bprop)

        residual_grad = custom("ResidualBiasGrad", lambda drop, dout: (dout, [dout[1]]),
                               lambda drop, dout: (dout, dout))

        def residual_bprop(y, acc, bias, drop, out, dout):
            dacc, dbias = residual_grad(drop, dout)
            return dout, dacc, dbias, ops.zeros_like(drop)

        self.residual_bias = custom("ResidualBias", lambda y, *_: y, lambda y, *_: y, residual_bprop)

        # the MLP's weight folds (norm2's affine and the GELU constants into fc1, LayerScale into fc2)
        fold_grad = custom("FoldMlpGrad", lambda w1, g, beta, w2, b2, ls, *_: (w1, [w1[0]], g, beta, w2, b2, ls),
                           lambda w1, *_: (w1,) * 7)

        def fold_bprop(w1, b1, gamma, beta, w2, b2, ls, out, dout):
            return fold_grad(w1, gamma, beta, w2, b2, ls, *dout)

        self.fold_mlp = custom("FoldMlp", lambda w1, b1, g, beta, w2, b2, ls: (w1, b1, w2, b2),
                               lambda w1, *_: (w1,) * 4, fold_bprop)

        # one kernel for the training step's non-finite check over every gradient (float32/float16)
        self.all_finite = custom("AllFinite", lambda *shapes: [1], lambda *types: mstype.bool_)

        # mmseg's decode-head loss (bilinear resize of the logits to the label size, log_softmax over the
        # classes, the label's NLL) in one kernel each way, never writing a label-size class map. Outputs:
        # each image's NLL summed over its labelled pixels, and the log-sum-exp per pixel for the gradient.
        nll_grad = custom("ResizedPixelNllGrad", lambda logits, *_: logits, lambda logits, *_: logits)

        def nll_bprop(logits, labels, ignore_index, out, dout):
            return nll_grad(logits, labels, ignore_index, out[1], dout[0]), ops.zeros_like(labels), \
                ops.zeros_like(ignore_index)

        self.resized_pixel_nll = custom("ResizedPixelNll", lambda logits, labels, _: ([logits[0]], labels),
                                        lambda logits, labels, _: (logits, logits), nll_bprop)

        # The MLP's 1x1 convs (fc1, fc2 and their input gradients) as a cache-blocked AVX-512 GEMM over the
        # whole batch where the library was compiled with AVX-512 (else None: oneDNN convs). MindSpore's
        # oneDNN is capped at AVX2 on this package's CPUs (see _runtime.py); measured per shape at batch
        # 32 (bench/results/optimizations-20261121.md) the GEMM is 1.2-1.7x faster on every S12 shape.
        self.conv1x1 = self.conv3x3 = self.conv3x3_direct = self.conv3x3_winograd = None
        gemm_switch = os.environ.get("MINDCV_POOLFORMER_CPU_GEMM", "1").strip().lower()
        if gemm_switch not in ("0", "false", "off", "no") and ctypes.CDLL(library).PoolformerHasFastGemm():
            def conv_shape(x, w):
                return [x[0], w[0], x[2], x[3]]

            conv_weight_grad = custom("Conv1x1WeightGrad", lambda dy, x: [dy[1], x[1]], lambda dy, x: x)
            conv_transposed = custom("Conv1x1Transposed", lambda dy, w: [dy[0], w[1], dy[2], dy[3]],
                                     lambda dy, w: dy)

            def conv_bprop(x, w, out, dout):
                if w.shape[1] % 8 == 0:  # the GEMM tiles 8 output channels at a time
                    dx = conv_transposed(dout, w)
                else:
                    transposed = w.transpose(1, 0)
                    dx = ops.conv2d(dout, transposed.reshape(transposed.shape + (1, 1)))
                return dx, conv_weight_grad(dout, x)

            self.conv1x1 = custom("Conv1x1", conv_shape, lambda x, w: x, conv_bprop)

            # The whole channel MLP (fc1, bias + GELU, fc2, bias + drop path + residual) as two GEMMs whose
            # epilogues do the elementwise steps, so the 4C-wide hidden map is written once (twice in
            # training, where fc1's sums are kept for the GELU's gradient) and read once per pass.
            hidden_grad = custom("MlpHiddenGrad", lambda d2, w2, acc, b1: (acc, b1), lambda d2, w2, acc, b1: (acc, b1))

            def mlp_bprop(n, w1, b1, w2, b2, y, drop, out, dout):
                dacc2, db2 = residual_grad(drop, dout[0])
                dacc, db1 = hidden_grad(dacc2, w2, out[1], b1)
                return (conv_transposed(dacc, w1), conv_weight_grad(dacc, n), db1, conv_weight_grad(dacc2, out[2]),
                        db2, dout[0], ops.zeros_like(drop))

            def mlp_shape(n, w1, *_):
                return n, conv_shape(n, w1), conv_shape(n, w1)

            self.mlp = custom("MlpForward", mlp_shape, lambda n, *_: (n, n, n), mlp_bprop)
            # inference: norm2 folded in (each image centred and scaled as fc1 packs it); no gradient
            self.moments = custom("SampleMoments", lambda x: (_per_sample(x), _per_sample(x)), lambda x: (x, x))
            self.mlp_inference = custom("MlpInference", lambda y, w1, *_: (y, conv_shape(y, w1)), lambda y, *_: (y, y))

            # A 3x3, stride-1, zero-padded conv (Semantic FPN's neck and head: two thirds of FPN-S12's MACs at
            # 512x512) on the same GEMM, its depth the 9 C taps that the packing reads shifted off each row.
            # MindSpore's oneDNN, capped at AVX2, runs these at 97-124 GFLOP/s on 2 Ice Lake cores; the
            # GEMM at 270-300 (forward and input gradient) and 170-230 (weight gradient):
            # bench/conv3x3.py. Input and output channels must be multiples of 8.
            # All three also come in the Winograd F(4x4, 3x3) form (on maps of 8x8 and larger at batch 16, where
            # it saves at least half the multiply-adds: kernels' UseWinograd): a quarter of the multiply-adds in
            # the GEMMs, ~10x the direct form's float32 rounding (5e-6 of the output's scale at 256 channels). It
            # is the default; MINDCV_POOLFORMER_CPU_WINOGRAD=0 keeps the direct form.
            def conv3x3(form):
                transposed = custom("Conv3x3Transposed" + form, lambda dy, w: [dy[0], w[1], dy[2], dy[3]],
                                    lambda dy, w: dy)
                weight_grad = custom("Conv3x3WeightGrad" + form, lambda dy, x: [dy[1], x[1], 3, 3], lambda dy, x: x)

                def bprop(x, w, out, dout):
                    return transposed(dout, w), weight_grad(dout, x)

                return custom("Conv3x3" + form, conv_shape, lambda x, w: x, bprop)

            self.conv3x3_direct, self.conv3x3_winograd = conv3x3(""), conv3x3("Winograd")
            winograd = os.environ.get("MINDCV_POOLFORMER_CPU_WINOGRAD", "1").strip().lower()
            self.conv3x3 = self.conv3x3_direct if winograd in ("0", "false", "off", "no") else self.conv3x3_winograd


@cache
def _kernels_for(library: str) -> CpuKernels:
    return CpuKernels(library)


def cpu_kernels() -> CpuKernels | None:
    """The shared kernel primitives, or None where ``kernels_enabled()`` is false."""
    return _kernels_for(library_path()) if kernels_enabled() else None
