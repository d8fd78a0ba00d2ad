"""Fused kernels: a layer's element-wise chain or loop as one compiled pass over memory.

Each layer computes its equations with plain NumPy lines, next to their derivation: the
reference, what a learner steps through. Where a kernel here computes the same equation
for the arrays at hand, the layer calls it instead, on the line after the reference:

    if kernels.fused(x):
        return kernels.cpu.max_pool(x, k, s)   # the same Eq. (1), in one pass over memory

CPU kernels (``mnn.kernels.cpu``) are compiled by numba the first time they run and cached
on disk; GPU kernels (``mnn.kernels.cuda``) are CUDA C that CuPy compiles, used where
``kernels.fused_gpu(x)``. ``MNN_KERNELS=numpy`` in the environment, or ``kernels.use("numpy")``,
runs the reference everywhere; ``tests/test_kernels.py`` compares every CPU kernel with its
reference, and ``tests/test_cuda_kernels.py`` every GPU kernel, compiled for the CPU.
"""
import importlib
import importlib.util
import os

import numpy

MODES = ("fused", "numpy")
_state = {"mode": None}


def use(mode):
    """Run the fused kernels (``"fused"``, the default) or the NumPy reference everywhere (``"numpy"``)."""
    if mode not in MODES:
        raise ValueError(f"kernels: unknown mode {mode!r}; expected 'fused' or 'numpy' (MNN_KERNELS)")
    if mode == "fused" and importlib.util.find_spec("numba") is None:
        raise RuntimeError("kernels: the fused kernels need numba (pip install numba), or MNN_KERNELS=numpy")
    _state["mode"] = mode


def mode():
    """The mode in use: ``use``'s, else ``$MNN_KERNELS``, else ``"fused"`` (``"numpy"`` without numba)."""
    if _state["mode"] is None:
        use(os.environ.get("MNN_KERNELS", "") or ("fused" if importlib.util.find_spec("numba") else "numpy"))
    return _state["mode"]


ATTENTIONS = ("products", "flash")


def use_attention(kind):
    """How ``MultiHeadAttention`` runs on a GPU in fused mode: ``"products"`` (the default: batched
    cuBLAS products around one softmax launch) or ``"flash"`` (``kernels.cuda_attention``: no (T, T)
    scores in memory; tested on the CPU, not yet timed on a GPU)."""
    if kind not in ATTENTIONS:
        raise ValueError(f"kernels: unknown attention {kind!r}; expected 'products' or 'flash' (MNN_ATTENTION)")
    _state["attention"] = kind


def attention():
    """``use_attention``'s choice, else ``$MNN_ATTENTION``, else ``"products"``."""
    if _state.get("attention") is None:
        use_attention(os.environ.get("MNN_ATTENTION", "") or "products")
    return _state["attention"]


COMPILED_DTYPES = ("float32", "float64")  # numba has no float16
_COMPILED = frozenset(map(numpy.dtype, COMPILED_DTYPES))  # a set lookup: dtype.name costs microseconds a call


def fused(*arrays):
    """True where the CPU kernels apply: fused mode, and NumPy arrays of float32 or float64 (CuPy
    arrays, and float16 ones, take the reference lines)."""
    return mode() == "fused" and all(type(array).__module__ == "numpy" and array.dtype in _COMPILED
                                     for array in arrays)


def fused_gpu(*arrays):
    """True where the GPU kernels apply: fused mode, and CuPy arrays of float32 or float64."""
    return mode() == "fused" and all(type(array).__module__.startswith("cupy") and array.dtype in _COMPILED
                                     for array in arrays)


def __getattr__(name):  # kernels.cpu, kernels.cuda, ...: numba is imported on first use
    if name in ("cpu", "cpu_sequence", "cuda", "cuda_attention", "cuda_products", "threads"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mnn.kernels' has no attribute {name!r}")
