r"""Stacks of matrix products on a GPU, read by cuBLAS where the operands lie.

CuPy's ``matmul`` on stacks (arrays of more than two dimensions) first copies every operand that
is not C-contiguous: a transposed view such as attention's $K^\top$, or a stack sliced out of a
wider array. cuBLAS needs neither copy. Its strided batched GEMM reads matrices that lie a fixed
distance apart (the batch stride), each stored by columns or by rows (a transposition flag), its
rows or columns any fixed distance apart (the leading dimension). ``batched_product`` describes
each operand to cuBLAS so, and copies nothing: attention's six products a step (two forward,
four backward) then cost six launches, where CuPy's ``matmul`` adds a copy for every transposed
operand.

**Rows against columns.** cuBLAS is column-major: it reads an $r \times c$ matrix stored by rows,
with rows $\ell$ entries apart, as its transpose, a $c \times r$ matrix stored by columns with
leading dimension $\ell$. So the row-major product $C = AB$ is computed as

$$C^\top = B^\top A^\top, \tag{1}$$

with $B$ as cuBLAS's first operand and $A$ as its second: an operand stored by rows is passed
as it is (``N``: cuBLAS sees its transpose, the factor Eq. (1) wants), one stored by columns
(a transposed view) with ``T``. $C$ is written by rows, a new C-contiguous stack.
"""
import math
from typing import NamedTuple

import numpy


class Stack(NamedTuple):
    """How cuBLAS reads a stack of matrices where it lies: the distance between matrices (``batch``)
    and between the stored rows of one (``leading``), in entries, and whether each is stored by
    columns (``by_columns``: a transposed view of matrices stored by rows)."""

    batch: int
    leading: int
    by_columns: bool


def stack_layout(x):
    """``Stack`` for an array of shape (..., r, c), or None where cuBLAS cannot read it in place:
    matrices not evenly spaced, neither their rows nor their columns contiguous, or a side of one
    (whose stride says nothing)."""
    *stack, rows, cols = x.shape
    if rows < 2 or cols < 2 or any(stride <= 0 or stride % x.itemsize
                                   for size, stride in zip(x.shape, x.strides) if size > 1):
        return None
    *between, row_step, col_step = (stride // x.itemsize for stride in x.strides)
    if col_step == 1 and row_step >= cols:
        by_columns, leading = False, row_step
    elif row_step == 1 and col_step >= rows:
        by_columns, leading = True, col_step
    else:
        return None
    batch = matrix_spacing(stack, between, rows * cols)
    return None if batch is None else Stack(batch, leading, by_columns)


def matrix_spacing(stack, strides, default):
    """The one distance between consecutive matrices of a stack of shape ``stack``, or None where the
    stack's dimensions do not merge into one (a (B, h) stack of heads cut from a (B, T, h d) array)."""
    dims = [(size, stride) for size, stride in zip(stack, strides) if size > 1]
    for (_, outer), (size, inner) in zip(dims, dims[1:]):
        if outer != size * inner:
            return None
    return dims[-1][1] if dims else default


CUBLAS_TYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))


def batched_product(a, b):
    """``a @ b`` for CuPy stacks of one stack shape, both float32 or both float64, as one strided batched
    GEMM reading both where they lie (Eq. (1)); None where ``stack_layout`` cannot describe one of them."""
    import cupy

    layout_a, layout_b = stack_layout(a), stack_layout(b)
    if layout_a is None or layout_b is None or a.shape[:-2] != b.shape[:-2] or a.dtype != b.dtype or \
            a.dtype not in CUBLAS_TYPES:
        return None
    rows, inner, cols = a.shape[-2], a.shape[-1], b.shape[-1]
    out = cupy.empty(a.shape[:-1] + (cols,), dtype=a.dtype)
    count = math.prod(a.shape[:-2])
    if count:
        strided_batched_gemm(layout_b.by_columns, layout_a.by_columns, cols, rows, inner, b, layout_b, a, layout_a,
                             out, count)  # Eq. (1): C^T = B^T A^T
    return out


def strided_batched_gemm(transpose_p, transpose_q, m, n, k, p, p_stack, q, q_stack, c, count):
    """cuBLAS's column-major ``C_i = op(P_i) op(Q_i)``, m x n with k summed, for i < ``count``
    (``cublasGemmStridedBatchedEx``): P and Q start at the first entries of ``p`` and ``q`` and are read as
    their ``Stack``s say; ``c`` is C-contiguous, each C_i stored by columns (leading dimension m)."""
    from cupy.cuda import device
    from cupy_backends.cuda.api import runtime
    from cupy_backends.cuda.libs import cublas

    double = c.dtype == numpy.float64
    data_type = runtime.CUDA_R_64F if double else runtime.CUDA_R_32F
    compute_type = cublas.CUBLAS_COMPUTE_64F if double else cublas.CUBLAS_COMPUTE_32F
    one, zero = numpy.ones((), c.dtype), numpy.zeros((), c.dtype)  # host scalars: cuBLAS's default pointer mode
    operation = {False: cublas.CUBLAS_OP_N, True: cublas.CUBLAS_OP_T}
    cublas.gemmStridedBatchedEx(
        device.get_cublas_handle(), operation[transpose_p], operation[transpose_q], m, n, k, one.ctypes.data,
        p.data.ptr, data_type, p_stack.leading, p_stack.batch,
        q.data.ptr, data_type, q_stack.leading, q_stack.batch,
        zero.ctypes.data, c.data.ptr, data_type, m, m * n, count, compute_type, cublas.CUBLAS_GEMM_DEFAULT)
