r"""Affine maps: ``LinearLayer`` and the product of two inputs, ``MatrixProduct``."""
import math

import numpy

from .. import backend, kernels
from .base import Layer, check_flag, check_floating, check_size
from .sums import add_column_sums, add_product


class LinearLayer(Layer):
    r"""An affine map $y = W x + b$, the workhorse of every network.

    **Function.** For one sample, a column vector $x \in \mathbb{R}^n$,
    $W \in \mathbb{R}^{m \times n}$ (``w``, shaped ``(out, in)`` as in PyTorch) and
    $b \in \mathbb{R}^m$ (``b``):

    $$y = W x + b. \tag{1}$$

    **Jacobians.** $y_i = \sum_j W_{ij} x_j + b_i$, so
    $\partial y_i / \partial x_j = W_{ij}$, $\partial y_i / \partial W_{kj} = \delta_{ik} x_j$ and
    $\partial y_i / \partial b_k = \delta_{ik}$. With $g = \partial L / \partial y$ the chain rule gives

    $$\frac{\partial L}{\partial x} = W^\top g, \qquad
      \frac{\partial L}{\partial W} = g\, x^\top, \qquad
      \frac{\partial L}{\partial b} = g. \tag{2}$$

    **Batched.** Samples are the rows of $X \in \mathbb{R}^{B \times n}$, so Eq. (1) reads
    $Y = X W^\top + b$ (3) and Eq. (2), summed over the batch, becomes one GEMM each:

    $$\frac{\partial L}{\partial X} = G W, \tag{4}$$

    $$\frac{\partial L}{\partial W} \mathrel{+}= G^\top X, \tag{5}$$

    $$\frac{\partial L}{\partial b} \mathrel{+}= \textstyle\sum_{\text{rows}} G. \tag{6}$$

    Leading dimensions beyond the batch (a sequence ``(B, T, n)``) are folded into the rows.
    Initialisation is PyTorch's: $W, b \sim U(-1/\sqrt{n}, 1/\sqrt{n})$.
    """

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features = check_size("LinearLayer", "in_features", in_features)
        self.out_features = check_size("LinearLayer", "out_features", out_features)
        self.bias = check_flag("LinearLayer", "bias", bias)
        bound = 1 / math.sqrt(in_features)
        self.add_param("w", backend.uniform(-bound, bound, (out_features, in_features)))
        if bias:
            self.add_param("b", backend.uniform(-bound, bound, (out_features,)))

    def config(self):
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias}

    def forward(self, x):
        self.check_input(x, min_ndim=1, last_dim=self.in_features)
        rows = x.reshape(-1, self.in_features)  # one GEMM for all rows, not one per sequence
        self.save(rows, x.shape)
        y = rows @ self.params["w"].T  # Eq. (3)
        if self.bias:
            y += self.params["b"]
        return y.reshape(*x.shape[:-1], self.out_features)

    def backward(self, g):
        rows_x, shape = self.saved()
        rows_g = g.reshape(-1, self.out_features)
        add_product(self.grads["w"], rows_g.T, rows_x)  # Eq. (5)
        if self.bias:
            add_column_sums(self.grads["b"], rows_g)  # Eq. (6)
        if not self.input_grad:
            return None
        return (rows_g @ self.params["w"]).reshape(shape)  # Eq. (4)


class MatrixProduct(Layer):
    r"""The product of two inputs, $C = A B$ (batched over leading dimensions).

    **Function.** $C_{ik} = \sum_j A_{ij} B_{jk}$. (1)

    **Jacobians.** $\partial C_{ik}/\partial A_{ij} = B_{jk}$ and
    $\partial C_{ik}/\partial B_{jk} = A_{ij}$, so with $G = \partial L/\partial C$

    $$\frac{\partial L}{\partial A} = G B^\top, \tag{2}$$

    $$\frac{\partial L}{\partial B} = A^\top G. \tag{3}$$

    Both are GEMMs; with leading batch dimensions ``matmul`` broadcasts them over the
    stack, and ``swapaxes(-1, -2)`` is the transpose of each matrix in it.

    **Broadcasting.** When one operand has fewer leading dimensions (or size 1 where the
    other has more), ``matmul`` uses the same matrix for every product in the stack. Each
    use contributes its own term to that matrix's gradient, so Eqs. (2)-(3) are summed over
    the broadcast dimensions:

    $$\frac{\partial L}{\partial A} = \sum_{\text{broadcast}} G B^\top. \tag{4}$$

    **On a GPU** each product of two stacks of one shape is one cuBLAS call that reads the
    operands where they lie, transposed views included (``mnn.kernels.cuda_products``): CuPy's
    ``matmul`` would first copy each operand of Eqs. (2) and (3) that ``swapaxes`` transposes.
    """

    def forward(self, a, b):
        check_floating(self, a, "first input")
        check_floating(self, b, "second input")
        if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
            raise ValueError(f"{self!r}: cannot multiply shapes {tuple(a.shape)} and {tuple(b.shape)}; "
                             "expected (..., n, k) @ (..., k, m)")
        try:
            numpy.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except ValueError:
            raise ValueError(f"{self!r}: cannot multiply shapes {tuple(a.shape)} and {tuple(b.shape)}: their "
                             f"leading (stack) dimensions {tuple(a.shape[:-2])} and {tuple(b.shape[:-2])} do not "
                             "broadcast") from None
        self.save(a, b)
        return product(a, b)  # Eq. (1)

    def backward(self, g):
        a, b = self.saved()
        grad_a, grad_b = product(g, b.swapaxes(-1, -2)), product(a.swapaxes(-1, -2), g)  # Eqs. (2), (3)
        return sum_to_shape(grad_a, a.shape), sum_to_shape(grad_b, b.shape)  # Eq. (4)


def product(a, b):
    """``a @ b``; on a GPU, for stacks that cuBLAS reads where they lie, one call with no copy."""
    if a.ndim > 2 and kernels.fused_gpu(a, b):
        out = kernels.cuda_products.batched_product(a, b)
        if out is not None:
            return out
    return a @ b


def sum_to_shape(grad, shape):
    """Sum ``grad`` over the dimensions that broadcasting added to, or stretched from 1 in, ``shape``."""
    extra = grad.ndim - len(shape)
    stretched = tuple(extra + i for i, size in enumerate(shape) if size == 1 and grad.shape[extra + i] != 1)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    if stretched:
        grad = grad.sum(axis=tuple(axis - extra for axis in stretched), keepdims=True)
    return grad
