r"""Residual connections: $y = x + f(x)$."""
from .base import CompositeLayer, Layer


class ResidualBlock(CompositeLayer):
    r"""A skip connection around any layer (usually a ``SequentialLayers``): $y = x + f(x)$.

    $$J_x y = I + J_x f, \qquad \frac{\partial L}{\partial x} = g + (J_x f)^\top g, \tag{1}$$

    so the gradient flows through unchanged and the body's input gradient is added:
    the reason deep residual networks train. The body's parameters keep their names
    (``<block>.<parameter>``).
    """

    def __init__(self, body):
        super().__init__()
        if not isinstance(body, Layer):
            raise TypeError(f"ResidualBlock: the body must be an mnn layer (a SequentialLayers of layers, say), "
                            f"got {type(body).__name__}")
        self.body = body

    def __repr__(self):
        return f"ResidualBlock({self.body!r})"

    def sublayers(self):
        return {"body": self.body}

    def named_parameters(self, prefix=""):
        return self.body.named_parameters(prefix)

    def named_buffers(self, prefix=""):
        return self.body.named_buffers(prefix)

    def forward(self, x):
        y = self.body.forward(x)
        if tuple(y.shape) != tuple(x.shape):
            raise ValueError(f"ResidualBlock: its body turns {tuple(x.shape)} into {tuple(y.shape)}; a skip "
                             "connection adds the input to the output, so the body must keep the shape")
        return x + y

    def backward(self, g):
        return g + self.body.backward(g)  # Eq. (1)
