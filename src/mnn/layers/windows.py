r"""Sliding windows over images, as strided views: im2col without copying.

Images are $(B, C, H, W)$ as in PyTorch, but mnn keeps them **channels-last in memory**
(a ``(B, H, W, C)`` array seen through a transposed view) wherever a layer writes them:
a GEMM produces that layout, per-channel vectors then broadcast along contiguous memory,
and im2col copies runs of $C$ contiguous values instead of single ones. Every layer
accepts any layout; only speed depends on it.

For a kernel $k_h \times k_w$ and stride $s$, the window at output $(i, j)$ covers rows
$s i, \dots, s i + k_h - 1$ and columns $s j, \dots, s j + k_w - 1$.
"""
from .. import backend


def output_size(size, kernel, stride):
    return (size - kernel) // stride + 1


def channels_last(x):
    """The (B, H, W, C) view of a (B, C, H, W) image batch (no copy)."""
    return x.transpose(0, 2, 3, 1)


def channels_first(x):
    """The (B, C, H, W) view of a (B, H, W, C) array (no copy)."""
    return x.transpose(0, 3, 1, 2)


def pad_channels_last(x, padding):
    """A zero-padded (B, H + 2P, W + 2P, C) copy of the image batch ``x`` (B, C, H, W)."""
    xp = backend.array_module(x)
    batch, channels, height, width = x.shape
    padded = xp.zeros((batch, height + 2 * padding, width + 2 * padding, channels), dtype=x.dtype)
    padded[:, padding:padding + height, padding:padding + width] = channels_last(x)
    return padded


def windows(x, kh, kw, stride):
    """View ``x`` (B, H, W, C) as (B, Ho, Wo, kh, kw, C); entry [b, i, j, p, q, c] = x[b, s*i+p, s*j+q, c]."""
    xp = backend.array_module(x)
    batch, height, width, channels = x.shape
    sb, sh, sw, sc = x.strides
    shape = (batch, output_size(height, kh, stride), output_size(width, kw, stride), kh, kw, channels)
    strides = (sb, sh * stride, sw * stride, sh, sw, sc)
    return xp.lib.stride_tricks.as_strided(x, shape=shape, strides=strides)  # read only: never written through


def offset_slices(kernel, stride, out_h, out_w):
    """For each kernel offset (p, q): the index picking x[..., s*i+p, s*j+q] for all outputs (i, j)."""
    return [(Ellipsis, slice(p, p + stride * out_h, stride), slice(q, q + stride * out_w, stride))
            for p in range(kernel) for q in range(kernel)]
