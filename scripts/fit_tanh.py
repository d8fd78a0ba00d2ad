"""Fit the rational tanh of mnn.kernels.cpu_sequence: tanh x = x P(x^2) / Q(x^2) on [0, 9], P and Q of degree 5.

    python scripts/fit_tanh.py     # prints TANH_P and TANH_Q, and the fit's largest relative error

Minimising the relative error max |R - f| / f of R = P / Q, f(x) = tanh(x) / x, is not linear in
the coefficients; P - f Q is. So this solves, by least squares with Q's constant term fixed at 1,
P(u) - f Q(u) = 0 weighted by 1 / (f Q_prev(u)), Q_prev being the last iteration's Q (Loeb's
iteration), until Q settles. u = (x / 9)^2 keeps the columns of the system comparable; the
coefficients are scaled back to powers of x^2 at the end.
"""
import numpy

LIMIT, DEGREE = 9.0, 5


def fit(iterations=30):
    x = numpy.unique(numpy.concatenate([numpy.linspace(0, LIMIT, 40_000), numpy.geomspace(1e-5, 1, 4_000)]))[1:]
    u, f = (x / LIMIT) ** 2, numpy.tanh(x) / x
    powers = u[:, None] ** numpy.arange(DEGREE + 1)
    q_previous = numpy.ones_like(x)
    for _ in range(iterations):
        system = numpy.hstack([powers, -f[:, None] * powers[:, 1:]]) / (f * q_previous)[:, None]
        solution = numpy.linalg.lstsq(system, 1 / q_previous, rcond=None)[0]
        p, q = solution[:DEGREE + 1], numpy.concatenate([[1.0], solution[DEGREE + 1:]])
        q_previous = powers @ q
    error = numpy.abs((powers @ p) / q_previous / f - 1).max()
    scale = LIMIT ** (-2.0 * numpy.arange(DEGREE + 1))
    return p * scale, q * scale, error


if __name__ == "__main__":
    p, q, error = fit()
    print("TANH_P =", tuple(float(c) for c in p))
    print("TANH_Q =", tuple(float(c) for c in q))
    print(f"largest relative error on [0, {LIMIT}]: {error:.1e}")
