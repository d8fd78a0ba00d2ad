"""Bad input gets a clear error naming the layer and the shapes."""
import numpy
import pytest

import mnn


def test_linear_wrong_width_names_layer_and_shapes():
    with pytest.raises(ValueError, match=r"LinearLayer\(in_features=4.*\(2, 3\).*last dimension 4"):
        mnn.LinearLayer(4, 2).forward(numpy.zeros((2, 3), dtype=numpy.float32))


def test_integer_input_is_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        mnn.ReluLayer().forward(numpy.zeros((2, 3), dtype=numpy.int64))


def test_backward_before_forward():
    with pytest.raises(RuntimeError, match="before forward"):
        mnn.LinearLayer(3, 2).backward(numpy.zeros((1, 2), dtype=numpy.float32))
    with pytest.raises(RuntimeError, match="before forward"):
        mnn.CrossEntropyLossLayer().backward()


@pytest.mark.parametrize("loss", [mnn.CrossEntropyLossLayer, mnn.NllLossLayer])
def test_labels_out_of_range(loss):
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        loss().forward(numpy.zeros((2, 3), dtype=numpy.float32), numpy.array([0, 3]))
    with pytest.raises(ValueError, match="integer"):
        loss().forward(numpy.zeros((2, 3), dtype=numpy.float32), numpy.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"targets \(3,\)"):
        loss().forward(numpy.zeros((2, 3), dtype=numpy.float32), numpy.array([0, 1, 2]))


def test_mse_shape_mismatch():
    with pytest.raises(ValueError, match=r"targets of shape \(2, 2\); expected the input's shape \(2, 3\)"):
        mnn.MSELossLayer().forward(numpy.zeros((2, 3), dtype=numpy.float32), numpy.zeros((2, 2)))


def test_matrix_product_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(4, 5\)"):
        mnn.MatrixProduct().forward(numpy.zeros((2, 3)), numpy.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"MatrixProduct.*stack\) dimensions \(2,\) and \(3,\) do not broadcast"):
        mnn.MatrixProduct().forward(numpy.zeros((2, 3, 4)), numpy.zeros((3, 4, 6)))


def test_an_empty_batch_flows_through_flatten_and_the_positional_embedding():
    flatten = mnn.FlattenLayer()
    assert flatten.forward(numpy.zeros((0, 3, 2), dtype=numpy.float32)).shape == (0, 6)
    assert flatten.backward(numpy.zeros((0, 6), dtype=numpy.float32)).shape == (0, 3, 2)
    positions = mnn.PositionalEmbeddingLayer(4, 3)
    y = positions.forward(numpy.zeros((0, 2, 3), dtype=numpy.float32))
    assert positions.backward(y).shape == (0, 2, 3) and not positions.grads["weight"].any()


def test_failed_forward_in_a_network_leaves_parameters_unchanged():
    net = mnn.SequentialLayers([mnn.LinearLayer(3, 4), mnn.LinearLayer(5, 2), mnn.MSELossLayer()])
    before = {k: v.copy() for k, v in net.params.items()}
    with pytest.raises(ValueError, match="LinearLayer"):
        net(numpy.ones((2, 3), dtype=numpy.float32), numpy.ones((2, 2), dtype=numpy.float32))
    assert all(numpy.array_equal(before[k], v) for k, v in net.params.items())


def test_loss_in_the_middle_is_rejected():
    with pytest.raises(ValueError, match="must be the last layer"):
        mnn.SequentialLayers([mnn.MSELossLayer(), mnn.LinearLayer(2, 2)])


def test_dropout_probability_checked():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        mnn.DropoutLayer(1.0)


F32 = numpy.float32


@pytest.mark.parametrize("make, message", [
    (lambda: mnn.Conv2dLayer(3, 2, 2.0), r"Conv2dLayer: kernel_size must be an integer or a pair"),
    (lambda: mnn.Conv2dLayer(3, 2, (1, 2, 3)), r"Conv2dLayer: kernel_size must be an integer or a pair"),
    (lambda: mnn.Conv2dLayer(3, 2, (2, 2.5)), r"Conv2dLayer: kernel width must be an integer"),
    (lambda: mnn.BatchNormLayer(4, momentum=None), r"BatchNormLayer: momentum must be a number in \[0, 1\], got None"),
    (lambda: mnn.BatchNorm2dLayer(4, momentum="0.1"), r"BatchNorm2dLayer: momentum must be a number"),
    (lambda: mnn.BatchNormLayer(4, eps=None), r"BatchNormLayer: eps must be a finite number > 0, got None"),
    (lambda: mnn.LayerNormLayer(4, eps=float("inf")), r"LayerNormLayer: eps must be a finite number > 0, got inf"),
    (lambda: mnn.SoftmaxLayer(axis=1.0), r"SoftmaxLayer: axis must be an integer"),
    (lambda: mnn.DropoutLayer(numpy.float32(1.0)), r"DropoutLayer: p must lie in \[0, 1\)"),
])
def test_bad_settings_name_the_layer(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_numpy_numbers_are_accepted_as_settings():
    conv = mnn.Conv2dLayer(numpy.int64(3), 2, numpy.int64(3), stride=numpy.int32(2), padding=numpy.int8(1))
    assert conv.config() == {"in_channels": 3, "out_channels": 2, "kernel_size": [3, 3], "stride": 2, "padding": 1,
                             "bias": True}
    assert all(type(value) is int for value in (conv.in_channels, conv.stride, conv.padding, *conv.kernel_size))
    assert mnn.DropoutLayer(numpy.float32(0.5)).config() == {"p": 0.5}
    assert mnn.BatchNormLayer(2, eps=numpy.float64(1e-3), momentum=numpy.float32(0.5)).config() == {
        "num_features": 2, "eps": 1e-3, "momentum": 0.5}


@pytest.mark.parametrize("layer, x, message", [
    (mnn.SoftmaxLayer(axis=3), numpy.ones((3, 4), F32), r"SoftmaxLayer\(axis=3\): axis 3 is out of range .*\(3, 4\)"),
    (mnn.LogSoftmaxLayer(axis=-3), numpy.ones((3, 4), F32), r"axis -3 is out of range"),
    (mnn.SoftmaxLayer(), numpy.ones((3, 0), F32), r"\(3, 0\) has nothing along axis -1"),
    (mnn.LSTMLayer(4, 3), numpy.ones((2, 0, 4), F32), r"LSTMLayer\(.*\): input of shape \(2, 0, 4\); expected at least"),
    (mnn.GRULayer(4, 3), numpy.ones((0, 5, 4), F32), r"GRULayer\(.*\): input of shape \(0, 5, 4\); expected at least"),
    (mnn.RNNLayer(4, 3), numpy.ones((2, 0, 4), F32), r"RNNLayer\(.*\): input of shape \(2, 0, 4\)"),
    (mnn.BatchNormLayer(3), numpy.ones((1, 3), F32), r"BatchNormLayer\(.*\): input of shape \(1, 3\) gives 1 value"),
    (mnn.BatchNorm2dLayer(3), numpy.ones((1, 3, 1, 1), F32), r"gives 1 value\(s\) per feature/channel; training"),
    (mnn.SoftmaxLayer(), numpy.ones((), F32), r"expected at least 1 dimension$"),
])
def test_inputs_a_layer_cannot_take_name_the_layer_and_the_shape(layer, x, message):
    with pytest.raises(ValueError, match=message):
        layer.forward(x)


def test_batch_norm_takes_a_single_value_per_channel_in_eval_mode():
    layer = mnn.BatchNorm2dLayer(3)
    layer.eval()
    assert layer.forward(numpy.ones((1, 3, 1, 1), F32)).shape == (1, 3, 1, 1)


def test_an_integer_gradient_is_refused():
    layer = mnn.LinearLayer(3, 2)
    layer.forward(numpy.ones((4, 3), F32))
    with pytest.raises(ValueError, match=r"LinearLayer\(.*\): backward's gradient must be a floating-point array, "
                                         "got int64"):
        layer.backward(numpy.ones((4, 2), numpy.int64))


def test_mse_takes_its_targets_in_the_inputs_dtype():
    loss = mnn.MSELossLayer()
    assert float(loss.forward(numpy.full((2, 3), 2, F32), numpy.ones((2, 3), numpy.int64))) == 1.0
    assert loss.backward().dtype == F32
    loss.forward(numpy.ones((2, 3), F32), numpy.zeros((2, 3), numpy.float64))
    assert loss.backward().dtype == F32
    with pytest.raises(ValueError, match="targets must be numbers"):
        loss.forward(numpy.ones((1, 2), F32), numpy.array([["a", "b"]]))


def test_a_torch_tensor_is_refused_with_the_conversion_to_make():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"input must be a NumPy or CuPy array, got Tensor"):
        mnn.SequentialLayers([mnn.LinearLayer(4, 3)])(torch.ones(5, 4))


def test_labels_given_as_a_list_are_told_to_become_integers():
    with pytest.raises(TypeError, match=r"numpy.asarray\(x, dtype=numpy.int64\)"):
        mnn.CrossEntropyLossLayer().forward(numpy.zeros((4, 3), numpy.float32), [0, 1, 2, 1])


@pytest.mark.parametrize("loss, targets", [(mnn.CrossEntropyLossLayer, numpy.zeros(0, int)),
                                           (mnn.NllLossLayer, numpy.zeros(0, int)),
                                           (mnn.MSELossLayer, numpy.zeros((0, 2)))])
def test_a_loss_of_an_empty_batch_is_refused_not_nan(loss, targets):
    with pytest.raises(ValueError, match=r"input of shape \(0, 2\) holds nothing to average"):
        loss().forward(numpy.zeros((0, 2), numpy.float32), targets)


@pytest.mark.parametrize("build", [lambda flag: mnn.LinearLayer(2, 3, bias=flag),
                                   lambda flag: mnn.Conv2dLayer(1, 2, 3, bias=flag),
                                   lambda flag: mnn.LayerNormLayer(4, bias=flag),
                                   lambda flag: mnn.GRULayer(2, 3, bias=flag),
                                   lambda flag: mnn.MultiHeadAttention(4, 2, bias=flag),
                                   lambda flag: mnn.MultiHeadAttention(4, 2, causal=flag)])
def test_a_flag_must_be_true_or_false(build):
    with pytest.raises(ValueError, match=r"must be True or False, got 'False'"):
        build("False")  # a non-empty string is true: it would have built the bias
    for flag in (False, True):  # NumPy's booleans are taken as Python's: the same layer either way
        assert build(numpy.bool_(flag)).config() == build(flag).config()
    assert build(numpy.bool_(False)).config() != build(True).config()


def test_attention_refuses_an_empty_batch_or_sequence():
    for shape in [(1, 0, 4), (0, 3, 4)]:
        with pytest.raises(ValueError, match=r"at least one sample and one position"):
            mnn.MultiHeadAttention(4, 2).forward(numpy.zeros(shape, numpy.float32))


def test_a_default_dtype_that_is_no_dtype():
    with pytest.raises(ValueError, match=r"default dtype must be floating point .*'bogus'"):
        mnn.backend.set_default_dtype("bogus")


def test_check_layer_wants_arrays():
    from mnn.gradcheck import check_layer
    with pytest.raises(TypeError, match=r"check_layer: input 0 must be a NumPy array, got list"):
        check_layer(mnn.ReluLayer(), [[1.0]])


def test_attention_shows_every_setting():
    assert repr(mnn.MultiHeadAttention(16, 2, bias=False, dropout=0.1)) == \
        "MultiHeadAttention(dim=16, heads=2, causal=True, bias=False, dropout=0.1)"
