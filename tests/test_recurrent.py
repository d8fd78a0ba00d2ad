"""RNN, LSTM and GRU: back-propagation through time against finite differences and torch.nn.RNN/LSTM/GRU."""
import numpy
import pytest
import torch
from reference import max_relative_difference

import mnn
from mnn.gradcheck import check_layer

TOL = 1e-6
CELLS = {"rnn": (mnn.RNNLayer, torch.nn.RNN, 1), "lstm": (mnn.LSTMLayer, torch.nn.LSTM, 2),
         "gru": (mnn.GRULayer, torch.nn.GRU, 1)}  # mnn layer, torch module, arrays in the state


def as_tuple(state):
    return state if isinstance(state, tuple) else (state,)


def pack(parts):
    return tuple(parts) if len(parts) > 1 else parts[0]


class StateInOut(mnn.Layer):
    """A recurrent layer seen by check_layer with its state as inputs and outputs.

    ``forward(x, *initial_state)`` returns each sample's outputs and final state side by side,
    so finite differences check ``state_grad`` (the gradient w.r.t. the initial state) and
    ``backward(g, final_state_grad)`` (a gradient flowing into the final state).
    """

    def __init__(self, layer):
        super().__init__()
        self.layer, self.params, self.grads = layer, layer.params, layer.grads

    def forward(self, x, *state):
        y = self.layer.forward(x, pack(state))
        self.shape = y.shape
        return numpy.concatenate([y.reshape(len(y), -1), *as_tuple(self.layer.final_state)], axis=1)

    def backward(self, g):
        batch, length, size = self.shape
        g_y, g_final = g[:, :length * size].reshape(self.shape), g[:, length * size:]
        g_state = numpy.split(g_final, g_final.shape[1] // size, axis=1)
        dx = self.layer.backward(g_y, pack(g_state))
        return (dx, *as_tuple(self.layer.state_grad))


def torch_copy(layers, torch_cls, dtype=torch.float64):
    """A torch module with ``len(layers)`` layers holding the weights of the mnn layers, by name."""
    first = layers[0]
    module = torch_cls(first.input_size, first.hidden_size, num_layers=len(layers), bias=first.bias,
                       batch_first=True).to(dtype)
    with torch.no_grad():
        for index, layer in enumerate(layers):
            for name, value in layer.params.items():
                getattr(module, f"{name}_l{index}").copy_(torch.tensor(value))
    return module


def torch_run(module, x, state, g, g_final):
    """Torch's outputs, final state, and gradients of sum(Y * g) + sum(final state * g_final)."""
    tx = torch.tensor(x, requires_grad=True)
    t_state = [torch.tensor(s[None], requires_grad=True) for s in state]
    y, final = module(tx, pack(t_state))
    final = as_tuple(final)
    loss = (y * torch.tensor(g)).sum() + sum((f * torch.tensor(gf[None])).sum() for f, gf in zip(final, g_final))
    loss.backward()
    return (y.detach().numpy(), [f.detach().numpy()[0] for f in final], tx.grad.numpy(),
            [s.grad.numpy()[0] for s in t_state])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cell", CELLS)
def test_finite_differences_for_input_and_parameters(cell, bias, float64, rng):
    layer = CELLS[cell][0](3, 4, bias=bias)
    errors = check_layer(layer, rng.standard_normal((2, 5, 3)))
    assert set(errors) == {"input0", *layer.params, *(f"{name} (accumulated)" for name in layer.params)}
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("cell", CELLS)
def test_finite_differences_for_initial_and_final_state(cell, float64, rng):
    layer_cls, _, parts = CELLS[cell]
    state = [rng.standard_normal((2, 4)) for _ in range(parts)]
    layer = layer_cls(3, 4)
    errors = check_layer(StateInOut(layer), rng.standard_normal((2, 5, 3)), *state)
    assert len(errors) == 1 + parts + 2 * len(layer.params)  # the input, the state, the parameters (and their +=)
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cell", CELLS)
def test_matches_torch_with_state_in_and_out(cell, bias, float64, rng):
    layer_cls, torch_cls, parts = CELLS[cell]
    layer = layer_cls(5, 6, bias=bias)
    module = torch_copy([layer], torch_cls)
    x = rng.standard_normal((3, 7, 5))
    state = [rng.standard_normal((3, 6)) for _ in range(parts)]
    g, g_final = rng.standard_normal((3, 7, 6)), [rng.standard_normal((3, 6)) for _ in range(parts)]
    y = layer.forward(x, pack(state))
    dx = layer.backward(g, pack(g_final))
    t_y, t_final, t_dx, t_state_grad = torch_run(module, x, state, g, g_final)
    assert max_relative_difference(y, t_y) <= TOL
    for ours, theirs in zip(as_tuple(layer.final_state), t_final):
        assert max_relative_difference(ours, theirs) <= TOL
    assert max_relative_difference(dx, t_dx) <= TOL
    for ours, theirs in zip(as_tuple(layer.state_grad), t_state_grad):
        assert max_relative_difference(ours, theirs) <= TOL
    for name in layer.params:
        assert max_relative_difference(layer.grads[name], getattr(module, f"{name}_l0").grad.numpy()) <= TOL, name


@pytest.mark.parametrize("cell", CELLS)
def test_zero_initial_state_by_default_and_no_final_gradient(cell, float64, rng):
    layer_cls, torch_cls, parts = CELLS[cell]
    layer = layer_cls(4, 5)
    module = torch_copy([layer], torch_cls)
    x, g = rng.standard_normal((2, 6, 4)), rng.standard_normal((2, 6, 5))
    y = layer.forward(x)
    dx = layer.backward(g)
    zeros = [numpy.zeros((2, 5))] * parts
    t_y, _, t_dx, t_state_grad = torch_run(module, x, zeros, g, zeros)
    assert max_relative_difference(y, t_y) <= TOL and max_relative_difference(dx, t_dx) <= TOL
    for ours, theirs in zip(as_tuple(layer.state_grad), t_state_grad):
        assert max_relative_difference(ours, theirs) <= TOL


@pytest.mark.parametrize("cell", CELLS)
def test_two_stacked_layers_equal_a_two_layer_torch_module(cell, float64, rng):
    layer_cls, torch_cls, _ = CELLS[cell]
    layers = [layer_cls(4, 6), layer_cls(6, 6)]
    net = mnn.SequentialLayers(layers)
    module = torch_copy(layers, torch_cls)
    x, g = rng.standard_normal((3, 5, 4)), rng.standard_normal((3, 5, 6))
    y = net.forward(x)
    dx = net.backward(g)
    tx = torch.tensor(x, requires_grad=True)
    t_y, _ = module(tx)
    t_y.backward(torch.tensor(g))
    assert max_relative_difference(y, t_y.detach().numpy()) <= TOL
    assert max_relative_difference(dx, tx.grad.numpy()) <= TOL
    grads = net.grads
    assert len(grads) == len(list(module.parameters()))
    for name, grad in grads.items():
        index, param = name.split(".")
        assert max_relative_difference(grad, getattr(module, f"{param}_l{index}").grad.numpy()) <= TOL, name


@pytest.mark.parametrize("cell", CELLS)
def test_carrying_state_across_calls_equals_one_call(cell, float64, rng):
    """Truncated BPTT: two chunks with the state carried equal one call on the whole sequence,
    and passing the second chunk's state_grad back as final_state_grad gives full BPTT."""
    layer_cls = CELLS[cell][0]
    first = layer_cls(3, 4)
    second, whole = layer_cls(3, 4), layer_cls(3, 4)
    for other in (second, whole):
        for name, value in first.params.items():
            other.params[name][...] = value
    x, g = rng.standard_normal((2, 9, 3)), rng.standard_normal((2, 9, 4))
    y = whole.forward(x)
    dx = whole.backward(g)

    y1 = first.forward(x[:, :4])
    second.initial_state = first.final_state  # what a training loop does between batches
    y2 = second.forward(x[:, 4:])
    assert numpy.allclose(numpy.concatenate([y1, y2], axis=1), y, rtol=0, atol=1e-12)
    for ours, theirs in zip(as_tuple(second.final_state), as_tuple(whole.final_state)):
        assert numpy.allclose(ours, theirs, rtol=0, atol=1e-12)

    dx2 = second.backward(g[:, 4:])
    dx1 = first.backward(g[:, :4], final_state_grad=second.state_grad)
    assert numpy.allclose(numpy.concatenate([dx1, dx2], axis=1), dx, rtol=0, atol=1e-12)
    for name, grad in whole.grads.items():
        assert numpy.allclose(first.grads[name] + second.grads[name], grad, rtol=0, atol=1e-12), name


def test_state_argument_overrides_the_attribute(float64, rng):
    layer = mnn.LSTMLayer(3, 4)
    x = rng.standard_normal((2, 5, 3))
    state = (rng.standard_normal((2, 4)), rng.standard_normal((2, 4)))
    given = layer.forward(x, state)
    layer.initial_state = state
    assert numpy.array_equal(layer.forward(x), given)
    layer.initial_state = None
    assert numpy.array_equal(layer.forward(x, state), given)
    assert not numpy.allclose(layer.forward(x), given)


@pytest.mark.parametrize("cell", CELLS)
def test_gradients_accumulate_and_input_grad_can_be_skipped(cell, rng):
    layer = CELLS[cell][0](3, 4)
    x = rng.standard_normal((2, 5, 3)).astype(numpy.float32)
    g = rng.standard_normal((2, 5, 4)).astype(numpy.float32)
    y = layer.forward(x)
    assert y.dtype == numpy.float32 and y.shape == (2, 5, 4) and y.flags.c_contiguous
    dx = layer.backward(g)
    assert dx.dtype == numpy.float32 and dx.shape == x.shape
    once = {name: grad.copy() for name, grad in layer.grads.items()}
    layer.input_grad = False
    assert layer.backward(g) is None
    for name, grad in layer.grads.items():
        assert numpy.allclose(grad, 2 * once[name], rtol=1e-5, atol=1e-6), name
    layer.zero_grads()
    assert not any(grad.any() for grad in layer.grads.values())


@pytest.mark.parametrize("cell", CELLS)
def test_weights_are_named_shaped_and_initialised_as_pytorch(cell):
    layer_cls, torch_cls, _ = CELLS[cell]
    mnn.backend.seed(5)
    layer = layer_cls(30, 200)
    module = torch_cls(30, 200, batch_first=True)
    ours = {name: value.shape for name, value in layer.params.items()}
    assert ours == {name.removesuffix("_l0"): tuple(value.shape) for name, value in module.state_dict().items()}
    bound = 1 / numpy.sqrt(200)
    for value in layer.params.values():
        assert value.dtype == numpy.float32 and numpy.abs(value).max() <= bound
    assert numpy.isclose(layer.params["weight_hh"].std(), bound / numpy.sqrt(3), rtol=0.02)
    assert set(layer_cls(3, 4, bias=False).params) == {"weight_ih", "weight_hh"}
    assert layer.config() == {"input_size": 30, "hidden_size": 200, "bias": True}
    assert repr(layer) == f"{layer_cls.__name__}(input_size=30, hidden_size=200, bias=True)"


def test_bad_input_names_the_layer_and_the_shapes():
    lstm, gru = mnn.LSTMLayer(3, 4), mnn.GRULayer(3, 4)
    x = numpy.zeros((2, 5, 3), dtype=numpy.float32)
    with pytest.raises(ValueError, match=r"LSTMLayer\(input_size=3.*\(2, 5, 2\).*last dimension 3"):
        lstm.forward(numpy.zeros((2, 5, 2), dtype=numpy.float32))
    with pytest.raises(ValueError, match=r"GRULayer.*\(10, 3\); expected 3 dimensions"):
        gru.forward(numpy.zeros((10, 3), dtype=numpy.float32))
    with pytest.raises(ValueError, match="floating-point"):
        gru.forward(numpy.zeros((2, 5, 3), dtype=numpy.int64))
    with pytest.raises(ValueError, match=r"GRULayer.*initial state h of shape \(3, 4\); expected \(2, 4\)"):
        gru.forward(x, numpy.zeros((3, 4), dtype=numpy.float32))
    gru.initial_state = numpy.zeros((2, 5), dtype=numpy.float32)  # e.g. carried from another layer
    with pytest.raises(ValueError, match=r"initial state h of shape \(2, 5\); expected \(2, 4\)"):
        gru.forward(x)
    with pytest.raises(ValueError, match=r"LSTMLayer.*initial state must be a pair \(h, c\) of arrays of shape "
                                         r"\(2, 4\), got an array of shape \(2, 4\)$"):
        lstm.forward(x, numpy.zeros((2, 4), dtype=numpy.float32))
    with pytest.raises(ValueError, match=r"GRULayer.*must be an array of shape \(2, 4\), got a tuple of 2: "
                                         r"\(2, 4\), int$"):
        gru.forward(x, (numpy.zeros((2, 4)), 5))
    with pytest.raises(ValueError, match=r"initial state c of shape \(1, 4\); expected \(2, 4\)"):
        lstm.forward(x, (numpy.zeros((2, 4)), numpy.zeros((1, 4))))
    with pytest.raises(ValueError, match="initial state h must be a floating-point array"):
        mnn.RNNLayer(3, 4).forward(x, numpy.zeros((2, 4), dtype=numpy.int64))
    with pytest.raises(RuntimeError, match="before forward"):
        mnn.RNNLayer(3, 4).backward(numpy.zeros((2, 5, 4), dtype=numpy.float32))
    lstm.forward(x)
    with pytest.raises(ValueError, match=r"final state gradient h of shape \(2, 5\); expected \(2, 4\)"):
        lstm.backward(numpy.zeros((2, 5, 4), dtype=numpy.float32), (numpy.zeros((2, 5)), numpy.zeros((2, 4))))


def test_an_lstm_learns_to_remember_the_first_input(rng):
    """The sign of the first input, asked for at every step: the state must carry it along."""
    mnn.backend.seed(0)
    net = mnn.SequentialLayers([mnn.LSTMLayer(1, 16), mnn.LinearLayer(16, 1), mnn.MSELossLayer()])
    net.optimizer = mnn.optim.AdamW(net, lr=1e-2, weight_decay=0)
    x = rng.standard_normal((64, 12, 1)).astype(numpy.float32)
    targets = numpy.repeat(numpy.sign(x[:, :1]), 12, axis=1)  # predicting 0 would give loss 1
    losses = []
    for _ in range(300):  # at 150 steps float32 rounding decided whether a passing spike was over
        net.zero_grads()
        losses.append(float(net(x, targets)))
        net.backward()
        net.step()
    assert losses[0] > 0.9 and losses[-1] < 0.2, (losses[0], losses[-1])  # here: 1.01, then 0.025


@pytest.mark.cupy
@pytest.mark.parametrize("cell", CELLS)
def test_the_same_gradients_under_cupy(cell, rng):
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (no GPU here)")
    layer_cls, _, parts = CELLS[cell]
    cpu = layer_cls(5, 8)
    mnn.backend.use("cupy")
    try:
        gpu = layer_cls(5, 8)
    finally:
        mnn.backend.use("numpy")
    for name, value in cpu.params.items():
        gpu.params[name][...] = cupy.asarray(value)
    x, g = rng.standard_normal((3, 6, 5)).astype(numpy.float32), rng.standard_normal((3, 6, 8)).astype(numpy.float32)
    state = tuple(rng.standard_normal((3, 8)).astype(numpy.float32) for _ in range(parts))
    y = cpu.forward(x, pack(state))
    dx = cpu.backward(g)
    gpu_y = gpu.forward(cupy.asarray(x), pack(tuple(cupy.asarray(s) for s in state)))
    gpu_dx = gpu.backward(cupy.asarray(g))
    assert isinstance(gpu_dx, cupy.ndarray)
    assert numpy.allclose(cupy.asnumpy(gpu_y), y, atol=1e-5) and numpy.allclose(cupy.asnumpy(gpu_dx), dx, atol=1e-5)
    for ours, theirs in zip(as_tuple(gpu.state_grad), as_tuple(cpu.state_grad)):
        assert numpy.allclose(cupy.asnumpy(ours), theirs, atol=1e-5)
    for name, grad in cpu.grads.items():
        assert numpy.allclose(cupy.asnumpy(gpu.grads[name]), grad, rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("cell", [mnn.RNNLayer, mnn.LSTMLayer, mnn.GRULayer])
@pytest.mark.parametrize("shape", [(1, 5, 3), (2, 1, 3), (2, 5, 3)])
def test_neither_the_output_nor_the_input_is_what_backward_saved(cell, shape, float64, rng):
    """Where B or T is 1 a transpose is already contiguous: swapping batch and time must still copy, so
    changing the output, or the input, after forward changes no gradient."""
    x, g = rng.standard_normal(shape), rng.standard_normal(shape[:2] + (4,))
    layer = cell(3, 4)
    layer.forward(x)
    expected_dx = layer.backward(g)
    expected = {name: grad.copy() for name, grad in layer.grads.items()}
    layer.zero_grads()
    changed = x.copy()
    y = layer.forward(changed)
    y *= 2  # the caller's arrays to change
    changed *= 3
    assert numpy.array_equal(layer.backward(g), expected_dx)
    for name, grad in layer.grads.items():
        assert numpy.array_equal(grad, expected[name]), name
