"""Property-based checks (hypothesis): random shapes, strides and paddings against torch."""
import numpy
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import assert_matches_torch

import mnn
from mnn.data import read_idx, write_idx


@st.composite
def conv_cases(draw):
    kernel = draw(st.integers(1, 4))
    padding = draw(st.integers(0, kernel - 1))
    stride = draw(st.integers(1, 3))
    height = draw(st.integers(max(1, kernel - 2 * padding), 9))
    width = draw(st.integers(max(1, kernel - 2 * padding), 9))
    return (draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4)), height, width,
            kernel, stride, padding, draw(st.booleans()), draw(st.integers(0, 2 ** 16)))


@settings(max_examples=40, deadline=None)
@given(conv_cases())
def test_conv2d_matches_torch_for_any_shape(case):
    batch, cin, cout, height, width, kernel, stride, padding, bias, seed = case
    mnn.backend.set_default_dtype(numpy.float64)
    try:
        layer = mnn.Conv2dLayer(cin, cout, kernel, stride=stride, padding=padding, bias=bias)
    finally:
        mnn.backend.set_default_dtype(numpy.float32)
    x = numpy.random.default_rng(seed).standard_normal((batch, cin, height, width))
    assert_matches_torch(layer, lambda x, params: F.conv2d(x, params["w"], params.get("b"), stride, padding), x,
                         seed=seed)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2 ** 16),
       st.data())
def test_max_pool_matches_torch_for_any_shape(batch, channels, kernel, stride, seed, data):
    height, width = data.draw(st.integers(kernel, 9)), data.draw(st.integers(kernel, 9))
    rng = numpy.random.default_rng(seed)
    x = rng.integers(-3, 3, (batch, channels, height, width)).astype(numpy.float64)  # many ties
    assert_matches_torch(mnn.MaxPool2dLayer(kernel, stride), lambda x, params: F.max_pool2d(x, kernel, stride), x)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.integers(0, 2 ** 16))
def test_softmax_rows_sum_to_one_and_match_torch(shape, seed):
    x = numpy.random.default_rng(seed).standard_normal(shape) * 30
    y = mnn.SoftmaxLayer().forward(x)
    assert numpy.allclose(y.sum(axis=-1), 1.0)
    assert_matches_torch(mnn.LogSoftmaxLayer(), lambda x, params: F.log_softmax(x, dim=-1), x, seed=seed)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=4),
       st.sampled_from(["u1", "i1", ">i2", ">i4", ">f4", ">f8"]), st.integers(0, 2 ** 16))
def test_idx_round_trip_for_any_shape_and_type(tmp_path_factory, shape, code, seed):
    dtype = numpy.dtype(code).newbyteorder("=")
    array = (numpy.random.default_rng(seed).standard_normal(shape) * 50).astype(dtype)
    path = tmp_path_factory.mktemp("idx") / "a.idx"
    write_idx(path, array)
    assert numpy.array_equal(read_idx(path), array)
