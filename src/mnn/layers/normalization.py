r"""Normalisation layers: batch norm (dense and 2-D) and layer norm.

All three compute $\hat x = (x - \mu)/\sigma$ over some set of $N$ entries, then
$y = \gamma \hat x + \beta$. They share one backward. With $\hat g = \gamma\, g$ and
$\sigma = \sqrt{\operatorname{var} + \epsilon}$, differentiating through $\mu$ and $\sigma$
(both functions of every entry in the set) gives, per set,

$$\frac{\partial L}{\partial x} = \frac{1}{N \sigma}\Big(N \hat g - \sum \hat g - \hat x \sum \hat g\, \hat x\Big), \tag{N}$$

using $\partial \mu/\partial x_k = 1/N$ and $\partial \sigma/\partial x_k = \hat x_k / N$:
$\partial \hat x_i/\partial x_k = (\delta_{ik} - 1/N - \hat x_i \hat x_k / N)/\sigma$, and
$\sum_i \hat g_i\, \partial \hat x_i / \partial x_k$ is Eq. (N).
"""
from .. import backend, kernels
from ..optim import is_finite_number
from .base import Layer, check_flag, check_size
from .sums import add_column_sums, column_dots, column_sums
from .windows import channels_first, channels_last


def in_dtype_of(values, array, weight):
    """``values`` in the dtype the lines give back, ``array``'s and the parameters' (an output, a gradient):
    float16 in gives float16 out, though the statistics, ``backend.at_least_float32``, were float32."""
    return values.astype(backend.array_module(array).result_type(array, weight), copy=False)


def normalize(x, axis, eps):
    """(x_hat, 1/sigma, mean, biased variance) along ``axis``, in float32 at least (float16's squares overflow
    past 256: the variance would be inf, x_hat 0; PyTorch's statistics are float32 too)."""
    xp, x = backend.array_module(x), backend.at_least_float32(x)
    mean = x.mean(axis=axis, keepdims=True)
    x_hat = x - mean
    var = (x_hat * x_hat).mean(axis=axis, keepdims=True)
    inv_std = 1 / xp.sqrt(var + eps)
    x_hat *= inv_std
    return x_hat, inv_std, mean, var


def normalize_rows(rows, eps, total=None, count=None):
    """``normalize`` along axis 0 of a (N, C) array, with BLAS sums: (x_hat, 1/sigma, mean, var).

    ``total`` (synchronised batch norm) turns each sum over these rows into the sum over every
    rank's rows, ``count`` of them in all. In float32 at least."""
    xp, total, rows = backend.array_module(rows), total or (lambda sums: sums), backend.at_least_float32(rows)
    count = count or rows.shape[0]
    mean = total(column_sums(rows)) / count
    x_hat = rows - mean
    var = total(column_dots(x_hat, x_hat)) / count
    inv_std = 1 / xp.sqrt(var + eps)
    x_hat *= inv_std
    return x_hat, inv_std, mean, var


def normalize_backward(g_hat, x_hat, inv_std, axis):
    """Eq. (N): the input gradient of x_hat = (x - mu) / sigma, given g_hat = dL/dx_hat."""
    xp = backend.array_module(g_hat)
    mean_g = g_hat.mean(axis=axis, keepdims=True)
    mean_gx = (g_hat * x_hat).mean(axis=axis, keepdims=True)
    grad = x_hat * mean_gx
    grad += mean_g
    xp.subtract(g_hat, grad, out=grad)
    grad *= inv_std
    return grad


class BatchNormLayer(Layer):
    r"""Batch normalisation of $(B, n)$ features (``torch.nn.BatchNorm1d``).

    **Training.** Per feature, over the $N = B$ samples of the batch:

    $$\hat x = \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}, \qquad y = \gamma \hat x + \beta. \tag{1}$$

    $$\frac{\partial L}{\partial \gamma} = \sum g \odot \hat x, \qquad \frac{\partial L}{\partial \beta} = \sum g, \tag{2}$$

    and the input gradient is Eq. (N) of the module with $\hat g = \gamma g$. As $\gamma$ is
    constant over the sums, and those sums are Eq. (2)'s:

    $$\frac{\partial L}{\partial x} = \frac{\gamma}{\sigma}\Big(g - \frac{1}{N}\frac{\partial L}{\partial \beta} -
      \hat x\, \frac{1}{N}\frac{\partial L}{\partial \gamma}\Big). \tag{3}$$

    **Running statistics** (used in eval mode), with momentum $m$ and the unbiased variance:

    $$\bar\mu \leftarrow (1 - m)\bar\mu + m \mu_B, \qquad \bar\sigma^2 \leftarrow (1 - m)\bar\sigma^2 + m\, \tfrac{N}{N-1}\sigma_B^2. \tag{4}$$

    **Eval.** $\hat x = (x - \bar\mu)/\sqrt{\bar\sigma^2 + \epsilon}$ is affine in $x$, so
    $\partial L / \partial x = \gamma g / \sqrt{\bar\sigma^2 + \epsilon}$. (5)

    **Synchronised** (data-parallel training, ``mnn.distributed``). When $R$ ranks each hold
    $N/R$ rows of the batch, $\mu_B$, $\sigma_B^2$ and the two sums of Eq. (3) must run over all
    $N$: each rank sums its own rows and ``batch_total`` adds those sums over the ranks (an
    all-reduce). Each rank's $g$ is then $R$ times the one-process gradient of its rows (its
    loss is the mean over its $N/R$ samples), and so is its $\partial L/\partial x$, consistently:
    Eq. (3) is linear in $g$. Eq. (2) stays a sum over this rank's rows; averaging it over the
    ranks with the other parameter gradients gives the one-process sum.

    The code works on rows: one row per sample here, one per pixel in ``BatchNorm2dLayer``.
    In training on one process, the fused CPU kernels (``mnn.kernels.cpu``) compute Eq. (1)
    in three passes over the rows and Eqs. (2)-(3) in two. The GPU kernels (``mnn.kernels.cuda``)
    sum each channel over chunks of rows in parallel, add those partial sums, and then apply
    Eq. (1) or Eq. (3) in one launch over every entry.
    """

    batch_total = None  # synchronised batch norm: a function summing a number or an array over every rank

    ndim = 2  # of the input

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.num_features = check_size(type(self).__name__, "num_features", num_features)
        self.eps, self.momentum = check_eps(self, eps), check_momentum(self, momentum)
        xp, dtype = backend.xp(), backend.default_dtype()
        self.add_param("weight", xp.ones(num_features, dtype=dtype))
        self.add_param("bias", xp.zeros(num_features, dtype=dtype))
        self.buffers = {"running_mean": xp.zeros(num_features, dtype=dtype),
                        "running_var": xp.ones(num_features, dtype=dtype)}

    def config(self):
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum}

    def to_rows(self, x):
        """(N, features): the entries each feature's statistics are taken over, one per row."""
        return x

    def from_rows(self, rows, shape):
        return rows

    def check_shape(self, x):
        self.check_input(x, ndim=self.ndim)
        if x.shape[1] != self.num_features:
            raise ValueError(f"{self!r}: input of shape {tuple(x.shape)} has {x.shape[1]} features/channels; "
                             f"expected {self.num_features}")

    def forward(self, x):
        self.check_shape(x)
        rows = self.to_rows(x)
        count = self.rows_in_batch(rows) if self.training else rows.shape[0]
        if self.training and count < 2:  # the variance of one value is 0: y would be the bias, whatever x is
            raise ValueError(f"{self!r}: input of shape {tuple(x.shape)} gives {count} value(s) per feature/channel; "
                             "training needs more than 1: a larger batch (mnn train --batch-size), or eval()")
        fused = self.fused_kernels(rows)
        if fused:  # Eq. (1) in three passes (four launches on a GPU): the lines below' numbers, to rounding
            y, x_hat, inv_std, mean, var = fused.batch_norm(rows, self.params["weight"], self.params["bias"], self.eps)
            self.update_running_stats(mean, var, rows.shape[0])
            self.save(x_hat, inv_std, True, x.shape, rows.shape[0])
            return self.from_rows(y, x.shape)
        if self.training:
            x_hat, inv_std, mean, var = normalize_rows(rows, self.eps, self.batch_total, count)  # Eq. (1)
            self.update_running_stats(mean, var, count)
        else:
            xp = backend.array_module(x)
            inv_std = 1 / xp.sqrt(self.buffers["running_var"] + self.eps)
            x_hat = (rows - self.buffers["running_mean"]) * inv_std
        self.save(x_hat, inv_std, self.training, x.shape, count)
        y = x_hat * self.params["weight"]
        y += self.params["bias"]
        y = in_dtype_of(y, x, self.params["weight"])
        return self.from_rows(y, x.shape)

    def fused_kernels(self, rows, *saved):
        """The kernels that run Eqs. (1)-(3) here, ``kernels.cpu`` or ``kernels.cuda``, if any: in training,
        on one process's batch, of one dtype with the parameters and what forward saved (the kernels keep
        that dtype, where the reference lines follow NumPy's promotions)."""
        if not self.training or self.batch_total is not None or rows.shape[0] == 0:
            return None
        if len({array.dtype for array in (rows, self.params["weight"], self.params["bias"], *saved)}) > 1:
            return None
        if kernels.fused(rows):
            return kernels.cpu
        return kernels.cuda if kernels.fused_gpu(rows) else None

    def rows_in_batch(self, rows):
        """N: the rows the statistics run over, every rank's when synchronised."""
        if self.batch_total is None:
            return rows.shape[0]
        return self.batch_total(rows.shape[0])

    def update_running_stats(self, mean, var, count):
        m, running = self.momentum, (self.buffers["running_mean"], self.buffers["running_var"])
        var_scale = m * count / max(count - 1, 1)  # the variance made unbiased, times the momentum
        if kernels.fused_gpu(mean, var, *running) and len({array.dtype for array in (mean, var, *running)}) == 1:
            return kernels.cuda.running_statistics(mean, var, m, var_scale, *running)  # Eq. (4) in one launch
        self.buffers["running_mean"] *= 1 - m
        self.buffers["running_mean"] += m * mean  # Eq. (4)
        self.buffers["running_var"] *= 1 - m
        self.buffers["running_var"] += var_scale * var

    def backward(self, g):
        x_hat, inv_std, training, shape, count = self.saved()
        g = self.to_rows(g)
        fused = self.fused_kernels(g, x_hat, inv_std) if training else None
        if fused:  # Eqs. (2)-(3) in two passes (four launches on a GPU), Eq. (2) added into the gradients
            grad = fused.batch_norm_backward(g, x_hat, self.params["weight"], inv_std, self.grads["weight"],
                                             self.grads["bias"])
            return self.from_rows(grad, shape)
        d_weight, d_bias = column_dots(g, x_hat), column_sums(g)
        self.grads["weight"] += d_weight  # Eq. (2)
        self.grads["bias"] += d_bias
        scale = self.params["weight"] * inv_std
        if not training:
            return self.from_rows(g * scale, shape)  # Eq. (5)
        if self.batch_total is not None:  # synchronised: Eq. (3)'s sums over every rank's rows
            d_weight, d_bias = self.batch_total(d_weight), self.batch_total(d_bias)
        grad = x_hat * (-scale * d_weight / count)  # Eq. (3), term by term
        grad += scale * -d_bias / count
        grad += g * scale
        return self.from_rows(in_dtype_of(grad, g, self.params["weight"]), shape)


class BatchNorm2dLayer(BatchNormLayer):
    r"""Batch normalisation of $(B, C, H, W)$ images per channel (``torch.nn.BatchNorm2d``).

    Exactly ``BatchNormLayer`` with the statistics of each channel $c$ taken over
    $N = B H W$ entries (batch and both spatial axes),

    $$\mu_c = \frac{1}{BHW} \sum_{b,h,w} x_{b,c,h,w}, \qquad
      \sigma_c^2 = \frac{1}{BHW} \sum_{b,h,w} (x_{b,c,h,w} - \mu_c)^2,$$

    so the rows are the pixels of the channels-last view, and Eqs. (1)-(5) there apply unchanged.
    """

    ndim = 4

    def to_rows(self, x):
        return channels_last(x).reshape(-1, x.shape[1])  # free when x is channels-last in memory

    def from_rows(self, rows, shape):
        batch, channels, height, width = shape
        return channels_first(rows.reshape(batch, height, width, channels))


class LayerNormLayer(Layer):
    r"""Layer normalisation over the last dimension (``torch.nn.LayerNorm(dim)``).

    Each row (a token's $D$ features) is normalised on its own, $N = D$:

    $$\hat x = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad y = \gamma \odot \hat x + \beta, \tag{1}$$

    $$\frac{\partial L}{\partial \gamma} = \sum_{\text{rows}} g \odot \hat x, \qquad
      \frac{\partial L}{\partial \beta} = \sum_{\text{rows}} g, \tag{2}$$

    and the input gradient is Eq. (N) of the module with $\hat g = \gamma \odot g$, its sums taken
    along the row. (3) Same in training and eval: no batch statistics. With ``bias=False``
    there is no $\beta$ (as ``torch.nn.LayerNorm(dim, bias=False)``). The fused CPU kernels
    (``mnn.kernels.cpu``) normalise each row, and back-propagate through it, in one pass from cache;
    on a GPU (``mnn.kernels.cuda``) one warp takes each row, in one launch for all rows.
    """

    def __init__(self, dim, eps=1e-5, bias=True):
        super().__init__()
        self.dim, self.eps = check_size("LayerNormLayer", "dim", dim), check_eps(self, eps)
        self.bias = check_flag("LayerNormLayer", "bias", bias)
        xp, dtype = backend.xp(), backend.default_dtype()
        self.add_param("weight", xp.ones(dim, dtype=dtype))
        if bias:
            self.add_param("bias", xp.zeros(dim, dtype=dtype))

    def config(self):
        return {"dim": self.dim, "eps": self.eps, "bias": self.bias}

    def forward(self, x):
        self.check_input(x, min_ndim=1, last_dim=self.dim)
        weight = self.params["weight"]
        shift = self.params["bias"] if self.bias else backend.kept_vector(backend.array_module(x), 0, self.dim,
                                                                           weight.dtype)  # no bias: beta = 0
        fused = kernels.cpu if kernels.fused(x) else kernels.cuda if kernels.fused_gpu(x) else None
        if fused and x.dtype == weight.dtype == shift.dtype:  # the kernels keep one dtype; the lines below promote
            y, x_hat, inv_std = fused.layer_norm(x, weight, shift, self.eps)  # Eq. (1), each row in one pass
            self.save(x_hat, inv_std)
            return y
        x_hat, inv_std, _, _ = normalize(x, -1, self.eps)  # Eq. (1)
        self.save(x_hat, inv_std)
        y = x_hat * self.params["weight"]
        if self.bias:
            y += self.params["bias"]
        return in_dtype_of(y, x, weight)

    def backward(self, g):
        x_hat, inv_std = self.saved()
        one_dtype = g.dtype == x_hat.dtype == self.params["weight"].dtype
        if kernels.fused(g, x_hat) and one_dtype:  # Eqs. (2)-(3), each row in one pass
            grad, d_weight, d_bias = kernels.cpu.layer_norm_backward(g, x_hat, self.params["weight"], inv_std)
            self.grads["weight"] += d_weight
            if self.bias:
                self.grads["bias"] += d_bias
            return grad
        if kernels.fused_gpu(g, x_hat) and one_dtype:  # Eq. (3) and g x_hat in one launch, Eq. (2) two GEMVs
            grad, products = kernels.cuda.layer_norm_backward(g, x_hat, self.params["weight"], inv_std)
            add_column_sums(self.grads["weight"], products.reshape(-1, self.dim))  # Eq. (2)
            if self.bias:
                add_column_sums(self.grads["bias"], g.reshape(-1, self.dim))
            return grad
        rows = (g * x_hat).reshape(-1, self.dim)
        self.grads["weight"] += rows.sum(axis=0)  # Eq. (2)
        if self.bias:
            self.grads["bias"] += g.reshape(-1, self.dim).sum(axis=0)
        grad = normalize_backward(g * self.params["weight"], x_hat, inv_std, -1)  # Eq. (3)
        return in_dtype_of(grad, g, self.params["weight"])


def check_eps(layer, eps):
    if not (is_finite_number(eps) and eps > 0):
        raise ValueError(f"{type(layer).__name__}: eps must be a finite number > 0, got {eps!r}")
    return float(eps)


def check_momentum(layer, momentum):
    if not (is_finite_number(momentum) and 0 <= momentum <= 1):
        raise ValueError(f"{type(layer).__name__}: momentum must be a number in [0, 1], got {momentum!r} "
                         "(PyTorch's momentum=None, a cumulative average, is not offered)")
    return float(momentum)
