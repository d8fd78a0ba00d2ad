"""SequentialLayers: the seed API, whole-MLP gradients and one SGD step against torch, toy training."""
import json

import numpy
import pytest
import torch
from reference import max_relative_difference

import mnn
from mnn import models


def make_mlp(loss):
    return mnn.SequentialLayers([mnn.LinearLayer(6, 8), mnn.ReluLayer(), mnn.LinearLayer(8, 8), mnn.TanhLayer(),
                                 mnn.LinearLayer(8, 4), loss])


def torch_mlp(net):
    layers = [net.layers[i] for i in (0, 2, 4)]
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 4)).double()
    with torch.no_grad():
        for ours, theirs in zip(layers, [model[0], model[2], model[4]]):
            theirs.weight.copy_(torch.tensor(ours.params["w"]))
            theirs.bias.copy_(torch.tensor(ours.params["b"]))
    return model


def test_mlp_gradients_equal_torch(float64, rng):
    net = make_mlp(mnn.CrossEntropyLossLayer())
    model = torch_mlp(net)
    x, labels = rng.standard_normal((16, 6)), rng.integers(0, 4, 16)
    loss = net(x, labels)
    passed = net.backward()
    t_x = torch.tensor(x, requires_grad=True)
    t_loss = torch.nn.functional.cross_entropy(model(t_x), torch.tensor(labels))
    t_loss.backward()
    assert abs(float(loss) - t_loss.item()) <= 1e-12
    assert len(passed) == len(net.layers)
    assert max_relative_difference(passed[-1], t_x.grad.numpy()) <= 1e-6
    grads = net.grads
    for index, t_layer in zip((0, 2, 4), (model[0], model[2], model[4])):
        assert max_relative_difference(grads[f"{index}.w"], t_layer.weight.grad.numpy()) <= 1e-6
        assert max_relative_difference(grads[f"{index}.b"], t_layer.bias.grad.numpy()) <= 1e-6


def test_step_equals_torch_sgd(float64, rng):
    net = make_mlp(mnn.MSELossLayer())
    model = torch_mlp(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = rng.standard_normal((8, 6)), rng.standard_normal((8, 4))
    for _ in range(3):
        net.zero_grads()
        net(x, y)
        net.backward()
        net.step()
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(torch.tensor(x)), torch.tensor(y)).backward()
        optimizer.step()
    params = net.params
    for index, t_layer in zip((0, 2, 4), (model[0], model[2], model[4])):
        assert max_relative_difference(params[f"{index}.w"], t_layer.weight.detach().numpy()) <= 1e-12


def toy_classification(rng, n=256):
    x = rng.standard_normal((n, 6)).astype(numpy.float32)
    labels = (x[:, 0] > 0).astype(int) + 2 * (x[:, 1] > 0).astype(int)
    return x, labels


def train(net, x, targets, steps=300):
    losses = []
    for _ in range(steps):
        net.zero_grads()
        losses.append(float(net(x, targets)))
        net.backward()
        net.step()
    return losses


def test_mlp_with_mse_learns(rng):
    mnn.backend.seed(0)
    x = rng.standard_normal((128, 6)).astype(numpy.float32)
    y = numpy.stack([x[:, 0] * x[:, 1], numpy.sin(x[:, 2]), x[:, 3], -x[:, 4]], 1).astype(numpy.float32)
    net = make_mlp(mnn.MSELossLayer())
    net.optimizer = mnn.optim.SGD(net, lr=0.1, momentum=0.9)
    losses = train(net, x, y)
    assert losses[-1] < 0.2 * losses[0]


@pytest.mark.parametrize("head", ["cross-entropy", "log-softmax-nll"])
def test_classifier_learns(head, rng):
    mnn.backend.seed(0)
    x, labels = toy_classification(rng)
    layers = [mnn.LinearLayer(6, 16), mnn.ReluLayer(), mnn.LinearLayer(16, 4)]
    layers += [mnn.CrossEntropyLossLayer()] if head == "cross-entropy" else [mnn.LogSoftmaxLayer(), mnn.NllLossLayer()]
    net = mnn.SequentialLayers(layers)
    net.optimizer = mnn.optim.SGD(net, lr=0.5)
    losses = train(net, x, labels)
    accuracy = (net(x).argmax(1) == labels).mean()
    assert losses[-1] < 0.3 * losses[0] and accuracy > 0.9


def test_default_step_is_plain_gradient_descent(rng):
    net = mnn.SequentialLayers([mnn.LinearLayer(3, 2), mnn.MSELossLayer()])
    x, y = rng.standard_normal((4, 3)).astype(numpy.float32), rng.standard_normal((4, 2)).astype(numpy.float32)
    before = net.params["0.w"].copy()
    net(x, y)
    net.backward()
    net.step()
    assert numpy.allclose(net.params["0.w"], before - 0.01 * net.grads["0.w"])


def test_call_without_targets_returns_the_output(rng):
    net = make_mlp(mnn.CrossEntropyLossLayer())
    out = net(rng.standard_normal((5, 6)).astype(numpy.float32))
    assert out.shape == (5, 4)


def test_nested_sequential_is_a_layer(float64, rng):
    inner = mnn.SequentialLayers([mnn.LinearLayer(4, 5), mnn.TanhLayer()])
    net = mnn.SequentialLayers([inner, mnn.LinearLayer(5, 2), mnn.MSELossLayer()])
    assert set(net.params) == {"0.0.w", "0.0.b", "1.w", "1.b"}
    errors = mnn.gradcheck.check_layer(inner, rng.standard_normal((3, 4)))
    assert max(errors.values()) < 1e-6


def test_debug_prints_shapes(rng, capsys):
    net = make_mlp(mnn.CrossEntropyLossLayer())
    net(rng.standard_normal((5, 6)).astype(numpy.float32), rng.integers(0, 4, 5), debug=True)
    net.backward(debug=True)
    out = capsys.readouterr().out
    assert "LinearLayer: (5, 6) -> (5, 8)" in out and "grad (5, 6)" in out
    net.input_grad = False  # the first layer's parameter gradients are still made, and told
    net(rng.standard_normal((5, 6)).astype(numpy.float32), rng.integers(0, 4, 5))
    net.backward(debug=True)
    assert "LinearLayer: no input gradient params {'w': (8, 6), 'b': (8,)}" in capsys.readouterr().out


def test_state_dict_round_trip(rng):
    net, other = make_mlp(mnn.MSELossLayer()), make_mlp(mnn.MSELossLayer())
    other.load_weights({k: v.copy() for k, v in net.state_dict().items()})
    x = rng.standard_normal((2, 6)).astype(numpy.float32)
    assert numpy.array_equal(net(x), other(x))


def test_load_weights_rejects_a_wrong_shape_and_changes_nothing():
    net = make_mlp(mnn.MSELossLayer())
    before = {k: v.copy() for k, v in net.params.items()}
    state = {k: numpy.zeros_like(v) for k, v in before.items()}
    state["4.w"] = numpy.zeros((3, 8), dtype=numpy.float32)
    with pytest.raises(ValueError, match=r"4\.w has shape \(3, 8\); expected \(4, 8\)"):
        net.load_weights(state)
    assert all(numpy.array_equal(before[k], v) for k, v in net.params.items())


def test_backward_debug_must_be_keyword():
    with pytest.raises(TypeError, match="debug"):
        make_mlp(mnn.MSELossLayer()).backward(True)


def test_input_gradient_can_be_skipped(float64, rng):
    net = mnn.SequentialLayers([mnn.FlattenLayer(), mnn.LinearLayer(6, 5), mnn.ReluLayer(), mnn.LinearLayer(5, 3),
                                mnn.CrossEntropyLossLayer()])
    x, labels = rng.standard_normal((4, 2, 3)), rng.integers(0, 3, 4)
    net(x, labels)
    full = net.backward()
    expected = {k: v.copy() for k, v in net.grads.items()}
    net.zero_grads()
    net.input_grad = False
    net(x, labels)
    partial = net.backward()
    assert len(full) == 5 and full[-1].shape == (4, 2, 3)
    assert len(partial) == 3 and partial[-1].shape == (4, 5)
    assert all(numpy.array_equal(expected[k], v) for k, v in net.grads.items())
    net.input_grad = True
    assert net(x, labels) and len(net.backward()) == 5


def test_a_network_is_a_list_of_layers():
    layers = [mnn.LinearLayer(3, 4), mnn.ReluLayer(), mnn.LinearLayer(4, 2), mnn.MSELossLayer()]
    net = mnn.SequentialLayers(layers)
    assert len(net) == 4 and net[0] is layers[0] and net[-1] is layers[-1] and list(net) == layers
    assert net[1:3] == layers[1:3]


@pytest.mark.parametrize("build", [
    lambda: models.mlp(hidden=(16, 8)), lambda: models.cnn(channels=(2, 3), hidden=(8,)),
    lambda: models.gpt(vocab_size=11, context=8, layers=2, heads=2, width=16, dropout=0.1, bias=True),
])
def test_get_config_describes_the_network_that_from_config_rebuilds(build):
    net = build()
    config = net.get_config()
    assert json.loads(json.dumps(config)) == config  # plain data
    rebuilt = mnn.SequentialLayers.from_config(config)
    assert rebuilt.get_config() == config and repr(rebuilt) == repr(net)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    rebuilt.load_weights(net.state_dict())
    x = numpy.random.default_rng(0).integers(0, 11, (2, 8)) if "Embedding" in repr(net) else \
        numpy.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(numpy.float32)
    assert numpy.array_equal(net.eval()(x), rebuilt.eval()(x))


def test_from_config_names_no_code_outside_mnn():
    with pytest.raises(ValueError, match="unknown layer type 'os.system'"):
        mnn.SequentialLayers.from_config({"layers": [{"type": "os.system", "config": {}}]})

    class Double(mnn.Layer):
        def forward(self, x):
            return 2 * x

    net = mnn.SequentialLayers([Double(), mnn.ReluLayer()])
    rebuilt = mnn.SequentialLayers.from_config(net.get_config(), custom_layers={"Double": Double})
    assert isinstance(rebuilt[0], Double)


def test_targets_for_a_network_without_a_loss_are_an_error():
    net = mnn.SequentialLayers([mnn.LinearLayer(3, 2)])
    with pytest.raises(ValueError, match="targets given, but the network ends in no loss layer"):
        net(numpy.ones((1, 3), dtype=numpy.float32), numpy.ones((1, 2), dtype=numpy.float32))


def test_a_parameter_shared_without_its_gradient_is_refused_and_a_full_tie_trains_as_one():
    """Sharing only the array would drop one layer's gradient; sharing both adds the two, as a reused weight needs."""
    mnn.backend.set_default_dtype(numpy.float64)
    try:
        a, b = mnn.LinearLayer(4, 4, bias=False), mnn.LinearLayer(4, 4, bias=False)
        b.params["w"] = a.params["w"]
        with pytest.raises(ValueError, match=r"2.w shares its parameter array with 0.w but not its gradient array"):
            mnn.SequentialLayers([a, mnn.TanhLayer(), b, mnn.MSELossLayer()])
        b.grads["w"] = a.grads["w"]
        net = mnn.SequentialLayers([a, mnn.TanhLayer(), b, mnn.MSELossLayer()])
        rng = numpy.random.default_rng(0)
        x, y = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
        net(x, y)
        net.backward()
        w = torch.tensor(a.params["w"], requires_grad=True)
        torch.nn.functional.mse_loss(torch.tanh(torch.tensor(x) @ w.T) @ w.T, torch.tensor(y)).backward()
        assert [name for name, _, _ in net.named_parameters()] == ["0.w"]
        assert max_relative_difference(net.named_parameters()[0][2], w.grad.numpy()) < 1e-12
    finally:
        mnn.backend.set_default_dtype(numpy.float32)


def test_load_weights_checks_every_value_before_copying_any(rng):
    net = mnn.SequentialLayers([mnn.LinearLayer(2, 3), mnn.LinearLayer(3, 2), mnn.BatchNormLayer(2)])
    before = {name: value.copy() for name, value in net.state_dict().items()}
    bad_values = {"1.b": (numpy.array(["x", "y"]), "holds <U1 values; expected real numbers"),
                  "0.w": ([[1.0] * 2] * 3, "must be a NumPy or CuPy array, got list"),
                  "1.w": (numpy.full((2, 3), numpy.nan), "holds NaN, infinity or values beyond float32's range"),
                  "0.b": (numpy.array([1e300, 0, 0]), "holds NaN, infinity or values beyond float32's range"),
                  "2.weight": (numpy.array([1 + 2j, 1]), "complex128 values"),
                  "2.running_var": (numpy.array([1.0, -1.0], numpy.float32), "a variance, holds values below 0")}
    for name, (value, message) in bad_values.items():
        state = {key: numpy.ones(v.shape) for key, v in net.state_dict().items()}
        state[name] = value
        with pytest.raises((TypeError, ValueError), match=rf"load_weights: {name}.*{message}"):
            net.load_weights(state)
        assert all((before[key] == v).all() for key, v in net.state_dict().items())  # nothing half-loaded


def test_a_single_layer_saves_and_loads_weights(tmp_path):
    from mnn.checkpoint import read_weights, save_weights
    layer, copy = mnn.LinearLayer(3, 2), mnn.LinearLayer(3, 2)
    save_weights(tmp_path / "w.safetensors", layer)
    copy.load_weights(read_weights(tmp_path / "w.safetensors"))
    assert (copy.params["w"] == layer.params["w"]).all() and (copy.params["b"] == layer.params["b"]).all()


def test_a_loss_inside_a_layer_is_refused():
    inner = mnn.SequentialLayers([mnn.LinearLayer(4, 2), mnn.MSELossLayer()])
    for outer in ([inner, mnn.ReluLayer()], [mnn.ResidualBlock(inner)]):
        with pytest.raises(ValueError, match=r"item 0 \(\w+\) holds a loss layer, which a network used as a "
                                             r"layer skips"):
            mnn.SequentialLayers(outer)


def test_from_config_tells_what_is_wrong():
    build = mnn.SequentialLayers.from_config
    with pytest.raises(ValueError, match=r"a SequentialLayers without its 'layers'"):
        build({"layerz": []})
    with pytest.raises(ValueError, match=r"LinearLayer: .*missing 1 required positional argument: 'out_features'"):
        build({"layers": [{"type": "LinearLayer", "config": {"in_features": 2}}]})
    for base in ("Layer", "LossLayer", "CompositeLayer"):
        with pytest.raises(ValueError, match=rf"unknown layer type '{base}'"):
            build({"layers": [{"type": base}]})


def test_repr_indents_nested_networks():
    net = mnn.SequentialLayers([mnn.SequentialLayers([mnn.ReluLayer()]), mnn.MSELossLayer()])
    assert repr(net).splitlines() == ["SequentialLayers(", "  (0) SequentialLayers(", "    (0) ReluLayer()", "  )",
                                      "  (1) MSELossLayer()", ")"]
