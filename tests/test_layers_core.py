"""Every core layer: gradients against finite differences and against torch autograd (float64)."""
import numpy
import pytest
import torch
import torch.nn.functional as F
from reference import assert_matches_torch

import mnn
from mnn.gradcheck import check_layer

TOL = 1e-6


def linear_torch(x, params):
    return F.linear(x, params["w"], params.get("b"))


CASES = {
    "linear": (lambda: mnn.LinearLayer(5, 3), [(4, 5)], linear_torch),
    "linear-no-bias": (lambda: mnn.LinearLayer(5, 3, bias=False), [(4, 5)], linear_torch),
    "linear-sequence": (lambda: mnn.LinearLayer(5, 3), [(2, 4, 5)], linear_torch),
    "relu": (mnn.ReluLayer, [(4, 6)], lambda x, params: F.relu(x)),
    "sigmoid": (mnn.SigmoidLayer, [(4, 6)], lambda x, params: torch.sigmoid(x)),
    "tanh": (mnn.TanhLayer, [(4, 6)], lambda x, params: torch.tanh(x)),
    "gelu": (mnn.GeluLayer, [(4, 6)], lambda x, params: F.gelu(x, approximate="tanh")),
    "softmax": (mnn.SoftmaxLayer, [(4, 6)], lambda x, params: F.softmax(x, dim=-1)),
    "softmax-axis0": (lambda: mnn.SoftmaxLayer(axis=0), [(4, 6)], lambda x, params: F.softmax(x, dim=0)),
    "log-softmax": (mnn.LogSoftmaxLayer, [(4, 6)], lambda x, params: F.log_softmax(x, dim=-1)),
    "flatten": (mnn.FlattenLayer, [(2, 3, 4)], lambda x, params: x.flatten(1)),
    "matrix-product": (mnn.MatrixProduct, [(3, 4), (4, 5)], lambda a, b, params: a @ b),
    "matrix-product-batched": (mnn.MatrixProduct, [(2, 3, 4), (2, 4, 5)], lambda a, b, params: a @ b),
}

LOSS_CASES = {
    "mse": (mnn.MSELossLayer, (4, 3), "float", lambda x, t, params: F.mse_loss(x, t)),
    "nll": (mnn.NllLossLayer, (5, 4), "labels", lambda x, t, params: F.nll_loss(x, t)),
    "cross-entropy": (mnn.CrossEntropyLossLayer, (5, 4), "labels", lambda x, t, params: F.cross_entropy(x, t)),
    "cross-entropy-sequence": (mnn.CrossEntropyLossLayer, (2, 3, 4), "labels",
                               lambda x, t, params: F.cross_entropy(x.reshape(-1, 4), t.reshape(-1))),
}


def make_inputs(shapes, rng):
    return [rng.standard_normal(shape) for shape in shapes]


def make_targets(kind, shape, rng):
    if kind == "float":
        return rng.standard_normal(shape)
    return rng.integers(0, shape[-1], size=shape[:-1])


@pytest.mark.parametrize("name", CASES)
def test_layer_matches_finite_differences(name, float64, rng):
    make, shapes, _ = CASES[name]
    errors = check_layer(make(), *make_inputs(shapes, rng))
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("name", CASES)
def test_layer_matches_torch(name, float64, rng):
    make, shapes, torch_fn = CASES[name]
    assert_matches_torch(make(), torch_fn, *make_inputs(shapes, rng))


@pytest.mark.parametrize("name", LOSS_CASES)
def test_loss_matches_finite_differences(name, float64, rng):
    make, shape, kind, _ = LOSS_CASES[name]
    errors = check_layer(make(), rng.standard_normal(shape), targets=make_targets(kind, shape, rng))
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("name", LOSS_CASES)
def test_loss_matches_torch(name, float64, rng):
    make, shape, kind, torch_fn = LOSS_CASES[name]
    x = rng.standard_normal(shape)
    if name == "nll":
        x = x - numpy.log(numpy.exp(x).sum(-1, keepdims=True))
    assert_matches_torch(make(), torch_fn, x, targets=make_targets(kind, shape, rng))


def test_dropout_matches_torch_with_the_same_mask(float64, rng):
    layer = mnn.DropoutLayer(0.3)
    x = rng.standard_normal((50, 40))
    y = layer.forward(x)
    mask = y != 0
    assert 0.6 < mask.mean() < 0.8
    assert_matches_torch(FixedMask(layer), lambda x, params: x * torch.tensor(mask) / 0.7, x)
    errors = check_layer(FixedMask(layer), x)
    assert max(errors.values()) <= TOL


class FixedMask(mnn.Layer):
    """Dropout replaying the mask of its last forward pass, so finite differences see one function."""

    def __init__(self, dropout):
        super().__init__()
        self.dropout = dropout
        self.scale, _ = dropout.saved()

    def forward(self, x):
        return x * self.scale

    def backward(self, g):
        return self.dropout.backward(g)


def frequency_near(events, probability):
    """Whether the share of True in ``events`` (independent draws) is within 5 standard deviations of
    ``probability``: a fair generator fails this about once in 1.7 million tries."""
    return abs(events.mean() - probability) < 5 * (probability * (1 - probability) / events.size) ** 0.5


def test_dropout_masks_are_fair_independent_and_fresh_each_pass():
    """Eqs. (3), (4): each element kept with probability 1 - p, neighbours and passes independent."""
    mnn.backend.seed(11)
    layer, keep, n = mnn.DropoutLayer(0.3), 0.7, 400_000
    masks = [layer.forward(numpy.ones(n, dtype=numpy.float32)) != 0 for _ in range(2)]
    for mask in masks:
        assert frequency_near(mask, keep)
        even, odd = mask[0::2], mask[1::2]  # neighbours, in pairs that share no element
        assert frequency_near(even & odd, keep**2) and frequency_near(even & ~odd, keep * (1 - keep))
    assert frequency_near(masks[0] & masks[1], keep**2)  # a new key each forward pass


def test_dropout_masks_follow_the_seed():
    x = numpy.ones((20, 30))
    masks = []
    for seed in (5, 5, 6):
        mnn.backend.seed(seed)
        masks.append(mnn.DropoutLayer(0.5).forward(x))
    numpy.testing.assert_array_equal(masks[0], masks[1])
    assert not numpy.array_equal(masks[0], masks[2])


def test_dropout_of_float16_with_p_near_one_is_no_nan(rng):
    """float16's 1 / (1 - p) is infinite from p = 0.99998 on, and a dropped entry was 0 * inf = NaN: the
    reference lines scale in float32, and give back float16."""
    layer = mnn.DropoutLayer(0.99999)
    x = rng.standard_normal(1000).astype(numpy.float16)
    x[:10] = 0  # a kept zero stays zero
    y = layer.forward(x)
    grad = layer.backward(numpy.ones_like(y))
    assert y.dtype == grad.dtype == numpy.float16
    assert not numpy.isnan(y).any() and not numpy.isnan(grad).any() and (y[:10] == 0).all()


def test_dropout_is_identity_in_eval(rng):
    layer = mnn.DropoutLayer(0.5).eval()
    x = rng.standard_normal((3, 4)).astype(numpy.float32)
    assert layer.forward(x) is x
    assert layer.backward(x) is x


def test_softmax_is_stable_for_large_scores():
    x = numpy.array([[1000.0, 1000.0, -1000.0]], dtype=numpy.float32)
    assert numpy.allclose(mnn.SoftmaxLayer().forward(x), [[0.5, 0.5, 0.0]])
    assert numpy.isfinite(mnn.LogSoftmaxLayer().forward(x)).all()
    loss = mnn.CrossEntropyLossLayer().forward(x, numpy.array([2]))
    assert numpy.isclose(loss, 2000.0 + numpy.log(2))


def test_linear_initialisation_follows_pytorch_bounds():
    mnn.backend.seed(3)
    layer = mnn.LinearLayer(400, 300)
    bound = 1 / numpy.sqrt(400)
    assert layer.params["w"].shape == (300, 400) and layer.params["b"].shape == (300,)
    assert layer.params["w"].dtype == numpy.float32
    assert numpy.abs(layer.params["w"]).max() <= bound
    assert numpy.isclose(layer.params["w"].std(), bound / numpy.sqrt(3), rtol=0.02)


def test_gradients_accumulate_until_zeroed(rng):
    layer = mnn.LinearLayer(3, 2)
    x = rng.standard_normal((4, 3)).astype(numpy.float32)
    g = numpy.ones((4, 2), dtype=numpy.float32)
    layer.forward(x)
    layer.backward(g)
    once = layer.grads["w"].copy()
    layer.backward(g)
    assert numpy.allclose(layer.grads["w"], 2 * once)
    layer.zero_grads()
    assert not layer.grads["w"].any() and not layer.grads["b"].any()


def test_float32_stays_float32(rng):
    x = rng.standard_normal((4, 6)).astype(numpy.float32)
    for layer in [mnn.LinearLayer(6, 6), mnn.ReluLayer(), mnn.SigmoidLayer(), mnn.TanhLayer(), mnn.GeluLayer(),
                  mnn.SoftmaxLayer(), mnn.LogSoftmaxLayer(), mnn.DropoutLayer(0.2)]:
        y = layer.forward(x)
        assert y.dtype == numpy.float32, layer
        assert layer.backward(numpy.ones_like(y)).dtype == numpy.float32, layer
    loss = mnn.CrossEntropyLossLayer()
    loss.forward(x, numpy.array([0, 1, 2, 3]))
    assert loss.backward().dtype == numpy.float32


def test_relu_backward_at_nan_inputs_and_infinite_gradients_equals_torch():
    x = numpy.array([numpy.nan, -1.0, 0.0, 2.0, -3.0], dtype=numpy.float32)
    g = numpy.array([1.0, numpy.inf, 5.0, 3.0, -numpy.inf], dtype=numpy.float32)
    layer = mnn.ReluLayer()
    layer.forward(x)
    tx = torch.tensor(x, requires_grad=True)
    torch.relu(tx).backward(torch.tensor(g))
    assert numpy.array_equal(layer.backward(g), tx.grad.numpy(), equal_nan=True)  # 1, 0, 0, 3, 0: no inf * 0
