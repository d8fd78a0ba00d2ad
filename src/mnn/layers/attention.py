r"""Multi-head self-attention, as in GPT-2: fused QKV projection, scaled dot products, causal mask."""
import math

from .. import backend, kernels
from ..optim import is_finite_number
from .base import CompositeLayer, check_flag, check_size
from .dropout import DropoutLayer, keep_threshold
from .linear import LinearLayer, MatrixProduct
from .softmax import SoftmaxLayer


class MultiHeadAttention(CompositeLayer):
    r"""Causal multi-head self-attention over sequences $(B, T, C)$ with $h$ heads of width $d = C/h$.

    **Function.** One fused projection gives queries, keys and values, split into heads:

    $$[Q \mid K \mid V] = X W_{qkv}^\top + b_{qkv}. \tag{1}$$

    Per head, with the causal mask $M_{ts} = 0$ for $s \le t$ and $-\infty$ for $s > t$
    (a position sees only itself and the past):

    $$S = \frac{Q K^\top}{\sqrt d} + M, \qquad A = \operatorname{softmax}_{\text{rows}}(S), \qquad O = A V, \tag{2}$$

    and the heads, concatenated back to width $C$, are projected: $Y = O W_o^\top + b_o$. (3)

    **Backward**, from $G = \partial L/\partial Y$, each step one of the layers already derived:

    $$\frac{\partial L}{\partial O} = G W_o \quad (\texttt{LinearLayer}, \text{which also accumulates } W_o, b_o), \tag{4}$$

    $$\frac{\partial L}{\partial A} = \frac{\partial L}{\partial O} V^\top, \qquad
      \frac{\partial L}{\partial V} = A^\top \frac{\partial L}{\partial O} \quad (\texttt{MatrixProduct}), \tag{5}$$

    $$\frac{\partial L}{\partial S} = A \odot \Big(\frac{\partial L}{\partial A} -
      \textstyle\sum_s \frac{\partial L}{\partial A} \odot A\Big) \quad (\texttt{SoftmaxLayer}), \tag{6}$$

    $$\frac{\partial L}{\partial Q} = \frac{1}{\sqrt d} \frac{\partial L}{\partial S} K, \qquad
      \frac{\partial L}{\partial K} = \frac{1}{\sqrt d} \Big(\frac{\partial L}{\partial S}\Big)^\top Q
      \quad (\texttt{MatrixProduct}), \tag{7}$$

    then $\partial L/\partial X$ from Eq. (1) through the QKV ``LinearLayer``. The mask is a
    constant added to $S$ (the code writes $-\infty$ in, since a score that overflowed to $+\infty$
    plus $-\infty$ would be NaN): masked entries have $A = 0$, so Eq. (6) gives them zero
    gradient with no special case. All heads and the whole batch go through each step as
    one stacked product of shape $(B, h, T, \cdot)$. On a GPU (``mnn.kernels.cuda``) the scale,
    the mask and the softmax of Eq. (2) are one launch, reading $QK^\top$ once and writing
    $A$ once, and Eq. (6) with the scale of Eq. (7) another. There $Q$, $K$ and $V$ are copied
    out of the projection once, each into a stack of contiguous heads, and so is
    $\partial L/\partial O$: cuBLAS then reads every operand of Eqs. (2), (5) and (7) in place,
    transposed or not (``MatrixProduct``), where CuPy's ``matmul`` would first copy each operand
    that is not C-contiguous (nine copies a layer and step).

    **Attention dropout** (``dropout`` $= p > 0$, as nanoGPT's): in training Eq. (2) mixes the
    values with a dropped-out copy of the weights, $O = \tilde A V$ with
    $\tilde A = A \odot m / (1 - p)$ (``DropoutLayer``'s Eq. (1)), so Eq. (5) gives
    $\partial L/\partial \tilde A$, and ``DropoutLayer``'s Eq. (2) turns it into the
    $\partial L/\partial A = \partial L/\partial \tilde A \odot m / (1 - p)$ that Eq. (6) takes.

    **Flash attention** (on a GPU, with ``kernels.use_attention("flash")`` or ``MNN_ATTENTION=flash``;
    ``mnn.kernels.cuda_attention``). The same function and gradients without ever storing $S$, $A$
    or their gradients, $O(BhT)$ memory where the lines above take $O(BhT^2)$. Write $Z_{ts}$ for
    the dropout factor $m_{ts}/(1 - p)$ (1 without dropout), so $\tilde A = A \odot Z$. Query row $t$
    takes the keys a tile at a time. With

    $$S_{ts} = \frac{q_t \cdot k_s}{\sqrt d} \quad (s \text{ visible to } t), \tag{8}$$

    it keeps the largest score so far $m$, the sum $l = \sum_s e^{S_{ts} - m}$ and the row
    $o = \sum_s e^{S_{ts} - m} Z_{ts} v_s$, and a tile $J$ updates them to its new maximum:

    $$m' = \max\big(m, \max_{s \in J} S_{ts}\big), \quad \alpha = e^{m - m'}, \quad
      l' = \alpha l + \sum_{s \in J} e^{S_{ts} - m'}, \quad
      o' = \alpha o + \sum_{s \in J} e^{S_{ts} - m'} Z_{ts} v_s. \tag{9}$$

    Every term carries the same $e^{-m}$, so after the last tile $o / l = \sum_s A_{ts} Z_{ts} v_s$,
    Eq. (2)'s $O_t$. The row's log-sum-exp is kept, $T$ numbers per head rather than $T^2$:

    $$L_t = m + \log l, \qquad A_{ts} = e^{S_{ts} - L_t}, \tag{10}$$

    so the backward pass recomputes any weight from $q_t$, $k_s$ and $L_t$ alone. Eq. (6)'s row
    sum needs no row of $A$ either: $\partial L/\partial A_{ts} = Z_{ts}\, (\partial L/\partial O_t) \cdot v_s$
    (Eq. (5), then dropout's Eq. (2)), so

    $$D_t = \sum_s \frac{\partial L}{\partial A_{ts}} A_{ts}
      = \frac{\partial L}{\partial O_t} \cdot \sum_s A_{ts} Z_{ts} v_s
      = \frac{\partial L}{\partial O_t} \cdot O_t, \tag{11}$$

    one dot product of width $d$. Eqs. (5)-(7), entry by entry:

    $$\frac{\partial L}{\partial S_{ts}} = A_{ts}\Big(Z_{ts}\, \frac{\partial L}{\partial O_t} \cdot v_s - D_t\Big),
      \quad \frac{\partial L}{\partial q_t} = \frac{1}{\sqrt d} \sum_s \frac{\partial L}{\partial S_{ts}} k_s,
      \quad \frac{\partial L}{\partial k_s} = \frac{1}{\sqrt d} \sum_t \frac{\partial L}{\partial S_{ts}} q_t,
      \quad \frac{\partial L}{\partial v_s} = \sum_t A_{ts} Z_{ts} \frac{\partial L}{\partial O_t}. \tag{12}$$

    **What the backward recomputes.** $S_{ts}$ (Eq. (8)), $A_{ts}$ (Eq. (10)), the mask $Z_{ts}$
    (from the forward's key and the entry's index, ``DropoutLayer``'s Eqs. (3)-(4)) and
    $(\partial L/\partial O_t) \cdot v_s$, twice: once in the pass over queries, which sums over $s$
    for $\partial L/\partial q_t$ (and first forms $D_t$), once in the pass over keys, which sums over $t$
    for $\partial L/\partial k_s$ and $\partial L/\partial v_s$. Each sum stays in one thread, so no two
    threads add into one entry. The backward then does seven products of $T \times T \times d$ per
    head where the lines above do four: arithmetic traded for the memory traffic of $S$ and $A$.
    """

    def __init__(self, dim, heads, causal=True, bias=True, dropout=0.0):
        super().__init__()
        check_size("MultiHeadAttention", "dim", dim)
        check_size("MultiHeadAttention", "heads", heads)
        if dim % heads:
            raise ValueError(f"MultiHeadAttention: width {dim} is not divisible by {heads} heads")
        self.dim, self.heads = dim, heads
        self.causal = check_flag("MultiHeadAttention", "causal", causal)
        self.bias = check_flag("MultiHeadAttention", "bias", bias)
        self.qkv, self.proj = LinearLayer(dim, 3 * dim, bias), LinearLayer(dim, dim, bias)
        self.scores, self.softmax, self.mix = MatrixProduct(), SoftmaxLayer(), MatrixProduct()
        if not (is_finite_number(dropout) and 0 <= dropout < 1):
            raise ValueError(f"MultiHeadAttention: dropout must lie in [0, 1), got {dropout!r}")
        self.dropout = DropoutLayer(dropout) if dropout else None

    def config(self):
        return {"dim": self.dim, "heads": self.heads, "causal": self.causal, "bias": self.bias,
                "dropout": self.dropout.p if self.dropout else 0.0}

    def sublayers(self):
        dropout = {"dropout": self.dropout} if self.dropout else {}
        return {"qkv": self.qkv, "scores": self.scores, "softmax": self.softmax, **dropout, "mix": self.mix,
                "proj": self.proj}

    def split_heads(self, x):
        """(B, T, C) -> (B, h, T, d)."""
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.heads, -1).transpose(0, 2, 1, 3)

    def split_qkv(self, qkv):
        """(B, T, 3C) -> Q, K, V, each (B, h, T, d): views, or on a GPU contiguous stacks of heads made by one
        copy (in the projection's output one part's B h matrices are not evenly spaced, as cuBLAS needs)."""
        batch, length, _ = qkv.shape
        parts = qkv.reshape(batch, length, 3, self.heads, -1).transpose(2, 0, 3, 1, 4)
        if kernels.fused_gpu(qkv):
            parts = backend.array_module(qkv).ascontiguousarray(parts)
        return parts[0], parts[1], parts[2]

    def merge_qkv(self, d_q, d_k, d_v):
        """Q's, K's and V's gradients, each (B, h, T, d), written into one (B, T, 3C) array."""
        xp = backend.array_module(d_q)
        batch, _, length, _ = d_q.shape
        d_qkv = xp.empty((batch, length, 3 * self.dim), dtype=xp.result_type(d_q, d_k, d_v))
        parts = d_qkv.reshape(batch, length, 3, self.heads, -1).transpose(2, 0, 3, 1, 4)
        parts[0], parts[1], parts[2] = d_q, d_k, d_v
        return d_qkv

    def merge_heads(self, x):
        """(B, h, T, d) -> (B, T, C)."""
        batch, _, length, _ = x.shape
        return x.transpose(0, 2, 1, 3).reshape(batch, length, self.dim)

    def forward(self, x):
        self.check_input(x, ndim=3, last_dim=self.dim)
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{self!r}: input of shape {tuple(x.shape)}; expected at least one sample and one "
                             f"position, (batch, time, {self.dim})")
        xp = backend.array_module(x)
        qkv = self.qkv.forward(x)  # Eq. (1)
        scale = 1 / math.sqrt(self.dim // self.heads)
        if self.flash_applies(qkv):
            return self.proj.forward(self.flash_forward(xp.ascontiguousarray(qkv), scale))  # Eqs. (8)-(10), (3)
        q, k, v = self.split_qkv(qkv)
        s = self.scores.forward(q, k.swapaxes(-1, -2))  # Eq. (2), scaled below: q k^T keeps views of qkv
        if kernels.fused_gpu(s):  # Eq. (2)'s scale, mask and softmax in one launch
            a = kernels.cuda.scaled_softmax(s, scale, self.causal)
            self.softmax.save(a)  # what SoftmaxLayer's forward keeps for its backward
        else:
            s *= scale
            if self.causal:  # M of Eq. (2), written rather than added: a score overflowed to +inf plus -inf is NaN
                length = x.shape[1]
                future = xp.triu(xp.ones((length, length), dtype=bool), k=1)
                xp.copyto(s, -xp.inf, where=future)  # s[..., future] = -inf, 16x faster than NumPy's boolean index
            a = self.softmax.forward(s)
        if self.dropout:
            a = self.dropout.forward(a)  # the identity in eval mode
        self.save(scale, None)
        return self.proj.forward(self.merge_heads(self.mix.forward(a, v)))  # Eqs. (2), (3)

    def flash_applies(self, qkv):
        return kernels.attention() == "flash" and kernels.fused_gpu(qkv) and \
            kernels.cuda_attention.flash_supported(qkv, self.heads)

    def flash_forward(self, qkv, scale):
        """O in the (B, T, C) layout, by Eqs. (8)-(10) in one launch; keeps what Eqs. (11)-(12) need."""
        dropout = None
        if self.dropout and self.dropout.training:  # the key DropoutLayer would draw, for the same masks
            keep = 1 - self.dropout.p
            dropout = (backend.random_key(), keep_threshold(keep), qkv.dtype.type(1 / keep))
        out, logsumexp = kernels.cuda_attention.flash_attention(qkv, self.heads, scale, self.causal, dropout)
        self.save(scale, (qkv, out, logsumexp, dropout))
        return out

    def backward(self, g):
        scale, flash = self.saved()
        if flash:
            qkv, out, logsumexp, dropout = flash
            d_o = self.proj.backward(g).astype(qkv.dtype, copy=False)  # Eq. (4)
            d_qkv = kernels.cuda_attention.flash_attention_backward(qkv, out, d_o, logsumexp, self.heads, scale,
                                                                     self.causal, dropout)  # Eqs. (11)-(12)
            return self.qkv.backward(d_qkv)
        d_o = self.split_heads(self.proj.backward(g))  # Eq. (4)
        if kernels.fused_gpu(d_o):  # read twice below: one copy into a contiguous stack rather than two
            d_o = backend.array_module(d_o).ascontiguousarray(d_o)
        d_a, d_v = self.mix.backward(d_o)  # Eq. (5)
        if self.dropout:
            d_a = self.dropout.backward(d_a)  # DropoutLayer's Eq. (2)
        (a,) = self.softmax.saved()
        if kernels.fused_gpu(a, d_a) and a.dtype == d_a.dtype:  # Eq. (6) and Eq. (7)'s scale in one launch
            d_s = kernels.cuda.scaled_softmax_backward(a, d_a, scale)
        else:
            d_s = self.softmax.backward(d_a) * scale  # Eq. (6), and the scale of Eq. (7)
        d_q, d_k_t = self.scores.backward(d_s)  # Eq. (7)
        return self.qkv.backward(self.merge_qkv(d_q, d_k_t.swapaxes(-1, -2), d_v))  # through Eq. (1)
