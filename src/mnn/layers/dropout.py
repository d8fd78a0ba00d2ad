r"""Inverted dropout."""
from .. import backend
from .base import Layer


class DropoutLayer(Layer):
    r"""Inverted dropout with drop probability $p$; the identity in eval mode.

    In training each entry is kept with probability $1 - p$ and scaled so the
    expectation is unchanged: with $m_i \sim \text{Bernoulli}(1 - p)$,

    $$y_i = \frac{m_i}{1 - p}\, x_i. \tag{1}$$

    The mask is fixed during the step, so $J = \operatorname{diag}(m / (1-p))$ and

    $$\frac{\partial L}{\partial x} = g \odot \frac{m}{1 - p}. \tag{2}$$
    """

    def __init__(self, p=0.5):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"DropoutLayer: p must lie in [0, 1), got {p!r}")
        self.p = p

    def config(self):
        return {"p": self.p}

    def forward(self, x):
        self.check_input(x)
        if not self.training or self.p == 0:
            self.save(None)
            return x
        scale = backend.random_mask(x.shape, 1 - self.p, x) * x.dtype.type(1 / (1 - self.p))
        self.save(scale)
        return x * scale  # Eq. (1)

    def backward(self, g):
        (scale,) = self.saved()
        return g if scale is None else g * scale  # Eq. (2)
