"""Convolution, pooling and normalisation: finite differences and torch autograd over many shapes."""
import numpy
import pytest
import torch
import torch.nn.functional as F
from reference import assert_matches_torch, max_relative_difference

import mnn
from mnn.gradcheck import check_layer

TOL = 1e-6

CONV_CASES = [  # (batch, in, out, height, width, kernel, stride, padding)
    (2, 3, 4, 7, 7, 3, 1, 0),
    (2, 3, 4, 7, 7, 3, 1, 1),
    (1, 1, 2, 9, 6, 3, 2, 1),
    (3, 2, 5, 8, 8, 5, 2, 2),
    (2, 4, 3, 5, 7, (2, 3), 3, 0),
    (1, 2, 2, 4, 4, 4, 1, 0),
    (2, 2, 3, 3, 4, (1, 3), 2, 1),  # padding wider than the kernel's height, as PyTorch allows
    (1, 2, 2, 2, 3, 2, 3, 4),  # windows of padding alone: the bias
]


def conv_torch(case):
    _, _, _, _, _, _, stride, padding = case
    return lambda x, params: F.conv2d(x, params["w"], params.get("b"), stride=stride, padding=padding)


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d(case, bias, float64, rng):
    batch, cin, cout, h, w, k, stride, padding = case
    layer = mnn.Conv2dLayer(cin, cout, k, stride=stride, padding=padding, bias=bias)
    x = rng.standard_normal((batch, cin, h, w))
    assert max(check_layer(layer, x).values()) <= TOL
    assert_matches_torch(layer, conv_torch(case), x)


POOL_CASES = [(2, 3, 6, 6, 2, None), (1, 2, 7, 5, 3, 2), (2, 1, 5, 5, 2, 1), (1, 2, 9, 9, 3, 3)]


POOLS = {"max": (mnn.MaxPool2dLayer, F.max_pool2d), "avg": (mnn.AvgPool2dLayer, F.avg_pool2d)}


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
@pytest.mark.parametrize("kind", POOLS)
def test_pooling(kind, case, float64, rng):
    batch, channels, h, w, k, stride = case
    make, torch_pool = POOLS[kind]
    layer = make(k, stride)
    x = rng.standard_normal((batch, channels, h, w))
    assert max(check_layer(layer, x).values()) <= TOL
    assert_matches_torch(layer, lambda x, params: torch_pool(x, k, stride), x)


def test_max_pool_routes_ties_to_the_first_maximum(float64):
    x = numpy.zeros((1, 1, 4, 4))
    layer = mnn.MaxPool2dLayer(2)
    layer.forward(x)
    grad = layer.backward(numpy.ones((1, 1, 2, 2)))
    assert_matches_torch(layer, lambda x, params: F.max_pool2d(x, 2), x)
    assert grad[0, 0, ::2, ::2].sum() == 4 and grad.sum() == 4


def randomize_affine(layer, rng):
    for name in ("weight", "bias"):
        layer.params[name][...] = rng.standard_normal(layer.params[name].shape)
    return layer


@pytest.mark.parametrize("shape", [(6, 4), (3, 5, 4, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm(shape, training, float64, rng):
    layer = mnn.BatchNormLayer(shape[1]) if len(shape) == 2 else mnn.BatchNorm2dLayer(shape[1])
    randomize_affine(layer, rng).train(training)
    if not training:
        layer.buffers["running_mean"][...] = rng.standard_normal(shape[1])
        layer.buffers["running_var"][...] = rng.uniform(0.5, 2, shape[1])
    stats = {k: torch.tensor(v.copy()) for k, v in layer.buffers.items()}
    x = rng.standard_normal(shape) * 3 + 1
    assert max(check_layer(layer, x).values()) <= TOL
    assert_matches_torch(layer, lambda x, params: F.batch_norm(
        x, stats["running_mean"].clone(), stats["running_var"].clone(), params["weight"], params["bias"],
        training=training, eps=1e-5), x)


def test_batch_norm_running_statistics_equal_torch(float64, rng):
    ours = mnn.BatchNorm2dLayer(3, momentum=0.2)
    theirs = torch.nn.BatchNorm2d(3, momentum=0.2).double()
    for _ in range(5):
        x = rng.standard_normal((4, 3, 5, 5)) * rng.uniform(0.5, 3) + rng.uniform(-2, 2)
        ours.forward(x)
        theirs(torch.tensor(x))
    assert max_relative_difference(ours.buffers["running_mean"], theirs.running_mean.numpy()) <= 1e-12
    assert max_relative_difference(ours.buffers["running_var"], theirs.running_var.numpy()) <= 1e-12
    x = rng.standard_normal((2, 3, 5, 5))
    theirs.eval()
    assert max_relative_difference(ours.eval().forward(x), theirs(torch.tensor(x)).detach().numpy()) <= 1e-12


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 6)])
def test_layer_norm(shape, float64, rng):
    layer = randomize_affine(mnn.LayerNormLayer(6), rng)
    x = rng.standard_normal(shape) * 2 + 0.5
    assert max(check_layer(layer, x).values()) <= TOL
    assert_matches_torch(layer, lambda x, params: F.layer_norm(x, (6,), params["weight"], params["bias"]), x)


@pytest.mark.parametrize("parameters", ["float32", "float16"])
@pytest.mark.parametrize("make, torch_layer", [(lambda: mnn.LayerNormLayer(4), torch.nn.LayerNorm(4)),
                                               (lambda: mnn.BatchNormLayer(4), torch.nn.BatchNorm1d(4))],
                         ids=["layer norm", "batch norm"])
def test_normalisation_of_float16_takes_its_statistics_in_float32(make, torch_layer, parameters):
    """Squares of float16 overflow past 256: the variance would be inf and the output the bias alone.
    The output keeps float16 where the parameters are float16 too."""
    x = numpy.array([[-300, 0, 300, 10], [1, 2, 3, 4], [7, -5, 60, 0]], numpy.float16)
    mnn.backend.set_default_dtype(parameters)
    try:
        layer = make()
    finally:
        mnn.backend.set_default_dtype("float32")
    y = layer.forward(x)
    assert y.dtype == numpy.result_type(x, layer.params["weight"])
    expected = torch_layer(torch.tensor(x, dtype=torch.float32)).detach().numpy()
    numpy.testing.assert_allclose(y.astype(numpy.float32), expected, rtol=2e-3, atol=2e-3)
    grad = layer.backward(numpy.ones_like(y))
    assert numpy.isfinite(grad).all() and grad.dtype == numpy.result_type(y, layer.params["weight"])


@pytest.mark.parametrize("make", [lambda: mnn.MaxPool2dLayer(2), lambda: mnn.Conv2dLayer(2, 3, 3, padding=1)],
                         ids=["max pooling", "convolution"])
def test_a_float16_gradient_into_a_float32_layer(make, kernel_mode):
    """The kernels have no float16: the gradient is widened for them, and the input gradient is the
    reference lines' (as fine as float16's gradient allows)."""
    rng = numpy.random.default_rng(4)
    x, layer = rng.standard_normal((2, 2, 6, 6)).astype(numpy.float32), make()
    y = layer.forward(x)
    g = rng.standard_normal(y.shape).astype(numpy.float16)
    grad = layer.backward(g)
    assert grad.dtype == numpy.float32
    torch_layer = torch.nn.MaxPool2d(2) if isinstance(layer, mnn.MaxPool2dLayer) else F.conv2d
    tx = torch.tensor(x, requires_grad=True)
    ty = torch_layer(tx) if isinstance(layer, mnn.MaxPool2dLayer) else torch_layer(
        tx, torch.tensor(layer.params["w"]), torch.tensor(layer.params["b"]), padding=1)
    ty.backward(torch.tensor(g.astype(numpy.float32)))
    numpy.testing.assert_allclose(grad, tx.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_kernel_larger_than_padded_input():
    with pytest.raises(ValueError, match=r"kernel 5x5 is larger than the padded input 4x4"):
        mnn.Conv2dLayer(1, 2, 5, padding=1).forward(numpy.zeros((1, 1, 2, 2), numpy.float32))
    with pytest.raises(ValueError, match=r"MaxPool2dLayer.*larger than the input \(1, 1, 2, 2\)"):
        mnn.MaxPool2dLayer(3).forward(numpy.zeros((1, 1, 2, 2), numpy.float32))


def test_wrong_channel_count():
    with pytest.raises(ValueError, match=r"Conv2dLayer.*\(2, 3, 8, 8\) has 3 channels; expected 1"):
        mnn.Conv2dLayer(1, 4, 3).forward(numpy.zeros((2, 3, 8, 8), numpy.float32))
    with pytest.raises(ValueError, match=r"BatchNorm2dLayer.*has 3 features/channels; expected 4"):
        mnn.BatchNorm2dLayer(4).forward(numpy.zeros((2, 3, 8, 8), numpy.float32))
    with pytest.raises(ValueError, match=r"expected 4 dimensions"):
        mnn.Conv2dLayer(1, 4, 3).forward(numpy.zeros((2, 8, 8), numpy.float32))


def test_layer_norm_without_bias(float64, rng):
    layer = randomize_affine(mnn.LayerNormLayer(6), rng)
    unbiased = mnn.LayerNormLayer(6, bias=False)
    unbiased.params["weight"][...] = layer.params["weight"]
    x = rng.standard_normal((3, 6))
    assert set(unbiased.params) == {"weight"}
    assert max(check_layer(unbiased, x).values()) <= TOL
    assert_matches_torch(unbiased, lambda x, params: F.layer_norm(x, (6,), params["weight"]), x)


@pytest.mark.parametrize("channels", [1, 5])
def test_convolution_of_an_empty_batch_is_an_empty_batch(channels, kernel_mode):
    """No window to copy: the shapes alone (and the weights' gradients stay zero)."""
    layer = mnn.Conv2dLayer(channels, 2, 3, padding=1)
    y = layer.forward(numpy.zeros((0, channels, 5, 5), numpy.float32))
    assert y.shape == (0, 2, 5, 5)
    assert layer.backward(numpy.zeros_like(y)).shape == (0, channels, 5, 5)
    assert not layer.grads["w"].any() and not layer.grads["b"].any()
