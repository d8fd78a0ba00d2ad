"""Every fused CPU kernel against the NumPy lines it replaces (``MNN_KERNELS=numpy``).

float64 agrees to ~1e-12 (sums may be taken in another order), float32 to its rounding;
max-pooling and Adam's update take the same steps as the reference, so they agree exactly.
"""
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from mnn import backend, kernels, optim
from mnn.layers import (BatchNorm2dLayer, BatchNormLayer, Conv2dLayer, CrossEntropyLossLayer, DropoutLayer,
                        EmbeddingLayer, GeluLayer, LayerNormLayer, LSTMLayer, MaxPool2dLayer, ReluLayer, SoftmaxLayer)
from mnn.layers.softmax import softmax
from mnn.layers.windows import channels_first, channels_last, output_size

TOLERANCE = {numpy.float64: 1e-12, numpy.float32: 2e-6}


@pytest.fixture(autouse=True)
def restore_mode():
    before = kernels.mode()
    yield
    kernels.use(before)


def both_ways(make_layer, x, dtype, seed=1, step=None, kernels_expected=True):
    """What ``step(layer)`` returns for a fresh layer, by the reference and fused; by default
    (output, input gradient, parameter gradients, layer) after a forward and a backward pass. Where the
    CPU kernels apply to ``dtype``, the fused side must call one (unless ``kernels_expected`` is False)
    and the reference side none: a layer that quietly took its reference lines would compare them with
    themselves."""
    def forward_and_backward(layer):
        y = layer.forward(x.astype(dtype) if x.dtype.kind == "f" else x)  # token indices stay integers
        grad = layer.backward(numpy.random.default_rng(seed).standard_normal(y.shape).astype(dtype))
        return y, grad, {name: value.copy() for name, value in layer.grads.items()}, layer

    results = []
    backend.set_default_dtype(dtype)
    try:
        for mode in ("numpy", "fused"):
            kernels.use(mode)
            backend.seed(0)
            with kernel_calls() as called:
                results.append((step or forward_and_backward)(make_layer()))
            if mode == "numpy":
                assert not called, f"the reference lines called {called}"
            elif kernels_expected and kernels.fused(numpy.zeros(1, dtype)):
                assert called, "the fused side called no kernel of mnn.kernels.cpu or cpu_sequence"
    finally:
        backend.set_default_dtype(numpy.float32)
    return results


@contextlib.contextmanager
def kernel_calls():
    """The names of the functions of ``mnn.kernels.cpu`` and ``cpu_sequence`` that the layers call inside."""
    called, modules = [], {name: getattr(kernels, name) for name in ("cpu", "cpu_sequence")}

    class Counting:
        def __init__(self, module):
            self.module = module

        def __getattr__(self, attribute):
            value = getattr(self.module, attribute)
            if not callable(value) or attribute == "parts":  # cpu_sequence.parts splits a batch: no kernel
                return value

            def call(*args, **kwargs):
                called.append(attribute)
                return value(*args, **kwargs)
            return call

    try:
        for name, module in modules.items():
            setattr(kernels, name, Counting(module))
        yield called
    finally:
        for name, module in modules.items():
            setattr(kernels, name, module)


def lstm_step(x, state, final_state_grad, gradient_dtype=numpy.float64):
    """A ``both_ways`` step for an LSTMLayer given a state and a final-state gradient: (output, input
    gradient, final h, final c, initial h gradient, initial c gradient)."""
    def step(layer):
        y = layer.forward(x, state=state)
        grad = layer.backward(numpy.ones(y.shape, gradient_dtype), final_state_grad=final_state_grad)
        return (y, grad, *layer.final_state, *layer.state_grad)
    return step


def assert_close(reference, fused, dtype, what):
    scale = max(float(numpy.abs(reference).max()), 1e-30)
    error = float(numpy.abs(numpy.asarray(reference, dtype=numpy.float64) - fused).max()) / scale
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.2e}"


def channels_last_batch(shape, rng, decimals=None):
    """A (B, C, H, W) batch laid out channels-last in memory, as mnn's layers write images."""
    batch, channels, height, width = shape
    x = rng.standard_normal((batch, height, width, channels))
    return channels_first(numpy.round(x, decimals) if decimals is not None else x)


POOLS = [(2, 2, (3, 4, 8, 8)), (2, 2, (2, 3, 7, 9)), (3, 2, (2, 3, 9, 9)), (3, 1, (2, 2, 6, 7)),
         (2, 1, (2, 2, 5, 5)), (3, 3, (2, 2, 9, 9)), (2, 3, (2, 3, 8, 11))]  # the last: pixels between windows


@pytest.mark.parametrize("kernel, stride, shape", POOLS)
@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_max_pool_kernels_route_exactly_as_the_reference(kernel, stride, shape, dtype, ties):
    x = channels_last_batch(shape, numpy.random.default_rng(0), decimals=0 if ties else None)
    (y, grad, _, _), (y_fused, grad_fused, _, _) = both_ways(lambda: MaxPool2dLayer(kernel, stride), x, dtype)
    numpy.testing.assert_array_equal(y_fused, y)
    if stride == kernel:  # windows apart: each pixel gets one gradient or none, exactly
        numpy.testing.assert_array_equal(grad_fused, grad)
    else:  # overlapping windows add in another order
        assert_close(grad, grad_fused, dtype, "max-pool input gradient")


def test_max_pool_kernel_propagates_nan_as_numpy_maximum():
    x = channels_last_batch((1, 2, 4, 4), numpy.random.default_rng(0))
    x[0, 1, 2, 3] = numpy.nan
    kernels.use("fused")
    y = MaxPool2dLayer(2).forward(x)
    assert numpy.isnan(y[0, 1, 1, 1]) and numpy.isfinite(numpy.delete(y.ravel(), 7)).all()


@pytest.mark.parametrize("kernel, stride", [(2, 2), (3, 1), (3, 3)])
def test_max_pool_sends_an_infinite_gradient_to_the_maximum_alone_both_ways(kernel, stride):
    """The other pixels of the window get 0, as in PyTorch: not inf * 0, which is NaN."""
    x = numpy.random.default_rng(0).standard_normal((1, 2, 6, 6))

    def step(layer):
        y = layer.forward(x)
        g = numpy.ones_like(y)
        g[0, 1, 0, 0], g[0, 0, -1, -1] = numpy.inf, -numpy.inf
        return layer.backward(g), y

    (grad, y), (grad_fused, _) = both_ways(lambda: MaxPool2dLayer(kernel, stride), x, numpy.float64, step=step)
    numpy.testing.assert_array_equal(grad, grad_fused)
    assert not numpy.isnan(grad).any()
    assert numpy.isinf(grad).sum() == 2 and numpy.isinf(grad[x == y[0, 1, 0, 0]]).all()


@pytest.mark.parametrize("kernel, stride", [(2, 2), (3, 2), (3, 3)])
def test_max_pool_routes_a_nan_windows_gradient_to_its_last_nan_both_ways(kernel, stride):
    """As PyTorch does; the reference lines, which match the max by equality, once sent it to the window's last entry."""
    x = numpy.random.default_rng(0).standard_normal((2, 3, 7, 7))
    x[0, 0, 0, 0] = x[0, 0, 1, 0] = x[1, 2, 4, 5] = x[1, 1, 6, 6] = numpy.nan
    (y, grad, _, _), (y_fused, grad_fused, _, _) = both_ways(lambda: MaxPool2dLayer(kernel, stride), x,
                                                             numpy.float64)
    numpy.testing.assert_array_equal(y, y_fused)
    numpy.testing.assert_allclose(grad, grad_fused, rtol=1e-12, atol=1e-12)  # overlapping windows: another order
    import torch
    x_torch = torch.tensor(x, requires_grad=True)
    torch.nn.functional.max_pool2d(x_torch, kernel, stride).backward(
        torch.tensor(numpy.random.default_rng(1).standard_normal(y.shape)))  # both_ways's gradient
    numpy.testing.assert_allclose(grad, x_torch.grad.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cin, cout, size, kernel, stride, padding", [
    (3, 5, 9, 3, 1, 1), (2, 4, 10, 3, 2, 1), (2, 3, 7, 2, 2, 0), (1, 2, 6, 5, 1, 2), (4, 3, 8, (3, 2), 1, 0),
    (6, 4, 9, 3, 1, 1), (5, 3, 10, 3, 2, 2), (8, 2, 7, 2, 2, 0),
    (2, 3, 9, (3, 2), 2, 1)])  # fewer than 4 channels: im2col a column at a time
@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
def test_im2col_and_col2im_kernels_equal_the_reference(cin, cout, size, kernel, stride, padding, dtype):
    x = channels_last_batch((4, cin, size, size), numpy.random.default_rng(0))
    reference, fused = both_ways(lambda: Conv2dLayer(cin, cout, kernel, stride=stride, padding=padding), x, dtype)
    for index, what in ((0, "output"), (1, "input gradient")):
        assert_close(reference[index], fused[index], dtype, what)
    for name in reference[2]:
        assert_close(reference[2][name], fused[2][name], dtype, name)


@pytest.mark.parametrize("channels, kernel, stride, padding", [(1, (3, 3), 1, 1), (3, (2, 3), 2, 1), (2, (5, 5), 3, 0)])
def test_im2col_a_column_at_a_time_copies_what_a_window_at_a_time_copies(channels, kernel, stride, padding):
    images = numpy.random.default_rng(channels).standard_normal((3, 11, 10, channels)).astype(numpy.float32)
    (kh, kw), out_size = kernel, tuple(output_size(n + 2 * padding, k, stride) for n, k in zip((11, 10), kernel))
    by_windows = numpy.empty((3, *out_size, kh, kw, channels), dtype=numpy.float32)
    kernels.cpu.im2col_rows(images, stride, padding, by_windows)
    for layout in (images, channels_last(numpy.ascontiguousarray(channels_first(images)))):  # any memory order
        by_columns = kernels.cpu.im2col_by_columns(layout, kh, kw, stride, padding, out_size)
        numpy.testing.assert_array_equal(by_columns, by_windows.reshape(by_columns.shape))


def test_im2col_kernel_takes_any_memory_layout():
    x = numpy.random.default_rng(0).standard_normal((2, 5, 7, 7))  # channels-first in memory
    reference, fused = both_ways(lambda: Conv2dLayer(5, 4, 3, padding=1), x, numpy.float64)
    assert_close(reference[0], fused[0], numpy.float64, "output")


@pytest.mark.parametrize("layer_class, shape", [(BatchNormLayer, (16, 5)), (BatchNorm2dLayer, (8, 3, 6, 6))])
@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
def test_batch_norm_kernels_equal_the_reference(layer_class, shape, dtype):
    assert_batch_norm_both_ways_equal(layer_class, shape, dtype)


def assert_batch_norm_both_ways_equal(layer_class, shape, dtype, centre=1.0):
    x = numpy.random.default_rng(0).standard_normal(shape) * 3 + centre
    reference, fused = both_ways(lambda: layer_class(shape[1]), x, dtype)
    for index, what in ((0, "output"), (1, "input gradient")):
        assert_close(reference[index], fused[index], dtype, what)
        assert fused[index].dtype == dtype
    for name in ("weight", "bias"):
        assert_close(reference[2][name], fused[2][name], dtype, name)
    for name in ("running_mean", "running_var"):
        assert_close(reference[3].buffers[name], fused[3].buffers[name], dtype, name)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("optimizer", [optim.Adam, optim.AdamW])
def test_adam_kernel_takes_the_reference_steps_exactly(dtype, optimizer):
    finals = []
    for mode in ("numpy", "fused"):
        kernels.use(mode)
        rng = numpy.random.default_rng(0)
        param = rng.standard_normal((7, 5)).astype(dtype)
        grad = numpy.zeros_like(param)
        adam = optimizer([("w", param, grad)], lr=1e-2, weight_decay=0.1)
        for _ in range(5):
            grad[...] = rng.standard_normal(param.shape)
            adam.step()
        finals.append(param)
    numpy.testing.assert_array_equal(finals[0], finals[1])


def test_the_switch_reads_mnn_kernels_and_refuses_other_values():
    script = "from mnn import kernels; print(kernels.mode())"
    for value, expected in (("numpy", "numpy"), ("", "fused"), ("fused", "fused")):
        env = {**os.environ, "MNN_KERNELS": value}
        assert subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                              check=True).stdout.strip() == expected
    with pytest.raises(ValueError, match="expected 'fused' or 'numpy'"):
        kernels.use("numba")


def test_cupy_and_float16_arrays_take_the_reference_lines():
    class FakeCupyArray:
        __module__ = "cupy"

    assert kernels.fused(numpy.zeros(2)) and not kernels.fused(numpy.zeros(2), FakeCupyArray())
    assert not kernels.fused(numpy.zeros(2, dtype=numpy.float16))
    kernels.use("numpy")
    assert not kernels.fused(numpy.zeros(2))


def test_only_cupy_arrays_of_float32_and_float64_take_the_gpu_kernels():
    class FakeCupyArray:
        __module__ = "cupy._core.core"

        def __init__(self, dtype):
            self.dtype = numpy.dtype(dtype)

    assert kernels.fused_gpu(FakeCupyArray("float32"), FakeCupyArray("float64"))
    assert not kernels.fused_gpu(FakeCupyArray("float16")) and not kernels.fused_gpu(numpy.zeros(2))
    kernels.use("numpy")
    assert not kernels.fused_gpu(FakeCupyArray("float32"))


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
def test_dropout_kernel_draws_and_applies_the_masks_of_the_reference(dtype, layout):
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((3, 5, 7)) if layout == "contiguous" else channels_last_batch((2, 3, 4, 5), rng)
    reference, fused = both_ways(lambda: DropoutLayer(0.3), x, dtype)
    for index in range(2):  # the same masks, element for element: the output and the input gradient
        numpy.testing.assert_array_equal(reference[index], fused[index])


@pytest.mark.parametrize("make_layer", [GeluLayer, lambda: DropoutLayer(0.5)], ids=["gelu", "dropout"])
def test_element_wise_kernels_keep_a_single_numbers_shape(make_layer):
    x, g = numpy.array(0.75, dtype=numpy.float32), numpy.array(2.0, dtype=numpy.float32)
    results = []
    for mode in ("numpy", "fused"):
        kernels.use(mode)
        backend.seed(0)
        layer = make_layer()
        results.append((layer.forward(x), layer.backward(g)))
    for reference, fused in zip(*results):
        assert fused.shape == reference.shape == ()
        numpy.testing.assert_allclose(fused, reference, rtol=1e-6)


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
def test_gelu_kernels_equal_the_reference(dtype, layout):
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((3, 5, 7)) * 3 if layout == "contiguous" else channels_last_batch((2, 3, 4, 5), rng) * 3
    reference, fused = both_ways(GeluLayer, x, dtype)
    for index, what in ((0, "output"), (1, "input gradient")):
        assert_close(reference[index], fused[index], dtype, what)


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
def test_relu_backward_kernel_equals_the_reference(dtype, layout, monkeypatch):
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((3, 5, 7)) if layout == "contiguous" else channels_last_batch((2, 3, 4, 5), rng)
    x.reshape(-1)[:3] = numpy.nan, 0.0, -0.0
    calls, kernel = [], kernels.cpu.relu_backward
    monkeypatch.setattr(kernels.cpu, "relu_backward", lambda g, y: calls.append(1) or kernel(g, y))
    reference, fused = both_ways(ReluLayer, x, dtype)
    assert calls == [1]  # the fused pass ran the kernel, the reference did not
    for index in range(2):  # a selection, no arithmetic: equal, NaN and all
        numpy.testing.assert_array_equal(reference[index], fused[index])
    g = numpy.array([numpy.inf, -numpy.inf, 2.0], dtype=dtype)
    y = numpy.array([-1.0, 0.0, numpy.nan], dtype=dtype)
    numpy.testing.assert_array_equal(kernels.cpu.relu_backward(g, y), [0.0, 0.0, 2.0])  # no inf * 0


@pytest.mark.parametrize("g_layout", ["channels-last", "contiguous", "a slice"])
def test_relu_backward_keeps_a_channels_last_gradient_channels_last(g_layout):
    """Where the gradient and the output lie alike in memory, the pass runs in memory order and the
    result lies so too: the layers below a ReLU in a CNN get channels-last arrays, as they expect."""
    rng = numpy.random.default_rng(1)
    y = numpy.maximum(channels_last_batch((2, 3, 4, 5), rng), 0)
    g = {"channels-last": channels_last_batch((2, 3, 4, 5), rng), "contiguous": rng.standard_normal((2, 3, 4, 5)),
         "a slice": channels_last_batch((2, 3, 4, 10), rng)[..., ::2]}[g_layout]
    grad = kernels.cpu.relu_backward(g, y)
    numpy.testing.assert_array_equal(grad, numpy.where(y <= 0, 0, g))
    assert (grad.strides == y.strides) == (g_layout == "channels-last")


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (5, 1), (4, 37)])
def test_softmax_kernels_equal_the_reference(dtype, shape):
    x = numpy.random.default_rng(0).standard_normal(shape) * 4
    if shape[-1] == 8:  # a causal mask, as attention adds it
        x = x + numpy.triu(numpy.full((8, 8), -numpy.inf), k=1)
    reference, fused = both_ways(SoftmaxLayer, x, dtype)
    for index, what in ((0, "output"), (1, "input gradient")):
        assert_close(reference[index], fused[index], dtype, what)


def test_softmax_kernel_gives_nan_and_inf_rows_as_numpy():
    x = numpy.array([[1.0, numpy.nan, 2.0], [numpy.nan, 0.0, 0.0], [numpy.inf, 1.0, 0.0],
                     [-numpy.inf, -numpy.inf, -numpy.inf], [3.0, 2.0, 1.0]])
    kernels.use("numpy")
    with numpy.errstate(invalid="ignore"):  # inf - inf in NumPy's lines
        expected = softmax(x)
    kernels.use("fused")
    numpy.testing.assert_array_equal(numpy.isnan(softmax(x)), numpy.isnan(expected))
    numpy.testing.assert_allclose(softmax(x)[4], expected[4], rtol=1e-15)


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("shape", [(6, 10), (2, 5, 65), (3, 1)])
def test_cross_entropy_kernel_equals_the_reference(dtype, shape):
    rng = numpy.random.default_rng(4)
    x = rng.standard_normal(shape) * 6
    labels = rng.integers(0, shape[-1], shape[:-1])
    results = []
    for mode in ("numpy", "fused"):
        kernels.use(mode)
        layer = CrossEntropyLossLayer()
        loss = layer.forward(x.astype(dtype), labels)
        results.append((loss, layer.backward()))
    (loss, grad), (fused_loss, fused_grad) = results
    assert fused_loss.dtype == loss.dtype == dtype and fused_grad.dtype == grad.dtype == dtype
    assert_close(loss, fused_loss, dtype, "loss")
    assert_close(grad, fused_grad, dtype, "input gradient")


def test_cross_entropy_kernel_keeps_large_scores_finite_and_nan_rows_nan():
    x = numpy.array([[1000.0, -1000.0, 0.0], [numpy.nan, 0.0, 0.0], [3.0, 2.0, 1.0]])
    labels = numpy.array([1, 0, 2])
    kernels.use("fused")
    layer = CrossEntropyLossLayer()
    layer.forward(x[[0, 2]], labels[[0, 2]])
    numpy.testing.assert_allclose(layer.saved()[1][0], [1, 0, 0])  # softmax of the huge scores
    assert layer.forward(x[[0]], labels[[0]]) == 2000.0  # log-sum-exp: no overflow, no log(0)
    assert numpy.isnan(layer.forward(x, labels))


def test_softmax_of_a_single_number_is_one_on_both_paths():
    for mode in ("numpy", "fused"):
        kernels.use(mode)
        assert softmax(numpy.array(2.0)) == 1.0


def test_softmax_along_another_axis_or_of_mixed_dtypes_takes_the_reference():
    rng = numpy.random.default_rng(1)
    x, g = rng.standard_normal((3, 4)), rng.standard_normal((3, 4)).astype(numpy.float32)
    results = []
    for mode in ("numpy", "fused"):
        kernels.use(mode)
        layer = SoftmaxLayer(axis=0)
        results.append((layer.forward(x), layer.backward(g)))
        layer = SoftmaxLayer()
        results.append((layer.forward(x), layer.backward(g)))
    for reference, fused in ((results[0], results[2]), (results[1], results[3])):
        for a, b in zip(reference, fused):
            assert a.dtype == b.dtype
            numpy.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
def test_layer_norm_kernels_equal_the_reference(bias, dtype):
    x = numpy.random.default_rng(0).standard_normal((3, 5, 16)) * 2 + 0.5

    def make_layer():
        layer = LayerNormLayer(16, bias=bias)
        layer.params["weight"][...] = numpy.linspace(0.5, 1.5, 16)
        return layer

    reference, fused = both_ways(make_layer, x, dtype)
    for index, what in ((0, "output"), (1, "input gradient")):
        assert_close(reference[index], fused[index], dtype, what)
    for name in reference[2]:
        assert_close(reference[2][name], fused[2][name], dtype, name)


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
def test_embedding_kernel_adds_repeated_tokens_as_the_reference(dtype):
    indices = numpy.array([[1, 3, 1, 1], [0, 3, 2, 1]])
    reference, fused = both_ways(lambda: EmbeddingLayer(5, 3), indices, dtype)
    assert_close(reference[2]["weight"], fused[2]["weight"], dtype, "embedding gradient")


def test_the_fused_convolution_gives_the_same_numbers_in_chunks_of_one_image(monkeypatch):
    from mnn.layers import conv

    x = channels_last_batch((5, 6, 8, 8), numpy.random.default_rng(0))
    whole = both_ways(lambda: Conv2dLayer(6, 4, 3, padding=1), x, numpy.float64)[1]
    monkeypatch.setattr(conv, "CHUNK_BYTES", 1)
    chunked = both_ways(lambda: Conv2dLayer(6, 4, 3, padding=1), x, numpy.float64)[1]
    for index in (0, 1):
        assert_close(whole[index], chunked[index], numpy.float64, "output" if index == 0 else "input gradient")
    assert_close(whole[2]["w"], chunked[2]["w"], numpy.float64, "weight gradient")


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("hidden, bias", [(5, True), (8, False), (17, True)])  # 4H: a tile and a rest, whole tiles
def test_lstm_step_kernels_equal_the_reference(dtype, hidden, bias, monkeypatch):
    """The step kernels in both dtypes: a float32 layer takes the sequence kernels (tests/test_cpu_sequence.py),
    unless told there are none for it."""
    from mnn.layers import recurrent

    monkeypatch.setattr(recurrent, "sequence_parts", lambda batch, *arrays: None)
    x = numpy.random.default_rng(0).standard_normal((3, 6, 4))
    reference, fused = both_ways(lambda: LSTMLayer(4, hidden, bias=bias), x, dtype)
    assert_close(reference[0], fused[0], dtype, "output")
    assert_close(reference[1], fused[1], dtype, "input gradient")
    for name in reference[2]:
        assert_close(reference[2][name], fused[2][name], dtype, name)
    for part in (0, 1):
        assert_close(reference[3].final_state[part], fused[3].final_state[part], dtype, "final state")
        assert_close(reference[3].state_grad[part], fused[3].state_grad[part], dtype, "initial state gradient")


@pytest.mark.parametrize("weights, state, gradient, final", [
    (numpy.float64, numpy.float64, numpy.float32, numpy.float64),  # a float32 gradient into a float64 layer
    (numpy.float64, numpy.float64, numpy.float64, numpy.float32),  # and a float32 final-state gradient
    (numpy.float32, numpy.float64, numpy.float32, numpy.float32),  # a float64 state: the reference runs float64
    (numpy.float32, numpy.float32, numpy.float32, numpy.float16),  # numba has no float16 (backward; forward fused)
])
def test_lstm_with_mixed_dtypes_takes_the_reference_numbers(weights, state, gradient, final):
    rng = numpy.random.default_rng(3)
    x = rng.standard_normal((2, 4, 3)).astype(weights)
    initial = tuple(rng.standard_normal((2, 5)).astype(state) for _ in range(2))
    final_grad = tuple(rng.standard_normal((2, 5)).astype(final) for _ in range(2))
    forward_fused = final == numpy.float16  # the backward's float16 runs the reference on the fused forward's
    results = both_ways(lambda: LSTMLayer(3, 5), x, weights, step=lstm_step(x, initial, final_grad, gradient),
                        kernels_expected=forward_fused)
    for reference, fused in zip(*results):
        assert reference.dtype == fused.dtype
        if forward_fused:
            assert_close(reference, fused, numpy.float32, "a float16 final-state gradient")
        else:
            numpy.testing.assert_array_equal(reference, fused)


def test_lstm_kernels_carry_a_given_state_and_final_state_gradient_as_the_reference():
    rng = numpy.random.default_rng(2)
    x, state = rng.standard_normal((2, 5, 3)), (rng.standard_normal((2, 6)), rng.standard_normal((2, 6)))
    final_grad = (rng.standard_normal((2, 6)), rng.standard_normal((2, 6)))
    reference, fused = both_ways(lambda: LSTMLayer(3, 6), x, numpy.float64, step=lstm_step(x, state, final_grad))
    what = ("output", "input gradient", "final h", "final c", "initial h gradient", "initial c gradient")
    for a, b, name in zip(reference, fused, what):
        assert_close(a, b, numpy.float64, name)


@pytest.mark.parametrize("make_layer, shape", [
    (lambda: BatchNormLayer(3), (8, 3)), (lambda: BatchNorm2dLayer(3), (4, 3, 5, 5)),
    (lambda: LayerNormLayer(5), (4, 5)), (lambda: Conv2dLayer(2, 3, 3, padding=1), (2, 2, 6, 6))])
def test_a_float32_input_to_float64_parameters_gives_the_same_dtypes_both_ways(make_layer, shape):
    """The kernels keep one dtype, so they leave a mixed pair to the reference lines, which promote as NumPy does."""
    x = numpy.random.default_rng(0).standard_normal(shape).astype(numpy.float32)
    results = []
    backend.set_default_dtype(numpy.float64)
    try:
        for mode in ("numpy", "fused"):
            kernels.use(mode)
            backend.seed(0)
            layer = make_layer()
            y = layer.forward(x)
            grad = layer.backward(numpy.ones_like(y))
            results.append((y, grad, *layer.grads.values()))
    finally:
        backend.set_default_dtype(numpy.float32)
    for reference, fused in zip(*results):
        assert reference.dtype == fused.dtype
        assert_close(reference, fused, numpy.float32, "mixed dtypes")


def test_kernels_load_where_numba_finds_no_cache_folder(tmp_path):
    """A read-only install run by a user without a home: numba can write beside the code nor in ~/.cache."""
    code = "\n".join([
        "import numba, numpy",
        "from numba.core.caching import CacheImpl",
        "CacheImpl._locator_classes = [kind for kind in CacheImpl._locator_classes  # only NUMBA_CACHE_DIR, unset",
        "                              if 'UserProvided' in kind.__name__]",
        "from mnn.kernels import cpu",
        "print(numba.config.CACHE_DIR)",
        "print(cpu.relu_backward(numpy.ones(3), numpy.array([-1.0, 0.0, 2.0])).tolist())"])
    environment = {key: value for key, value in os.environ.items() if key != "NUMBA_CACHE_DIR"}
    environment["TMPDIR"] = str(tmp_path)
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True)
    folder, result = printed.stdout.splitlines()
    assert folder.startswith(str(tmp_path / "mnn-numba-cache-")) and result == "[0.0, 0.0, 1.0]"
    assert list((tmp_path).glob("mnn-numba-cache-*/*"))  # the kernels compiled into it
    assert not Path(folder).stat().st_mode & 0o077  # this user's alone


def test_a_cache_folder_another_user_could_write_is_not_taken(tmp_path, monkeypatch):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    shared = tmp_path / f"mnn-numba-cache-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)  # as another user, there first, could have left it: numba unpickles what it holds
    chosen = kernels.cpu.private_temporary_folder()
    assert chosen != shared and chosen.parent == tmp_path and not chosen.stat().st_mode & 0o077
    shared.chmod(0o700)
    assert kernels.cpu.private_temporary_folder() == shared
