r"""Max and average pooling over $(B, C, H, W)$, one strided slice per kernel offset.

For a $k \times k$ kernel with stride $s$, the slice ``x[..., p::s, q::s]`` (cut to
$H_o \times W_o$) holds, for every output $(i, j)$ at once, the window entry at offset
$(p, q)$. Pooling is then $k^2$ whole-array operations, never a loop over pixels, and it
keeps the input's memory layout.
"""
from .. import backend, kernels
from .base import Layer, check_size
from .windows import channels_first, channels_last, offset_slices, output_size


class PoolLayer(Layer):
    """Shared checks and the per-offset slices of the pooling layers."""

    def __init__(self, kernel_size, stride=None):
        super().__init__()
        name = type(self).__name__
        self.kernel_size = check_size(name, "kernel_size", kernel_size)
        self.stride = check_size(name, "stride", kernel_size if stride is None else stride)

    def config(self):
        return {"kernel_size": self.kernel_size, "stride": self.stride}

    def slices_for(self, x):
        self.check_input(x, ndim=4)
        k, s = self.kernel_size, self.stride
        if x.shape[2] < k or x.shape[3] < k:
            raise ValueError(f"{self!r}: kernel {k}x{k} is larger than the input {tuple(x.shape)}")
        return offset_slices(k, s, *self.out_size(x.shape))

    def out_size(self, input_shape):
        """(Ho, Wo): the windows that fit down and across a (B, C, H, W) input."""
        k, s = self.kernel_size, self.stride
        return output_size(input_shape[2], k, s), output_size(input_shape[3], k, s)


class MaxPool2dLayer(PoolLayer):
    r"""Max pooling: each output is the largest entry of its $k \times k$ window.

    $$y_{b,c,i,j} = \max_{p,q}\ x_{b,c,\,si+p,\,sj+q} = x_{b,c,\,a(i,j)}. \tag{1}$$

    **Backward.** Away from ties the max is locally the single entry $a(i,j)$ (its arg-max),
    so $\partial y_{b,c,i,j} / \partial x = \mathbb{1}[\text{at } a(i,j)]$ and each gradient is
    routed to the arg-max of its window; overlapping windows add:

    $$\frac{\partial L}{\partial x_{b,c,u,v}} = \sum_{(i,j):\ a(i,j) = (u,v)} g_{b,c,i,j}. \tag{2}$$

    Forward is $k^2 - 1$ element-wise maxima. Backward finds each window's arg-max as the
    first offset whose entry equals the max (ties go to the first; a window holding NaNs has
    the max NaN and routes its gradient to its last NaN; both as in PyTorch) and adds $g$
    into that offset's slice. The fused CPU kernels (``mnn.kernels.cpu``) take one pass
    each: forward keeps every window's arg-max (a byte per output), backward adds $g$ there.
    On a GPU (``mnn.kernels.cuda``) each is one launch; backward gathers, each pixel summing
    the gradients of the windows whose arg-max it is.
    """

    def forward(self, x):
        slices = self.slices_for(x)
        if kernels.fused(x):
            y, argmax = kernels.cpu.max_pool(x, self.kernel_size, self.stride)  # Eq. (1)
            self.save("fused", argmax, x.shape)
            return y
        if kernels.fused_gpu(x):  # Eq. (1), one launch
            y, argmax = kernels.cuda.max_pool(channels_last(x), self.kernel_size, self.stride, self.out_size(x.shape))
            self.save("gpu", argmax, x.shape)
            return channels_first(y)
        xp = backend.array_module(x)
        y = x[slices[0]].copy(order="K")  # keep the memory layout (channels-last)
        for where in slices[1:]:
            xp.maximum(y, x[where], out=y)  # Eq. (1)
        self.save("reference", x, y)
        return y

    def backward(self, g):
        path, x, y = self.saved()
        if path != "reference":  # the kernels took the forward pass, and have no float16
            g = backend.at_least_float32(g)
        if path == "fused":  # x: the arg-max, y: the input's shape
            return kernels.cpu.max_pool_backward(g, x, self.kernel_size, self.stride, y)  # Eq. (2)
        if path == "gpu":  # the same, as channels-last arrays; one launch
            batch, channels, height, width = y
            return channels_first(kernels.cuda.max_pool_backward(channels_last(g), x, self.kernel_size, self.stride,
                                                                 (batch, height, width, channels)))
        xp = backend.array_module(g)
        slices = self.slices_for(x)
        # each window's arg-max: its first entry equal to the max; where the max is NaN, its last NaN
        # (as in PyTorch and the kernels: y == NaN holds nowhere)
        argmax, found = xp.zeros(y.shape, dtype=xp.int32), xp.zeros(y.shape, dtype=bool)
        for offset, where in enumerate(slices):
            first_max = (x[where] == y) & ~found
            found |= first_max
            xp.copyto(argmax, offset, where=first_max | xp.isnan(x[where]))
        grad = xp.zeros_like(x)
        for offset, where in enumerate(slices):
            # Eq. (2), its indicator as a selection: g * 0 would be NaN where g is infinite
            if self.stride < self.kernel_size:  # overlapping windows add up
                grad[where] += xp.where(argmax == offset, g, 0)
            else:  # each pixel in one window at most: write in place
                xp.copyto(grad[where], g, where=argmax == offset)
        return grad


class AvgPool2dLayer(PoolLayer):
    r"""Average pooling over $k \times k$ windows.

    $$y_{b,c,i,j} = \frac{1}{k^2} \sum_{p,q} x_{b,c,\,si+p,\,sj+q}, \tag{1}$$

    so every pixel of a window receives $1/k^2$ of its gradient, and overlapping windows add:

    $$\frac{\partial L}{\partial x_{b,c,u,v}} = \frac{1}{k^2} \sum_{(i,j) \text{ covering } (u,v)} g_{b,c,i,j}. \tag{2}$$
    """

    def forward(self, x):
        slices = self.slices_for(x)
        total = x[slices[0]].copy(order="K")
        for where in slices[1:]:
            total += x[where]
        self.save(x)
        return total * (1 / self.kernel_size ** 2)  # Eq. (1)

    def backward(self, g):
        (x,) = self.saved()
        grad = backend.array_module(g).zeros_like(x)
        share = g * (1 / self.kernel_size ** 2)
        for where in self.slices_for(x):
            grad[where] += share  # Eq. (2)
        return grad
