r"""Two-dimensional convolution by im2col and one GEMM per product."""
import math
import numbers

from .. import backend, kernels
from .base import Layer, check_flag, check_size
from .sums import add_column_sums, add_product, column_sums
from .windows import channels_first, channels_last, output_size, pad_channels_last, windows

CHUNK_BYTES = 4 << 20  # fused path: im2col rows made and multiplied at a time (a few MiB, in cache)


def im2col(x, kh, kw, stride):
    """Rows of windows: (B, H, W, C) -> (B*Ho*Wo, kh*kw*C), plus (B, Ho, Wo). The one copy."""
    view = windows(x, kh, kw, stride)
    batch, out_h, out_w = view.shape[:3]
    width = kh * kw * x.shape[3]  # written out: NumPy cannot infer a -1 for an empty batch
    return view.reshape(batch * out_h * out_w, width), (batch, out_h, out_w)


def kernel_pair(kernel_size):
    """(kh, kw) from a kernel size given as one integer or as a pair (height, width)."""
    if isinstance(kernel_size, numbers.Integral):
        return kernel_size, kernel_size
    if isinstance(kernel_size, (tuple, list)) and len(kernel_size) == 2:
        return tuple(kernel_size)
    raise ValueError(f"Conv2dLayer: kernel_size must be an integer or a pair (height, width) of integers, "
                     f"got {kernel_size!r}")


class Conv2dLayer(Layer):
    r"""2-D convolution (cross-correlation, as in PyTorch) over $(B, C, H, W)$ inputs.

    **Function.** With weights $W$ of shape $(O, C, k_h, k_w)$ (``w``), bias $b$ (``b``),
    stride $s$ and the input zero-padded by $P$ on each side into $\tilde x$:

    $$y_{b,o,i,j} = b_o + \sum_{c,p,q} W_{o,c,p,q}\, \tilde x_{b,c,\,s i + p,\, s j + q}. \tag{1}$$

    **Parameter gradients.** Each weight multiplies one input pixel per output position:

    $$\frac{\partial L}{\partial W_{o,c,p,q}} = \sum_{b,i,j} g_{b,o,i,j}\, \tilde x_{b,c,\,si+p,\,sj+q}, \qquad
      \frac{\partial L}{\partial b_o} = \sum_{b,i,j} g_{b,o,i,j}. \tag{2}$$

    **Input gradient.** Each padded pixel receives from every output whose window covers it:

    $$\frac{\partial L}{\partial \tilde x_{b,c,u,v}} = \sum_{o}\ \sum_{\substack{i,p:\ si+p=u \\ j,q:\ sj+q=v}}
      g_{b,o,i,j}\, W_{o,c,p,q}. \tag{3}$$

    (For $s = 1$ this is the full correlation of $g$ with the kernel flipped in both axes.)
    $\partial L/\partial x$ is $\partial L/\partial \tilde x$ with the padding cut off. Grouping
    Eq. (3) by kernel offset $(p, q)$: every output $(i, j)$ sends $\sum_o g_{b,o,i,j} W_{o,c,p,q}$
    to pixel $(si + p, sj + q)$, a GEMM per offset added onto a strided slice.

    **As matrices (im2col).** Lay the windows out as rows,
    $X_{\text{col}}[(b,i,j),\,(p,q,c)] = \tilde x_{b,c,si+p,sj+q}$, flatten $W$ to
    $W_{\text{col}}[o, (p,q,c)] = W_{o,c,p,q}$ and $g$ to $G_{\text{col}}[(b,i,j), o]$. Then

    $$Y_{\text{col}} = X_{\text{col}} W_{\text{col}}^\top + b, \tag{4}$$

    $$\frac{\partial L}{\partial W_{\text{col}}} \mathrel{+}= G_{\text{col}}^\top X_{\text{col}}, \qquad
      \frac{\partial L}{\partial b} \mathrel{+}= \textstyle\sum_{\text{rows}} G_{\text{col}}, \tag{5}$$

    $$\frac{\partial L}{\partial \tilde x_{[:,\ s i + p,\ s j + q]}} \mathrel{+}= G_{\text{col}}\, W_{[:,:,p,q]}
      \quad \text{for each offset } (p, q). \tag{6}$$

    Eqs. (4) and (5) are one GEMM each; Eq. (6) is $k_h k_w$ thin ones, with no col2im
    buffer.

    **Fused** (the CPU kernels, ``mnn.kernels.cpu``): a few images at a time, their windows
    are copied in one pass (padding included) and multiplied, so the whole $X_{\text{col}}$
    never exists (with fewer than four channels a window is too short a copy: the padded
    images' planes are copied instead, a column of $X_{\text{col}}$ each, shifted by $(p, q)$);
    backward keeps the input instead and copies the windows again for Eq. (5),
    and computes Eq. (6) as one GEMM, $\partial L/\partial X_{\text{col}} = G_{\text{col}} W_{\text{col}}$,
    whose rows col2im adds back onto the pixels they came from (Eq. (3), summed in another order).
    The columns run over $(p, q, c)$ and images are channels-last in memory (see ``windows``), so
    im2col copies contiguous runs of $k_w C$ values (four channels or more), and the GEMM writes
    $Y_{\text{col}}$ as a $(B, H_o, W_o, O)$ array, returned as a $(B, O, H_o, W_o)$ view.

    **On a GPU** (``mnn.kernels.cuda``) im2col is one launch, padding included, and Eq. (6) is
    the same one GEMM followed by one col2im launch, in which each pixel gathers its window
    entries: the $k_h k_w$ thin GEMMs and strided adds were a launch each.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        kh, kw = kernel_pair(kernel_size)
        in_channels, out_channels, kh, kw, stride = (
            check_size("Conv2dLayer", name, value) for name, value in [
                ("in_channels", in_channels), ("out_channels", out_channels), ("kernel height", kh),
                ("kernel width", kw), ("stride", stride)])
        padding = check_size("Conv2dLayer", "padding", padding, minimum=0)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (kh, kw), stride, padding
        self.bias = check_flag("Conv2dLayer", "bias", bias)
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

    def forward(self, x):
        self.check_shape(x)
        (kh, kw), pad = self.kernel_size, self.padding
        if kernels.fused(x) and x.dtype == self.params["w"].dtype:  # the kernels keep the dtype, NumPy promotes
            return self.forward_by_chunks(x)
        if kernels.fused_gpu(x):  # the padding and the copy in one launch
            batch, (out_h, out_w) = x.shape[0], self.out_size(x.shape)
            cols = kernels.cuda.im2col(channels_last(x), kh, kw, self.stride, pad, (out_h, out_w))
        else:
            padded = pad_channels_last(x, pad) if pad else channels_last(x)
            cols, (batch, out_h, out_w) = im2col(padded, kh, kw, self.stride)
        y = cols @ self.w_col().T  # Eq. (4)
        if self.bias:
            y += self.params["b"]
        self.save("reference", cols, x.shape)
        return channels_first(y.reshape(batch, out_h, out_w, self.out_channels))

    def w_col(self):
        """$W_{\text{col}}$: the weights as an (O, kh kw C) matrix, columns in im2col's order."""
        return self.params["w"].transpose(0, 2, 3, 1).reshape(self.out_channels, -1)

    def backward(self, g):
        path, cols, input_shape = self.saved()
        if path == "fused":  # cols: the input
            return self.backward_by_chunks(backend.at_least_float32(g), cols)  # the kernels have no float16
        g_col = channels_last(g).reshape(-1, self.out_channels)  # free when g is channels-last
        (kh, kw), cin = self.kernel_size, self.in_channels
        d_w = self.grads["w"]
        if (cin == 1 or kh * kw == 1) and d_w.flags.c_contiguous:  # (O, C, kh, kw) is then im2col's column order
            add_product(d_w.reshape(self.out_channels, -1), g_col.T, cols)  # Eq. (5), one GEMM adding into it
        else:
            d_w += (g_col.T @ cols).reshape(self.out_channels, kh, kw, cin).transpose(0, 3, 1, 2)  # Eq. (5)
        if self.bias:
            add_column_sums(self.grads["b"], g_col)  # Eq. (5)
        return self.input_gradient(g_col, input_shape, g.shape[2:]) if self.input_grad else None

    def input_gradient(self, g_col, input_shape, out_size):
        """Eq. (6): per kernel offset, a GEMM added onto the strided pixels it reaches."""
        xp = backend.array_module(g_col)
        (kh, kw), s, pad = self.kernel_size, self.stride, self.padding
        batch, channels, height, width = input_shape
        if kernels.fused_gpu(g_col, self.params["w"]) and g_col.dtype == self.params["w"].dtype:
            d_cols = g_col @ self.w_col()  # one GEMM for every offset; col2im sums its rows back in one launch
            return channels_first(kernels.cuda.col2im(d_cols, kh, kw, s, pad, (batch, height, width, channels),
                                                      out_size))
        out_h, out_w = out_size
        dtype = xp.result_type(g_col, self.params["w"])
        grad = xp.zeros((batch, height + 2 * pad, width + 2 * pad, channels), dtype=dtype)
        for p in range(kh):
            for q in range(kw):
                pixels = grad[:, p:p + s * out_h:s, q:q + s * out_w:s]
                xp.add(pixels, (g_col @ self.params["w"][:, :, p, q]).reshape(pixels.shape), out=pixels)
        return channels_first(grad[:, pad:pad + height, pad:pad + width])

    # -- the fused path: a few images at a time ------------------------------------------------
    def image_chunks(self, batch, out_size):
        """Slices of the batch whose im2col rows take about ``CHUNK_BYTES``: they stay in cache."""
        row_bytes = self.in_channels * self.kernel_size[0] * self.kernel_size[1] * self.params["w"].itemsize
        per_chunk = max(1, CHUNK_BYTES // (out_size[0] * out_size[1] * row_bytes))
        return [slice(start, start + per_chunk) for start in range(0, batch, per_chunk)]

    def out_size(self, input_shape):
        (kh, kw), pad, s = self.kernel_size, self.padding, self.stride
        return output_size(input_shape[2] + 2 * pad, kh, s), output_size(input_shape[3] + 2 * pad, kw, s)

    def forward_by_chunks(self, x):
        """Eq. (4), with the fused im2col, chunk by chunk into one (B, Ho, Wo, O) output."""
        (kh, kw), xp, images = self.kernel_size, backend.array_module(x), channels_last(x)
        out_h, out_w = self.out_size(x.shape)
        y, w_col_t = xp.empty((x.shape[0], out_h, out_w, self.out_channels), dtype=x.dtype), self.w_col().T
        for chunk in self.image_chunks(x.shape[0], (out_h, out_w)):
            cols = kernels.cpu.im2col(images[chunk], kh, kw, self.stride, self.padding)
            xp.matmul(cols, w_col_t, out=y[chunk].reshape(-1, self.out_channels))  # Eq. (4)
        if self.bias:
            y += self.params["b"]
        self.save("fused", x, x.shape)
        return channels_first(y)

    def backward_by_chunks(self, g, x):
        """Eqs. (5) and (6), chunk by chunk: the windows copied again from the input, col2im for Eq. (6)."""
        (kh, kw), xp, images = self.kernel_size, backend.array_module(g), channels_last(x)
        g_rows, w_col = channels_last(g), self.w_col()
        d_w_col, d_b = xp.zeros_like(w_col), xp.zeros(self.out_channels, dtype=g.dtype)
        grad = xp.empty(images.shape, dtype=g.dtype) if self.input_grad else None
        for chunk in self.image_chunks(x.shape[0], g.shape[2:]):
            cols = kernels.cpu.im2col(images[chunk], kh, kw, self.stride, self.padding)
            g_col = g_rows[chunk].reshape(-1, self.out_channels)
            d_w_col += (cols.T @ g_col).T  # Eq. (5), as (X^T G)^T: 1.6x faster for the first layer's thin X
            if self.bias:
                d_b += column_sums(g_col)  # Eq. (5), while the chunk's rows are in cache
            if grad is not None:
                kernels.cpu.col2im(g_col @ w_col, kh, kw, self.stride, self.padding, grad[chunk])  # Eq. (6)
        self.grads["w"] += d_w_col.reshape(self.out_channels, kh, kw, self.in_channels).transpose(0, 3, 1, 2)
        if self.bias:
            self.grads["b"] += d_b
        return channels_first(grad) if grad is not None else None
