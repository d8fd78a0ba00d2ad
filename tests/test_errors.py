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
