r"""CPU kernels that run an LSTM's whole sequence, forward or backward, for part of a batch.

``LSTMLayer``'s step kernels (``mnn.kernels.cpu``) leave each step's product with $W_{hh}$ to
OpenBLAS: a product of 32 states takes it some 55 microseconds on two threads, and every step
is a handful of calls from Python. Here one call runs every step for a part of the batch, so
the parts run side by side, each on a thread of its own (``mnn.kernels.threads``), with no
Python between the steps. Float32 only: the layer's other dtypes take the step kernels.

Three pieces, each a loop the compiler vectorises:

- ``add_state_products``: the step's product, for eight samples and two rows of the weight
  at a time: sixteen sums, each vectorised along the row and kept in a register, where
  OpenBLAS would pack the weight again at every step.
- ``tanh_rational``: $\tanh$ as a rational function, since numba has no vectorised $\tanh$
  (it would call the C library's once per value, 7 ms for 0.5 M values).
- The LSTM's Eqs. (1)-(3) forward and (4)-(7) backward (``LSTMLayer``), one pass per step.

Each sample is computed the same way whichever part holds it (parts start at multiples of
eight), so the results do not depend on the number of threads, two or more (with one, or
fewer than sixteen samples, the step kernels run, and the last bits differ).
"""
import numpy
from numba import njit

from . import threads
from .cpu import COMPILE, lstm_step_backward_rows

# The products' sums may add in any order: vectorised along k, each of the sixteen is kept as
# partial sums in one vector register (sixteen of them with AVX-512).
COMPILE_PRODUCTS = dict(COMPILE, fastmath={"reassoc"})
TILE_SAMPLES = 8  # samples a product tile takes; parts of the batch start at multiples of it
SAMPLES_PER_THREAD = 8  # fewer than this per thread, and the step kernels' one product is faster

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


@njit(inline="always", **COMPILE)
def tanh_rational(x):
    """tanh of a float32, computed in float64; NaN stays NaN (it fails the comparison)."""
    a = numpy.float64(x)
    if abs(a) > TANH_LIMIT:
        return numpy.float32(1.0 if a > 0 else -1.0)
    u = a * a
    p = ((((P5 * u + P4) * u + P3) * u + P2) * u + P1) * u + P0
    q = ((((Q5 * u + Q4) * u + Q3) * u + Q2) * u + Q1) * u + Q0
    return numpy.float32(a * p / q)


@njit(**COMPILE_PRODUCTS)
def add_state_products(w, states, out, lo, hi):
    """out[s, j] += w[j] . states[s] for samples lo <= s < hi, every row j of w: the state's product with
    $W_{hh}$ (forward, Eq. (T1)) or with $W_{hh}^\\top$ (backward, Eq. (4)). ``lo`` is a multiple of 8."""
    rows = w.shape[0]
    whole = lo + (hi - lo) // TILE_SAMPLES * TILE_SAMPLES
    for s in range(lo, whole, TILE_SAMPLES):
        for j in range(0, rows - 1, 2):
            add_tile(w[j], w[j + 1], states, out, s, j)
        if rows % 2:
            for t in range(s, s + TILE_SAMPLES):
                out[t, rows - 1] += dot(w[rows - 1], states[t])
    for t in range(whole, hi):
        for j in range(rows):
            out[t, j] += dot(w[j], states[t])


@njit(inline="always", **COMPILE_PRODUCTS)
def add_tile(w0, w1, states, out, s, j):
    """Rows j, j + 1 of w times samples s .. s + 7: sixteen sums, named so that each stays in a register
    (as an array they would live in memory, and the loop ran 20x slower)."""
    x0, x1, x2, x3, x4, x5, x6, x7 = (states[s], states[s + 1], states[s + 2], states[s + 3], states[s + 4],
                                      states[s + 5], states[s + 6], states[s + 7])
    zero = numpy.float32(0)  # the kernels run float32 (not w0[0] - w0[0]: NaN for an infinite weight)
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = zero
    for k in range(w0.shape[0]):
        p, q = w0[k], w1[k]
        a0 += p * x0[k]; a1 += p * x1[k]; a2 += p * x2[k]; a3 += p * x3[k]  # noqa: E702
        a4 += p * x4[k]; a5 += p * x5[k]; a6 += p * x6[k]; a7 += p * x7[k]  # noqa: E702
        b0 += q * x0[k]; b1 += q * x1[k]; b2 += q * x2[k]; b3 += q * x3[k]  # noqa: E702
        b4 += q * x4[k]; b5 += q * x5[k]; b6 += q * x6[k]; b7 += q * x7[k]  # noqa: E702
    for t, (a, b) in enumerate(((a0, b0), (a1, b1), (a2, b2), (a3, b3), (a4, b4), (a5, b5), (a6, b6), (a7, b7))):
        out[s + t, j] += a
        out[s + t, j + 1] += b


@njit(inline="always", **COMPILE_PRODUCTS)
def dot(u, v):
    total = numpy.float32(0)
    for k in range(u.shape[0]):
        total += u[k] * v[k]
    return total


@njit(**COMPILE)
def lstm_cell_rows(gates, bias, c_prev, c, tanh_c, h, lo, hi):
    """Eqs. (1)-(3) for samples lo..hi: ``gates`` holds the pre-activations less the bias and becomes
    [i, f, c~, o]; sigma(a) = (1 + tanh(a/2)) / 2 as in the reference."""
    size = c.shape[1]
    half, one = numpy.float32(0.5), numpy.float32(1)
    b_i, b_f, b_g, b_o = bias[:size], bias[size:2 * size], bias[2 * size:3 * size], bias[3 * size:]
    for s in range(lo, hi):
        row = gates[s]
        i, f, c_tilde, o = row[:size], row[size:2 * size], row[2 * size:3 * size], row[3 * size:]
        c_old, c_new, tanh_row, h_row = c_prev[s], c[s], tanh_c[s], h[s]
        for k in range(size):
            i[k] = (tanh_rational((i[k] + b_i[k]) * half) + one) * half  # Eq. (1)
            f[k] = (tanh_rational((f[k] + b_f[k]) * half) + one) * half
            c_tilde[k] = tanh_rational(c_tilde[k] + b_g[k])
            o[k] = (tanh_rational((o[k] + b_o[k]) * half) + one) * half
            c_new[k] = f[k] * c_old[k] + i[k] * c_tilde[k]  # Eq. (2)
            tanh_row[k] = tanh_rational(c_new[k])
            h_row[k] = o[k] * tanh_row[k]  # Eq. (3)


@njit(nogil=True, **COMPILE)
def lstm_forward_rows(gates, w_hh, bias, h0, c0, y, cells, tanh_cells, lo, hi):
    """Every step of Eqs. (T1), (1)-(3) for samples lo..hi; ``gates`` (T, B, 4H) holds $X W_{ih}^\\top$."""
    for t in range(gates.shape[0]):
        h_prev, c_prev = (y[t - 1], cells[t - 1]) if t else (h0, c0)
        add_state_products(w_hh, h_prev, gates[t], lo, hi)  # Eq. (T1)
        lstm_cell_rows(gates[t], bias, c_prev, cells[t], tanh_cells[t], y[t], lo, hi)


@njit(nogil=True, **COMPILE)
def lstm_backward_rows(g, w_hh_t, gates, cells, tanh_cells, c0, carry_h, carry_c, delta, dh, carries, lo, hi):
    """Every step of Eqs. (4)-(7), from the last back, for samples lo..hi. ``carry_h``, ``carry_c`` hold
    the final state's gradients and receive the initial state's; ``dh`` (B, H) and ``carries``
    (2, B, H) are scratch."""
    last, one = g.shape[0] - 1, numpy.float32(1)
    for t in range(last, -1, -1):
        dh[lo:hi] = g[t, lo:hi]
        if t == last:
            dh[lo:hi] += carry_h[lo:hi]  # Eq. (4) at t = T: the final state's gradient
        else:
            add_state_products(w_hh_t, delta[t + 1], dh, lo, hi)  # Eq. (4): W_hh^T delta_{t+1}
        c_prev = cells[t - 1] if t else c0
        carry_in = carry_c if t == last else carries[(t + 1) % 2]
        lstm_step_backward_rows(dh[lo:hi], carry_in[lo:hi], gates[t, lo:hi], tanh_cells[t, lo:hi], c_prev[lo:hi],
                                one, delta[t, lo:hi], carries[t % 2, lo:hi])  # Eqs. (5)-(7)
    carry_c[lo:hi] = carries[0, lo:hi]  # dL/dc_1 * f_1
    carry_h[lo:hi] = 0
    add_state_products(w_hh_t, delta[0], carry_h, lo, hi)  # W_hh^T delta_1: the initial state's


def parts(batch):
    """Sample ranges for the threads at hand, each starting at a multiple of 8, or None where fewer than
    two threads would have 8 samples each."""
    count = min(threads.threads_at_hand(), batch // SAMPLES_PER_THREAD)
    if count < 2:
        return None
    tiles = -(-batch // TILE_SAMPLES)
    starts = [tiles * k // count * TILE_SAMPLES for k in range(count)]
    return list(zip(starts, starts[1:] + [batch]))


def lstm_forward(gates, w_hh, bias, h0, c0, y, cells, tanh_cells, ranges):
    """Eqs. (T1), (1)-(3) for every step, the batch's ``ranges`` (from ``parts``) side by side."""
    threads.run_parts([lambda lo=lo, hi=hi: lstm_forward_rows(gates, w_hh, bias, h0, c0, y, cells, tanh_cells,
                                                             lo, hi) for lo, hi in ranges])


def lstm_backward(g, w_hh_t, gates, cells, tanh_cells, c0, carry_h, carry_c, delta, ranges):
    """Eqs. (4)-(7) for every step, the ranges side by side: fills ``delta``; ``carry_h``, ``carry_c``
    go in as the final state's gradients and come out as the initial state's."""
    dh, carries = numpy.empty_like(carry_h), numpy.empty((2,) + carry_c.shape, dtype=carry_c.dtype)
    threads.run_parts([lambda lo=lo, hi=hi: lstm_backward_rows(g, w_hh_t, gates, cells, tanh_cells, c0, carry_h,
                                                              carry_c, delta, dh, carries, lo, hi)
                       for lo, hi in ranges])
