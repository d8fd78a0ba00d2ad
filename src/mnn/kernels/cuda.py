"""GPU kernels for CuPy: a layer's element-wise chain, or its work on each row, as one launch.

On a GPU each array operation is a kernel launch that reads its operands from global
memory and writes its result back, so a chain of NumPy-style lines costs a launch and a
round trip per operator. Each kernel here does a whole chain in registers.

Every kernel is kept as its CUDA C source, compiled by CuPy (NVRTC) on first use:

* ``Elementwise``: a ``cupy.ElementwiseKernel``'s parameters and its operation on element ``i``.
* ``Raw``: a ``cupy.RawKernel`` family, one ``extern "C"`` entry per dtype. A row kernel gives
  each row one warp of ``LANES`` = 32 threads, which stride along the row and combine their
  partial sums with warp shuffles (``lanes_sum``); an element kernel's threads stride over all
  elements.

``tests/cuda_on_cpu.py`` compiles the same text with g++ and runs it on the CPU against the
layers' reference lines: ``__device__`` becomes ``static inline``, a row kernel runs with
one lane per row (``LANES`` = 1, so the shuffles are never reached), and an element kernel
runs as one thread. That checks the arithmetic and the indexing. The tests also compile every
source with NVRTC; the shuffles and the lanes' striding run only on a GPU, in ``tests/test_cupy.py``.
"""
import functools
import re
from typing import NamedTuple

import numpy

from ..layers.dropout import GOLDEN_GAMMA, MIX_MULTIPLIERS


class Elementwise(NamedTuple):
    """The source of a ``cupy.ElementwiseKernel``. ``operation`` is C code for element ``i``: it reads
    the inputs and writes the outputs by name; ``T`` is the floating type of the arrays."""

    name: str
    in_params: str
    out_params: str
    operation: str
    preamble: str = ""


class Raw(NamedTuple):
    """The source of a ``cupy.RawKernel`` family: CUDA C with the entries ``{name}_float`` and
    ``{name}_double`` (``entries``), using only what NVRTC knows without headers."""

    name: str
    code: str


@functools.cache
def compiled(source):
    """The CuPy kernel for ``source``; CuPy compiles it once per dtype, on first call."""
    import cupy

    return cupy.ElementwiseKernel(source.in_params, source.out_params, source.operation, source.name,
                                  preamble=source.preamble)


C_FLOATING = {"float32": "float", "float64": "double"}


@functools.cache
def compiled_raw(source, dtype_name):
    """The CuPy kernel of ``source``'s entry for arrays of ``dtype_name`` (float32 or float64)."""
    import cupy

    if dtype_name not in C_FLOATING:
        raise TypeError(f"{source.name}: no entry for {dtype_name} arrays, only for float32 and float64")
    return cupy.RawKernel(source.code, f"{source.name}_{C_FLOATING[dtype_name]}")


def entries(name, template, params):
    """C for the ``extern "C"`` entries ``{name}_float`` and ``{name}_double``: each calls the device
    function ``template`` with its parameters, ``params`` written with ``T`` for the floating type."""
    arguments = ", ".join(param.split()[-1].lstrip("*") for param in params.split(","))
    code = ""
    for c_type in C_FLOATING.values():
        typed = re.sub(r"\bT\b", c_type, params)
        code += f'extern "C" __global__ void {name}_{c_type}({typed}) {{ {template}({arguments}); }}\n'
    return code


# -- element-wise kernels --------------------------------------------------------------------------

# Adam's Eqs. (2)-(3) (mnn.optim.Adam), the same arithmetic as its NumPy lines.
ADAM_UPDATE = Elementwise(
    "mnn_adam_update",
    "T g, float64 beta1, float64 beta2, float64 step_size, float64 unbias, float64 eps",
    "T theta, T m, T v",
    "m = beta1 * m + (1 - beta1) * g;"
    " v = beta2 * v + (1 - beta2) * g * g;"
    " theta -= step_size * m / (sqrt(v) * unbias + eps)")

# SplitMix64's output function (mnn.layers.dropout, Eq. (4)).
SPLITMIX64 = f"""
__device__ unsigned long long mnn_splitmix64(unsigned long long z) {{
    z = (z ^ (z >> 30)) * {MIX_MULTIPLIERS[0]:#x}ull;
    z = (z ^ (z >> 27)) * {MIX_MULTIPLIERS[1]:#x}ull;
    return z ^ (z >> 31);
}}
"""

# Dropout's Eqs. (3), (4) and (1) (mnn.layers.dropout): the mask drawn where the data is, and applied.
DROPOUT = Elementwise(
    "mnn_dropout",
    "T x, uint64 key, uint64 threshold, T scale",
    "T y, T scaled_mask",
    f"unsigned long long z = mnn_splitmix64(key + (unsigned long long)(i + 1) * {GOLDEN_GAMMA:#x}ull);"
    " scaled_mask = (z >> 32) < threshold ? scale : (T)0;"
    " y = x * scaled_mask",
    SPLITMIX64)

# GELU's Eq. (1) and Eqs. (2)-(3) (mnn.layers.activations.GeluLayer); the backward computes t again.
GELU = Elementwise(
    "mnn_gelu",
    "T x, T c, T k",
    "T y",
    "y = (T)0.5 * x * ((T)1 + tanh(c * (x + k * x * x * x)))")
GELU_BACKWARD = Elementwise(
    "mnn_gelu_backward",
    "T g, T x, T c, T k",
    "T grad",
    "T t = tanh(c * (x + k * x * x * x));"
    " grad = g * ((T)0.5 * ((T)1 + t) + (T)0.5 * x * ((T)1 - t * t) * c * ((T)1 + (T)3 * k * x * x))")

# -- row kernels: one warp per row, ROWS_PER_BLOCK rows per block -----------------------------------

WARP = 32
ROWS_PER_BLOCK = 4  # a multiprocessor holds at most 32 blocks: blocks of one warp would leave it half full
ROWS = r"""
#ifndef LANES
#define LANES 32
#endif
/* The row this thread works on: rows of one warp each, blockDim.y rows to a block. */
__device__ long long row_index() { return (long long)blockIdx.x * blockDim.y + threadIdx.y; }
/* The maximum and the sum of v over the lanes of a row: each step combines the value of the
   lane `offset` away (a butterfly), so after log2(LANES) steps every lane holds the result. */
template <typename T> __device__ T lanes_max(T v) {
    for (int offset = LANES / 2; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}
template <typename T> __device__ T lanes_sum(T v) {
    for (int offset = LANES / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}
"""

# The attention's Eq. (2) tail and softmax (mnn.layers.attention; SoftmaxLayer's Eq. (1)):
# y = softmax(scale s + M) with the causal mask M, in one read of s and one write of y; and the
# backward, SoftmaxLayer's Eq. (3) times the scale (the attention's Eq. (7)), in one read of y and g.
SOFTMAX_ROWS = Raw("mnn_softmax_rows", ROWS + r"""
/* Row r of the (rows, n) scores: under the causal mask, query t = r mod n sees keys 0..t only. */
template <typename T> __device__ void softmax_row(const T* s, T* y, int n, T scale, int causal, long long rows) {
    long long row = row_index();
    if (row >= rows) return;
    int lane = threadIdx.x, visible = causal ? (int)(row % n) + 1 : n;
    s += row * n;
    y += row * n;
    T top = scale * s[0];  /* key 0 is always visible */
    for (int j = lane; j < visible; j += LANES) top = max(top, scale * s[j]);
    top = lanes_max(top);
    T total = 0;
    for (int j = lane; j < visible; j += LANES) total += exp(scale * s[j] - top);
    total = lanes_sum(total);
    for (int j = lane; j < n; j += LANES) y[j] = j < visible ? exp(scale * s[j] - top) / total : (T)0;
}
template <typename T> __device__ void softmax_row_backward(const T* y, const T* g, T* d, int n, T scale,
                                                           long long rows) {
    long long row = row_index();
    if (row >= rows) return;
    int lane = threadIdx.x;
    y += row * n;
    g += row * n;
    d += row * n;
    T dot = 0;
    for (int j = lane; j < n; j += LANES) dot += g[j] * y[j];
    dot = lanes_sum(dot);
    for (int j = lane; j < n; j += LANES) d[j] = y[j] * (g[j] - dot) * scale;
}
""" + entries("mnn_softmax_rows", "softmax_row", "const T* s, T* y, int n, T scale, int causal, long long rows")
    + entries("mnn_softmax_rows_backward", "softmax_row_backward",
              "const T* y, const T* g, T* d, int n, T scale, long long rows"))
SOFTMAX_ROWS_BACKWARD = Raw("mnn_softmax_rows_backward", SOFTMAX_ROWS.code)

# Layer norm's Eq. (1) and its input gradient, Eq. (3) (mnn.layers.normalization.LayerNormLayer).
LAYER_NORM_ROWS = Raw("mnn_layer_norm_rows", ROWS + r"""
template <typename T> __device__ void layer_norm_row(const T* x, const T* weight, const T* bias, T* y, T* x_hat,
                                                     T* inv_std, int n, T eps, long long rows) {
    long long row = row_index();
    if (row >= rows) return;
    int lane = threadIdx.x;
    x += row * n;
    y += row * n;
    x_hat += row * n;
    T total = 0;
    for (int j = lane; j < n; j += LANES) total += x[j];
    T mean = lanes_sum(total) / n;
    T squares = 0;
    for (int j = lane; j < n; j += LANES) squares += (x[j] - mean) * (x[j] - mean);
    T scale = (T)1 / sqrt(lanes_sum(squares) / n + eps);
    for (int j = lane; j < n; j += LANES) {
        x_hat[j] = (x[j] - mean) * scale;
        y[j] = x_hat[j] * weight[j] + bias[j];
    }
    if (lane == 0) inv_std[row] = scale;
}
/* g_hat = weight g; grad = (g_hat - mean(g_hat) - x_hat mean(g_hat x_hat)) / sigma, along the row. */
template <typename T> __device__ void layer_norm_row_backward(const T* g, const T* x_hat, const T* weight,
                                                              const T* inv_std, T* grad, int n, long long rows) {
    long long row = row_index();
    if (row >= rows) return;
    int lane = threadIdx.x;
    g += row * n;
    x_hat += row * n;
    grad += row * n;
    T sum_g = 0, sum_gx = 0;
    for (int j = lane; j < n; j += LANES) {
        sum_g += g[j] * weight[j];
        sum_gx += g[j] * weight[j] * x_hat[j];
    }
    T mean_g = lanes_sum(sum_g) / n, mean_gx = lanes_sum(sum_gx) / n;
    for (int j = lane; j < n; j += LANES) grad[j] = (g[j] * weight[j] - (x_hat[j] * mean_gx + mean_g)) * inv_std[row];
}
""" + entries("mnn_layer_norm_rows", "layer_norm_row",
              "const T* x, const T* weight, const T* bias, T* y, T* x_hat, T* inv_std, int n, T eps, long long rows")
    + entries("mnn_layer_norm_rows_backward", "layer_norm_row_backward",
              "const T* g, const T* x_hat, const T* weight, const T* inv_std, T* grad, int n, long long rows"))
LAYER_NORM_ROWS_BACKWARD = Raw("mnn_layer_norm_rows_backward", LAYER_NORM_ROWS.code)

# Cross-entropy's Eq. (1) and Eq. (2) (mnn.layers.losses.CrossEntropyLossLayer), rows of n classes:
# the softmax p and each row's loss -log p_t in one launch; (p - onehot(t)) / N in another.
CROSS_ENTROPY_ROWS = Raw("mnn_cross_entropy_rows", ROWS + r"""
template <typename T> __device__ void cross_entropy_row(const T* x, const long long* labels, T* p, T* loss, int n,
                                                        long long rows) {
    long long row = row_index();
    if (row >= rows) return;
    int lane = threadIdx.x;
    x += row * n;
    p += row * n;
    T top = x[0];
    for (int j = lane; j < n; j += LANES) top = max(top, x[j]);
    top = lanes_max(top);
    T total = 0;
    for (int j = lane; j < n; j += LANES) total += exp(x[j] - top);
    T log_total = log(lanes_sum(total));
    for (int j = lane; j < n; j += LANES) p[j] = exp(x[j] - top - log_total);  /* exp(log p) */
    if (lane == 0) loss[row] = log_total - (x[labels[row]] - top);  /* -log p_t */
}
template <typename T> __device__ void cross_entropy_row_backward(const T* p, const long long* labels, T* grad, int n,
                                                                 T inv_count, long long rows) {
    long long row = row_index();
    if (row >= rows) return;
    p += row * n;
    grad += row * n;
    for (int j = threadIdx.x; j < n; j += LANES) grad[j] = (p[j] - (j == labels[row] ? (T)1 : (T)0)) * inv_count;
}
""" + entries("mnn_cross_entropy_rows", "cross_entropy_row",
              "const T* x, const long long* labels, T* p, T* loss, int n, long long rows")
    + entries("mnn_cross_entropy_rows_backward", "cross_entropy_row_backward",
              "const T* p, const long long* labels, T* grad, int n, T inv_count, long long rows"))
CROSS_ENTROPY_ROWS_BACKWARD = Raw("mnn_cross_entropy_rows_backward", CROSS_ENTROPY_ROWS.code)

# -- element kernels: threads striding over all elements -------------------------------------------

ELEMENT_BLOCK = 256  # threads per block

# The LSTM's step (mnn.layers.recurrent.LSTMLayer): Eqs. (T1), (1)-(3) forward and Eqs. (4)-(7) backward,
# one thread per (sample, unit), which reads and writes that unit's four gates. The sigmoid is
# (1 + tanh(a / 2)) / 2, as in the reference lines.
LSTM_STEP = Raw("mnn_lstm_step", r"""
#define EACH_UNIT for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < (long long)batch * size; \
                       e += (long long)gridDim.x * blockDim.x)
template <typename T> __device__ T gate_sigmoid(T a) { return (tanh(a * (T)0.5) + (T)1) * (T)0.5; }
template <typename T> __device__ void lstm_step(T* gates, const T* product, const T* bias, const T* c_prev, T* c,
                                                T* tanh_c, T* h, int batch, int size) {
    EACH_UNIT {
        long long b = e / size, k = e % size, row = b * 4 * size;
        T* a = gates + row + k;  /* a[0], a[size], a[2 size], a[3 size]: the unit's i, f, g, o */
        const T* p = product + row + k;
        T i = gate_sigmoid((a[0] + bias[k]) + p[0]);
        T f = gate_sigmoid((a[size] + bias[size + k]) + p[size]);
        T g = tanh((a[2 * size] + bias[2 * size + k]) + p[2 * size]);
        T o = gate_sigmoid((a[3 * size] + bias[3 * size + k]) + p[3 * size]);
        a[0] = i;
        a[size] = f;
        a[2 * size] = g;
        a[3 * size] = o;
        c[e] = f * c_prev[e] + i * g;
        tanh_c[e] = tanh(c[e]);
        h[e] = o * tanh_c[e];
    }
}
template <typename T> __device__ void lstm_step_backward(const T* g_out, const T* carry_h, const T* carry_c,
                                                         const T* gates, const T* tanh_c, const T* c_prev, T* delta,
                                                         T* carry_c_out, int batch, int size) {
    EACH_UNIT {
        long long b = e / size, k = e % size, row = b * 4 * size;
        const T* a = gates + row + k;
        T* d = delta + row + k;
        T i = a[0], f = a[size], g = a[2 * size], o = a[3 * size], t = tanh_c[e];
        T dh = g_out[e] + carry_h[e];
        T dc = dh * o * ((T)1 - t * t) + carry_c[e];
        d[0] = (dc * g) * (i * ((T)1 - i));
        d[size] = (dc * c_prev[e]) * (f * ((T)1 - f));
        d[2 * size] = (dc * i) * ((T)1 - g * g);
        d[3 * size] = (dh * t) * (o * ((T)1 - o));
        carry_c_out[e] = dc * f;
    }
}
""" + entries("mnn_lstm_step", "lstm_step",
              "T* gates, const T* product, const T* bias, const T* c_prev, T* c, T* tanh_c, T* h, int batch, int size")
    + entries("mnn_lstm_step_backward", "lstm_step_backward",
              "const T* g_out, const T* carry_h, const T* carry_c, const T* gates, const T* tanh_c, const T* c_prev, "
              "T* delta, T* carry_c_out, int batch, int size"))
LSTM_STEP_BACKWARD = Raw("mnn_lstm_step_backward", LSTM_STEP.code)


# -- launches ----------------------------------------------------------------------------------------

def launch_rows(source, like, arguments):
    """Run a row kernel on ``like``'s rows (its last axis), ``arguments`` then the row count; no launch
    where there are none."""
    rows = like.size // like.shape[-1] if like.size else 0
    if rows:
        blocks = -(-rows // ROWS_PER_BLOCK)
        compiled_raw(source, like.dtype.name)((blocks,), (WARP, ROWS_PER_BLOCK), (*arguments, numpy.int64(rows)))


def launch_elements(source, like, count, arguments):
    """Run an element kernel over ``count`` elements (arrays of ``like``'s dtype); none for none."""
    if count:
        blocks = min(-(-count // ELEMENT_BLOCK), 65535)  # the rest stride
        compiled_raw(source, like.dtype.name)((blocks,), (ELEMENT_BLOCK,), arguments)


def adam_update(grad, beta1, beta2, step_size, unbias, eps, param, m, v):
    """Adam's Eqs. (2)-(3) in place on CuPy arrays: ``param``, ``m`` and ``v`` are updated."""
    compiled(ADAM_UPDATE)(grad, beta1, beta2, step_size, unbias, eps, param, m, v)


def dropout(x, key, threshold, scale):
    """Dropout's forward on a CuPy array: (y, scaled_mask), the mask holding ``scale`` or 0 per element."""
    import cupy

    shape, x = x.shape, cupy.ascontiguousarray(x)  # element i of the kernel is element i of x in C order (Eq. (4))
    y, scaled_mask = cupy.empty_like(x), cupy.empty_like(x)
    compiled(DROPOUT)(x, cupy.uint64(key), cupy.uint64(threshold), x.dtype.type(scale), y, scaled_mask)
    return y.reshape(shape), scaled_mask.reshape(shape)  # ascontiguousarray makes a 0-d array 1-d


def gelu(x, c, k):
    """GELU's Eq. (1) on a CuPy array, in one launch."""
    return compiled(GELU)(x, x.dtype.type(c), x.dtype.type(k))


def gelu_backward(g, x, c, k):
    """GELU's Eqs. (2)-(3) on CuPy arrays, in one launch."""
    return compiled(GELU_BACKWARD)(g, x, x.dtype.type(c), x.dtype.type(k))


def scaled_softmax(s, scale, causal):
    """softmax(scale s + M) along the last axis of CuPy scores (..., T, T) (or (..., n) without the
    mask), in one launch."""
    import cupy

    s = cupy.ascontiguousarray(s)
    y = cupy.empty_like(s)
    launch_rows(SOFTMAX_ROWS, s, (s, y, numpy.int32(s.shape[-1]), s.dtype.type(scale), numpy.int32(bool(causal))))
    return y


def scaled_softmax_backward(y, g, scale):
    """scale y (g - sum(g y)) along the last axis of CuPy arrays, in one launch."""
    import cupy

    y, g = cupy.ascontiguousarray(y), cupy.ascontiguousarray(g)
    d = cupy.empty_like(y)
    launch_rows(SOFTMAX_ROWS_BACKWARD, y, (y, g, d, numpy.int32(y.shape[-1]), y.dtype.type(scale)))
    return d


def layer_norm(x, weight, bias, eps):
    """Layer norm's Eq. (1) along the last axis of a CuPy array: (y, x_hat, 1/sigma), in one launch."""
    import cupy

    x, weight, bias = (cupy.ascontiguousarray(a) for a in (x, weight, bias))  # a raw kernel reads memory in order
    y, x_hat, inv_std = cupy.empty_like(x), cupy.empty_like(x), cupy.empty(x.shape[:-1] + (1,), dtype=x.dtype)
    launch_rows(LAYER_NORM_ROWS, x, (x, weight, bias, y, x_hat, inv_std, numpy.int32(x.shape[-1]), x.dtype.type(eps)))
    return y, x_hat, inv_std


def layer_norm_backward(g, x_hat, weight, inv_std):
    """Layer norm's Eq. (3) on CuPy arrays, in one launch (the weight's and the bias's sums are the caller's)."""
    import cupy

    g = cupy.ascontiguousarray(g)
    grad = cupy.empty_like(g)
    launch_rows(LAYER_NORM_ROWS_BACKWARD, g, (g, x_hat, weight, inv_std, grad, numpy.int32(g.shape[-1])))
    return grad


def device_labels(labels):
    """Class labels as the row kernels read them: a contiguous int64 CuPy array."""
    import cupy

    return cupy.ascontiguousarray(cupy.asarray(labels), dtype=cupy.int64)


def cross_entropy(rows, labels):
    """Cross-entropy's softmax p and per-row losses for CuPy scores (N, C) and ``device_labels`` (N,)."""
    import cupy

    rows = cupy.ascontiguousarray(rows)
    p, losses = cupy.empty_like(rows), cupy.empty(rows.shape[0], dtype=rows.dtype)
    launch_rows(CROSS_ENTROPY_ROWS, rows, (rows, labels, p, losses, numpy.int32(rows.shape[1])))
    return p, losses


def cross_entropy_backward(p, labels):
    """Cross-entropy's Eq. (2), (p - onehot(t)) / N, for CuPy arrays (N, C) and ``device_labels`` (N,)."""
    import cupy

    grad = cupy.empty_like(p)
    launch_rows(CROSS_ENTROPY_ROWS_BACKWARD, p, (p, labels, grad, numpy.int32(p.shape[1]),
                                                 p.dtype.type(1 / max(len(p), 1))))
    return grad


def lstm_step(gates, product, bias, c_prev, c, tanh_c, h):
    """The LSTM's forward step on contiguous CuPy arrays, as ``mnn.kernels.cpu.lstm_step_forward`` (but
    ``product`` is h_{t-1} W_hh^T, (B, 4H)): overwrites ``gates`` with [i, f, g, o], writes c, tanh(c), h."""
    batch, size = c.shape
    launch_elements(LSTM_STEP, gates, batch * size, (gates, product, bias, c_prev, c, tanh_c, h, numpy.int32(batch),
                                                     numpy.int32(size)))


def lstm_step_backward(g, carry_h, carry_c, gates, tanh_c, c_prev, delta):
    """The LSTM's Eqs. (4)-(7) for one step on contiguous CuPy arrays (``carry_h`` (B, H)); fills ``delta`` and
    returns the cell-state path's carry into step t - 1."""
    import cupy

    batch, size = carry_c.shape
    carry_out = cupy.empty_like(carry_c)
    launch_elements(LSTM_STEP_BACKWARD, gates, batch * size, (g, carry_h, carry_c, gates, tanh_c, c_prev, delta,
                                                              carry_out, numpy.int32(batch), numpy.int32(size)))
    return carry_out
