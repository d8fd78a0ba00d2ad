r"""Element-wise activations.

Every layer here applies a scalar function to each entry, $y_i = f(x_i)$, so its
Jacobian is diagonal, $J = \operatorname{diag}(f'(x))$, and the vector-Jacobian
product needs no matrix at all:

$$\frac{\partial L}{\partial x} = J^\top g = g \odot f'(x). \tag{0}$$

Each class derives its own $f'$, preferably in terms of the output it saved.
"""
import math

from .. import backend, kernels
from .base import Layer


class ElementwiseLayer(Layer):
    """Shared checks for the element-wise activations."""

    def forward(self, x):
        self.check_input(x)
        return self.apply(x)


class ReluLayer(ElementwiseLayer):
    r"""Rectified linear unit, $y = \max(x, 0)$.

    $$f'(x) = \mathbb{1}[x > 0], \tag{1}$$

    $$\frac{\partial L}{\partial x} = g \odot \mathbb{1}[y > 0]. \tag{2}$$

    (At $x = 0$ we take the subgradient 0, as PyTorch does.) The code writes Eq. (2) as
    "0 where $y \le 0$, else $g$", as PyTorch does too: a product with the indicator would turn
    an infinite $g$ at a unit that is off into $\infty \cdot 0 = \text{NaN}$, and where $x$ is NaN
    the gradient passes.
    """

    def apply(self, x):
        xp = backend.array_module(x)
        y = xp.maximum(x, 0, out=xp.empty_like(x))  # in x's memory layout (CuPy's own output would be C-ordered)
        self.save(y)
        return y

    def backward(self, g):
        (y,) = self.saved()
        if kernels.fused_gpu(g, y) and g.dtype == y.dtype:
            return kernels.cuda.relu_backward(g, y)  # Eq. (2) in one launch
        if kernels.fused(g, y):
            return kernels.cpu.relu_backward(g, y)  # Eq. (2) in one pass
        return backend.array_module(y).where(y <= 0, 0, g)  # Eq. (2)


class SigmoidLayer(ElementwiseLayer):
    r"""Logistic sigmoid, $y = \sigma(x) = 1 / (1 + e^{-x})$.

    Computed with $z = e^{-|x|} \in (0, 1]$, which never overflows:

    $$\sigma(x) = \frac{1}{1 + z} \ (x \ge 0), \qquad \sigma(x) = \frac{z}{1 + z} \ (x < 0). \tag{1}$$

    For very negative $x$ the second form keeps every significant digit of the tiny
    result, where $1 - \sigma(-x)$ or $\tfrac12(1 + \tanh(x/2))$ would round to 0.
    Differentiating $y (1 + e^{-x}) = 1$ gives

    $$f'(x) = \sigma(x)\,(1 - \sigma(x)) = y (1 - y), \tag{2}$$

    $$\frac{\partial L}{\partial x} = g \odot y \odot (1 - y). \tag{3}$$
    """

    def apply(self, x):
        xp = backend.array_module(x)
        z = xp.exp(-xp.abs(x))
        y = xp.where(x >= 0, 1, z) / (1 + z)  # Eq. (1)
        self.save(y)
        return y

    def backward(self, g):
        (y,) = self.saved()
        return g * y * (1 - y)  # Eq. (3)


class TanhLayer(ElementwiseLayer):
    r"""Hyperbolic tangent, $y = \tanh x$.

    $$f'(x) = 1 - \tanh^2 x = 1 - y^2, \tag{1}$$

    $$\frac{\partial L}{\partial x} = g \odot (1 - y^2). \tag{2}$$
    """

    def apply(self, x):
        y = backend.array_module(x).tanh(x)
        self.save(y)
        return y

    def backward(self, g):
        (y,) = self.saved()
        return g * (1 - y * y)  # Eq. (2)


class GeluLayer(ElementwiseLayer):
    r"""GELU in the tanh approximation used by GPT-2.

    With $c = \sqrt{2/\pi}$, $u(x) = c\,(x + 0.044715\,x^3)$ and $t = \tanh u$:

    $$y = \tfrac12\, x\, (1 + t). \tag{1}$$

    By the product rule and $\tanh' = 1 - \tanh^2$:

    $$f'(x) = \tfrac12 (1 + t) + \tfrac12\, x\, (1 - t^2)\, c\,(1 + 3 \cdot 0.044715\, x^2), \tag{2}$$

    $$\frac{\partial L}{\partial x} = g \odot f'(x). \tag{3}$$

    This matches ``torch.nn.GELU(approximate="tanh")``. Backward computes $t$ again from $x$
    (a tanh costs less than keeping another tensor the size of the output; PyTorch, too, keeps
    only $x$).
    The fused CPU kernels (``mnn.kernels.cpu``) compute $t$ in two passes around NumPy's tanh,
    and Eq. (1) and Eqs. (2)-(3) in one pass each; on a GPU (``mnn.kernels.cuda``) the forward
    and the backward are one launch each.
    """

    C = math.sqrt(2 / math.pi)
    K = 0.044715

    def apply(self, x):
        self.save(x)
        if kernels.fused_gpu(x):
            return kernels.cuda.gelu(x, self.C, self.K)  # Eq. (1), t computed inside
        t = self.tanh_argument(x)
        if kernels.fused(x):
            return kernels.cpu.gelu(x, t)  # Eq. (1)
        return 0.5 * x * (1 + t)  # Eq. (1)

    def tanh_argument(self, x):
        """$t = \tanh u(x)$."""
        if kernels.fused(x):
            return kernels.cpu.gelu_tanh(x, self.C, self.K)
        return backend.array_module(x).tanh(self.C * (x + self.K * x * x * x))

    def backward(self, g):
        (x,) = self.saved()
        if kernels.fused_gpu(g, x) and g.dtype == x.dtype:
            return kernels.cuda.gelu_backward(g, x, self.C, self.K)  # Eqs. (2)-(3)
        dtype = backend.array_module(x).result_type(g, x)
        # float16: 3K x^2 overflows past |x| = 256, and inf * (1 - t^2) = NaN; so Eq. (2) runs in float32, as PyTorch's
        x = backend.at_least_float32(x)
        t = self.tanh_argument(x)
        if kernels.fused(g, x):
            return kernels.cpu.gelu_backward(g, x, t, self.C, self.K)  # Eqs. (2)-(3)
        slope = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * self.C * (1 + 3 * self.K * x * x)  # Eq. (2)
        return (g * slope).astype(dtype, copy=False)  # Eq. (3)
