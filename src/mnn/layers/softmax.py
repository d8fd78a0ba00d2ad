r"""Softmax and log-softmax along one axis, numerically stable."""
import numbers

from .. import backend, kernels
from .base import Layer


def log_softmax(x, axis=-1):
    r"""$x - \log\sum e^{x}$, computed after subtracting the max so nothing overflows."""
    xp = backend.array_module(x)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


def softmax(x, axis=-1):
    r"""$e^{x - m} / \sum e^{x - m}$ with $m$ the max along ``axis`` (``SoftmaxLayer``'s Eq. (1))."""
    if kernels.fused(x) and x.ndim and axis in (-1, x.ndim - 1) and x.shape[-1]:
        return kernels.cpu.softmax(x)  # the same, in three passes over each row
    xp = backend.array_module(x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


class AlongAxisLayer(Layer):
    """Shared plumbing of the two: an axis, and a forward that keeps its output."""

    def __init__(self, axis=-1):
        super().__init__()
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise ValueError(f"{type(self).__name__}: axis must be an integer, got {axis!r}")
        self.axis = int(axis)

    def config(self):
        return {"axis": self.axis}

    def forward(self, x):
        self.check_input(x, min_ndim=1)
        if not -x.ndim <= self.axis < x.ndim:
            raise ValueError(f"{self!r}: axis {self.axis} is out of range for an input of shape {tuple(x.shape)}")
        if x.shape[self.axis] == 0:
            raise ValueError(f"{self!r}: input of shape {tuple(x.shape)} has nothing along axis {self.axis} "
                             "to normalise over")
        y = self.normalize(x, self.axis)
        self.save(y)
        return y


class SoftmaxLayer(AlongAxisLayer):
    r"""Softmax, $y_i = e^{x_i} / \sum_k e^{x_k}$, along ``axis``.

    **Stability.** $y$ is unchanged when a constant is subtracted from every $x_k$, so we
    subtract $\max_k x_k$ first and no exponential overflows. (1)

    **Jacobian.** $\partial y_i / \partial x_j = y_i \delta_{ij} - y_i y_j$, that is

    $$J = \operatorname{diag}(y) - y y^\top. \tag{2}$$

    **Backward.** $J$ is symmetric, so with $g = \partial L/\partial y$

    $$\frac{\partial L}{\partial x} = J g = y \odot g - y\,(y^\top g)
      = y \odot \Big(g - \sum_k g_k y_k\Big). \tag{3}$$

    Eq. (3) costs $O(n)$ per row; the $n \times n$ Jacobian is never built.
    """

    normalize = staticmethod(softmax)  # Eq. (1)

    def backward(self, g):
        (y,) = self.saved()
        if kernels.fused(y, g) and y.dtype == g.dtype and self.axis in (-1, y.ndim - 1):
            return kernels.cpu.softmax_backward(y, g)  # Eq. (3), each row in one pass from cache
        return y * (g - (g * y).sum(axis=self.axis, keepdims=True))  # Eq. (3)


class LogSoftmaxLayer(AlongAxisLayer):
    r"""Log-softmax, $y_i = x_i - \log \sum_k e^{x_k}$, along ``axis``.

    **Stability.** With $m = \max_k x_k$, $y_i = (x_i - m) - \log\sum_k e^{x_k - m}$. (1)

    **Jacobian.** $\partial \log\sum_k e^{x_k} / \partial x_j = e^{x_j}/\sum_k e^{x_k} = p_j$,
    the softmax, so

    $$\frac{\partial y_i}{\partial x_j} = \delta_{ij} - p_j, \qquad J = I - \mathbf{1} p^\top. \tag{2}$$

    **Backward.**

    $$\frac{\partial L}{\partial x} = J^\top g = g - p \sum_i g_i, \qquad p = e^{y}. \tag{3}$$
    """

    normalize = staticmethod(log_softmax)  # Eq. (1)

    def backward(self, g):
        (y,) = self.saved()
        xp = backend.array_module(y)
        return g - xp.exp(y) * g.sum(axis=self.axis, keepdims=True)  # Eq. (3)
