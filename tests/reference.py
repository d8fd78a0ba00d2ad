"""Compare an mnn layer's gradients with PyTorch autograd (the test-only reference)."""
import numpy
import torch

from mnn.gradcheck import relative_error  # noqa: F401  (re-exported for tests)
from mnn.layers.base import LossLayer


def max_relative_difference(ours, theirs):
    ours, theirs = numpy.asarray(ours, dtype=numpy.float64), numpy.asarray(theirs, dtype=numpy.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    scale = max(numpy.abs(theirs).max(initial=0.0), 1e-12)
    return float(numpy.abs(ours - theirs).max(initial=0.0) / scale)


def torch_gradients(torch_fn, inputs, params, upstream=None, targets=None):
    """Run ``torch_fn(inputs, params[, targets])`` under autograd; return (output, input grads, param grads)."""
    t_inputs = [torch.tensor(x, requires_grad=True) for x in inputs]
    t_params = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    out = torch_fn(*t_inputs, params=t_params) if targets is None else \
        torch_fn(*t_inputs, torch.tensor(targets), params=t_params)
    if upstream is None:
        out.backward()
    else:
        out.backward(torch.tensor(upstream))
    grads = [x.grad.numpy() if x.grad is not None else numpy.zeros_like(x.detach().numpy()) for x in t_inputs]
    return out.detach().numpy(), grads, {k: v.grad.numpy() for k, v in t_params.items()}


def assert_matches_torch(layer, torch_fn, *inputs, targets=None, tol=1e-6, seed=0):
    """mnn's output, input gradients and parameter gradients equal torch's (relative error <= tol)."""
    rng = numpy.random.default_rng(seed)
    layer.zero_grads()
    params = {k: numpy.array(v) for k, v in layer.params.items()}
    if isinstance(layer, LossLayer):
        out = layer.forward(*inputs, targets)
        ours = layer.backward()
        upstream = None
    else:
        out = layer.forward(*inputs)
        upstream = rng.standard_normal(out.shape)
        ours = layer.backward(upstream)
    ours = ours if isinstance(ours, tuple) else (ours,)
    t_out, t_grads, t_param_grads = torch_gradients(torch_fn, inputs, params, upstream, targets)
    assert max_relative_difference(out, t_out) <= tol, "forward differs from torch"
    for i, (g, tg) in enumerate(zip(ours, t_grads)):
        assert max_relative_difference(g, tg) <= tol, f"input {i} gradient differs from torch"
    for name, tg in t_param_grads.items():
        assert max_relative_difference(layer.grads[name], tg) <= tol, f"gradient of {name} differs from torch"
