r"""Finite-difference checks of any layer's hand-written backward.

For a layer $y = f(x; \theta)$, pick a random output weighting $v$ and look at the
scalar $s(x) = \langle v, f(x) \rangle$. Its gradient is exactly what ``backward(v)``
returns, $\nabla_x s = J^\top v$. Along a random direction $u$ the central difference

$$\frac{s(x + \epsilon u) - s(x - \epsilon u)}{2\epsilon} = \langle \nabla_x s, u \rangle + O(\epsilon^2)$$

must then agree with $\langle$ ``backward(v)`` $, u\rangle$, and likewise for every
parameter. A few such random probes test the whole Jacobian without building it.
Run in float64: in float32 the rounding error swamps $O(\epsilon^2)$.
"""
import numpy

from .layers.base import LossLayer


def _scalar(layer, inputs, targets, weights):
    out = layer.forward(*inputs, targets) if isinstance(layer, LossLayer) else layer.forward(*inputs)
    if isinstance(layer, LossLayer):
        return float(out)
    return float((out * weights).sum())


def _analytic(layer, inputs, targets, weights):
    layer.zero_grads()
    if isinstance(layer, LossLayer):
        layer.forward(*inputs, targets)
        grads = layer.backward()
    else:
        layer.forward(*inputs)
        grads = layer.backward(weights)
    grads = grads if isinstance(grads, tuple) else (grads,)
    return [None if g is None else g.copy() for g in grads], {name: g.copy() for name, g in layer.grads.items()}


def relative_error(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def check_layer(layer, *inputs, targets=None, probes=3, eps=1e-6, seed=0, check_inputs=True):
    """Worst relative error of the layer's input and parameter gradients, by name.

    Floating ``inputs`` must be float64 (integer inputs, such as token indices, are passed
    through unperturbed); for a loss layer pass ``targets``. Returns a dict such
    as ``{"input0": 3e-10, "w": 1e-9}``; values near 1e-8 or below mean backward is right.
    Call ``layer.eval()`` first for layers with randomness (dropout) unless the mask is fixed.
    """
    rng = numpy.random.default_rng(seed)
    inputs = [x.copy() for x in inputs]
    for x in inputs:
        if x.dtype.kind == "f" and x.dtype != numpy.float64:
            raise ValueError(f"check_layer: inputs must be float64 for finite differences, got {x.dtype}")
    sample = layer.forward(*inputs, targets) if isinstance(layer, LossLayer) else layer.forward(*inputs)
    shape = () if isinstance(layer, LossLayer) else sample.shape
    errors = {}
    for _ in range(probes):
        weights = rng.standard_normal(shape)
        input_grads, param_grads = _analytic(layer, inputs, targets, weights)
        tensors = {f"input{i}": (x, g) for i, (x, g) in enumerate(zip(inputs, input_grads))
                   if check_inputs and x.dtype.kind == "f"}
        tensors.update({name: (layer.params[name], param_grads[name]) for name in layer.params})
        for name, (tensor, grad) in tensors.items():
            direction = rng.standard_normal(tensor.shape)
            tensor += eps * direction
            plus = _scalar(layer, inputs, targets, weights)
            tensor -= 2 * eps * direction
            minus = _scalar(layer, inputs, targets, weights)
            tensor += eps * direction
            numeric = (plus - minus) / (2 * eps)
            error = relative_error(float((grad * direction).sum()), numeric)
            errors[name] = max(errors.get(name, 0.0), error)
    return errors
