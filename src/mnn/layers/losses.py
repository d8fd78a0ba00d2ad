r"""Loss layers: where back-propagation starts.

Each returns the **mean** loss over the batch, so the $1/N$ lives here and every
parameter gradient further down is a plain sum over the batch.
"""
from .. import backend, kernels
from .base import LossLayer, check_array, check_floating, check_in_range
from .softmax import log_softmax


class MSELossLayer(LossLayer):
    r"""Mean squared error over all $N$ entries, as ``torch.nn.MSELoss()``.

    $$L = \frac1N \sum_i (x_i - t_i)^2, \tag{1}$$

    $$\frac{\partial L}{\partial x_i} = \frac{2}{N} (x_i - t_i). \tag{2}$$

    The targets are taken in the input's dtype, so the gradient has the input's dtype too.
    """

    def forward(self, x, targets):
        check_floating(self, x)
        check_array(self, targets, "targets")
        if tuple(targets.shape) != tuple(x.shape):
            raise ValueError(f"{self!r}: targets of shape {tuple(targets.shape)}; "
                             f"expected the input's shape {tuple(x.shape)}")
        if targets.dtype.kind not in "fiub":
            raise ValueError(f"{self!r}: targets must be numbers, got {targets.dtype}")
        check_not_empty(self, x)
        diff = x - targets.astype(x.dtype, copy=False)
        self.save(diff)
        return (diff * diff).mean()  # Eq. (1)

    def backward(self):
        (diff,) = self.saved()
        return diff * (2 / diff.size)  # Eq. (2)


def check_labels(layer, x, labels, in_range=True):
    """Labels must be integers shaped like the input without its class axis, in [0, C) (unless ``in_range``
    is False: a GPU kernel counts the labels outside as it reads them, for ``check_in_range``)."""
    check_floating(layer, x)
    check_array(layer, labels, "targets", dtype="int64")
    if x.ndim < 2 or tuple(labels.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"{layer!r}: input {tuple(x.shape)} and targets {tuple(labels.shape)}; "
                         "expected input (..., C) and integer class labels (...)")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{layer!r}: targets must be integer class labels, got {labels.dtype}")
    check_not_empty(layer, x)
    if in_range:
        check_in_range(layer, labels, x.shape[-1], "target labels")


def check_not_empty(layer, x):
    """A mean loss needs at least one term (NumPy's mean of nothing is NaN, with a warning)."""
    if x.size == 0:
        raise ValueError(f"{layer!r}: input of shape {tuple(x.shape)} holds nothing to average; "
                         "a loss needs at least one sample")


def pick(rows, labels):
    """``rows[n, labels[n]]`` for every row n of a (N, C) array, without a one-hot."""
    xp = backend.array_module(rows)
    return rows[xp.arange(rows.shape[0]), labels]


class NllLossLayer(LossLayer):
    r"""Negative log-likelihood of integer labels, given log-probabilities.

    Inputs $x$ are log-probabilities (a ``LogSoftmaxLayer`` output) of shape $(\dots, C)$;
    labels $t_n$ index the class axis for each of the $N$ rows.

    $$L = -\frac1N \sum_n x_{n, t_n}, \tag{1}$$

    $$\frac{\partial L}{\partial x_{n c}} = -\frac1N\, \mathbb{1}[c = t_n]. \tag{2}$$

    Eq. (2) is written by scattering $-1/N$ into a zero array; no one-hot is built.
    """

    def forward(self, x, labels):
        check_labels(self, x, labels)
        rows, labels = x.reshape(-1, x.shape[-1]), labels.reshape(-1)
        self.save(x.shape, x.dtype, labels)
        return -pick(rows, labels).mean()  # Eq. (1)

    def backward(self):
        shape, dtype, labels = self.saved()
        xp = backend.array_module(labels)
        grad = xp.zeros((labels.size, shape[-1]), dtype=dtype)
        grad[xp.arange(labels.size), labels] = -1 / labels.size  # Eq. (2)
        return grad.reshape(shape)


class CrossEntropyLossLayer(LossLayer):
    r"""Cross-entropy of integer labels given raw scores (logits): log-softmax and NLL fused.

    With $p = \operatorname{softmax}(x)$ per row and $N$ rows,

    $$L = -\frac1N \sum_n \log p_{n, t_n}
        = \frac1N \sum_n \Big(\log\sum_c e^{x_{nc}} - x_{n t_n}\Big). \tag{1}$$

    **Backward.** $\partial \log\sum_c e^{x_{nc}}/\partial x_{nc} = p_{nc}$ and
    $\partial x_{n t_n}/\partial x_{nc} = \mathbb{1}[c = t_n]$, so

    $$\frac{\partial L}{\partial x_{nc}} = \frac{1}{N}\big(p_{nc} - \mathbb{1}[c = t_n]\big). \tag{2}$$

    Fusing avoids the softmax Jacobian altogether and is stable: $\log p$ comes from
    the shifted log-sum-exp (see ``LogSoftmaxLayer``). On the CPU (``mnn.kernels.cpu.cross_entropy``)
    the forward is softmax's three passes, each row's loss taken from its maximum and its sum; on a
    GPU (``mnn.kernels.cuda``) the forward and the backward are one launch each, one warp per row.
    """

    def forward(self, x, labels):
        on_gpu = kernels.fused_gpu(x)
        check_labels(self, x, labels, in_range=not on_gpu)
        xp = backend.array_module(x)
        if on_gpu:  # Eq. (1) and the softmax that Eq. (2) needs, in one launch, which checks the labels too
            rows_labels = kernels.cuda.device_labels(labels.reshape(-1))
            p, losses, outside = kernels.cuda.cross_entropy(x.reshape(-1, x.shape[-1]), rows_labels)
            check_in_range(self, labels, x.shape[-1], "target labels", outside)
            self.save(x.shape, p, rows_labels)
            return losses.mean()
        labels = labels.reshape(-1)
        if kernels.fused(x):  # the same, the softmax and each row's loss in three passes
            p, losses = kernels.cpu.cross_entropy(x.reshape(-1, x.shape[-1]), labels)
            self.save(x.shape, p, labels)
            return losses.mean()  # Eq. (1)
        log_p = log_softmax(x.reshape(-1, x.shape[-1]))
        self.save(x.shape, xp.exp(log_p), labels)
        return -pick(log_p, labels).mean()  # Eq. (1)

    def backward(self):
        shape, p, labels = self.saved()
        if kernels.fused_gpu(p):
            return kernels.cuda.cross_entropy_backward(p, kernels.cuda.device_labels(labels)).reshape(shape)  # Eq. (2)
        xp = backend.array_module(p)
        grad = p.copy()
        grad[xp.arange(labels.size), labels] -= 1
        grad *= 1 / labels.size  # Eq. (2)
        return grad.reshape(shape)
