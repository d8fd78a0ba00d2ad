r"""Finite-difference checks of any layer's hand-written backward.

For a layer $y = f(x; \theta)$, pick a random output weighting $v$ and look at the
scalar $s(x) = \langle v, f(x) \rangle$. Its gradient is exactly what ``backward(v)``
returns, $\nabla_x s = J^\top v$. Along a random direction $u$ the central difference

$$\frac{s(x + \epsilon u) - s(x - \epsilon u)}{2\epsilon} = \langle \nabla_x s, u \rangle + O(\epsilon^2)$$

must then agree with $\langle$ ``backward(v)`` $, u\rangle$, and likewise for every
parameter. A few such random probes test the whole Jacobian without building it.
Run in float64: in float32 the rounding error swamps $O(\epsilon^2)$.

The two numbers are compared relative to the larger of them and of $\lVert \nabla_x s \rVert$, the
spread of $\langle \nabla_x s, u \rangle$ over random directions: a direction that happens to be
nearly orthogonal to the gradient would otherwise divide rounding by almost nothing. And the
difference of two values of $s$ resolves no less than about $|s|\, 2^{-52}/\epsilon$: an error of that
size is rounding, and counts as ``ROUNDING`` (1e-8), however small the gradient (batch norm's input
gradient for a handful of rows is small beside $s$ itself).
At a kink (ReLU at exactly 0, a tie in a max-pooling window) the central difference straddles two
slopes, and an error near 0.5 or 1 there says nothing about ``backward``: draw inputs away from kinks.
"""
import numpy

from . import backend
from .layers.base import LossLayer


def _scalar(layer, inputs, targets, weights):
    out = layer.forward(*inputs, targets) if isinstance(layer, LossLayer) else layer.forward(*inputs)
    if isinstance(layer, LossLayer):
        return float(out)
    return float((out * weights).sum())


def _backward(layer, inputs, targets, weights):
    """A forward and a backward pass: the input gradients, as a tuple."""
    if isinstance(layer, LossLayer):
        layer.forward(*inputs, targets)
        grads = layer.backward()
    else:
        layer.forward(*inputs)
        grads = layer.backward(weights)
    return grads if isinstance(grads, tuple) else (grads,)


def _analytic(layer, inputs, targets, weights):
    layer.zero_grads()
    grads = _backward(layer, inputs, targets, weights)
    return [None if g is None else g.copy() for g in grads], {name: g.copy() for name, g in layer.grads.items()}


ACCUMULATED = " (accumulated)"  # the suffix of the accumulation checks' names


def _accumulation_errors(layer, inputs, targets, weights):
    """A second pass without ``zero_grads()`` must double every parameter gradient: backward adds to
    them (``+=``), which gradient accumulation and tied weights rely on."""
    _, once = _analytic(layer, inputs, targets, weights)
    _backward(layer, inputs, targets, weights)
    errors = {name + ACCUMULATED: float(numpy.abs(layer.grads[name] - 2 * grad).max()
                                        / max(2 * float(numpy.abs(grad).max()), 1e-12))
              for name, grad in once.items()}
    layer.zero_grads()
    return errors


def relative_error(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


ROUNDING = 1e-8  # what an error at the finite difference's own resolution counts as


def directional_error(analytic, numeric, gradient_norm, resolution):
    """|analytic - numeric| relative to the larger of the two, of the gradient's norm, and of the finite
    difference's ``resolution`` / ``ROUNDING`` (the module's note)."""
    return abs(analytic - numeric) / max(abs(analytic), abs(numeric), gradient_norm, resolution / ROUNDING, 1e-300)


def require_float64(layer, inputs):
    """Refuse float32 tensors: their rounding error (~1e-7 / eps) would look like a wrong derivation."""
    for index, x in enumerate(inputs):
        if x.dtype.kind == "f" and x.dtype != numpy.float64:
            raise ValueError(f"check_layer: input {index} is {x.dtype}; finite differences need float64 "
                             "(x.astype(numpy.float64))")
    wrong = {name: str(p.dtype) for name, p in layer.params.items() if p.dtype != numpy.float64}
    if wrong:
        raise ValueError(f"check_layer: {layer!r} has parameters that are not float64 ({wrong}); finite "
                         "differences need float64: build the layer after "
                         "mnn.backend.set_default_dtype(numpy.float64)")


def check_layer(layer, *inputs, targets=None, probes=3, eps=1e-6, seed=0, check_inputs=True):
    """Worst error of the layer's input and parameter gradients, by name, relative to their scale (the
    module's note; a NaN or infinite gradient gives inf).

    Floating ``inputs`` and the layer's parameters must be float64 (integer inputs, such as
    token indices, are passed through unperturbed); for a loss layer pass ``targets``. Returns a dict such
    as ``{"input0": 3e-10, "w": 1e-9, "w (accumulated)": 0.0}``; values near 1e-8 or below mean
    backward is right (the ``accumulated`` entries: that a second backward adds to the gradients).
    Call ``layer.eval()`` first for layers with randomness (dropout) unless the mask is fixed.
    Its parameters (bit for bit), gradients and running statistics (which every forward pass of
    batch norm in training mode moves) are restored after; what a forward pass keeps for
    ``backward``, and the random state dropout draws from, are not.
    """
    if targets is not None and not isinstance(layer, LossLayer):
        raise ValueError(f"check_layer: targets are for a loss layer, and {type(layer).__name__} is none; "
                         "check a network's layers and its loss layer one by one")
    if not (isinstance(probes, int) and probes >= 1):
        raise ValueError(f"check_layer: probes must be an integer >= 1, got {probes!r}")
    if not (isinstance(eps, (int, float)) and 0 < eps < 1):  # also refuses NaN
        raise ValueError(f"check_layer: eps must be a step in (0, 1), got {eps!r}")
    for index, x in enumerate(inputs):
        if not backend.is_array(x):
            raise TypeError(f"check_layer: input {index} must be a NumPy array, got {type(x).__name__} "
                            "(numpy.asarray(x, dtype=numpy.float64))")
    rng = numpy.random.default_rng(seed)
    inputs = [x.copy() for x in inputs]
    require_float64(layer, inputs)
    arrays = [array for _, param, grad in layer.named_parameters() for array in (param, grad)]
    state = [(array, array.copy()) for array in arrays + [value for _, value in layer.named_buffers()]]
    try:
        return _errors(layer, inputs, targets, probes, eps, check_inputs, rng)
    finally:
        for array, saved in state:
            array[...] = saved


def _errors(layer, inputs, targets, probes, eps, check_inputs, rng):
    sample = layer.forward(*inputs, targets) if isinstance(layer, LossLayer) else layer.forward(*inputs)
    shape = () if isinstance(layer, LossLayer) else sample.shape
    errors = {}
    for _ in range(probes):
        weights = rng.standard_normal(shape)
        input_grads, param_grads = _analytic(layer, inputs, targets, weights)
        tensors = {f"input{i}": (x, g) for i, (x, g) in enumerate(zip(inputs, input_grads))
                   if check_inputs and x.dtype.kind == "f"}
        check_input_gradients(layer, inputs, input_grads, tensors)
        tensors.update({name: (layer.params[name], param_grads[name]) for name in layer.params})
        for name, (tensor, grad) in tensors.items():
            direction = rng.standard_normal(tensor.shape)
            tensor += eps * direction
            plus = _scalar(layer, inputs, targets, weights)
            tensor -= 2 * eps * direction
            minus = _scalar(layer, inputs, targets, weights)
            tensor += eps * direction
            numeric = (plus - minus) / (2 * eps)
            resolution = max(abs(plus), abs(minus)) * numpy.finfo(numpy.float64).eps / eps
            error = directional_error(float((grad * direction).sum()), numeric, float(numpy.linalg.norm(grad)),
                                      resolution)
            errors[name] = max(errors.get(name, 0.0), numpy.inf if numpy.isnan(error) else error)  # NaN: a failure
    return {**errors, **_accumulation_errors(layer, inputs, targets, rng.standard_normal(shape))}


def check_input_gradients(layer, inputs, input_grads, checked):
    """One gradient for each input (None for an integer one), each to be checked an array (with
    ``check_inputs`` False, none: a recurrent layer's state has its gradient in ``state_grad``)."""
    if checked and len(input_grads) != len(inputs):
        raise ValueError(f"check_layer: {layer!r}.backward returned {len(input_grads)} gradient(s) for "
                         f"{len(inputs)} inputs; it must return one for each (a tuple, for several)")
    for name, (_, grad) in checked.items():
        if grad is None:
            raise ValueError(f"check_layer: {layer!r}.backward returned no gradient for {name} (is its input_grad "
                             "False? set layer.input_grad = True), or pass check_inputs=False")


def standard_cases(rng):
    """(name, layer, inputs, targets) for every mnn layer, sized for a quick check in float64."""
    from . import layers as L
    from .seq_layers import SequentialLayers

    def normal(*shape):
        return rng.standard_normal(shape)

    def labels(*shape, classes=4):
        return rng.integers(0, classes, shape)

    log_probs = normal(5, 4)
    log_probs -= numpy.log(numpy.exp(log_probs).sum(-1, keepdims=True))
    return [
        ("LinearLayer", L.LinearLayer(5, 3), [normal(4, 5)], None),
        ("ReluLayer", L.ReluLayer(), [normal(4, 6)], None),
        ("SigmoidLayer", L.SigmoidLayer(), [normal(4, 6)], None),
        ("TanhLayer", L.TanhLayer(), [normal(4, 6)], None),
        ("GeluLayer", L.GeluLayer(), [normal(4, 6)], None),
        ("SoftmaxLayer", L.SoftmaxLayer(), [normal(4, 6)], None),
        ("LogSoftmaxLayer", L.LogSoftmaxLayer(), [normal(4, 6)], None),
        ("FlattenLayer", L.FlattenLayer(), [normal(2, 3, 4)], None),
        ("DropoutLayer (eval)", L.DropoutLayer(0.5).eval(), [normal(3, 4)], None),
        ("MatrixProduct", L.MatrixProduct(), [normal(2, 3, 4), normal(2, 4, 5)], None),
        ("MSELossLayer", L.MSELossLayer(), [normal(4, 3)], normal(4, 3)),
        ("NllLossLayer", L.NllLossLayer(), [log_probs], labels(5)),
        ("CrossEntropyLossLayer", L.CrossEntropyLossLayer(), [normal(5, 4)], labels(5)),
        ("Conv2dLayer", L.Conv2dLayer(2, 3, 3, stride=2, padding=1), [normal(2, 2, 7, 6)], None),
        ("MaxPool2dLayer", L.MaxPool2dLayer(2), [normal(2, 3, 6, 6)], None),
        ("AvgPool2dLayer", L.AvgPool2dLayer(3, 2), [normal(2, 3, 7, 7)], None),
        ("BatchNormLayer", L.BatchNormLayer(4), [normal(6, 4)], None),
        ("BatchNorm2dLayer", L.BatchNorm2dLayer(3), [normal(2, 3, 4, 4)], None),
        ("LayerNormLayer", L.LayerNormLayer(6), [normal(3, 6)], None),
        ("EmbeddingLayer", L.EmbeddingLayer(7, 5), [labels(3, 4, classes=7)], None),
        ("PositionalEmbeddingLayer", L.PositionalEmbeddingLayer(6, 4), [normal(2, 5, 4)], None),
        ("MultiHeadAttention", L.MultiHeadAttention(8, 2), [normal(2, 5, 8)], None),
        ("ResidualBlock", L.ResidualBlock(SequentialLayers([L.LayerNormLayer(4), L.LinearLayer(4, 4)])),
         [normal(3, 4)], None),
        ("RNNLayer", L.RNNLayer(3, 4), [normal(2, 5, 3)], None),
        ("LSTMLayer", L.LSTMLayer(3, 4), [normal(2, 5, 3)], None),
        ("GRULayer", L.GRULayer(3, 4), [normal(2, 5, 3)], None),
    ]


def check_all_layers(seed=0):
    """Run ``check_layer`` on every mnn layer; yields (name, errors)."""
    from . import backend

    previous = backend.default_dtype()
    backend.set_default_dtype(numpy.float64)
    try:
        for name, layer, inputs, targets in standard_cases(numpy.random.default_rng(seed)):
            yield name, check_layer(layer, *inputs, targets=targets)
    finally:
        backend.set_default_dtype(previous)
