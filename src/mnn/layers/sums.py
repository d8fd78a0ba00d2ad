"""Sums over the rows of a matrix: every bias gradient and every normalisation needs one.

Both run as a matrix-vector product, BLAS on the CPU and cuBLAS on a GPU, rather than
``sum(axis=0)``: a GEMV reads the rows once, in order, on every core (on the GPU, every
multiprocessor), where the array modules' own reductions along the first axis are slower.
"""
import functools

from .. import backend


def column_sums(rows):
    """Sum over the rows of a (N, C) array, as one GEMV: ``ones(N) @ rows``."""
    xp = backend.array_module(rows)
    device = xp.cuda.Device().id if xp.__name__ == "cupy" else None
    return ones(xp, rows.shape[0], rows.dtype, device) @ rows


@functools.lru_cache(maxsize=64)
def ones(xp, count, dtype, device):
    """A vector of ``count`` ones, kept: a GPU would spend a launch filling a new one for every sum."""
    vector = xp.ones(count, dtype=dtype)
    if hasattr(vector.flags, "writeable"):
        vector.flags.writeable = False  # shared by every caller
    return vector


def column_dots(a, b):
    """``(a * b).sum(axis=0)`` for (N, C) arrays. NumPy's einsum needs no temporary product; on a
    GPU the product and one GEMV are faster than CuPy's einsum."""
    xp = backend.array_module(a)
    if xp.__name__ == "numpy":
        return xp.einsum("nc,nc->c", a, b)
    return column_sums(a * b)
