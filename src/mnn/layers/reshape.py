r"""Layers that move entries around without changing them."""
from .base import Layer


class FlattenLayer(Layer):
    r"""Flatten every dimension after the batch: $(B, d_1, \dots, d_k) \to (B, d_1 \cdots d_k)$.

    A reshape is a permutation-free relabelling of entries, so its Jacobian is the
    identity up to that relabelling, and the gradient is reshaped back:

    $$\frac{\partial L}{\partial x} = \operatorname{reshape}\Big(\frac{\partial L}{\partial y},\ \text{shape of } x\Big). \tag{1}$$
    """

    def forward(self, x):
        self.check_input(x, min_ndim=2)
        self.save(x.shape)
        return x.reshape(x.shape[0], -1)

    def backward(self, g):
        (shape,) = self.saved()
        return g.reshape(shape)  # Eq. (1)
