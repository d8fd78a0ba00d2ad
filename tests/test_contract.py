"""The layer contract holds at run time: no silent wrong gradient, no repeated layer, clear errors."""
import numpy
import pytest
import torch
from reference import max_relative_difference

import mnn
from bench.torch_mirror import mirror
from mnn import models
from mnn.gradcheck import check_layer
from mnn.seq_layers import walk

TOL = 1e-6


class ReplayedDropout(torch.nn.Module):
    """torch's side of one mnn DropoutLayer: multiplies by the mask mnn drew in its forward."""

    def __init__(self, layer):
        super().__init__()
        self.scale = torch.tensor(layer.saved()[0])

    def forward(self, x):
        return x * self.scale


def replay_dropout_masks(model, net):
    """Swap every torch Dropout in the mirror for the mask its mnn layer used (same order)."""
    ours = [layer for _, layer in walk(net) if isinstance(layer, mnn.DropoutLayer)]
    theirs = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Dropout)]
    assert len(ours) == len(theirs) > 0
    for layer, name in zip(ours, theirs):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, ReplayedDropout(layer))


@pytest.mark.parametrize("tie_weights", [False, True])
def test_gpt_with_dropout_has_torch_gradients_for_the_same_masks(tie_weights, float64, rng):
    mnn.backend.seed(0)
    net = models.gpt(vocab_size=11, context=8, layers=2, heads=2, width=16, dropout=0.3, tie_weights=tie_weights)
    model, loss_fn, pairs = mirror(net, torch.float64)
    x, y = rng.integers(0, 11, (3, 8)), rng.integers(0, 11, (3, 8))
    loss = net(x, y)
    net.backward()
    replay_dropout_masks(model, net)
    t_loss = loss_fn(model(torch.tensor(x)), torch.tensor(y))
    t_loss.backward()
    assert abs(float(loss) - t_loss.item()) <= 1e-12 * abs(t_loss.item())
    grads = net.grads
    for name, parameter in pairs:
        assert max_relative_difference(grads[name], parameter.grad.numpy()) <= TOL, name


def test_gpt_blocks_hold_one_dropout_layer_per_place():
    net = models.gpt(vocab_size=5, context=4, layers=2, heads=1, width=4, dropout=0.1)
    dropouts = [layer for _, layer in walk(net) if isinstance(layer, mnn.DropoutLayer)]
    assert len(dropouts) == 1 + 3 * 2 and len({id(layer) for layer in dropouts}) == len(dropouts)  # + attention


@pytest.mark.parametrize("build", [
    lambda relu: [mnn.LinearLayer(2, 2), relu, mnn.LinearLayer(2, 2), relu],
    lambda relu: [mnn.ResidualBlock(mnn.SequentialLayers([relu])), mnn.ResidualBlock(mnn.SequentialLayers([relu]))],
    lambda relu: [mnn.SequentialLayers([mnn.LinearLayer(2, 2), relu]), relu],
])
def test_a_layer_object_used_twice_is_rejected(build):
    relu = mnn.ReluLayer()
    with pytest.raises(ValueError, match=r"same ReluLayer object sits at net\.\S+ and at net\.\S+"):
        mnn.SequentialLayers(build(relu))


def test_tied_parameters_stay_possible():
    net = models.gpt(vocab_size=7, context=4, layers=1, heads=1, width=4, tie_weights=True)
    head, embedding = net.layers[-2], net.layers[0]
    assert head.params["w"] is embedding.params["weight"]


def test_matrix_product_broadcasting_sums_the_gradient(float64, rng):
    for a_shape, b_shape in [((3, 4), (2, 4, 5)), ((2, 1, 3, 4), (5, 4, 2)), ((1, 3, 4), (2, 4, 5))]:
        layer = mnn.MatrixProduct()
        a, b = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
        assert max(check_layer(layer, a, b).values()) <= TOL
        out = layer.forward(a, b)
        upstream = rng.standard_normal(out.shape)
        grad_a, grad_b = layer.backward(upstream)
        ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
        (ta @ tb).backward(torch.tensor(upstream))
        assert grad_a.shape == a.shape and grad_b.shape == b.shape
        assert max_relative_difference(grad_a, ta.grad.numpy()) <= 1e-12
        assert max_relative_difference(grad_b, tb.grad.numpy()) <= 1e-12


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_sigmoid_tails_equal_torch_value_by_value(dtype):
    x = numpy.concatenate([numpy.linspace(-800, 800, 4001), [-38, -17, 0, 17, 38]]).astype(dtype)
    ours = mnn.SigmoidLayer().forward(x)
    theirs = torch.sigmoid(torch.tensor(x)).numpy()
    normal = theirs >= numpy.finfo(dtype).tiny  # below it, denormals: compare absolutely
    assert numpy.all(numpy.abs(ours[normal] - theirs[normal]) <= 4 * numpy.finfo(dtype).eps * theirs[normal])
    assert numpy.all(numpy.abs(ours[~normal] - theirs[~normal]) <= numpy.finfo(dtype).tiny)
    assert ours[x == -38][0] > 0 if dtype == numpy.float64 else ours[x == -17][0] == pytest.approx(4.14e-8, rel=1e-2)


def test_gradcheck_refuses_float32_parameters():
    layer = mnn.LinearLayer(3, 2)  # float32 by default
    with pytest.raises(ValueError, match=r"not float64 \({'w': 'float32', 'b': 'float32'}\).*set_default_dtype"):
        check_layer(layer, numpy.ones((2, 3)))
    with pytest.raises(ValueError, match="input 0 is float32"):
        check_layer(mnn.ReluLayer(), numpy.ones((2, 3), dtype=numpy.float32))


def test_gradcheck_catches_a_backward_that_overwrites_its_gradients():
    """Right derivatives, but ``=`` where ``+=`` belongs: accumulation and tied weights would break."""
    class Overwriting(mnn.LinearLayer):
        def backward(self, g):
            grads = {name: grad.copy() for name, grad in self.grads.items()}
            grad_x = super().backward(g)
            for name, grad in self.grads.items():
                grad -= grads[name]  # only this pass's gradient is left
            return grad_x

    mnn.backend.set_default_dtype(numpy.float64)
    try:
        right, wrong = check_layer(mnn.LinearLayer(3, 2), numpy.ones((2, 3))), check_layer(Overwriting(3, 2),
                                                                                            numpy.ones((2, 3)))
    finally:
        mnn.backend.set_default_dtype(numpy.float32)
    assert max(right.values()) < 1e-6 and right["w (accumulated)"] == 0
    assert wrong["w"] < 1e-6 and wrong["w (accumulated)"] == pytest.approx(0.5)


def test_gradcheck_leaves_the_layer_as_it_found_it(float64):
    """Parameters bit for bit, gradients, and the running statistics each training-mode forward moves."""
    layer = mnn.ResidualBlock(mnn.SequentialLayers([mnn.BatchNormLayer(4), mnn.LinearLayer(4, 4)]))
    for _, param, grad in layer.named_parameters():
        param[...], grad[...] = numpy.random.default_rng(0).standard_normal(param.shape), 0.5
    before = {name: value.copy() for name, value in layer.named_buffers()}
    before.update({name: (param.copy(), grad.copy()) for name, param, grad in layer.named_parameters()})
    errors = check_layer(layer, numpy.random.default_rng(1).standard_normal((6, 4)))
    assert max(errors.values()) < 1e-7
    for name, value in layer.named_buffers():
        numpy.testing.assert_array_equal(value, before[name])
    for name, param, grad in layer.named_parameters():
        numpy.testing.assert_array_equal(param, before[name][0])
        numpy.testing.assert_array_equal(grad, before[name][1])


def test_gradcheck_wants_a_gradient_for_every_input(float64):
    """y = a b whose backward forgets b's gradient passed, the check of input1 silently dropped."""
    class Product(mnn.Layer):
        def forward(self, a, b):
            self.save(a, b)
            return a * b

        def backward(self, g):
            a, b = self.saved()
            return g * b  # and g * a for b: forgotten

    ones = numpy.ones((2, 3))
    with pytest.raises(ValueError, match=r"backward returned 1 gradient\(s\) for 2 inputs"):
        check_layer(Product(), ones, ones)
    layer = mnn.LinearLayer(3, 2)
    layer.input_grad = False  # as mnn train leaves a network's first layer
    with pytest.raises(ValueError, match="no gradient for input0 .*set layer.input_grad = True"):
        check_layer(layer, ones)
    assert max(check_layer(layer, ones, check_inputs=False).values()) < 1e-7
    rnn = mnn.RNNLayer(3, 2)  # its state's gradient is in state_grad: the parameters alone are checked
    state = numpy.random.default_rng(0).standard_normal((2, 2))
    assert max(check_layer(rnn, numpy.ones((2, 4, 3)), state, check_inputs=False).values()) < 1e-7


def test_gradcheck_fails_a_nan_gradient(float64):
    """max(0.0, nan) is 0.0: a backward giving NaN passed with an error of 0."""
    class NanBackward(mnn.ReluLayer):
        def backward(self, g):
            return g * numpy.nan

    assert check_layer(NanBackward(), numpy.ones((2, 3)))["input0"] == numpy.inf


def test_gradcheck_passes_a_right_layer_whatever_the_random_directions(float64):
    """A direction nearly orthogonal to the gradient made the directional derivative nearly 0, and rounding
    divided by it failed batch norm for about 1 seed in 50."""
    x = numpy.random.default_rng(7).standard_normal((4, 3))
    worst = max(max(check_layer(mnn.BatchNormLayer(3), x, seed=seed).values()) for seed in range(60))
    assert worst < 1e-6


def test_a_composite_layer_refuses_a_parameter_of_its_own():
    block = mnn.ResidualBlock(mnn.SequentialLayers([mnn.LinearLayer(2, 2)]))
    with pytest.raises(TypeError, match="a composite layer's parameters are its sub-layers'"):
        block.add_param("s", numpy.ones(2))


def test_gradcheck_refuses_targets_for_a_layer_that_is_no_loss():
    with pytest.raises(ValueError, match="targets are for a loss layer, and SequentialLayers is none"):
        check_layer(mnn.SequentialLayers([mnn.ReluLayer(), mnn.MSELossLayer()]), numpy.ones((2, 3)),
                    targets=numpy.ones((2, 3)))


@pytest.mark.parametrize("make", [
    lambda: mnn.LinearLayer(0, 3), lambda: mnn.LinearLayer(-1, 3), lambda: mnn.LinearLayer(2.5, 3),
    lambda: mnn.LinearLayer(True, 3), lambda: mnn.Conv2dLayer(1, 0, 3), lambda: mnn.Conv2dLayer(1, 2, 3, stride=0),
    lambda: mnn.MaxPool2dLayer(0), lambda: mnn.AvgPool2dLayer(2, -1), lambda: mnn.BatchNormLayer(0),
    lambda: mnn.BatchNorm2dLayer(3, eps=0), lambda: mnn.BatchNormLayer(3, momentum=2), lambda: mnn.LayerNormLayer(0),
    lambda: mnn.LayerNormLayer(4, eps=float("nan")), lambda: mnn.EmbeddingLayer(0, 4),
    lambda: mnn.PositionalEmbeddingLayer(4, -2), lambda: mnn.MultiHeadAttention(0, 1),
    lambda: mnn.MultiHeadAttention(8, 0),
])
def test_impossible_layer_sizes_are_refused(make):
    with pytest.raises(ValueError, match=r"(must be an integer >= \d|eps must be|momentum must)"):
        make()


def test_a_residual_block_around_something_other_than_a_layer_is_refused():
    with pytest.raises(TypeError, match="ResidualBlock: the body must be an mnn layer.*got function"):
        mnn.ResidualBlock(lambda x: x)


@pytest.mark.parametrize("dropout", [1.0, -0.1, float("nan"), "0.1"])
def test_attention_names_itself_for_a_dropout_it_cannot_take(dropout):
    with pytest.raises(ValueError, match=r"MultiHeadAttention: dropout must lie in \[0, 1\)"):
        mnn.MultiHeadAttention(8, 2, dropout=dropout)


def test_a_python_list_as_input_names_the_layer():
    with pytest.raises(TypeError, match=r"LinearLayer\(in_features=3.*must be a NumPy or CuPy array, got list"):
        mnn.LinearLayer(3, 2).forward([[1.0, 2.0, 3.0]])
    net = mnn.SequentialLayers([mnn.LinearLayer(3, 2), mnn.MSELossLayer()])
    with pytest.raises(TypeError, match="targets must be a NumPy or CuPy array, got list"):
        net(numpy.ones((1, 3), dtype=numpy.float32), [[1.0, 2.0]])
    with pytest.raises(TypeError, match="EmbeddingLayer.*got list"):
        mnn.EmbeddingLayer(4, 2).forward([1, 2])


def test_a_gradient_of_the_wrong_shape_is_refused():
    relu = mnn.ReluLayer()
    relu.forward(numpy.ones((5, 4), dtype=numpy.float32))
    with pytest.raises(ValueError, match=r"ReluLayer\(\): backward got a gradient of shape \(1, 4\); .*\(5, 4\)"):
        relu.backward(numpy.ones((1, 4), dtype=numpy.float32))
    inner = mnn.SequentialLayers([mnn.LinearLayer(4, 3)])
    inner.forward(numpy.ones((5, 4), dtype=numpy.float32))
    with pytest.raises(ValueError, match=r"SequentialLayers: backward got a gradient of shape \(5,\)"):
        inner.backward(numpy.ones(5, dtype=numpy.float32))


def test_a_subclass_that_reshapes_its_output_passes_the_inner_shape_to_super_backward():
    """Only the outermost backward is held to the last forward's output shape."""
    class FlatLinear(mnn.LinearLayer):
        def forward(self, x):
            return super().forward(x).reshape(len(x), -1)

        def backward(self, g):
            return super().backward(g.reshape(len(g), -1, self.out_features))

    layer = FlatLinear(3, 2)
    y = layer.forward(numpy.ones((4, 5, 3), dtype=numpy.float32))
    assert y.shape == (4, 10) and layer.backward(numpy.ones_like(y)).shape == (4, 5, 3)
    with pytest.raises(ValueError, match=r"FlatLinear.*gradient of shape \(4, 5, 2\); .*\(4, 10\)"):
        layer.backward(numpy.ones((4, 5, 2), dtype=numpy.float32))
    assert layer.backward(numpy.ones_like(y)).shape == (4, 5, 3)  # the refusal left nothing behind


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_gelu_in_float16_has_torch_gradients_where_its_square_overflows():
    x = numpy.array([1000, -1000, 300, -300, 1.5, -2, 0], dtype=numpy.float16)
    gelu = mnn.GeluLayer()
    grad = gelu.backward(numpy.ones_like(gelu.forward(x)))
    x_torch = torch.tensor(x, requires_grad=True)
    torch.nn.functional.gelu(x_torch, approximate="tanh").backward(torch.ones(len(x), dtype=torch.float16))
    assert grad.dtype == numpy.float16
    numpy.testing.assert_allclose(grad, x_torch.grad.numpy(), rtol=2e-3)


def test_backward_after_a_forward_without_targets_is_an_error(rng):
    net = mnn.SequentialLayers([mnn.LinearLayer(3, 4), mnn.ReluLayer(), mnn.LinearLayer(4, 2),
                                mnn.CrossEntropyLossLayer()])
    x, x2 = rng.standard_normal((6, 3)).astype(numpy.float32), rng.standard_normal((6, 3)).astype(numpy.float32)
    y = rng.integers(0, 2, 6)
    with pytest.raises(RuntimeError, match=r"no loss to back-propagate \(no forward pass yet"):
        net.backward()
    net(x, y)
    net(x2)
    with pytest.raises(RuntimeError, match="or the last one had no targets"):
        net.backward()
    net(x2, y)  # with the loss again, backward is allowed and right
    net.zero_grads()
    net.backward()
    assert numpy.isfinite(net.grads["0.w"]).all()


def test_import_mnn_names_every_layer_lazily():
    import subprocess
    import sys
    assert sorted(mnn.__all__) == sorted({"backend", "gradcheck", "optim", "layers", "models", "data", "checkpoint",
                                          "kernels", "load", "SequentialLayers", *mnn.layers.__all__})
    assert mnn.kernels.mode() in ("fused", "numpy")  # mnn.kernels.use("numpy"), as the README shows, works
    assert not [name for name in dir(mnn) if name.startswith("_") and name != "__version__"]
    loaded = subprocess.run([sys.executable, "-c", "import sys, mnn.cli; print('numpy' in sys.modules)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "False"  # the command starts before NumPy loads: a Ctrl-C then is caught by main


def test_library_arguments_that_cannot_work_are_refused():
    x = numpy.ones((2, 3))
    with pytest.raises(ValueError, match="eps must be a step in"):
        check_layer(mnn.ReluLayer(), x, eps=float("nan"))
    with pytest.raises(ValueError, match="eps must be a step in"):
        check_layer(mnn.ReluLayer(), x, eps=0)
    with pytest.raises(ValueError, match="probes must be an integer >= 1"):
        check_layer(mnn.ReluLayer(), x, probes=0)
    with pytest.raises(ValueError, match=r"DropoutLayer: p must lie in \[0, 1\), got '0.5'"):
        mnn.DropoutLayer("0.5")
    block = mnn.ResidualBlock(mnn.LinearLayer(3, 4))
    with pytest.raises(ValueError, match=r"ResidualBlock: its body turns \(2, 3\) into \(2, 4\)"):
        block.forward(numpy.ones((2, 3), dtype=numpy.float32))


def test_clip_grad_norm_takes_a_network_too():
    net = mnn.SequentialLayers([mnn.LinearLayer(3, 2)])
    net.grads["0.w"][...] = 10.0
    norm = mnn.optim.clip_grad_norm(net, 1.0)
    assert norm > 1 and abs(numpy.sqrt(sum(float((g * g).sum()) for g in net.grads.values())) - 1.0) < 1e-5
