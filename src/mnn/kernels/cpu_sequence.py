r"""CPU kernels that run an LSTM's whole sequence, forward or backward, for part of a batch.

Every step of an LSTM multiplies the last state by $W_{hh}$: a product of a few dozen states,
too small for OpenBLAS to split well between threads (some 55 microseconds for 32 states on
two), and every step would be a handful of calls from Python. But the samples of a batch are
independent for the whole sequence. So one call here runs every step for a part of the batch,
with no Python between the steps, and the parts run side by side, each on a thread of its own
(``mnn.kernels.threads``). Float32 only: the layer's other dtypes take the step kernels.

Three pieces:

- ``multiply``: the step's product as OpenBLAS computes a large one, by tiles of 8 samples and
  32 columns whose sixteen running sums, vectors of sixteen columns each, stay in registers
  (``mnn.kernels.vectors``); the weight is laid out once per pass as ``panels``, 32 columns in
  one place, rather than read a whole row of the matrix apart at every k (4 KB forward, H = 256).
- ``tanh_rational``: $\tanh$ as a rational function, since numba has no vectorised $\tanh$
  (it would call the C library's once per value, 7 ms for 0.5 M values).
- The LSTM's Eqs. (1)-(3) forward and (4)-(7) backward (``LSTMLayer``), one pass per step.

Each sample is computed the same way whichever part holds it, in a tile of 8 or alone (parts
start at multiples of eight): the results do not depend on the number of threads.
"""
import numpy
from numba import njit

from . import threads, vectors
from .cpu import COMPILE, lstm_step_backward_rows

TILE_SAMPLES = 8  # samples a product tile takes; parts of the batch start at multiples of it
SAMPLES_PER_THREAD = 8  # a thread takes a part of the batch only where each part has this many
PANEL = 32  # the columns of a matrix a product tile takes: two vectors of 16
# "contract": a product and the sum it enters may be one fused multiply-add, rounded once (the
# polynomials of tanh become five each). The forward cell takes some 10% less time.
COMPILE_CELLS = dict(COMPILE, fastmath={"contract"})

# tanh x = x P(x^2) / Q(x^2) for |x| <= 9, +-1 beyond (float32 rounds tanh x to 1 from 13 ln 2 = 9.011 on).
# P and Q, of degree 5 in x^2, were fitted to tanh's relative error over [0, 9] by weighted least
# squares, reweighted by 1 / Q until they settle (scripts/fit_tanh.py): relative error 1.2e-10.
# Computed in float64 and rounded to float32, the result is within one unit in the last place of
# the correctly rounded tanh (tests/test_cpu_sequence.py), as NumPy's float32 tanh is.
TANH_P = (0.9999999999907663, 0.1410571872202354, 0.004434625525087101, 4.249749815660669e-05,
          1.1246193827530448e-07, 3.7547459134473624e-11)
TANH_Q = (1.0, 0.47439052031676243, 0.02923146612225803, 0.0005025037154132462, 2.624653354479387e-06,
          2.9988623154617965e-09)
P0, P1, P2, P3, P4, P5 = TANH_P
Q0, Q1, Q2, Q3, Q4, Q5 = TANH_Q
TANH_LIMIT = 9.0


@njit(inline="always", **COMPILE_CELLS)
def tanh_rational(x):
    """tanh of a float32, computed in float64; NaN stays NaN (it fails the comparison)."""
    a = numpy.float64(x)
    if abs(a) > TANH_LIMIT:
        return numpy.float32(1.0 if a > 0 else -1.0)
    u = a * a
    u2 = u * u  # P and Q in Estrin's form: three multiply-adds deep, where Horner's five wait on each other
    p = (P0 + P1 * u) + u2 * ((P2 + P3 * u) + u2 * (P4 + P5 * u))
    q = (Q0 + Q1 * u) + u2 * ((Q2 + Q3 * u) + u2 * (Q4 + Q5 * u))
    return numpy.float32(a * p / q)


def panels(matrix):
    """A (K, N) matrix as (P, K, 32) panels, P = ceil(N / 32): panel p holds columns 32p .. 32p + 31, each
    row of 32 numbers in one place (zeros past column N), as ``multiply`` reads them."""
    out = numpy.empty((whole_panels(matrix.shape[1]) // PANEL, matrix.shape[0], PANEL), dtype=numpy.float32)
    fill_panels(matrix, out)
    return out


@njit(**COMPILE)
def fill_panels(matrix, out):
    """``panels``' copy, in one pass whatever the matrix's layout (a transposed view, forward)."""
    rows, columns = matrix.shape
    for p in range(out.shape[0]):
        for k in range(rows):
            for c in range(PANEL):
                j = PANEL * p + c
                out[p, k, c] = matrix[k, j] if j < columns else 0


@njit(**COMPILE)
def multiply(panels, states, out, lo, hi):
    """out[s, :32P] = states[s] @ matrix for samples lo <= s < hi, the matrix given as its ``panels``: the
    step's product with $W_{hh}^\\top$ (forward, Eq. (T1)) or with $W_{hh}$ (backward, Eq. (4))."""
    whole = lo + (hi - lo) // TILE_SAMPLES * TILE_SAMPLES
    for p in range(panels.shape[0]):
        for s in range(lo, whole, TILE_SAMPLES):
            multiply_tile(panels[p], states, out, s, PANEL * p)
        for s in range(whole, hi):
            multiply_row(panels[p], states[s], out[s], PANEL * p)


@njit(inline="always", **COMPILE)
def multiply_tile(panel, states, out, s, j):
    """Samples s .. s + 7 times a panel: sixteen running sums of sixteen columns each, a_r for columns
    j .. j + 15 of sample s + r, b_r for the next sixteen; each k adds w[k] x_r[k] to all of them."""
    x0, x1, x2, x3, x4, x5, x6, x7 = (states[s], states[s + 1], states[s + 2], states[s + 3], states[s + 4],
                                      states[s + 5], states[s + 6], states[s + 7])
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = vectors.zeros()
    for k in range(panel.shape[0]):
        u, v = vectors.load(panel[k], 0), vectors.load(panel[k], 16)
        x = vectors.splat(x0[k]); a0 = vectors.fma(u, x, a0); b0 = vectors.fma(v, x, b0)  # noqa: E702
        x = vectors.splat(x1[k]); a1 = vectors.fma(u, x, a1); b1 = vectors.fma(v, x, b1)  # noqa: E702
        x = vectors.splat(x2[k]); a2 = vectors.fma(u, x, a2); b2 = vectors.fma(v, x, b2)  # noqa: E702
        x = vectors.splat(x3[k]); a3 = vectors.fma(u, x, a3); b3 = vectors.fma(v, x, b3)  # noqa: E702
        x = vectors.splat(x4[k]); a4 = vectors.fma(u, x, a4); b4 = vectors.fma(v, x, b4)  # noqa: E702
        x = vectors.splat(x5[k]); a5 = vectors.fma(u, x, a5); b5 = vectors.fma(v, x, b5)  # noqa: E702
        x = vectors.splat(x6[k]); a6 = vectors.fma(u, x, a6); b6 = vectors.fma(v, x, b6)  # noqa: E702
        x = vectors.splat(x7[k]); a7 = vectors.fma(u, x, a7); b7 = vectors.fma(v, x, b7)  # noqa: E702
    for r, (a, b) in enumerate(((a0, b0), (a1, b1), (a2, b2), (a3, b3), (a4, b4), (a5, b5), (a6, b6), (a7, b7))):
        vectors.store(out[s + r], j, a)
        vectors.store(out[s + r], j + 16, b)


@njit(inline="always", **COMPILE)
def multiply_row(panel, state, out_row, j):
    """One sample times a panel, each sum formed as in ``multiply_tile``: the same bits."""
    a = b = vectors.zeros()
    for k in range(panel.shape[0]):
        x = vectors.splat(state[k])
        a = vectors.fma(vectors.load(panel[k], 0), x, a)
        b = vectors.fma(vectors.load(panel[k], 16), x, b)
    vectors.store(out_row, j, a)
    vectors.store(out_row, j + 16, b)


@njit(**COMPILE_CELLS)
def lstm_cell_rows(gates, product, bias, c_prev, c, tanh_c, h, lo, hi):
    """Eqs. (1)-(3) for samples lo..hi: ``gates`` holds $x_t W_{ih}^\\top$ and becomes [i, f, c~, o], the
    pre-activations being gates + product + bias; sigma(a) = (1 + tanh(a/2)) / 2 as in the reference."""
    size = c.shape[1]
    half, one = numpy.float32(0.5), numpy.float32(1)
    b_i, b_f, b_g, b_o = bias[:size], bias[size:2 * size], bias[2 * size:3 * size], bias[3 * size:]
    for s in range(lo, hi):
        row, p = gates[s], product[s]
        i, f, c_tilde, o = row[:size], row[size:2 * size], row[2 * size:3 * size], row[3 * size:]
        p_i, p_f, p_g, p_o = p[:size], p[size:2 * size], p[2 * size:3 * size], p[3 * size:4 * size]
        c_old, c_new, tanh_row, h_row = c_prev[s], c[s], tanh_c[s], h[s]
        for k in range(size):
            i[k] = (tanh_rational((i[k] + p_i[k] + b_i[k]) * half) + one) * half  # Eq. (1)
            f[k] = (tanh_rational((f[k] + p_f[k] + b_f[k]) * half) + one) * half
            c_tilde[k] = tanh_rational(c_tilde[k] + p_g[k] + b_g[k])
            o[k] = (tanh_rational((o[k] + p_o[k] + b_o[k]) * half) + one) * half
        for k in range(size):  # a loop of its own: tanh c waits on the gates, which in one loop held up the next
            c_new[k] = f[k] * c_old[k] + i[k] * c_tilde[k]  # Eq. (2)
            tanh_row[k] = tanh_rational(c_new[k])
            h_row[k] = o[k] * tanh_row[k]  # Eq. (3)


@njit(**COMPILE)
def add_rows(a, b, out, lo, hi):
    """out[s] = a[s] + b[s, :n] for samples lo..hi, n = out's width."""
    for s in range(lo, hi):
        for k in range(out.shape[1]):
            out[s, k] = a[s, k] + b[s, k]


@njit(nogil=True, **COMPILE)
def lstm_forward_rows(gates, w_panels, bias, h0, c0, y, cells, tanh_cells, product, lo, hi):
    """Every step of Eqs. (T1), (1)-(3) for samples lo..hi; ``gates`` (T, B, 4H) holds $X W_{ih}^\\top$,
    ``w_panels`` are $W_{hh}^\\top$'s ``panels``; ``product`` is scratch, whole panels wide (``scratch``:
    B x 32 ceil(4H / 32)), as ``multiply`` writes them."""
    for t in range(gates.shape[0]):
        h_prev, c_prev = (y[t - 1], cells[t - 1]) if t else (h0, c0)
        multiply(w_panels, h_prev, product, lo, hi)  # Eq. (T1): h_{t-1} W_hh^T
        lstm_cell_rows(gates[t], product, bias, c_prev, cells[t], tanh_cells[t], y[t], lo, hi)


@njit(nogil=True, **COMPILE)
def lstm_backward_rows(g, w_panels, gates, cells, tanh_cells, c0, carry_h, carry_c, delta, dh, carries, product,
                       lo, hi):
    """Every step of Eqs. (4)-(7), from the last back, for samples lo..hi; ``w_panels`` are $W_{hh}$'s
    ``panels``. ``carry_h``, ``carry_c`` hold the final state's gradients and receive the initial state's;
    ``dh`` (B, H), ``carries`` (2, B, H) and ``product`` (``scratch``, B x 32 ceil(H / 32)) are scratch."""
    last, one = g.shape[0] - 1, numpy.float32(1)
    for t in range(last, -1, -1):
        if t == last:
            add_rows(g[t], carry_h, dh, lo, hi)  # Eq. (4) at t = T: the final state's gradient
        else:
            multiply(w_panels, delta[t + 1], product, lo, hi)  # Eq. (4): W_hh^T delta_{t+1}, as rows
            add_rows(g[t], product, dh, lo, hi)
        c_prev = cells[t - 1] if t else c0
        carry_in = carry_c if t == last else carries[(t + 1) % 2]
        lstm_step_backward_rows(dh[lo:hi], carry_in[lo:hi], gates[t, lo:hi], tanh_cells[t, lo:hi], c_prev[lo:hi],
                                one, delta[t, lo:hi], carries[t % 2, lo:hi])  # Eqs. (5)-(7)
    carry_c[lo:hi] = carries[0, lo:hi]  # dL/dc_1 * f_1
    multiply(w_panels, delta[0], product, lo, hi)  # W_hh^T delta_1: the initial state's
    carry_h[lo:hi] = product[lo:hi, :carry_h.shape[1]]


def parts(batch):
    """Sample ranges, one for each thread at hand with eight samples or more, each starting at a multiple
    of 8: one range, the whole batch, where a second thread would have fewer."""
    count = max(1, min(threads.threads_at_hand(), batch // SAMPLES_PER_THREAD))
    tiles = -(-batch // TILE_SAMPLES)
    starts = [tiles * k // count * TILE_SAMPLES for k in range(count)]
    return list(zip(starts, starts[1:] + [batch]))


def lstm_forward(gates, w_hh, bias, h0, c0, y, cells, tanh_cells, ranges):
    """Eqs. (T1), (1)-(3) for every step, the batch's ``ranges`` (from ``parts``) side by side."""
    w_panels, product = panels(w_hh.T), scratch(gates.shape[1], w_hh.shape[0])
    threads.run_parts([lambda lo=lo, hi=hi: lstm_forward_rows(gates, w_panels, bias, h0, c0, y, cells, tanh_cells,
                                                             product, lo, hi) for lo, hi in ranges])


def lstm_backward(g, w_hh, gates, cells, tanh_cells, c0, carry_h, carry_c, delta, ranges):
    """Eqs. (4)-(7) for every step, the ranges side by side: fills ``delta``; ``carry_h``, ``carry_c``
    go in as the final state's gradients and come out as the initial state's."""
    w_panels, product = panels(w_hh), scratch(g.shape[1], w_hh.shape[1])
    dh, carries = numpy.empty_like(carry_h), numpy.empty((2,) + carry_c.shape, dtype=carry_c.dtype)
    threads.run_parts([lambda lo=lo, hi=hi: lstm_backward_rows(g, w_panels, gates, cells, tanh_cells, c0, carry_h,
                                                              carry_c, delta, dh, carries, product, lo, hi)
                       for lo, hi in ranges])


def scratch(batch, columns):
    """Room for ``multiply``'s products: (batch, columns rounded up to whole panels), float32."""
    return numpy.empty((batch, whole_panels(columns)), dtype=numpy.float32)


def whole_panels(columns):
    """``columns`` rounded up to a multiple of 32, the panels' width."""
    return -(-columns // PANEL) * PANEL
