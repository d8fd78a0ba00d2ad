"""Sums over the rows of a matrix: every bias gradient and every normalisation needs one.

Both run as a matrix-vector product, BLAS on the CPU and cuBLAS on a GPU, rather than
``sum(axis=0)``: a GEMV reads the rows once, in order, on every core (on the GPU, every
multiprocessor), where the array modules' own reductions along the first axis are slower.

A gradient adds such a sum, or a product of matrices (a sum over rows of outer products), into
what it holds: ``add_column_sums`` and ``add_product``. On a GPU each is one cuBLAS call that
adds into the gradient (beta = 1), rather than a call into a new array and an add: a launch
and a temporary fewer.
"""
from .. import backend, kernels


def column_sums(rows):
    """Sum over the rows of a (N, C) array, as one GEMV: ``ones(N) @ rows``."""
    return ones_for(rows) @ rows


def ones_for(rows):
    """The kept vector of ones for a (N, C) array: N ones of its dtype, where it is."""
    return backend.kept_vector(backend.array_module(rows), 1, rows.shape[0], rows.dtype)


def column_dots(a, b):
    """``(a * b).sum(axis=0)`` for (N, C) arrays. NumPy's einsum needs no temporary product; on a
    GPU the product and one GEMV are faster than CuPy's einsum."""
    xp = backend.array_module(a)
    if xp.__name__ == "numpy":
        return xp.einsum("nc,nc->c", a, b)
    return column_sums(a * b)


def add_product(out, a, b):
    """``out += a @ b`` for 2-D arrays: on a GPU one GEMM that adds into ``out``."""
    if kernels.fused_gpu(out, a, b) and out.dtype == a.dtype == b.dtype and out.flags.c_contiguous:
        kernels.cuda.add_product(out, a, b)
    else:
        out += a @ b


def add_column_sums(out, rows):
    """``out += column_sums(rows)`` for a (N, C) array: on a GPU one GEMV that adds into ``out``."""
    if kernels.fused_gpu(out, rows) and out.dtype == rows.dtype and out.flags.c_contiguous:
        kernels.cuda.add_column_sums(out, rows)
    else:
        out += column_sums(rows)
