r"""Two-dimensional convolution by im2col and one GEMM."""
import math

from .. import backend
from .base import Layer
from .windows import channels_first, channels_last, fold, pad_channels_last, windows


class Conv2dLayer(Layer):
    r"""2-D convolution (cross-correlation, as in PyTorch) over $(B, C, H, W)$ inputs.

    **Function.** With weights $W$ of shape $(O, C, k_h, k_w)$ (``w``), bias $b$ (``b``),
    stride $s$ and the input zero-padded by $P$ on each side into $\tilde x$:

    $$y_{b,o,i,j} = b_o + \sum_{c,p,q} W_{o,c,p,q}\, \tilde x_{b,c,\,s i + p,\, s j + q}. \tag{1}$$

    **Gradients.** Each weight multiplies one input pixel per output position, so

    $$\frac{\partial L}{\partial W_{o,c,p,q}} = \sum_{b,i,j} g_{b,o,i,j}\, \tilde x_{b,c,\,si+p,\,sj+q}, \qquad
      \frac{\partial L}{\partial b_o} = \sum_{b,i,j} g_{b,o,i,j}, \tag{2}$$

    and each padded input pixel receives from every output whose window covers it:

    $$\frac{\partial L}{\partial \tilde x_{b,c,u,v}} = \sum_{o}\ \sum_{\substack{i,p:\ si+p=u \\ j,q:\ sj+q=v}}
      g_{b,o,i,j}\, W_{o,c,p,q}. \tag{3}$$

    For $s = 1$, Eq. (3) is the full correlation of $g$ with the kernel flipped in both
    axes; $\partial L / \partial x$ is the centre of $\partial L/\partial \tilde x$ (padding removed).

    **As matrices (im2col).** Lay the windows out as rows,
    $X_{\text{col}}[(b,i,j),\,(p,q,c)] = \tilde x_{b,c,si+p,sj+q}$, flatten $W$ to
    $W_{\text{col}}[o, (p,q,c)] = W_{o,c,p,q}$ and $g$ to $G_{\text{col}}[(b,i,j), o]$. Then

    $$Y_{\text{col}} = X_{\text{col}} W_{\text{col}}^\top + b, \tag{4}$$
    $$\frac{\partial L}{\partial W_{\text{col}}} \mathrel{+}= G_{\text{col}}^\top X_{\text{col}}, \qquad
      \frac{\partial L}{\partial b} \mathrel{+}= \textstyle\sum_{\text{rows}} G_{\text{col}}, \tag{5}$$
    $$\frac{\partial L}{\partial X_{\text{col}}} = G_{\text{col}} W_{\text{col}}, \tag{6}$$

    and ``fold`` (col2im) adds each row of Eq. (6) back onto the pixels of its window,
    which is exactly the sum in Eq. (3). One GEMM each for Eqs. (4), (5), (6).

    The columns run over $(p, q, c)$ and the images are channels-last in memory (see
    ``windows``), so im2col copies contiguous runs of $k_w C$ values; the GEMM writes
    $Y_{\text{col}}$ as a $(B, H_o, W_o, O)$ array, returned as a $(B, O, H_o, W_o)$ view.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.bias = (kh, kw), stride, padding, bias
        bound = 1 / math.sqrt(in_channels * kh * kw)  # PyTorch's default initialisation
        self.add_param("w", backend.uniform(-bound, bound, (out_channels, in_channels, kh, kw)))
        if bias:
            self.add_param("b", backend.uniform(-bound, bound, (out_channels,)))

    def config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": self.stride, "padding": self.padding,
                "bias": self.bias}

    def check_shape(self, x):
        self.check_input(x, ndim=4)
        (kh, kw), pad = self.kernel_size, self.padding
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{self!r}: input of shape {tuple(x.shape)} has {x.shape[1]} channels; "
                             f"expected {self.in_channels}")
        if x.shape[2] + 2 * pad < kh or x.shape[3] + 2 * pad < kw:
            raise ValueError(f"{self!r}: kernel {kh}x{kw} is larger than the padded input "
                             f"{x.shape[2] + 2 * pad}x{x.shape[3] + 2 * pad} (input shape {tuple(x.shape)})")

    def weight_cols(self):
        """$W_{\text{col}}$: (O, C, kh, kw) -> (O, kh*kw*C), columns ordered like im2col's."""
        return self.params["w"].transpose(0, 2, 3, 1).reshape(self.out_channels, -1)

    def forward(self, x):
        self.check_shape(x)
        (kh, kw), pad = self.kernel_size, self.padding
        padded = pad_channels_last(x, pad) if pad else channels_last(x)
        view = windows(padded, kh, kw, self.stride)  # (B, Ho, Wo, kh, kw, C)
        batch, out_h, out_w = view.shape[:3]
        cols = view.reshape(batch * out_h * out_w, -1)  # X_col: the one copy (im2col)
        y = cols @ self.weight_cols().T  # Eq. (4)
        if self.bias:
            y += self.params["b"]
        self.save(cols, padded.shape, x.shape)
        return channels_first(y.reshape(batch, out_h, out_w, self.out_channels))

    def backward(self, g):
        cols, padded_shape, input_shape = self.saved()
        batch, _, out_h, out_w = g.shape
        g_col = channels_last(g).reshape(-1, self.out_channels)  # G_col; free when g is channels-last
        (kh, kw), cin = self.kernel_size, self.in_channels
        self.grads["w"] += (g_col.T @ cols).reshape(self.out_channels, kh, kw, cin).transpose(0, 3, 1, 2)  # Eq. (5)
        if self.bias:
            self.grads["b"] += g_col.sum(axis=0)  # Eq. (5)
        d_cols = g_col @ self.weight_cols()  # Eq. (6)
        d_padded = fold(d_cols.reshape(batch, out_h, out_w, kh, kw, cin), padded_shape, self.stride)  # Eq. (3)
        pad = self.padding
        return channels_first(d_padded[:, pad:pad + input_shape[2], pad:pad + input_shape[3]])
