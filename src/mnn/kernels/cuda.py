"""GPU kernels for CuPy: an element-wise chain as one launch.

On a GPU each array operation is a kernel launch that reads its operands from global
memory and writes its result back, so a chain of NumPy-style lines costs a launch and
a round trip per operator. Each kernel here does a whole chain per element, in registers.

A kernel is kept as its CUDA C source (``Elementwise``: the parameters, the operation on
one element, and helper functions), compiled by CuPy on first use. Nothing in the source
is CUDA-only beyond ``__device__``, so the tests compile the same text with g++ and run it
on the CPU against the layer's reference lines (``tests/cuda_on_cpu.py``): the arithmetic
of every GPU kernel is checked on machines without a GPU.
"""
import functools
from typing import NamedTuple


class Elementwise(NamedTuple):
    """The source of a ``cupy.ElementwiseKernel``. ``operation`` is C code for element ``i``: it reads
    the inputs and writes the outputs by name; ``T`` is the floating type of the arrays."""

    name: str
    in_params: str
    out_params: str
    operation: str
    preamble: str = ""


@functools.cache
def compiled(source):
    """The CuPy kernel for ``source``; CuPy compiles it once per dtype, on first call."""
    import cupy

    return cupy.ElementwiseKernel(source.in_params, source.out_params, source.operation, source.name,
                                  preamble=source.preamble)


# Adam's Eqs. (2)-(3) (mnn.optim.Adam), the same arithmetic as its NumPy lines.
ADAM_UPDATE = Elementwise(
    "mnn_adam_update",
    "T g, float64 beta1, float64 beta2, float64 step_size, float64 unbias, float64 eps",
    "T theta, T m, T v",
    "m = beta1 * m + (1 - beta1) * g;"
    " v = beta2 * v + (1 - beta2) * g * g;"
    " theta -= step_size * m / (sqrt(v) * unbias + eps)")

# SplitMix64's output function (mnn.layers.dropout, Eq. (4)).
SPLITMIX64 = """
__device__ unsigned long long mnn_splitmix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
"""

# Dropout's Eqs. (3), (4) and (1) (mnn.layers.dropout): the mask drawn where the data is, and applied.
DROPOUT = Elementwise(
    "mnn_dropout",
    "T x, uint64 key, uint64 threshold, T scale",
    "T y, T kept",
    "unsigned long long z = mnn_splitmix64(key + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ull);"
    " kept = (z >> 32) < threshold ? scale : (T)0;"
    " y = x * kept",
    SPLITMIX64)


def adam_update(grad, beta1, beta2, step_size, unbias, eps, param, m, v):
    """Adam's Eqs. (2)-(3) in place on CuPy arrays: ``param``, ``m`` and ``v`` are updated."""
    compiled(ADAM_UPDATE)(grad, beta1, beta2, step_size, unbias, eps, param, m, v)


def dropout(x, key, threshold, scale):
    """Dropout's forward on a CuPy array: (y, kept), ``kept`` holding ``scale`` or 0 per element."""
    import cupy

    x = cupy.ascontiguousarray(x)  # element i of the kernel is then element i of x in C order, as in Eq. (4)
    y, kept = cupy.empty_like(x), cupy.empty_like(x)
    compiled(DROPOUT)(x, cupy.uint64(key), cupy.uint64(threshold), x.dtype.type(scale), y, kept)
    return y, kept
