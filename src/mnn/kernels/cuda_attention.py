r"""Fused (flash) attention for CuPy: ``MultiHeadAttention``'s Eqs. (2) and (5)-(7) without the
(B, h, T, T) scores in global memory. The derivation, and the recomputation the backward does,
are in ``mnn.layers.attention.MultiHeadAttention``'s docstring (Eqs. (8)-(12)).

Three kernels, each a block of ``FLASH_ROWS`` warps over one head of one sample:

* ``flash_forward``: a warp per query row t. The block loads ``FLASH_TILE`` keys and values at a
  time into shared memory; lane j scores key j of the tile, and the row's running maximum m,
  its running sum l and its output row o (each lane holding every 32nd entry) are rescaled to
  the tile's new maximum (Eq. (9)). Writes O, already in the (B, T, C) layout of the output
  projection, and the row's log-sum-exp L = m + log l (Eq. (10)).
* ``flash_backward_queries``: a warp per query row t: D_t = dO_t . O_t (Eq. (11)), kept for the
  next kernel, and dQ_t over the tiles of keys, with A recomputed from L.
* ``flash_backward_keys``: a warp per key s: dK_s and dV_s over the tiles of queries (Eq. (12)).

Each reads Q, K and V straight from the QKV projection's (B, T, 3C) output, and the two backward
kernels write one (B, T, 3C) gradient for it, queries' part and keys' and values' parts apart:
no head is split off, merged back or concatenated. Every sum is made in a fixed order, by one
thread or by one warp's butterfly, so a run gives the same bits each time (no atomic adds).

Attention dropout draws ``DropoutLayer``'s mask of element i = ((b h + head) T + t) T + s of the
(B, h, T, T) weights, SplitMix64's output for counter i + 1: the masks of the reference lines.

A template parameter ``D`` sizes the tiles for heads of width d <= D, one entry per
(D, floating type) that fits 48 KB of static shared memory: D = 32, 64, 128 in float32,
32, 64 in float64. ``flash_supported`` says where these apply; elsewhere the layer takes its
reference lines.
"""
import re

import numpy

from . import cuda
from ..layers.dropout import GOLDEN_GAMMA

FLASH_ROWS = 8  # warps (query or key rows) per block
FLASH_TILE = 32  # keys (or queries) per tile in shared memory: one per lane
HEAD_TILES = {"float": (32, 64, 128), "double": (32, 64)}

COMMON = cuda.ROWS + cuda.SPLITMIX64 + f"""
#define FLASH_ROWS {FLASH_ROWS}
#define FLASH_TILE {FLASH_TILE}
#define FULL_MASK 0xffffffffu
/* DropoutLayer's Eqs. (3)-(4): weight (t, s) of head bh, element i = (bh T + t) T + s of the (B, h, T, T)
   weights, is kept, times 1/(1 - p), or dropped. */
template <typename T> __device__ T kept(unsigned long long key, int bh, int length, int t, int s,
                                        unsigned long long threshold, T keep_scale) {{
    unsigned long long i = ((unsigned long long)bh * length + t) * length + s;
    unsigned long long z = mnn_splitmix64(key + (i + 1ull) * {GOLDEN_GAMMA:#x}ull);
    return (z >> 32) < threshold ? keep_scale : (T)0;
}}
""" + r"""
/* count rows of one head's part of qkv (rows row_stride apart), from row first, into tile (rows stride
   apart); zeros for rows past the sequence. Every thread of the block takes part. */
template <typename T> __device__ void load_rows(T* tile, int stride, const T* part, long long row_stride,
                                                int first, int count, int length, int d) {
    int threads = blockDim.x * blockDim.y;
    for (int k = threadIdx.y * blockDim.x + threadIdx.x; k < count * d; k += threads) {
        int j = k / d, c = k - j * d;
        tile[j * stride + c] = first + j < length ? part[(long long)(first + j) * row_stride + c] : (T)0;
    }
}
template <typename T> __device__ T dot(const T* a, const T* b, int d) {
    T sum = 0;
    for (int c = 0; c < d; c++) sum += a[c] * b[c];
    return sum;
}
/* acc += sum over j < count of lane j's weight times row j of tile (rows D + 1 apart); each lane holds the
   entries c = lane + 32 i of acc. Every lane of the warp takes part. */
template <typename T, int D> __device__ void add_weighted_rows(T* acc, T weight, const T* tile, int count, int d) {
    for (int j = 0; j < count; j++) {
        T weight_j = __shfl_sync(FULL_MASK, weight, j);
        for (int i = 0; i < D / 32; i++)
            if (threadIdx.x + 32 * i < d) acc[i] += weight_j * tile[j * (D + 1) + threadIdx.x + 32 * i];
    }
}
/* row[c] = factor acc (the lane's entries c = lane + 32 i), for c < d. */
template <typename T, int D> __device__ void store_row(T* row, const T* acc, T factor, int d) {
    for (int i = 0; i < D / 32; i++)
        if (threadIdx.x + 32 * i < d) row[threadIdx.x + 32 * i] = acc[i] * factor;
}
/* Where sample b, head h of qkv (B, T, 3C) starts: its queries' row 0; keys C further, values 2C. */
template <typename T> __device__ const T* head_start(const T* qkv, int b, int h, int length, int width, int d) {
    return qkv + (long long)b * length * 3 * width + (long long)h * d;
}

/* Eqs. (8)-(10): the output row of query t and its log-sum-exp, over tiles of keys. */
template <typename T, int D> __device__ void flash_forward(
        const T* qkv, T* out, T* logsumexp, int heads, int length, int d, T scale, int causal,
        int dropout, unsigned long long key, unsigned long long threshold, T keep_scale) {
    __shared__ T keys[FLASH_TILE * (D + 1)], values[FLASH_TILE * (D + 1)], queries[FLASH_ROWS * D];
    int bh = blockIdx.y, b = bh / heads, h = bh - b * heads, lane = threadIdx.x, w = threadIdx.y;
    int width = heads * d, first = blockIdx.x * FLASH_ROWS, t = first + w;
    long long row_stride = 3LL * width;
    const T* q = head_start(qkv, b, h, length, width, d);
    load_rows(queries, D, q, row_stride, first, FLASH_ROWS, length, d);
    int block_keys = causal ? min(length, first + FLASH_ROWS) : length, visible = causal ? t + 1 : length;
    T top = 0, total = 0, o[D / 32];
    for (int i = 0; i < D / 32; i++) o[i] = 0;
    for (int s0 = 0; s0 < block_keys; s0 += FLASH_TILE) {
        __syncthreads();  /* every warp is done with the last tile */
        load_rows(keys, D + 1, q + width, row_stride, s0, FLASH_TILE, length, d);
        load_rows(values, D + 1, q + 2 * width, row_stride, s0, FLASH_TILE, length, d);
        __syncthreads();
        int count = min(FLASH_TILE, visible - s0);  /* keys of this tile that row t sees: lanes 0 .. count - 1 */
        if (t >= length || count <= 0) continue;
        T score = dot(queries + w * D, keys + lane * (D + 1), d) * scale;
        T first_score = __shfl_sync(FULL_MASK, score, 0);  /* every lane shuffles, as every shuffle needs */
        T tile_top = lanes_max(lane < count ? score : first_score);
        T new_top = s0 == 0 ? tile_top : max(top, tile_top);
        bool none_yet = isinf(new_top) && new_top < 0;  /* every score so far -inf (overflowed): none weighs */
        bool none_before = s0 == 0 || (isinf(top) && top < 0);  /* -inf - -inf would be NaN */
        T alpha = none_before ? (T)0 : exp(top - new_top);  /* Eq. (9)'s rescaling of what came before */
        T p = lane < count && !none_yet ? exp(score - new_top) : (T)0;
        total = total * alpha + p;
        top = new_top;
        if (dropout && lane < count) p *= kept(key, bh, length, t, s0 + lane, threshold, keep_scale);
        for (int i = 0; i < D / 32; i++) o[i] *= alpha;
        add_weighted_rows<T, D>(o, p, values, count, d);
    }
    if (t >= length) return;
    total = lanes_sum(total);
    for (int i = 0; i < D / 32; i++) o[i] /= total;
    store_row<T, D>(out + ((long long)b * length + t) * width + (long long)h * d, o, (T)1, d);
    if (lane == 0) logsumexp[(long long)bh * length + t] = top + log(total);  /* Eq. (10) */
}

/* Eq. (11) and dQ_t of Eq. (12), over tiles of keys; writes D_t to delta for the keys' kernel. */
template <typename T, int D> __device__ void flash_backward_queries(
        const T* qkv, const T* out, const T* grad_out, const T* logsumexp, T* delta, T* grad_qkv, int heads,
        int length, int d, T scale, int causal, int dropout, unsigned long long key, unsigned long long threshold,
        T keep_scale) {
    __shared__ T keys[FLASH_TILE * (D + 1)], values[FLASH_TILE * (D + 1)], queries[FLASH_ROWS * D],
        grads[FLASH_ROWS * D];
    int bh = blockIdx.y, b = bh / heads, h = bh - b * heads, lane = threadIdx.x, w = threadIdx.y;
    int width = heads * d, first = blockIdx.x * FLASH_ROWS, t = first + w;
    long long row_stride = 3LL * width;
    const T* q = head_start(qkv, b, h, length, width, d);
    long long head_out = (long long)b * length * width + (long long)h * d;  /* row 0 of the head in O and dO */
    load_rows(queries, D, q, row_stride, first, FLASH_ROWS, length, d);
    load_rows(grads, D, grad_out + head_out, width, first, FLASH_ROWS, length, d);
    __syncthreads();
    T row_delta = 0, row_logsumexp = 0;
    if (t < length) {
        T part = 0;
        for (int c = lane; c < d; c += LANES) part += grads[w * D + c] * out[head_out + (long long)t * width + c];
        row_delta = lanes_sum(part);  /* Eq. (11) */
        if (lane == 0) delta[(long long)bh * length + t] = row_delta;
        row_logsumexp = logsumexp[(long long)bh * length + t];
    }
    int block_keys = causal ? min(length, first + FLASH_ROWS) : length, visible = causal ? t + 1 : length;
    T dq[D / 32];
    for (int i = 0; i < D / 32; i++) dq[i] = 0;
    for (int s0 = 0; s0 < block_keys; s0 += FLASH_TILE) {
        __syncthreads();
        load_rows(keys, D + 1, q + width, row_stride, s0, FLASH_TILE, length, d);
        load_rows(values, D + 1, q + 2 * width, row_stride, s0, FLASH_TILE, length, d);
        __syncthreads();
        int count = min(FLASH_TILE, visible - s0);
        if (t >= length || count <= 0) continue;
        T ds = 0;
        if (lane < count) {
            T a = exp(dot(queries + w * D, keys + lane * (D + 1), d) * scale - row_logsumexp);  /* A, again */
            T da = dot(grads + w * D, values + lane * (D + 1), d);  /* dA~ = dO V^T */
            if (dropout) da *= kept(key, bh, length, t, s0 + lane, threshold, keep_scale);
            ds = a * (da - row_delta);  /* Eq. (12) */
        }
        add_weighted_rows<T, D>(dq, ds, keys, count, d);
    }
    if (t >= length) return;
    store_row<T, D>(grad_qkv + ((long long)b * length + t) * row_stride + (long long)h * d, dq, scale, d);
}

/* dK_s and dV_s of Eq. (12), over tiles of queries, with L and D from the kernels before. */
template <typename T, int D> __device__ void flash_backward_keys(
        const T* qkv, const T* grad_out, const T* logsumexp, const T* delta, T* grad_qkv, int heads, int length,
        int d, T scale, int causal, int dropout, unsigned long long key, unsigned long long threshold,
        T keep_scale) {
    __shared__ T queries[FLASH_TILE * (D + 1)], grads[FLASH_TILE * (D + 1)], keys[FLASH_ROWS * D],
        values[FLASH_ROWS * D], logsumexps[FLASH_TILE], deltas[FLASH_TILE];
    int bh = blockIdx.y, b = bh / heads, h = bh - b * heads, lane = threadIdx.x, w = threadIdx.y;
    int width = heads * d, first = blockIdx.x * FLASH_ROWS, s = first + w;
    long long row_stride = 3LL * width;
    const T* q = head_start(qkv, b, h, length, width, d);
    const T* grad_head = grad_out + (long long)b * length * width + (long long)h * d;
    load_rows(keys, D, q + width, row_stride, first, FLASH_ROWS, length, d);
    load_rows(values, D, q + 2 * width, row_stride, first, FLASH_ROWS, length, d);
    T dk[D / 32], dv[D / 32];
    for (int i = 0; i < D / 32; i++) dk[i] = dv[i] = 0;
    for (int t0 = causal ? first : 0; t0 < length; t0 += FLASH_TILE) {
        __syncthreads();
        load_rows(queries, D + 1, q, row_stride, t0, FLASH_TILE, length, d);
        load_rows(grads, D + 1, grad_head, width, t0, FLASH_TILE, length, d);
        for (int j = threadIdx.y * blockDim.x + threadIdx.x; j < FLASH_TILE; j += blockDim.x * blockDim.y) {
            bool inside = t0 + j < length;
            logsumexps[j] = inside ? logsumexp[(long long)bh * length + t0 + j] : (T)0;
            deltas[j] = inside ? delta[(long long)bh * length + t0 + j] : (T)0;
        }
        __syncthreads();
        if (s >= length) continue;
        int t = t0 + lane;
        T weight = 0, ds = 0;  /* A~_ts and dS_ts */
        if (t < length && (!causal || s <= t)) {
            T a = exp(dot(queries + lane * (D + 1), keys + w * D, d) * scale - logsumexps[lane]);
            T da = dot(grads + lane * (D + 1), values + w * D, d);
            T z = dropout ? kept(key, bh, length, t, s, threshold, keep_scale) : (T)1;
            weight = a * z;
            ds = a * (da * z - deltas[lane]);  /* Eq. (12) */
        }
        int count = min(FLASH_TILE, length - t0);
        add_weighted_rows<T, D>(dv, weight, grads, count, d);
        add_weighted_rows<T, D>(dk, ds, queries, count, d);
    }
    if (s >= length) return;
    T* row = grad_qkv + ((long long)b * length + s) * row_stride + (long long)h * d;
    store_row<T, D>(row + width, dk, scale, d);
    store_row<T, D>(row + 2 * width, dv, (T)1, d);
}
"""
SHAPE = "int heads, int length, int d, T scale, int causal"
DROPOUT = "int dropout, unsigned long long key, unsigned long long threshold, T keep_scale"
PARAMS = {
    "flash_forward": f"const T* qkv, T* out, T* logsumexp, {SHAPE}, {DROPOUT}",
    "flash_backward_queries": "const T* qkv, const T* out, const T* grad_out, const T* logsumexp, T* delta, "
                              f"T* grad_qkv, {SHAPE}, {DROPOUT}",
    "flash_backward_keys": f"const T* qkv, const T* grad_out, const T* logsumexp, const T* delta, T* grad_qkv, "
                           f"{SHAPE}, {DROPOUT}",
}


def tiled_entries(template, params):
    """C for ``mnn_{template}_{D}_{float|double}``, calling ``template<T, D>``, for every D of HEAD_TILES."""
    arguments = ", ".join(param.split()[-1].lstrip("*") for param in params.split(","))
    code = ""
    for c_type, tiles in HEAD_TILES.items():
        typed = re.sub(r"\bT\b", c_type, params)
        for tile in tiles:
            code += (f'extern "C" __global__ void mnn_{template}_{tile}_{c_type}({typed}) '
                     f"{{ {template}<{c_type}, {tile}>({arguments}); }}\n")
    return code


CODE = COMMON + "".join(tiled_entries(template, params) for template, params in PARAMS.items())
SOURCES = {(template, tile): cuda.Raw(f"mnn_{template}_{tile}", CODE)
           for template in PARAMS for tile in HEAD_TILES["float"]}


def head_tile(head_width, dtype_name):
    """The smallest tile width D of HEAD_TILES that holds a head of ``head_width``, or None."""
    tiles = HEAD_TILES.get(cuda.C_FLOATING.get(dtype_name), ())
    return next((tile for tile in tiles if head_width <= tile), None)


def flash_supported(qkv, heads):
    """True where the kernels take this QKV output (B, T, 3C): a head width they have a tile for, and
    no more than 65,535 (sample, head) pairs, a grid's second axis."""
    batch, _, triple = qkv.shape
    return head_tile(triple // 3 // heads, cuda.dtype_name(qkv)) is not None and 0 < batch * heads <= 65535


def launch(template, qkv, heads, arguments):
    batch, length, triple = qkv.shape
    tile = head_tile(triple // 3 // heads, cuda.dtype_name(qkv))
    grid = (-(-length // FLASH_ROWS), batch * heads)
    cuda.compiled_raw(SOURCES[template, tile], cuda.dtype_name(qkv))(grid, (cuda.WARP, FLASH_ROWS), arguments)


def settings(qkv, heads, scale, causal, dropout):
    """The kernels' trailing scalars; ``dropout`` is None or (key, threshold, keep_scale)."""
    real = qkv.dtype.type
    key, threshold, keep_scale = dropout or (0, 0, 1)
    return (numpy.int32(heads), numpy.int32(qkv.shape[1]), numpy.int32(qkv.shape[2] // 3 // heads), real(scale),
            numpy.int32(bool(causal)), numpy.int32(dropout is not None), numpy.uint64(key), numpy.uint64(threshold),
            real(keep_scale))


def check_contiguous(name, array, dtype):
    """The kernels take raw pointers: an array of another dtype or layout would be misread."""
    if array.dtype != dtype or not array.flags.c_contiguous:
        raise ValueError(f"flash attention: {name} must be a C-contiguous {dtype} array, got {array.dtype} "
                         f"with strides {array.strides}")


def flash_attention(qkv, heads, scale, causal, dropout=None):
    """Eqs. (8)-(10) on a C-contiguous CuPy (B, T, 3C) QKV output: (O as (B, T, C), L as (B, h, T))."""
    import cupy

    check_contiguous("qkv", qkv, qkv.dtype)
    batch, length, triple = qkv.shape
    out = cupy.empty((batch, length, triple // 3), qkv.dtype)
    logsumexp = cupy.empty((batch, heads, length), qkv.dtype)
    launch("flash_forward", qkv, heads, (qkv, out, logsumexp, *settings(qkv, heads, scale, causal, dropout)))
    return out, logsumexp


def flash_attention_backward(qkv, out, grad_out, logsumexp, heads, scale, causal, dropout=None):
    """Eqs. (11)-(12): the gradient of the (B, T, 3C) QKV output, from dO (B, T, C) and what the
    forward kept. Two launches: the queries' part (and D), then the keys' and the values'."""
    import cupy

    grad_out = cupy.ascontiguousarray(grad_out)
    for name, array in (("qkv", qkv), ("out", out), ("grad_out", grad_out), ("logsumexp", logsumexp)):
        check_contiguous(name, array, qkv.dtype)
    delta, grad_qkv = cupy.empty(logsumexp.shape, qkv.dtype), cupy.empty(qkv.shape, qkv.dtype)
    tail = settings(qkv, heads, scale, causal, dropout)
    launch("flash_backward_queries", qkv, heads, (qkv, out, grad_out, logsumexp, delta, grad_qkv, *tail))
    launch("flash_backward_keys", qkv, heads, (qkv, grad_out, logsumexp, delta, grad_qkv, *tail))
    return grad_qkv
