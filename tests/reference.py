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


def whole_model_matches_torch(net, rng, vocab, tol=1e-6):
    """A language model's loss and every parameter gradient equal its torch mirror's (float64);
    returns the (mnn name, torch parameter) pairs compared."""
    from bench.torch_mirror import mirror

    model, loss_fn, pairs = mirror(net, torch.float64)
    x, y = rng.integers(0, vocab, (3, 8)), rng.integers(0, vocab, (3, 8))
    loss = net(x, y)
    net.backward()
    t_loss = loss_fn(model(torch.tensor(x)), torch.tensor(y))
    t_loss.backward()
    assert abs(float(loss) - t_loss.item()) <= 1e-12 * abs(t_loss.item())
    grads = net.grads
    assert len(pairs) == len(grads) == len(list(model.parameters()))
    for name, parameter in pairs:
        assert max_relative_difference(grads[name], parameter.grad.numpy()) <= tol, name
    return pairs


def adamw_steps_match_torch(net, rng, vocab, steps=4):
    """Four AdamW steps of a language model and of its torch mirror give the same losses (float64)."""
    from bench.torch_mirror import mirror

    from mnn import optim

    model, loss_fn, _ = mirror(net, torch.float64)
    net.optimizer = optim.AdamW(net, lr=1e-2, weight_decay=0.1)
    torch_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        x, y = rng.integers(0, vocab, (3, 8)), rng.integers(0, vocab, (3, 8))
        net.zero_grads()
        loss = float(net(x, y))
        net.backward()
        net.step()
        torch_optimizer.zero_grad()
        t_loss = loss_fn(model(torch.tensor(x)), torch.tensor(y))
        t_loss.backward()
        torch_optimizer.step()
        assert abs(loss - t_loss.item()) <= 1e-10
