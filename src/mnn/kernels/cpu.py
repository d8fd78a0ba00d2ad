"""CPU kernels, compiled by numba: one pass over memory per equation.

Each function computes one equation of a layer, named after it, in one pass over memory; the layer's docstring
derives it and its NumPy lines are the reference these must equal (``tests/test_kernels.py``).
Images are channels-last in memory (``layers.windows``): the kernels loop over
(batch, row, column) and keep the channels innermost, where memory is contiguous.
"""
import os
import stat
import tempfile
from pathlib import Path

import numba
import numpy
from numba import njit

from ..layers.dropout import GOLDEN_GAMMA, MIX_MULTIPLIERS
from ..layers.windows import channels_first, channels_last, output_size


def cache_where_writable():
    """numba keeps compiled kernels where ``NUMBA_CACHE_DIR`` says, else beside this file, else in
    ``~/.cache``: where it can write none of these (a read-only install run by a user without a home),
    a private folder in the system's temporary one serves, rather than no kernel at all."""
    try:
        njit(cache=True)(nothing)  # numba looks for its cache folder as it wraps a function
    except RuntimeError:  # "cannot cache function ...: no locator available for file ..."
        numba.config.CACHE_DIR = str(private_temporary_folder())


def private_temporary_folder():
    """``mnn-numba-cache-<uid>`` in the temporary folder if this user alone can write it, else a new folder:
    numba unpickles its cache's index, so a folder another user made first must not be taken."""
    if hasattr(os, "getuid"):
        folder = Path(tempfile.gettempdir()) / f"mnn-numba-cache-{os.getuid()}"
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            held = folder.lstat()
            if stat.S_ISDIR(held.st_mode) and held.st_uid == os.getuid() and not held.st_mode & 0o077:
                return folder
        except OSError:
            pass
    return Path(tempfile.mkdtemp(prefix="mnn-numba-cache-"))  # this process's alone: compiled again next time


def nothing():
    """What ``cache_where_writable`` wraps."""


cache_where_writable()

# One thread each. OpenBLAS's threads spin for a while after every matrix product, and on
# two cores numba's threads then fight them: parallel kernels (prange) made the CNN's step
# slower here (26.5-28.1 ms against 25.4-25.7 ms), and the product after im2col 2x slower
# with numba's OpenMP layer. One pass over memory is what these kernels win.
# error_model="numpy": a division by zero gives inf or nan, as in NumPy, rather than raising as in
# Python, whose check on every division kept the compiler from vectorising the loops (Adam's update
# took 1.7 ms here with it, 0.2 ms without).
COMPILE = dict(cache=True, fastmath=False, error_model="numpy")
# Kernels that sum along a row may add in any order: the compiler then keeps several partial sums in
# vector registers instead of one chain of additions, each waiting for the last (layer norm's forward
# 3.2x faster here, its backward 3.8x). The sums are float64, so the order shows in their last bits only.
COMPILE_ROW_SUMS = dict(COMPILE, fastmath={"reassoc"})


def max_pool(x, kernel, stride):
    """Max-pooling's Eq. (1) for a (B, C, H, W) batch: the maxima, and the offset p k + q of each window's
    first maximum (its arg-max, for Eq. (2)), both (B, C, Ho, Wo) views of channels-last arrays."""
    rows = channels_last(x)
    batch, height, width, channels = rows.shape
    shape = (batch, output_size(height, kernel, stride), output_size(width, kernel, stride), channels)
    y = numpy.empty(shape, dtype=x.dtype)
    argmax = numpy.empty(shape, dtype=numpy.uint8 if kernel <= 16 else numpy.int32)
    if kernel == stride == 2:
        max_pool_2x2(rows, y, argmax)
    else:
        max_pool_windows(rows, kernel, stride, y, argmax)
    return channels_first(y), channels_first(argmax)


@njit(**COMPILE)
def max_pool_2x2(x, y, argmax):
    """The common 2 x 2 windows, stride 2, written out: the compiler then vectorises over channels."""
    for b in range(y.shape[0]):
        for i in range(y.shape[1]):
            for j in range(y.shape[2]):
                for c in range(y.shape[3]):
                    best, at = x[b, 2 * i, 2 * j, c], 0
                    value = x[b, 2 * i, 2 * j + 1, c]
                    if (value > best) | (value != value):  # a NaN wins, as in numpy.maximum
                        best, at = value, 1
                    value = x[b, 2 * i + 1, 2 * j, c]
                    if (value > best) | (value != value):
                        best, at = value, 2
                    value = x[b, 2 * i + 1, 2 * j + 1, c]
                    if (value > best) | (value != value):
                        best, at = value, 3
                    y[b, i, j, c], argmax[b, i, j, c] = best, at


@njit(**COMPILE)
def max_pool_windows(x, kernel, stride, y, argmax):
    best = numpy.empty(y.shape[3], dtype=y.dtype)  # one window's, per channel
    at = numpy.empty(y.shape[3], dtype=argmax.dtype)
    for b in range(y.shape[0]):
        for i in range(y.shape[1]):
            for j in range(y.shape[2]):
                best[:] = x[b, i * stride, j * stride]
                at[:] = 0
                for offset in range(1, kernel * kernel):
                    row, column = i * stride + offset // kernel, j * stride + offset % kernel
                    for c in range(y.shape[3]):  # contiguous: vectorised, with selects for the ifs
                        value = x[b, row, column, c]
                        larger = (value > best[c]) | (value != value)
                        best[c] = value if larger else best[c]
                        at[c] = offset if larger else at[c]
                y[b, i, j] = best
                argmax[b, i, j] = at


def max_pool_backward(g, argmax, kernel, stride, input_shape):
    """Max-pooling's Eq. (2): each gradient added at its window's arg-max; (B, C, H, W), channels-last."""
    batch, channels, height, width = input_shape
    shape = (batch, height, width, channels)
    if kernel == stride == 2 and height % 2 == 0 and width % 2 == 0:  # every pixel in one window: written once
        grad = numpy.empty(shape, dtype=g.dtype)
        max_pool_2x2_backward(channels_last(g), channels_last(argmax), grad)
    else:
        grad = numpy.zeros(shape, dtype=g.dtype)
        max_pool_windows_backward(channels_last(g), channels_last(argmax), kernel, stride, grad)
    return channels_first(grad)


@njit(**COMPILE)
def max_pool_2x2_backward(g, argmax, grad):
    for b in range(g.shape[0]):
        for i in range(g.shape[1]):
            for j in range(g.shape[2]):
                for c in range(g.shape[3]):
                    value, at = g[b, i, j, c], argmax[b, i, j, c]
                    grad[b, 2 * i, 2 * j, c] = value if at == 0 else 0
                    grad[b, 2 * i, 2 * j + 1, c] = value if at == 1 else 0
                    grad[b, 2 * i + 1, 2 * j, c] = value if at == 2 else 0
                    grad[b, 2 * i + 1, 2 * j + 1, c] = value if at == 3 else 0


@njit(**COMPILE)
def max_pool_windows_backward(g, argmax, kernel, stride, grad):
    for b in range(g.shape[0]):  # grad starts at zero: overlapping windows add up
        for i in range(g.shape[1]):
            for j in range(g.shape[2]):
                for c in range(g.shape[3]):
                    offset = argmax[b, i, j, c]
                    grad[b, i * stride + offset // kernel, j * stride + offset % kernel, c] += g[b, i, j, c]


def im2col(images, kh, kw, stride, padding):
    """Convolution's im2col, zero padding included, for (b, H, W, C) channels-last images: the rows
    X_col[(b, i, j), (p, q, c)] = x~[b, c, s i + p, s j + q], shaped (b Ho Wo, kh kw C); with fewer
    than four channels a transposed (column-major) view (``im2col_by_columns``)."""
    batch, height, width, channels = images.shape
    out_h = output_size(height + 2 * padding, kh, stride)
    out_w = output_size(width + 2 * padding, kw, stride)
    if channels < 4:  # a pixel of one value or few: a window's copy is too short to pay for the loops
        return im2col_by_columns(images, kh, kw, stride, padding, (out_h, out_w))
    cols = numpy.empty((batch, out_h, out_w, kh, kw, channels), dtype=images.dtype)
    im2col_rows(images, stride, padding, cols)
    return cols.reshape(batch * out_h * out_w, kh * kw * channels)


def im2col_by_columns(images, kh, kw, stride, padding, out_size):
    """im2col a column at a time: column (p, q, c) is every image's plane c, padded, shifted by (p, q),
    copied a row of pixels at a time (0.2 ms for 128 grey 28 x 28 images, where NumPy's copy of the
    windows took 1.1 ms and a loop over them 1.7 ms). Returned as the (b Ho Wo, kh kw C) transpose of
    those columns, a view the GEMMs read as it is."""
    batch, channels = images.shape[0], images.shape[3]
    (out_h, out_w), s = out_size, stride
    padded = numpy.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0))) if padding else images
    columns = numpy.empty((kh, kw, channels, batch, out_h, out_w), dtype=images.dtype)
    for p in range(kh):
        for q in range(kw):
            columns[p, q] = padded[:, p:p + s * out_h:s, q:q + s * out_w:s].transpose(3, 0, 1, 2)
    return columns.reshape(kh * kw * channels, batch * out_h * out_w).T


@njit(**COMPILE)
def im2col_rows(x, stride, padding, cols):
    batch, height, width, channels = x.shape
    _, out_h, out_w, kh, kw, _ = cols.shape
    for b in range(batch):
        for i in range(out_h):
            for j in range(out_w):
                for p in range(kh):
                    row = i * stride + p - padding
                    for q in range(kw):
                        column = j * stride + q - padding
                        if 0 <= row < height and 0 <= column < width:  # tested once per pixel, not per entry
                            for c in range(channels):
                                cols[b, i, j, p, q, c] = x[b, row, column, c]
                        else:  # the zero padding
                            for c in range(channels):
                                cols[b, i, j, p, q, c] = 0


def col2im(d_cols, kh, kw, stride, padding, grad):
    """Convolution's Eq. (3) from the gradient of the im2col rows: every window entry added back onto
    the pixel it was copied from (the padding dropped), into ``grad``, (b, H, W, C) images set to 0 first."""
    batch, height, width, channels = grad.shape
    out_h = output_size(height + 2 * padding, kh, stride)
    out_w = output_size(width + 2 * padding, kw, stride)
    grad[...] = 0
    col2im_rows(d_cols.reshape(batch, out_h, out_w, kh, kw, channels), stride, padding, grad)


@njit(**COMPILE)
def col2im_rows(d_cols, stride, padding, grad):
    height, width = grad.shape[1], grad.shape[2]
    for b in range(d_cols.shape[0]):
        for i in range(d_cols.shape[1]):
            for j in range(d_cols.shape[2]):
                for p in range(d_cols.shape[3]):
                    for q in range(d_cols.shape[4]):
                        row, column = i * stride + p - padding, j * stride + q - padding
                        if 0 <= row < height and 0 <= column < width:
                            for c in range(d_cols.shape[5]):
                                grad[b, row, column, c] += d_cols[b, i, j, p, q, c]


def batch_norm(rows, weight, bias, eps):
    """Batch norm's Eq. (1) over the rows of a (N, C) array: (y, x_hat, 1/sigma, mean, biased variance),
    in three passes (the sums accumulated in float64)."""
    x_hat, y = numpy.empty_like(rows), numpy.empty_like(rows)
    mean, var = numpy.zeros(rows.shape[1]), numpy.zeros(rows.shape[1])
    batch_norm_rows(rows, weight, bias, eps, x_hat, y, mean, var)
    inv_std = (1 / numpy.sqrt(var + eps)).astype(rows.dtype)
    return y, x_hat, inv_std, mean.astype(rows.dtype), var.astype(rows.dtype)


@njit(**COMPILE)
def batch_norm_rows(rows, weight, bias, eps, x_hat, y, mean, var):
    count, channels = rows.shape
    for n in range(count):
        for c in range(channels):
            mean[c] += rows[n, c]
    mean /= count
    for n in range(count):
        for c in range(channels):
            deviation = rows[n, c] - mean[c]
            var[c] += deviation * deviation
    var /= count
    inv_std = (1 / numpy.sqrt(var + eps)).astype(rows.dtype)
    centre = mean.astype(rows.dtype)
    for n in range(count):
        for c in range(channels):
            x_hat[n, c] = (rows[n, c] - centre[c]) * inv_std[c]
            y[n, c] = x_hat[n, c] * weight[c] + bias[c]


def batch_norm_backward(g, x_hat, weight, inv_std, d_weight, d_bias):
    """Batch norm's Eqs. (2)-(3) for (N, C) rows: dL/dx, in two passes, with dL/dgamma and dL/dbeta added into
    ``d_weight`` and ``d_bias``."""
    sums_gx, sums_g = numpy.zeros(g.shape[1]), numpy.zeros(g.shape[1])
    grad = numpy.empty_like(g)
    batch_norm_backward_rows(g, x_hat, weight * inv_std, grad, sums_gx, sums_g)
    d_weight += sums_gx.astype(g.dtype)
    d_bias += sums_g.astype(g.dtype)
    return grad


@njit(**COMPILE)
def batch_norm_backward_rows(g, x_hat, scale, grad, d_weight, d_bias):
    count, channels = g.shape
    for n in range(count):
        for c in range(channels):
            d_weight[c] += g[n, c] * x_hat[n, c]
            d_bias[c] += g[n, c]
    mean_gx = (d_weight / count).astype(g.dtype)
    mean_g = (d_bias / count).astype(g.dtype)
    for n in range(count):
        for c in range(channels):
            grad[n, c] = scale[c] * (g[n, c] - mean_g[c] - x_hat[n, c] * mean_gx[c])


def adam_update(grad, beta1, beta2, step_size, unbias, eps, shrink, param, m, v):
    """Adam's Eqs. (2)-(3) in place, after AdamW's decay (param times ``shrink``; 1 for none), in one pass
    over contiguous arrays, in their dtype and in the reference's order of operations (so float32
    gives the same numbers)."""
    scalars = [param.dtype.type(value) for value in (beta1, 1 - beta1, beta2, 1 - beta2, step_size, unbias, eps,
                                                     shrink)]
    adam_update_flat(grad.reshape(-1), *scalars, param.reshape(-1), m.reshape(-1), v.reshape(-1))


@njit(**COMPILE)
def adam_update_flat(grad, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, unbias, eps, shrink, param, m,
                     v):
    for k in range(param.size):
        m[k] = m[k] * beta1 + grad[k] * one_minus_beta1
        v[k] = v[k] * beta2 + grad[k] * one_minus_beta2 * grad[k]  # (1 - beta2) g first: g g may overflow
        param[k] = param[k] * shrink - m[k] / (numpy.sqrt(v[k]) * unbias + eps) * step_size


def gelu_tanh(x, c, k):
    """GELU's t = tanh(c (x + k x^3)): the polynomial in one pass, then NumPy's tanh in place (vectorised
    already; numba's would call the C library once per entry)."""
    t = numpy.empty(x.shape, dtype=x.dtype)
    gelu_argument(flat(x), x.dtype.type(c), x.dtype.type(k), t.reshape(-1))
    return numpy.tanh(t, out=t)


def flat(x):
    """``x``'s entries in C order as a 1-D array (a view where ``x`` is C-contiguous): the element-wise
    loops run over these, whatever layout came in. Outputs are made in ``x.shape``, which may be ()."""
    return numpy.ascontiguousarray(x).reshape(-1)


def relu_backward(g, y):
    """ReLU's Eq. (2) in one pass: 0 where y <= 0, else g (NumPy's ``where`` took 17 times as long).
    Where ``g`` and ``y`` lie alike in memory (channels-last images), so does the gradient, and the
    pass runs in memory order: nothing is transposed."""
    grad = numpy.empty_like(g, subok=False)  # g's layout, a plain array (not a matrix or a memmap)
    views = [in_memory_order(array) for array in (g, y, grad)]
    if g.strides == y.strides == grad.strides and all(view is not None for view in views):
        relu_backward_flat(*views)
        return grad
    grad = numpy.empty(g.shape, dtype=g.dtype)
    relu_backward_flat(flat(g), flat(y), grad.reshape(-1))
    return grad


def in_memory_order(x):
    """``x``'s entries as a 1-D view in the order they lie in memory, where they fill it without gaps in
    some order of the axes (C order, channels-last images); else None."""
    axes = sorted(range(x.ndim), key=lambda axis: -x.strides[axis])
    view = x.transpose(axes)
    return view.reshape(-1) if view.flags.c_contiguous else None


@njit(**COMPILE)
def relu_backward_flat(g, y, grad):
    zero = grad.dtype.type(0)
    for n in range(g.size):
        grad[n] = zero if y[n] <= 0 else g[n]


def gelu(x, t):
    """GELU's Eq. (1), y = x (1 + t) / 2, in one pass."""
    y = numpy.empty(x.shape, dtype=x.dtype)
    gelu_product(flat(x), flat(t), y.reshape(-1))
    return y


@njit(**COMPILE)
def gelu_argument(x, c, k, out):
    for n in range(x.size):
        out[n] = c * (x[n] + k * x[n] * x[n] * x[n])


@njit(**COMPILE)
def gelu_product(x, t, y):
    for n in range(x.size):
        y[n] = 0.5 * x[n] * (1 + t[n])


def gelu_backward(g, x, t, c, k):
    """GELU's Eqs. (2)-(3): g f'(x) in one pass."""
    grad = numpy.empty(g.shape, dtype=g.dtype)
    gelu_backward_flat(flat(g), flat(x), flat(t), x.dtype.type(c), x.dtype.type(3 * k), grad.reshape(-1))
    return grad


@njit(**COMPILE)
def gelu_backward_flat(g, x, t, c, k3, grad):
    for n in range(g.size):
        slope = 0.5 * (1 + t[n]) + 0.5 * x[n] * (1 - t[n] * t[n]) * c * (1 + k3 * x[n] * x[n])
        grad[n] = g[n] * slope


def layer_norm(x, weight, bias, eps):
    """Layer norm's Eq. (1) along the last axis: (y, x_hat, 1/sigma), each row in one pass from cache."""
    rows = x.reshape(-1, x.shape[-1])
    y, x_hat = numpy.empty_like(rows), numpy.empty_like(rows)
    inv_std = numpy.empty((rows.shape[0], 1), dtype=x.dtype)
    layer_norm_rows(rows, weight, bias, x.dtype.type(eps), y, x_hat, inv_std)
    return y.reshape(x.shape), x_hat.reshape(x.shape), inv_std.reshape(x.shape[:-1] + (1,))


@njit(**COMPILE_ROW_SUMS)
def layer_norm_rows(rows, weight, bias, eps, y, x_hat, inv_std):
    count, size = rows.shape
    for n in range(count):
        total = 0.0
        for d in range(size):
            total += rows[n, d]
        mean = rows.dtype.type(total / size)
        squares = 0.0
        for d in range(size):
            deviation = rows[n, d] - mean
            squares += deviation * deviation
        scale = 1 / numpy.sqrt(rows.dtype.type(squares / size) + eps)
        inv_std[n, 0] = scale
        for d in range(size):
            x_hat[n, d] = (rows[n, d] - mean) * scale
            y[n, d] = x_hat[n, d] * weight[d] + bias[d]


def layer_norm_backward(g, x_hat, weight, inv_std):
    """Layer norm's Eqs. (2)-(3): (dL/dx, dL/dgamma, dL/dbeta), the parameter sums taken in float64."""
    rows, hats = g.reshape(-1, g.shape[-1]), x_hat.reshape(-1, g.shape[-1])
    grad = numpy.empty_like(rows)
    d_weight, d_bias = numpy.zeros(g.shape[-1]), numpy.zeros(g.shape[-1])
    layer_norm_backward_rows(rows, hats, weight, inv_std.reshape(-1), grad, d_weight, d_bias)
    return grad.reshape(g.shape), d_weight.astype(g.dtype), d_bias.astype(g.dtype)


@njit(**COMPILE_ROW_SUMS)
def layer_norm_backward_rows(g, x_hat, weight, inv_std, grad, d_weight, d_bias):
    count, size = g.shape
    for n in range(count):
        sum_g, sum_gx = 0.0, 0.0
        for d in range(size):
            d_weight[d] += g[n, d] * x_hat[n, d]
            d_bias[d] += g[n, d]
            g_hat = g[n, d] * weight[d]
            sum_g += g_hat
            sum_gx += g_hat * x_hat[n, d]
        mean_g, mean_gx = g.dtype.type(sum_g / size), g.dtype.type(sum_gx / size)
        for d in range(size):
            grad[n, d] = (g[n, d] * weight[d] - mean_g - x_hat[n, d] * mean_gx) * inv_std[n]


def softmax(x):
    """Softmax's Eq. (1) along the last axis in three passes: each row less its maximum, NumPy's vectorised
    exp in place, each row divided by its sum."""
    rows = numpy.ascontiguousarray(x).reshape(-1, x.shape[-1])
    y = numpy.empty_like(rows)
    subtract_row_max(rows, y)
    numpy.exp(y, out=y)
    divide_by_row_sum(y)
    return y.reshape(x.shape)


def cross_entropy(rows, labels):
    """Cross-entropy's Eq. (1) for (N, C) scores and N labels, as softmax's three passes: the softmax p
    that Eq. (2) needs, and each row's loss log(sum_c e^(x_c - m)) - (x_t - m), m the row's maximum."""
    rows = numpy.ascontiguousarray(rows)
    p = numpy.empty_like(rows)
    subtract_row_max(rows, p)
    picked = p[numpy.arange(rows.shape[0]), labels]  # x_t - m, before the exp
    numpy.exp(p, out=p)
    sums = divide_by_row_sum(p)
    return p, (numpy.log(sums) - picked).astype(rows.dtype)


@njit(**COMPILE)
def subtract_row_max(rows, y):
    for n in range(rows.shape[0]):
        row, out = rows[n], y[n]
        top = row_max(row)
        for k in range(row.size):
            out[k] = row[k] - top


@njit(**dict(COMPILE, fastmath={"nnan", "nsz", "reassoc"}))
def row_max(row):
    """The largest entry, in vector registers: the compiler may assume no NaN, so a NaN may be passed
    over here; it still reaches the row's sum, and the row comes out all NaN, as NumPy's does."""
    top = row[0]
    for k in range(1, row.size):
        top = max(top, row[k])
    return top


@njit(**COMPILE_ROW_SUMS)
def divide_by_row_sum(y):
    """Each row divided by its sum; returns the sums (float64)."""
    sums = numpy.empty(y.shape[0], dtype=numpy.float64)
    for n in range(y.shape[0]):
        row = y[n]
        total = 0.0
        for k in range(row.size):
            total += row[k]
        sums[n] = total
        row_total = y.dtype.type(total)
        for k in range(row.size):
            row[k] = row[k] / row_total
    return sums


def softmax_backward(y, g):
    """Softmax's Eq. (3) along the last axis: y (g - sum(g y)), each row in one pass from cache."""
    y_rows = numpy.ascontiguousarray(y).reshape(-1, y.shape[-1])
    g_rows = numpy.ascontiguousarray(g).reshape(y_rows.shape)
    grad = numpy.empty_like(g_rows)
    softmax_backward_rows(y_rows, g_rows, grad)
    return grad.reshape(g.shape)


@njit(**COMPILE_ROW_SUMS)
def softmax_backward_rows(y, g, grad):
    for n in range(y.shape[0]):
        y_row, g_row, out = y[n], g[n], grad[n]
        total = 0.0
        for k in range(y_row.size):
            total += g_row[k] * y_row[k]
        dot = y.dtype.type(total)
        for k in range(y_row.size):
            out[k] = y_row[k] * (g_row[k] - dot)


def embedding_backward(grad, indices, g):
    """The embedding's Eq. (2): each row of ``g`` added to the table row its token names (in place)."""
    embedding_backward_rows(grad, indices.reshape(-1), g.reshape(-1, grad.shape[1]))


@njit(**COMPILE)
def embedding_backward_rows(grad, indices, g):
    for n in range(indices.size):
        grad[indices[n]] += g[n]


TILE = 16  # a transposed read takes 16 rows of the source at a time: the cache lines one column loads serve the next


def lstm_step_forward(gates, state_product, bias, c_prev, c, tanh_c, h):
    r"""The LSTM's Eqs. (T1), (1)-(3) for one step. ``gates`` (B, 4H) holds $x_t W_{ih}^\top$ and is
    overwritten by [i, f, c~, o]; ``state_product`` is $W_{hh} h_{t-1}^\top$ (4H, B), as the faster
    matrix product returns it; writes $c_t$, $\tanh c_t$ and $h_t$. Each sigmoid is
    $\tfrac12(1 + \tanh(a/2))$, as in the reference, so NumPy's vectorised tanh does all four gates
    in one call; the kernels around it do the rest in one pass each."""
    half, one = gates.dtype.type(0.5), gates.dtype.type(1)
    add_transposed(gates, bias, state_product)  # Eq. (T1)
    halve_sigmoid_blocks(gates, half)
    numpy.tanh(gates, out=gates)  # Eq. (1)
    lstm_cell(gates, c_prev, one, half, c)  # Eqs. (1), (2)
    numpy.tanh(c, out=tanh_c)
    numpy.multiply(gates[:, 3 * c.shape[1]:], tanh_c, out=h)  # Eq. (3)


@njit(**COMPILE)
def add_transposed(rows, bias, columns):
    """rows[b, k] += bias[k] + columns[k, b]: ``columns`` is read tile by tile."""
    batch, width = rows.shape
    whole = width - width % TILE
    for k0 in range(0, whole, TILE):
        for b in range(batch):
            row = rows[b, k0:k0 + TILE]
            for k in range(TILE):  # a constant count: the compiler gathers it as one vector
                row[k] = (row[k] + bias[k0 + k]) + columns[k0 + k, b]
    for b in range(batch):
        for k in range(whole, width):
            rows[b, k] = (rows[b, k] + bias[k]) + columns[k, b]


@njit(**COMPILE)
def halve_sigmoid_blocks(gates, half):
    """a/2 in the i, f and o blocks: the argument of tanh in sigma(a) = (1 + tanh(a/2)) / 2."""
    size = gates.shape[1] // 4
    for b in range(gates.shape[0]):
        i_f, o = gates[b, :2 * size], gates[b, 3 * size:]
        for k in range(2 * size):
            i_f[k] *= half
        for k in range(size):
            o[k] *= half


@njit(**COMPILE)
def lstm_cell(gates, c_prev, one, half, c):
    """i, f, o = (1 + tanh) / 2 in place (the c~ block is tanh already); c = f c_prev + i c~."""
    size = c.shape[1]
    for b in range(c.shape[0]):  # a row's blocks as 1-D slices: the compiler vectorises these loops
        i, f, c_tilde, o = gates[b, :size], gates[b, size:2 * size], gates[b, 2 * size:3 * size], gates[b, 3 * size:]
        c_old, c_new = c_prev[b], c[b]
        for k in range(size):
            i[k] = (i[k] + one) * half
            f[k] = (f[k] + one) * half
            o[k] = (o[k] + one) * half
            c_new[k] = f[k] * c_old[k] + i[k] * c_tilde[k]


def lstm_step_backward(g, carry_h, carry_c, gates, tanh_c, c_prev, delta):
    r"""The LSTM's Eqs. (4)-(7) for one step: fills ``delta`` (B, 4H) from the saved gates [i, f, c~, o]
    and returns dL/dc_t * f_t, the cell-state path's carry into step t - 1. ``carry_h`` is
    $W_{hh}^\top \delta_{t+1}$ as (H, B) columns, as the faster matrix product returns it."""
    carry_out, dh = numpy.empty_like(carry_c), g.copy()
    add_transposed(dh, numpy.zeros(g.shape[1], dtype=g.dtype), carry_h)  # Eq. (4)
    lstm_step_backward_rows(dh, carry_c, gates, tanh_c, c_prev, g.dtype.type(1), delta, carry_out)
    return carry_out


@njit(**COMPILE)
def lstm_step_backward_rows(dh, carry_c, gates, tanh_c, c_prev, one, delta, carry_out):
    size = dh.shape[1]
    for b in range(dh.shape[0]):  # a row's blocks as 1-D slices: the compiler vectorises these loops
        i, f, c_tilde, o = gates[b, :size], gates[b, size:2 * size], gates[b, 2 * size:3 * size], gates[b, 3 * size:]
        d_i, d_f, d_c, d_o = delta[b, :size], delta[b, size:2 * size], delta[b, 2 * size:3 * size], delta[b, 3 * size:]
        dh_row, carry_row, tanh_row, c_old, out = dh[b], carry_c[b], tanh_c[b], c_prev[b], carry_out[b]
        for k in range(size):
            dc = dh_row[k] * o[k] * (one - tanh_row[k] * tanh_row[k]) + carry_row[k]  # Eq. (5)
            d_i[k] = (dc * c_tilde[k]) * (i[k] * (one - i[k]))  # Eqs. (6), (7)
            d_f[k] = (dc * c_old[k]) * (f[k] * (one - f[k]))
            d_c[k] = (dc * i[k]) * (one - c_tilde[k] * c_tilde[k])
            d_o[k] = (dh_row[k] * tanh_row[k]) * (o[k] * (one - o[k]))
            out[k] = dc * f[k]


def dropout(x, key, threshold, scale):
    """Dropout's Eqs. (3), (4) and (1) in one pass: (y, scaled_mask), the mask holding ``scale`` or 0 per element."""
    y, scaled_mask = numpy.empty(x.shape, dtype=x.dtype), numpy.empty(x.shape, dtype=x.dtype)
    # element i of flat(x) is the i-th in C order, as Eq. (4) counts
    dropout_flat(flat(x), numpy.uint64(key), numpy.uint64(threshold), scale, y.reshape(-1), scaled_mask.reshape(-1))
    return y, scaled_mask


GAMMA, MIX_1, MIX_2 = (numpy.uint64(c) for c in (GOLDEN_GAMMA, *MIX_MULTIPLIERS))
SHIFTS = tuple(numpy.uint64(s) for s in (30, 27, 31, 32))


@njit(**COMPILE)
def dropout_flat(x, key, threshold, scale, y, scaled_mask):
    zero = scale - scale
    for i in range(x.size):
        z = key + numpy.uint64(i + 1) * GAMMA  # Eq. (4); unsigned arithmetic wraps mod 2^64
        z = (z ^ (z >> SHIFTS[0])) * MIX_1
        z = (z ^ (z >> SHIFTS[1])) * MIX_2
        z ^= z >> SHIFTS[2]
        scaled_mask[i] = scale if (z >> SHIFTS[3]) < threshold else zero  # Eq. (3), times 1 / (1 - p)
        y[i] = x[i] * scaled_mask[i]  # Eq. (1)
