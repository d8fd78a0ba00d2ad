r"""Inverted dropout, with masks drawn by a counter-based generator."""
import math

from .. import backend, kernels
from ..optim import is_finite_number
from .base import Layer

GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment: 2^64 / golden ratio, made odd
MIX_MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)  # its output function's


class DropoutLayer(Layer):
    r"""Inverted dropout with drop probability $p$; the identity in eval mode.

    In training each entry is kept with probability $1 - p$ and scaled so the
    expectation is unchanged: with $m_i \sim \text{Bernoulli}(1 - p)$,

    $$y_i = \frac{m_i}{1 - p}\, x_i. \tag{1}$$

    The mask is fixed during the step, so $J = \operatorname{diag}(m / (1-p))$ and

    $$\frac{\partial L}{\partial x} = g \odot \frac{m}{1 - p}. \tag{2}$$

    **The mask, element by element.** Each forward pass draws one 64-bit key $k$ from
    mnn's generator (whose state checkpoints carry). The mask of the element at C-order
    position $i = 0, 1, \dots$ of $x$ is then a function of $k$ and $i$ alone:

    $$m_i = \big[\, \lfloor z_i / 2^{32} \rfloor < \lfloor (1 - p)\, 2^{32} \rfloor \,\big], \tag{3}$$

    $$z_i = \operatorname{mix}\big(k + (i + 1)\,\gamma \bmod 2^{64}\big), \qquad
      \gamma = \texttt{0x9E3779B97F4A7C15}, \tag{4}$$

    where $\operatorname{mix}$ is the output function of SplitMix64 (Steele, Lea and Flood,
    2014): twice an xor with a right shift and a multiplication by an odd constant, then
    one more xor-shift. $z_0, z_1, \dots$ are SplitMix64's stream started from state $k$, a
    generator that passes the BigCrush tests; the top 32 bits of each are uniform on
    $[0, 2^{32})$, so $P(m_i = 1)$ is $1 - p$ to within $2^{-32}$.

    Nothing is drawn in sequence, so each element's mask can be computed alone, by any
    thread, in any order: the same masks come from the NumPy lines, the CPU kernel and
    the GPU kernel, and on a GPU they are drawn there, with nothing copied from the host.
    """

    def __init__(self, p=0.5):
        super().__init__()
        if not (is_finite_number(p) and 0 <= p < 1):
            raise ValueError(f"DropoutLayer: p must lie in [0, 1), got {p!r}")
        self.p = float(p)

    def config(self):
        return {"p": self.p}

    def forward(self, x):
        self.check_input(x)
        if not self.training or self.p == 0:
            self.save(None, x.dtype)
            return x
        key, threshold = backend.random_key(), keep_threshold(1 - self.p)
        if kernels.fused(x):  # Eqs. (3), (4), (1) in one pass
            y, scaled_mask = kernels.cpu.dropout(x, key, threshold, x.dtype.type(1 / (1 - self.p)))
        elif kernels.fused_gpu(x):
            y, scaled_mask = kernels.cuda.dropout(x, key, threshold, x.dtype.type(1 / (1 - self.p)))
        else:  # in float32 at least: float16's 1 / (1 - p) overflows from p = 0.99998 on, and 0 * inf is NaN
            xp = backend.array_module(x)
            wide = xp.dtype(xp.promote_types(x.dtype, xp.float32)).type
            scaled_mask = keep_mask(key, threshold, x.shape, xp) * wide(1 / (1 - self.p))  # m / (1 - p)
            y = (x * scaled_mask).astype(x.dtype, copy=False)  # Eq. (1)
        self.save(scaled_mask, x.dtype)
        return y

    def backward(self, g):
        scaled_mask, dtype = self.saved()
        if scaled_mask is None:
            return g
        xp = backend.array_module(g)
        return (g * scaled_mask).astype(xp.result_type(g, dtype), copy=False)  # Eq. (2)


def keep_threshold(keep):
    r"""$\lfloor (1 - p)\, 2^{32} \rfloor$ of Eq. (3), for ``keep`` $= 1 - p$."""
    return math.floor(keep * 2**32)


def keep_mask(key, threshold, shape, xp):
    """Eqs. (3), (4): the boolean mask for ``key``, in module ``xp``; unsigned arithmetic wraps mod 2^64."""
    z = xp.arange(1, math.prod(shape) + 1, dtype=xp.uint64) * xp.uint64(GOLDEN_GAMMA) + xp.uint64(key)  # Eq. (4)
    z = (z ^ (z >> xp.uint64(30))) * xp.uint64(MIX_MULTIPLIERS[0])
    z = (z ^ (z >> xp.uint64(27))) * xp.uint64(MIX_MULTIPLIERS[1])
    z ^= z >> xp.uint64(31)
    return ((z >> xp.uint64(32)) < xp.uint64(threshold)).reshape(shape)  # Eq. (3)
