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
one lane per row (``LANES`` = 1, so the shuffles are never reached), and an element kernel's
threads run one after another. That checks the arithmetic and the indexing.
``tests/test_gpu_lines.py`` goes further: with CuPy's kernel objects stood in for by those CPU builds, and NumPy for CuPy, the
layers take their GPU lines on the CPU, so every launch's argument list (each array's dtype and
layout, each scalar's width) is checked against the kernel's parameters, and whole models train
as on the reference lines. Where a test asks for it, and for every kernel whose threads share
memory, ``cuda_on_cpu`` runs each block whole instead, every thread a fiber: the lanes' striding,
the shuffles and ``__syncthreads`` then run as on a GPU. The tests also compile every source with
NVRTC; ``tests/test_cupy.py`` runs the kernels on a GPU. The flash attention kernels are in
``mnn.kernels.cuda_attention``.
"""
import functools
import re
from typing import NamedTuple

import numpy

from ..layers.dropout import GOLDEN_GAMMA, MIX_MULTIPLIERS
from ..layers.sums import column_sums, ones_for


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
DTYPE_NAMES = {numpy.dtype(name): name for name in C_FLOATING}


def dtype_name(array):
    """``array.dtype.name``, by a dictionary lookup for the two floating types (a microsecond or more
    saved on each launch: NumPy computes the name in Python)."""
    return DTYPE_NAMES.get(array.dtype) or array.dtype.name


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

# Adam's Eqs. (2)-(3) (mnn.optim.Adam) after AdamW's decay (theta times shrink, 1 for none), in the
# order of operations of the CPU kernel, and in T: the settings come rounded to the parameters' dtype,
# as there (double arithmetic would also be slow on GPUs with few float64 units).
ADAM_SETTINGS = "T beta1, T one_minus_beta1, T beta2, T one_minus_beta2, T step_size, T unbias, T eps, T shrink"
ADAM_STEP = ("m = m * beta1 + g * one_minus_beta1;"
             " v = v * beta2 + g * one_minus_beta2 * g;"
             " theta -= m / (sqrt(v) * unbias + eps) * step_size;")
ADAM_UPDATE = Elementwise("mnn_adam_update", "T g, " + ADAM_SETTINGS, "T theta, T m, T v",
                          "theta = theta * shrink; " + ADAM_STEP)

# The same step over a whole flat buffer (mnn.flat) in one launch: ``code`` says what entry i is,
# 0 for one the optimizer leaves alone (padding, a parameter it does not hold), 1 for a parameter
# it updates without decay, 2 for one it decays.
ADAM_UPDATE_FLAT = Elementwise("mnn_adam_update_flat", "T g, uint8 code, " + ADAM_SETTINGS, "T theta, T m, T v",
                               "if (code != 0) { theta = theta * (code == 2 ? shrink : (T)1); " + ADAM_STEP + " }")

# Batch norm's Eq. (4) (mnn.layers.normalization.BatchNormLayer): both running statistics in one launch.
RUNNING_STATISTICS = Elementwise(
    "mnn_running_statistics",
    "T mean, T var, T keep, T momentum, T var_scale",
    "T running_mean, T running_var",
    "running_mean = running_mean * keep + momentum * mean;"
    " running_var = running_var * keep + var_scale * var")

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

# ReLU's Eq. (2) (mnn.layers.activations.ReluLayer), g times the indicator, in one launch rather than two.
RELU_BACKWARD = Elementwise("mnn_relu_backward", "T g, T y", "T grad", "grad = y <= (T)0 ? (T)0 : g")

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
/* Eq. (3), and g x_hat (products), whose sum over the rows is Eq. (2)'s weight gradient */
template <typename T> __device__ void layer_norm_row_backward(const T* g, const T* x_hat, const T* weight,
                                                              const T* inv_std, T* grad, T* products, int n,
                                                              long long rows) {
    long long row = row_index();
    if (row >= rows) return;
    int lane = threadIdx.x;
    g += row * n;
    x_hat += row * n;
    grad += row * n;
    products += row * n;
    T sum_g = 0, sum_gx = 0;
    for (int j = lane; j < n; j += LANES) {
        products[j] = g[j] * x_hat[j];
        sum_g += g[j] * weight[j];
        sum_gx += g[j] * weight[j] * x_hat[j];
    }
    T mean_g = lanes_sum(sum_g) / n, mean_gx = lanes_sum(sum_gx) / n;
    for (int j = lane; j < n; j += LANES) grad[j] = (g[j] * weight[j] - (x_hat[j] * mean_gx + mean_g)) * inv_std[row];
}
""" + entries("mnn_layer_norm_rows", "layer_norm_row",
              "const T* x, const T* weight, const T* bias, T* y, T* x_hat, T* inv_std, int n, T eps, long long rows")
    + entries("mnn_layer_norm_rows_backward", "layer_norm_row_backward",
              "const T* g, const T* x_hat, const T* weight, const T* inv_std, T* grad, T* products, int n, "
              "long long rows"))
LAYER_NORM_ROWS_BACKWARD = Raw("mnn_layer_norm_rows_backward", LAYER_NORM_ROWS.code)

# Cross-entropy's Eq. (1) and Eq. (2) (mnn.layers.losses.CrossEntropyLossLayer), rows of n classes:
# the softmax p and each row's loss -log p_t in one launch; (p - onehot(t)) / N in another. The
# forward counts the labels outside [0, n) (leaving their rows' losses unwritten), so that the layer's
# range check is one read from the device, where a minimum and a maximum would be two launches and two.
CROSS_ENTROPY_ROWS = Raw("mnn_cross_entropy_rows", ROWS + r"""
template <typename T> __device__ void cross_entropy_row(const T* x, const long long* labels, T* p, T* loss,
                                                        unsigned long long* outside, int n, long long rows) {
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
    long long label = labels[row];
    if (lane == 0 && label >= 0 && label < n) loss[row] = log_total - (x[label] - top);  /* -log p_t */
    else if (lane == 0) atomicAdd(outside, 1ull);
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
              "const T* x, const long long* labels, T* p, T* loss, unsigned long long* outside, int n, long long rows")
    + entries("mnn_cross_entropy_rows_backward", "cross_entropy_row_backward",
              "const T* p, const long long* labels, T* grad, int n, T inv_count, long long rows"))
CROSS_ENTROPY_ROWS_BACKWARD = Raw("mnn_cross_entropy_rows_backward", CROSS_ENTROPY_ROWS.code)

# The embedding's Eq. (1) (mnn.layers.embedding.EmbeddingLayer): a warp copies each index's row of the
# table, and counts the indices outside [0, V) (their rows left unwritten): one read for the range check.
EMBEDDING_ROWS = Raw("mnn_embedding_rows", ROWS + r"""
template <typename T> __device__ void embedding_row(const T* table, const long long* indices, T* y,
                                                    unsigned long long* outside, int n, long long vocabulary,
                                                    long long rows) {
    long long row = row_index();
    if (row >= rows) return;
    long long index = indices[row];
    if (index < 0 || index >= vocabulary) {
        if (threadIdx.x == 0) atomicAdd(outside, 1ull);
        return;
    }
    for (int j = threadIdx.x; j < n; j += LANES) y[row * n + j] = table[index * n + j];
}
""" + entries("mnn_embedding_rows", "embedding_row", "const T* table, const long long* indices, T* y, "
              "unsigned long long* outside, int n, long long vocabulary, long long rows"))

# -- element kernels: threads striding over all elements -------------------------------------------

ELEMENT_BLOCK = 256  # threads per block
ELEMENTS = r"""
/* A grid-stride loop: the grid's threads take elements 0, 1, ... in turn, each then steps by their count. */
#define EACH_ELEMENT(e, count) for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < (count); \
                                    e += (long long)gridDim.x * blockDim.x)
"""

# The LSTM's step (mnn.layers.recurrent.LSTMLayer), product with the state included, one launch each
# way: a step is latency, not arithmetic (a batch of 32 by 256 units is 17 MFLOP), so a launch saved is
# time saved. Each warp takes one unit k for LSTM_SAMPLES samples, so each of W_hh's rows it reads
# serves them all. Forward: Eq. (T1)'s (h_{t-1} W_hh^T) for the unit's four gates, summed over the
# lanes, then Eqs. (1)-(3). Backward: Eq. (4)'s W_hh^T delta_{t+1} for the unit (the row k of W_hh^T,
# made contiguous once a backward pass), then Eqs. (5)-(7). After the sums every lane holds every
# sample's, and lane s finishes sample s. The sigmoid is (1 + tanh(a / 2)) / 2, as in the reference lines.
LSTM_SAMPLES = 8
LSTM_STEP = Raw("mnn_lstm_step", ROWS + f"#define LSTM_SAMPLES {LSTM_SAMPLES}\n" + r"""
template <typename T> __device__ T gate_sigmoid(T a) { return (tanh(a * (T)0.5) + (T)1) * (T)0.5; }
/* Row r of the launch: unit k = r mod size of the samples b0 = (r / size) LSTM_SAMPLES onwards. */
__device__ bool lstm_row(int batch, int size, int* k, int* b0) {
    long long row = row_index(), tiles = (batch + LSTM_SAMPLES - 1) / LSTM_SAMPLES;
    *k = (int)(row % size);
    *b0 = (int)(row / size) * LSTM_SAMPLES;
    return row < tiles * size;
}
template <typename T> __device__ void lstm_step(T* gates, const T* h_prev, const T* w_hh, const T* bias,
                                                const T* c_prev, T* c, T* tanh_c, T* h, int batch, int size) {
    int k, b0, lane = threadIdx.x;
    if (!lstm_row(batch, size, &k, &b0)) return;
    T p[4][LSTM_SAMPLES] = {};  /* Eq. (T1): the unit's four gates for each sample */
    for (int j = lane; j < size; j += LANES) {
        T w[4];
        for (int gate = 0; gate < 4; gate++) w[gate] = w_hh[((long long)gate * size + k) * size + j];
        for (int s = 0; s < LSTM_SAMPLES; s++) {
            T h_j = b0 + s < batch ? h_prev[(long long)(b0 + s) * size + j] : (T)0;
            for (int gate = 0; gate < 4; gate++) p[gate][s] += h_j * w[gate];
        }
    }
    for (int s = 0; s < LSTM_SAMPLES; s++)
        for (int gate = 0; gate < 4; gate++) p[gate][s] = lanes_sum(p[gate][s]);
    for (int s = 0; s < LSTM_SAMPLES; s++) {
        if (s % LANES != lane || b0 + s >= batch) continue;
        long long e = (long long)(b0 + s) * size + k;
        T* a = gates + (long long)(b0 + s) * 4 * size + k;  /* a[0], a[size], a[2 size], a[3 size]: i, f, g, o */
        T i = gate_sigmoid((a[0] + bias[k]) + p[0][s]);
        T f = gate_sigmoid((a[size] + bias[size + k]) + p[1][s]);
        T g = tanh((a[2 * size] + bias[2 * size + k]) + p[2][s]);
        T o = gate_sigmoid((a[3 * size] + bias[3 * size + k]) + p[3][s]);
        a[0] = i;
        a[size] = f;
        a[2 * size] = g;
        a[3 * size] = o;
        c[e] = f * c_prev[e] + i * g;
        tanh_c[e] = tanh(c[e]);
        h[e] = o * tanh_c[e];
    }
}
/* delta_next is delta_{t+1} (B, 4H) where from_next is 1; at the last step it is not read, and carry_h,
   the final state's gradient, stands in for its product. */
template <typename T> __device__ void lstm_step_backward(const T* g_out, const T* delta_next, const T* w_hh_t,
                                                         const T* carry_h, const T* carry_c, const T* gates,
                                                         const T* tanh_c, const T* c_prev, T* delta, T* carry_c_out,
                                                         int batch, int size, int from_next) {
    int k, b0, lane = threadIdx.x;
    if (!lstm_row(batch, size, &k, &b0)) return;
    T q[LSTM_SAMPLES] = {};  /* Eq. (4)'s second term, W_hh^T delta_{t+1}, for each sample */
    for (int m = lane; from_next && m < 4 * size; m += LANES) {
        T w = w_hh_t[(long long)k * 4 * size + m];
        for (int s = 0; s < LSTM_SAMPLES; s++)
            q[s] += (b0 + s < batch ? delta_next[(long long)(b0 + s) * 4 * size + m] : (T)0) * w;
    }
    for (int s = 0; s < LSTM_SAMPLES; s++) q[s] = lanes_sum(q[s]);
    for (int s = 0; s < LSTM_SAMPLES; s++) {
        if (s % LANES != lane || b0 + s >= batch) continue;
        long long e = (long long)(b0 + s) * size + k;
        const T* a = gates + (long long)(b0 + s) * 4 * size + k;
        T* d = delta + (long long)(b0 + s) * 4 * size + k;
        T i = a[0], f = a[size], g = a[2 * size], o = a[3 * size], t = tanh_c[e];
        T dh = g_out[e] + (from_next ? q[s] : carry_h[e]);
        T dc = dh * o * ((T)1 - t * t) + carry_c[e];
        d[0] = (dc * g) * (i * ((T)1 - i));
        d[size] = (dc * c_prev[e]) * (f * ((T)1 - f));
        d[2 * size] = (dc * i) * ((T)1 - g * g);
        d[3 * size] = (dh * t) * (o * ((T)1 - o));
        carry_c_out[e] = dc * f;
    }
}
""" + entries("mnn_lstm_step", "lstm_step",
              "T* gates, const T* h_prev, const T* w_hh, const T* bias, const T* c_prev, T* c, T* tanh_c, T* h, "
              "int batch, int size")
    + entries("mnn_lstm_step_backward", "lstm_step_backward",
              "const T* g_out, const T* delta_next, const T* w_hh_t, const T* carry_h, const T* carry_c, "
              "const T* gates, const T* tanh_c, const T* c_prev, T* delta, T* carry_c_out, int batch, int size, "
              "int from_next"))
LSTM_STEP_BACKWARD = Raw("mnn_lstm_step_backward", LSTM_STEP.code)


# Convolution's im2col and col2im, and max-pooling (mnn.layers.conv, mnn.layers.pooling), on
# channels-last images (B, H, W, C): one thread per element written. col2im and the pooling's
# backward gather, each pixel summing what its windows send it in the order of the CPU kernels'
# loops, so no two threads add into one place (no atomics: the sums are the same every run).
IMAGE_GEOMETRY = "int batch, int height, int width, int channels, int out_h, int out_w"
IM2COL = Raw("mnn_im2col", ELEMENTS + r"""
/* X_col[(b, i, j), (p, q, c)] = x~[b, s i + p, s j + q, c], zero in the padding (Conv2dLayer, Eq. (4)). */
template <typename T> __device__ void im2col(const T* x, T* cols, int batch, int height, int width, int channels,
                                             int out_h, int out_w, int kh, int kw, int stride, int padding) {
    EACH_ELEMENT(e, (long long)batch * out_h * out_w * kh * kw * channels) {
        long long rest = e / channels;
        int c = e % channels, q = rest % kw, p = rest / kw % kh, j = rest / kw / kh % out_w;
        int i = rest / kw / kh / out_w % out_h;
        long long b = rest / kw / kh / out_w / out_h;
        int row = i * stride + p - padding, column = j * stride + q - padding;
        bool inside = 0 <= row && row < height && 0 <= column && column < width;
        cols[e] = inside ? x[((b * height + row) * width + column) * channels + c] : (T)0;
    }
}
/* Eq. (3): pixel (b, u, v, c) sums the window entries copied from it, windows (i, j) in rising order. */
template <typename T> __device__ void col2im(const T* d_cols, T* grad, int batch, int height, int width, int channels,
                                             int out_h, int out_w, int kh, int kw, int stride, int padding) {
    EACH_ELEMENT(e, (long long)batch * height * width * channels) {
        int c = e % channels, v = e / channels % width, u = e / channels / width % height;
        long long b = e / channels / width / height;
        T total = 0;
        for (int p = kh - 1; p >= 0; p--) {  /* i = (u + P - p) / s rises as p falls */
            int top = u + padding - p;
            if (top < 0 || top % stride != 0 || top / stride >= out_h) continue;
            for (int q = kw - 1; q >= 0; q--) {
                int left = v + padding - q;
                if (left < 0 || left % stride != 0 || left / stride >= out_w) continue;
                long long row = (b * out_h + top / stride) * out_w + left / stride;
                total += d_cols[((row * kh + p) * kw + q) * channels + c];
            }
        }
        grad[e] = total;
    }
}
""" + entries("mnn_im2col", "im2col", f"const T* x, T* cols, {IMAGE_GEOMETRY}, int kh, int kw, int stride, int padding")
    + entries("mnn_col2im", "col2im",
              f"const T* d_cols, T* grad, {IMAGE_GEOMETRY}, int kh, int kw, int stride, int padding"))
COL2IM = Raw("mnn_col2im", IM2COL.code)

MAX_POOL = Raw("mnn_max_pool", ELEMENTS + r"""
/* MaxPool2dLayer's Eq. (1): each window's maximum and the offset p k + q of its first; a NaN wins
   (the last NaN, if several), as in the CPU kernels. */
template <typename T> __device__ void max_pool(const T* x, T* y, int* argmax, int batch, int height, int width,
                                               int channels, int out_h, int out_w, int kernel, int stride) {
    EACH_ELEMENT(e, (long long)batch * out_h * out_w * channels) {
        int c = e % channels, j = e / channels % out_w, i = e / channels / out_w % out_h;
        long long b = e / channels / out_w / out_h;
        const T* corner = x + ((b * height + i * stride) * width + j * stride) * channels + c;
        T best = corner[0];
        int at = 0;
        for (int offset = 1; offset < kernel * kernel; offset++) {
            T value = corner[((long long)(offset / kernel) * width + offset % kernel) * channels];
            if (value > best || value != value) {
                best = value;
                at = offset;
            }
        }
        y[e] = best;
        argmax[e] = at;
    }
}
/* Eq. (2): pixel (b, u, v, c) sums the gradients of the windows whose arg-max it is, in rising (i, j). */
template <typename T> __device__ void max_pool_backward(const T* g, const int* argmax, T* grad, int batch, int height,
                                                        int width, int channels, int out_h, int out_w, int kernel,
                                                        int stride) {
    EACH_ELEMENT(e, (long long)batch * height * width * channels) {
        int c = e % channels, v = e / channels % width, u = e / channels / width % height;
        long long b = e / channels / width / height;
        int first_i = u < kernel ? 0 : (u - kernel) / stride + 1, last_i = min(u / stride, out_h - 1);
        int first_j = v < kernel ? 0 : (v - kernel) / stride + 1, last_j = min(v / stride, out_w - 1);
        T total = 0;
        for (int i = first_i; i <= last_i; i++) {
            for (int j = first_j; j <= last_j; j++) {
                long long at = ((b * out_h + i) * out_w + j) * channels + c;
                if (argmax[at] == (u - i * stride) * kernel + (v - j * stride)) total += g[at];
            }
        }
        grad[e] = total;
    }
}
""" + entries("mnn_max_pool", "max_pool", f"const T* x, T* y, int* argmax, {IMAGE_GEOMETRY}, int kernel, int stride")
    + entries("mnn_max_pool_backward", "max_pool_backward",
              f"const T* g, const int* argmax, T* grad, {IMAGE_GEOMETRY}, int kernel, int stride"))
MAX_POOL_BACKWARD = Raw("mnn_max_pool_backward", MAX_POOL.code)

# Batch norm's Eq. (1) and Eqs. (2)-(3) (mnn.layers.normalization.BatchNormLayer) over the rows of a
# contiguous (N, C) array. Each thread sums one channel over CHUNK_ROWS rows, in double; the caller
# adds those partial sums over the chunks (one GEMV); a thread per channel turns them into
# the statistics; a thread per entry applies them. The forward sums x - K and its square, with K the
# first row: the variance S2/N - (S1/N)^2 then cancels no more digits than the spread of the data
# around one of its samples costs, where sums of x and x^2 lose them all when the mean is large.
CHUNK_ROWS = 16
BATCH_NORM_SUMS = Raw("mnn_batch_norm_sums", ELEMENTS + r"""
template <typename T> __device__ void batch_norm_sums(const T* rows, double* sums, long long count, int channels,
                                                      int chunk_rows) {
    /* e: a chunk of rows and a channel; sums (chunks, 2, C) gets their sum of x - K, then of (x - K)^2 */
    EACH_ELEMENT(e, (count + chunk_rows - 1) / chunk_rows * channels) {
        long long chunk = e / channels, c = e % channels, end = min(count, (chunk + 1) * chunk_rows);
        double shift = rows[c], total = 0, squares = 0;
        for (long long n = chunk * chunk_rows; n < end; n++) {
            double d = rows[n * channels + c] - shift;
            total += d;
            squares += d * d;
        }
        sums[(chunk * 2) * channels + c] = total;
        sums[(chunk * 2 + 1) * channels + c] = squares;
    }
}
template <typename T> __device__ void batch_norm_statistics(const T* rows, const double* sums, T* mean, T* var,
                                                            T* inv_std, long long count, int channels, double eps) {
    EACH_ELEMENT(c, channels) {  /* sums (2, C): over every chunk */
        double offset = sums[c] / count, squares = sums[channels + c] / count;
        double variance = isinf(squares) ? squares : squares - offset * offset;  /* not inf - inf = NaN */
        variance = variance < 0 ? 0 : variance;  /* rounding may take it below 0; a NaN stays */
        mean[c] = (T)(rows[c] + offset);
        var[c] = (T)variance;
        inv_std[c] = (T)(1 / sqrt(variance + eps));
    }
}
template <typename T> __device__ void batch_norm_apply(const T* rows, const T* mean, const T* inv_std, const T* weight,
                                                       const T* bias, T* x_hat, T* y, long long count, int channels) {
    EACH_ELEMENT(e, count * channels) {
        int c = e % channels;
        x_hat[e] = (rows[e] - mean[c]) * inv_std[c];
        y[e] = x_hat[e] * weight[c] + bias[c];
    }
}
template <typename T> __device__ void batch_norm_backward_sums(const T* g, const T* x_hat, double* sums,
                                                               long long count, int channels, int chunk_rows) {
    /* e: a chunk of rows and a channel; sums (chunks, 2, C) gets their sum of g x_hat, then of g (Eq. (2)) */
    EACH_ELEMENT(e, (count + chunk_rows - 1) / chunk_rows * channels) {
        long long chunk = e / channels, c = e % channels, end = min(count, (chunk + 1) * chunk_rows);
        double product = 0, total = 0;
        for (long long n = chunk * chunk_rows; n < end; n++) {
            product += (double)g[n * channels + c] * x_hat[n * channels + c];
            total += g[n * channels + c];
        }
        sums[(chunk * 2) * channels + c] = product;
        sums[(chunk * 2 + 1) * channels + c] = total;
    }
}
/* Eq. (2)'s sums over every chunk, sums (2, C): added into the gradients, and as means, of g x_hat then of g,
   for Eq. (3) (means (2, C)), each rounded once a channel */
template <typename T> __device__ void batch_norm_backward_means(const double* sums, T* means, T* d_weight, T* d_bias,
                                                                long long count, int channels) {
    EACH_ELEMENT(c, channels) {
        means[c] = (T)(sums[c] / count);
        means[channels + c] = (T)(sums[channels + c] / count);
        d_weight[c] += (T)sums[c];
        d_bias[c] += (T)sums[channels + c];
    }
}
/* Eq. (3), with the means of Eq. (2)'s sums over every chunk, means (2, C): of g x_hat, then of g. */
template <typename T> __device__ void batch_norm_backward_apply(const T* g, const T* x_hat, const T* means,
                                                                const T* weight, const T* inv_std, T* grad,
                                                                long long count, int channels) {
    EACH_ELEMENT(e, count * channels) {
        int c = e % channels;
        grad[e] = (weight[c] * inv_std[c]) * (g[e] - means[channels + c] - x_hat[e] * means[c]);
    }
}
""" + entries("mnn_batch_norm_sums", "batch_norm_sums",
              "const T* rows, double* sums, long long count, int channels, int chunk_rows")
    + entries("mnn_batch_norm_statistics", "batch_norm_statistics",
              "const T* rows, const double* sums, T* mean, T* var, T* inv_std, long long count, int channels, "
              "double eps")
    + entries("mnn_batch_norm_apply", "batch_norm_apply",
              "const T* rows, const T* mean, const T* inv_std, const T* weight, const T* bias, T* x_hat, T* y, "
              "long long count, int channels")
    + entries("mnn_batch_norm_backward_sums", "batch_norm_backward_sums",
              "const T* g, const T* x_hat, double* sums, long long count, int channels, int chunk_rows")
    + entries("mnn_batch_norm_backward_means", "batch_norm_backward_means",
              "const double* sums, T* means, T* d_weight, T* d_bias, long long count, int channels")
    + entries("mnn_batch_norm_backward_apply", "batch_norm_backward_apply",
              "const T* g, const T* x_hat, const T* means, const T* weight, const T* inv_std, T* grad, "
              "long long count, int channels"))
BATCH_NORM_STATISTICS = Raw("mnn_batch_norm_statistics", BATCH_NORM_SUMS.code)
BATCH_NORM_APPLY = Raw("mnn_batch_norm_apply", BATCH_NORM_SUMS.code)
BATCH_NORM_BACKWARD_SUMS = Raw("mnn_batch_norm_backward_sums", BATCH_NORM_SUMS.code)
BATCH_NORM_BACKWARD_MEANS = Raw("mnn_batch_norm_backward_means", BATCH_NORM_SUMS.code)
BATCH_NORM_BACKWARD_APPLY = Raw("mnn_batch_norm_backward_apply", BATCH_NORM_SUMS.code)


# -- launches ----------------------------------------------------------------------------------------

def empty(like):
    """A new C-contiguous array of ``like``'s shape and dtype (for a C-contiguous ``like``, what
    ``cupy.empty_like`` makes, without its look at ``like``'s strides: several microseconds a call)."""
    import cupy

    return cupy.empty(like.shape, like.dtype)


def launch_rows(source, like, arguments):
    """Run a row kernel on ``like``'s rows (its last axis), ``arguments`` then the row count; no launch
    where there are none."""
    rows = like.size // like.shape[-1] if like.size else 0
    launch_warps(source, like, rows, (*arguments, numpy.int64(rows)))


def launch_warps(source, like, rows, arguments):
    """Run a kernel that gives each of ``rows`` rows a warp (arrays of ``like``'s dtype); none for none."""
    if rows:
        compiled_raw(source, dtype_name(like))((-(-rows // ROWS_PER_BLOCK),), (WARP, ROWS_PER_BLOCK), arguments)


def launch_elements(source, like, count, arguments):
    """Run an element kernel over ``count`` elements (arrays of ``like``'s dtype); none for none."""
    if count:
        blocks = min(-(-count // ELEMENT_BLOCK), 65535)  # the rest stride
        compiled_raw(source, dtype_name(like))((blocks,), (ELEMENT_BLOCK,), arguments)


def add_product(out, a, b):
    """``out += a @ b`` on CuPy 2-D arrays of one dtype (``out`` C-contiguous) as one cuBLAS GEMM with
    beta = 1: ``cupy.cublas.gemm`` passes each operand's layout to cuBLAS, copying none where both are
    contiguous (either order)."""
    from cupy import cublas

    if a.size and b.size:  # cuBLAS refuses an empty operand's leading dimension; nothing to add anyway
        cublas.gemm("N", "N", a, b, out=out, beta=1.0)


def add_column_sums(out, rows):
    """``out += ones @ rows`` on CuPy arrays of one dtype (``rows`` (N, C), ``out`` (C,) contiguous) as
    one cuBLAS GEMV with beta = 1."""
    from cupy import cublas

    if rows.size:
        cublas.gemv("T", 1.0, rows, ones_for(rows), 1.0, out)


def adam_update(grad, beta1, beta2, step_size, unbias, eps, shrink, param, m, v):
    """Adam's Eqs. (2)-(3) in place on CuPy arrays, after AdamW's decay (``shrink``): ``param``, ``m`` and
    ``v`` are updated."""
    compiled(ADAM_UPDATE)(grad, *adam_settings(param.dtype, beta1, beta2, step_size, unbias, eps, shrink), param, m, v)


def adam_update_flat(grad, codes, beta1, beta2, step_size, unbias, eps, shrink, param, m, v):
    """``adam_update`` over flat buffers (``mnn.flat``) in one launch: entries whose ``codes`` are 0 are
    left alone, those coded 1 are not decayed (see ``ADAM_UPDATE_FLAT``)."""
    settings = adam_settings(param.dtype, beta1, beta2, step_size, unbias, eps, shrink)
    compiled(ADAM_UPDATE_FLAT)(grad, codes, *settings, param, m, v)


def adam_settings(dtype, beta1, beta2, step_size, unbias, eps, shrink):
    """``ADAM_SETTINGS``' values, each rounded once to the parameters' dtype."""
    return [dtype.type(value) for value in (beta1, 1 - beta1, beta2, 1 - beta2, step_size, unbias, eps, shrink)]


def running_statistics(mean, var, momentum, var_scale, running_mean, running_var):
    """Batch norm's Eq. (4) on CuPy arrays, in place, in one launch (the reference lines take six)."""
    dtype = running_mean.dtype.type
    compiled(RUNNING_STATISTICS)(mean, var, dtype(1 - momentum), dtype(momentum), dtype(var_scale), running_mean,
                                 running_var)


def dropout(x, key, threshold, scale):
    """Dropout's forward on a CuPy array: (y, scaled_mask), the mask holding ``scale`` or 0 per element."""
    import cupy

    shape, x = x.shape, cupy.ascontiguousarray(x)  # element i of the kernel is element i of x in C order (Eq. (4))
    y, scaled_mask = empty(x), empty(x)
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
    y = empty(s)
    launch_rows(SOFTMAX_ROWS, s, (s, y, numpy.int32(s.shape[-1]), s.dtype.type(scale), numpy.int32(bool(causal))))
    return y


def scaled_softmax_backward(y, g, scale):
    """scale y (g - sum(g y)) along the last axis of CuPy arrays, in one launch."""
    import cupy

    y, g = cupy.ascontiguousarray(y), cupy.ascontiguousarray(g)
    d = empty(y)
    launch_rows(SOFTMAX_ROWS_BACKWARD, y, (y, g, d, numpy.int32(y.shape[-1]), y.dtype.type(scale)))
    return d


def layer_norm(x, weight, bias, eps):
    """Layer norm's Eq. (1) along the last axis of a CuPy array: (y, x_hat, 1/sigma), in one launch."""
    import cupy

    x, weight, bias = (cupy.ascontiguousarray(a) for a in (x, weight, bias))  # a raw kernel reads memory in order
    y, x_hat, inv_std = empty(x), empty(x), cupy.empty(x.shape[:-1] + (1,), dtype=x.dtype)
    launch_rows(LAYER_NORM_ROWS, x, (x, weight, bias, y, x_hat, inv_std, numpy.int32(x.shape[-1]), x.dtype.type(eps)))
    return y, x_hat, inv_std


def layer_norm_backward(g, x_hat, weight, inv_std):
    """Layer norm's Eq. (3) on CuPy arrays, and g x_hat, in one launch: (dL/dx, g x_hat) (the weight's and the
    bias's sums over rows are the caller's)."""
    import cupy

    g = cupy.ascontiguousarray(g)
    grad, products = empty(g), empty(g)
    launch_rows(LAYER_NORM_ROWS_BACKWARD, g, (g, x_hat, weight, inv_std, grad, products, numpy.int32(g.shape[-1])))
    return grad, products


def device_labels(labels):
    """Class labels as the row kernels read them: a contiguous int64 CuPy array."""
    import cupy

    return cupy.ascontiguousarray(cupy.asarray(labels), dtype=cupy.int64)


def cross_entropy(rows, labels):
    """Cross-entropy's softmax p and per-row losses for CuPy scores (N, C) and ``device_labels`` (N,), and how
    many labels lie outside [0, C) (a uint64 on the device)."""
    import cupy

    rows = cupy.ascontiguousarray(rows)
    p, losses, outside = empty(rows), cupy.empty(rows.shape[0], dtype=rows.dtype), cupy.zeros(1, dtype=cupy.uint64)
    launch_rows(CROSS_ENTROPY_ROWS, rows, (rows, labels, p, losses, outside, numpy.int32(rows.shape[1])))
    return p, losses, outside[0]


def embedding(table, indices):
    """Rows of a CuPy table (V, n) for int64 ``device_labels`` indices (any shape): (rows, how many indices
    lie outside [0, V), a uint64 on the device)."""
    import cupy

    table = cupy.ascontiguousarray(table)
    rows, outside = cupy.empty((*indices.shape, table.shape[1]), dtype=table.dtype), cupy.zeros(1, dtype=cupy.uint64)
    launch_rows(EMBEDDING_ROWS, rows, (table, indices, rows, outside, numpy.int32(table.shape[1]),
                                       numpy.int64(table.shape[0])))
    return rows, outside[0]


def cross_entropy_backward(p, labels):
    """Cross-entropy's Eq. (2), (p - onehot(t)) / N, for CuPy arrays (N, C) and ``device_labels`` (N,)."""
    grad = empty(p)
    launch_rows(CROSS_ENTROPY_ROWS_BACKWARD, p, (p, labels, grad, numpy.int32(p.shape[1]),
                                                 p.dtype.type(1 / max(len(p), 1))))
    return grad


def lstm_step(gates, h_prev, w_hh, bias, c_prev, c, tanh_c, h):
    """The LSTM's forward step, Eq. (T1)'s product with the state included, on contiguous CuPy arrays
    (``h_prev`` (B, H), ``w_hh`` (4H, H)): overwrites ``gates`` with [i, f, g, o], writes c, tanh(c), h."""
    batch, size = c.shape
    launch_lstm(LSTM_STEP, gates, batch, size, (gates, h_prev, w_hh, bias, c_prev, c, tanh_c, h))


def lstm_step_backward(g, delta_next, w_hh_t, carry_h, carry_c, gates, tanh_c, c_prev, delta, carry_c_out):
    """The LSTM's Eqs. (4)-(7) for one step on contiguous CuPy arrays: fills ``delta`` and ``carry_c_out``, the
    cell-state path's carry into step t - 1. Eq. (4)'s second term is ``delta_next @ W_hh`` for ``delta_next``
    (B, 4H), read from ``w_hh_t`` (W_hh^T, (H, 4H), contiguous: a warp reads one of its rows), or where
    ``delta_next`` is None (the last step) the final state's gradient ``carry_h``."""
    batch, size = carry_c.shape
    from_next = delta_next is not None
    launch_lstm(LSTM_STEP_BACKWARD, gates, batch, size,
                (g, delta_next if from_next else delta, w_hh_t, carry_h, carry_c, gates, tanh_c, c_prev, delta,
                 carry_c_out), numpy.int32(from_next))


def launch_lstm(source, like, batch, size, arrays, *flags):
    """Run an LSTM step kernel: a warp for each unit and LSTM_SAMPLES samples."""
    launch_warps(source, like, -(-batch // LSTM_SAMPLES) * size, (*arrays, numpy.int32(batch), numpy.int32(size),
                                                                   *flags))


def relu_backward(g, y):
    """ReLU's Eq. (2) on CuPy arrays, in one launch, the gradient laid out in memory as ``g``."""
    import cupy

    return compiled(RELU_BACKWARD)(g, y, cupy.empty_like(g))  # a kernel's own output would be C-ordered


def image_geometry(images, out_size, *window):
    """The kernels' shape arguments for channels-last images (B, H, W, C), windows out_size (Ho, Wo),
    then the window's own numbers (kernel size, stride, padding), as the kernels' ints."""
    return tuple(numpy.int32(n) for n in (*images.shape, *out_size, *window))


def im2col(images, kh, kw, stride, padding, out_size):
    """Convolution's X_col (B Ho Wo, kh kw C) for channels-last CuPy images (B, H, W, C), the zero padding
    included, in one launch."""
    import cupy

    images = cupy.ascontiguousarray(images)
    cols = cupy.empty((images.shape[0] * out_size[0] * out_size[1], kh * kw * images.shape[3]), dtype=images.dtype)
    launch_elements(IM2COL, images, cols.size, (images, cols, *image_geometry(images, out_size, kh, kw, stride,
                                                                               padding)))
    return cols


def col2im(d_cols, kh, kw, stride, padding, images_shape, out_size):
    """Convolution's Eq. (3) from the gradient of X_col: the channels-last images' gradient (B, H, W, C)."""
    import cupy

    d_cols, grad = cupy.ascontiguousarray(d_cols), cupy.empty(images_shape, dtype=d_cols.dtype)
    launch_elements(COL2IM, d_cols, grad.size, (d_cols, grad, *image_geometry(grad, out_size, kh, kw, stride,
                                                                              padding)))
    return grad


def max_pool(images, kernel, stride, out_size):
    """Max-pooling's Eq. (1) for channels-last CuPy images (B, H, W, C): the maxima (B, Ho, Wo, C) and
    each window's arg-max offset p k + q (int32), in one launch."""
    import cupy

    images = cupy.ascontiguousarray(images)
    shape = (images.shape[0], *out_size, images.shape[3])
    y, argmax = cupy.empty(shape, dtype=images.dtype), cupy.empty(shape, dtype=cupy.int32)
    launch_elements(MAX_POOL, images, y.size, (images, y, argmax, *image_geometry(images, out_size, kernel, stride)))
    return y, argmax


def max_pool_backward(g, argmax, kernel, stride, images_shape):
    """Max-pooling's Eq. (2): the channels-last gradient (B, H, W, C) from g and argmax (B, Ho, Wo, C)."""
    import cupy

    g, grad = cupy.ascontiguousarray(g), cupy.empty(images_shape, dtype=g.dtype)
    launch_elements(MAX_POOL_BACKWARD, g, grad.size, (g, argmax, grad, *image_geometry(grad, g.shape[1:3], kernel,
                                                                                       stride)))
    return grad


def chunk_sums(source, arrays, count, channels):
    """Run a batch norm sums kernel over (count, channels) rows; its partial sums added over the chunks: (2, C)."""
    import cupy

    chunks = -(-count // CHUNK_ROWS)
    sums = cupy.empty((chunks, 2, channels), dtype=cupy.float64)
    launch_elements(source, arrays[0], chunks * channels, (*arrays, sums, numpy.int64(count), numpy.int32(channels),
                                                           numpy.int32(CHUNK_ROWS)))
    return column_sums(sums.reshape(chunks, 2 * channels)).reshape(2, channels)  # one GEMV


def batch_norm(rows, weight, bias, eps):
    """Batch norm's Eq. (1) over the rows of a CuPy (N, C) array: (y, x_hat, 1/sigma, mean, biased variance),
    as ``mnn.kernels.cpu.batch_norm``, in four launches."""
    import cupy

    rows, weight, bias = (cupy.ascontiguousarray(a) for a in (rows, weight, bias))  # read in memory order
    (count, channels), dtype = rows.shape, rows.dtype
    if count == 0:  # the statistics kernel reads a first row
        raise ValueError("batch norm's kernels take at least one row")
    sums = chunk_sums(BATCH_NORM_SUMS, (rows,), count, channels)
    mean, var, inv_std = (cupy.empty(channels, dtype=dtype) for _ in range(3))
    launch_elements(BATCH_NORM_STATISTICS, rows, channels, (rows, sums, mean, var, inv_std, numpy.int64(count),
                                                            numpy.int32(channels), numpy.float64(eps)))
    x_hat, y = empty(rows), empty(rows)
    launch_elements(BATCH_NORM_APPLY, rows, rows.size, (rows, mean, inv_std, weight, bias, x_hat, y,
                                                        numpy.int64(count), numpy.int32(channels)))
    return y, x_hat, inv_std, mean, var


def batch_norm_backward(g, x_hat, weight, inv_std, d_weight, d_bias):
    """Batch norm's Eqs. (2)-(3) for CuPy (N, C) rows: dL/dx, with dL/dgamma and dL/dbeta added into ``d_weight``
    and ``d_bias``, as ``mnn.kernels.cpu.batch_norm_backward``, in three launches and a GEMV."""
    import cupy

    g, x_hat, weight, inv_std = (cupy.ascontiguousarray(a) for a in (g, x_hat, weight, inv_std))
    count, channels = g.shape
    sums = chunk_sums(BATCH_NORM_BACKWARD_SUMS, (g, x_hat), count, channels)
    means, grad = cupy.empty((2, channels), dtype=g.dtype), empty(g)
    added = [into if into.flags.c_contiguous else cupy.zeros(into.shape, into.dtype) for into in (d_weight, d_bias)]
    launch_elements(BATCH_NORM_BACKWARD_MEANS, g, channels, (sums, means, *added, numpy.int64(count),
                                                             numpy.int32(channels)))
    for gradient, into in zip((d_weight, d_bias), added):
        if into is not gradient:  # a gradient with gaps (a view a user put there): added to through a buffer
            gradient += into
    launch_elements(BATCH_NORM_BACKWARD_APPLY, g, g.size, (g, x_hat, means, weight, inv_std, grad, numpy.int64(count),
                                                           numpy.int32(channels)))
    return grad
