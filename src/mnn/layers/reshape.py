r"""Layers that move entries around without changing them."""
import math

from .. import backend
from .base import Layer


class FlattenLayer(Layer):
    r"""Flatten every dimension after the batch: $(B, d_1, \dots, d_k) \to (B, d_1 \cdots d_k)$.

    A reshape is a permutation-free relabelling of entries, so its Jacobian is the
    identity up to that relabelling, and the gradient is reshaped back:

    $$\frac{\partial L}{\partial x} = \operatorname{reshape}\Big(\frac{\partial L}{\partial y},\ \text{shape of } x\Big). \tag{1}$$

    The gradient is written in the input's memory layout (channels-last images stay
    channels-last), so the layers below it never mix layouts.
    """

    def forward(self, x):
        self.check_input(x, min_ndim=2)
        self.save(x)
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))  # not -1, which an empty batch leaves undefined

    def backward(self, g):
        (x,) = self.saved()
        grad = backend.array_module(g).empty_like(x)
        grad[...] = g.reshape(x.shape)  # Eq. (1)
        return grad
