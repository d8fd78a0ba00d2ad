"""The layers' GPU lines, run on the CPU: each GPU kernel compiled by g++ (``cuda_on_cpu``) and launched
by the layers as on a GPU, with its argument list checked against the kernel's parameters, against
the NumPy lines (``MNN_KERNELS=numpy``). A row kernel runs with one lane a row, except in the tests
that ask for all its lanes (``cuda_on_cpu.LANES_SHIMS``: every thread of a block a fiber, warp
shuffles between them). On a GPU, ``tests/test_cupy.py``."""
import numpy
import pytest
from _pytest.monkeypatch import MonkeyPatch

from cuda_on_cpu import CublasOnCpu, run_gpu_lines_on_cpu
from device_operations import READ_BACK, count_on_gpu_lines, step_operations
from mnn import backend, kernels, models, optim
from mnn.kernels import cuda, cuda_products
from mnn.layers import (BatchNorm2dLayer, BatchNormLayer, Conv2dLayer, CrossEntropyLossLayer, EmbeddingLayer,
                        LayerNormLayer, LinearLayer, LSTMLayer, MatrixProduct, MultiHeadAttention,
                        PositionalEmbeddingLayer, ReluLayer)
from mnn.layers.linear import sum_to_shape
import test_kernels
from test_kernels import POOLS, assert_close, both_ways, channels_last_batch, lstm_step

RAW_NAMES = {value.name for value in vars(cuda).values() if isinstance(value, cuda.Raw)}
CUBLAS = {"cublas.gemm", "cublas.gemv", "cublas.gemmStridedBatched"}
CONVOLUTIONS = [(3, 5, (9, 9), 3, 1, 1), (2, 4, (10, 10), 3, 2, 1), (2, 3, (7, 7), 2, 2, 0), (1, 2, (6, 6), 5, 1, 2),
                (4, 3, (8, 8), (3, 2), 1, 0), (5, 3, (7, 10), 3, 2, 2), (3, 2, (11, 6), (2, 4), 3, 1),
                (2, 3, (3, 4), (1, 3), 2, 3)]  # (H, W)


@pytest.fixture(autouse=True)
def launched(monkeypatch):
    """The names of the kernels launched, in order; the kernel mode is restored afterwards."""
    before = kernels.mode()
    yield run_gpu_lines_on_cpu(monkeypatch)
    kernels.use(before)


@pytest.mark.parametrize("kernel, stride, shape", POOLS)
@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_max_pooling_on_the_gpu_lines_routes_as_the_reference(kernel, stride, shape, dtype, ties, launched):
    test_kernels.test_max_pool_kernels_route_exactly_as_the_reference(kernel, stride, shape, dtype, ties)
    assert launched == [cuda.MAX_POOL.name, cuda.MAX_POOL_BACKWARD.name]


def test_max_pooling_on_the_gpu_lines_propagates_nan(launched):
    test_kernels.test_max_pool_kernel_propagates_nan_as_numpy_maximum()
    assert launched == [cuda.MAX_POOL.name]


@pytest.mark.parametrize("cin, cout, size, kernel, stride, padding", CONVOLUTIONS)
@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("layout", ["channels-last", "channels-first"])
def test_convolution_on_the_gpu_lines_equals_the_reference(cin, cout, size, kernel, stride, padding, dtype, layout,
                                                           launched):
    rng = numpy.random.default_rng(0)
    x = channels_last_batch((3, cin, *size), rng) if layout == "channels-last" else rng.standard_normal(
        (3, cin, *size))
    reference, gpu = both_ways(lambda: Conv2dLayer(cin, cout, kernel, stride=stride, padding=padding), x, dtype)
    weight_in_im2col_order = cin == 1  # (O, 1, kh, kw): the weight's gradient added to by one GEMM
    assert launched == [cuda.IM2COL.name, *["cublas.gemm"] * weight_in_im2col_order, "cublas.gemv",
                        cuda.COL2IM.name]  # the bias's gradient added to
    for index, what in ((0, "output"), (1, "input gradient")):
        assert_close(reference[index], gpu[index], dtype, what)
    for name in reference[2]:
        assert_close(reference[2][name], gpu[2][name], dtype, name)


@pytest.mark.parametrize("layer_class, shape", [(BatchNormLayer, (37, 5)), (BatchNorm2dLayer, (3, 4, 5, 7)),
                                                (BatchNormLayer, (3, 3)), (BatchNormLayer, (16, 1))])
@pytest.mark.parametrize("dtype, centre", [(numpy.float64, 1.0), (numpy.float32, 1.0), (numpy.float64, 1e3)],
                         ids=["float64", "float32", "float64-far-from-zero"])
def test_batch_norm_on_the_gpu_lines_equals_the_reference(layer_class, shape, dtype, centre, launched):
    """Row counts around a chunk's (16) and not a multiple of it. A mean far from zero (1e3, spread 3):
    sums of x and x^2 would lose about 1e-11 of the variance to cancellation, more than float64's
    tolerance; the kernels' sums, shifted by a sample, do not. (In float32 it is the reference lines
    that lose digits there, summing in float32.)"""
    test_kernels.assert_batch_norm_both_ways_equal(layer_class, shape, dtype, centre)
    assert launched == [cuda.BATCH_NORM_SUMS.name, cuda.BATCH_NORM_STATISTICS.name, cuda.BATCH_NORM_APPLY.name,
                        cuda.RUNNING_STATISTICS.name, cuda.BATCH_NORM_BACKWARD_SUMS.name,
                        cuda.BATCH_NORM_BACKWARD_MEANS.name, cuda.BATCH_NORM_BACKWARD_APPLY.name]


def test_batch_norm_on_the_gpu_lines_of_a_spread_past_the_squares_range(launched):
    """float64 values 1e160 apart: their squares overflow, and the statistics kernel's S2/N - offset^2 was
    inf - inf = NaN, NaN everywhere (the running variance too). The reference's: an infinite variance."""
    x = numpy.array([[1e160], [3e160], [2e160], [0.0]])
    with numpy.errstate(over="ignore", invalid="ignore"):
        reference, gpu = both_ways(lambda: BatchNormLayer(1), x, numpy.float64)
    assert cuda.BATCH_NORM_STATISTICS.name in launched
    for index in (0, 1):
        numpy.testing.assert_array_equal(reference[index], gpu[index])
    assert gpu[3].buffers["running_var"][0] == numpy.inf


def test_batch_norm_on_the_gpu_lines_adds_into_gradients_with_gaps(launched):
    """A gradient a user replaced by a strided view cannot be the kernel's target: it is added to through a
    buffer, as the reference lines add to it."""
    x = numpy.random.default_rng(0).standard_normal((20, 3))

    def step(layer):
        layer.grads["weight"] = numpy.ones(6)[::2]
        layer.backward(numpy.ones_like(layer.forward(x)) * numpy.arange(3))
        return layer.grads["weight"].copy(), layer.grads["bias"].copy()

    reference, gpu = both_ways(lambda: BatchNormLayer(3), x, numpy.float64, step=step)
    assert cuda.BATCH_NORM_BACKWARD_MEANS.name in launched
    for expected, got in zip(reference, gpu):
        assert_close(expected, got, numpy.float64, "gradient")


def test_batch_norm_on_the_gpu_lines_keeps_a_nan_variance():
    x = numpy.random.default_rng(0).standard_normal((20, 3))
    x[4, 1] = numpy.nan
    reference, gpu = both_ways(lambda: BatchNormLayer(3), x, numpy.float64)
    for name in ("running_mean", "running_var"):
        numpy.testing.assert_array_equal(numpy.isnan(gpu[3].buffers[name]), [False, True, False])
    numpy.testing.assert_array_equal(numpy.isnan(gpu[0]), numpy.isnan(reference[0]))


def test_batch_norm_of_parameters_in_another_dtype_takes_the_reference_lines_both_ways(launched):
    """float64 parameters, a float32 input: forward keeps a float32 x_hat, which a float64 kernel must not read."""
    x = channels_last_batch((2, 3, 4, 4), numpy.random.default_rng(0)).astype(numpy.float32)
    grads = {}
    for mode in ("numpy", "fused"):
        kernels.use(mode)
        backend.set_default_dtype(numpy.float64)
        try:
            layer = BatchNorm2dLayer(3)
        finally:
            backend.set_default_dtype(numpy.float32)
        y = layer.forward(x)
        grads[mode] = layer.backward(numpy.ones_like(y)), layer.grads["weight"].copy()
    assert launched == []
    for reference, gpu in zip(grads["numpy"], grads["fused"]):
        numpy.testing.assert_array_equal(gpu, reference)


def test_batch_norm_in_eval_mode_takes_the_reference_lines(launched):
    layer = BatchNorm2dLayer(3)
    layer.eval()
    kernels.use("fused")
    layer.backward(layer.forward(channels_last_batch((2, 3, 4, 4), numpy.random.default_rng(0)).astype(numpy.float32)))
    assert launched == []


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("batch, hidden, bias", [(2, 5, True), (cuda.LSTM_SAMPLES + 3, 17, False)])
def test_the_lstm_on_the_gpu_lines_carries_a_state_as_the_reference(dtype, batch, hidden, bias, launched):
    """A given initial state and final-state gradient, one step launch each way per time step; a batch of
    one tile of samples, and of two with a rest."""
    rng = numpy.random.default_rng(2)
    x = rng.standard_normal((batch, 5, 3)).astype(dtype)
    state, final_grad = (tuple(rng.standard_normal((batch, hidden)).astype(dtype) for _ in range(2)) for _ in range(2))
    results = both_ways(lambda: LSTMLayer(3, hidden, bias=bias), x, dtype, step=lstm_step(x, state, final_grad, dtype))
    steps = [cuda.LSTM_STEP.name] * 5 + [cuda.LSTM_STEP_BACKWARD.name] * 5
    assert launched == steps + ["cublas.gemm"] * 2  # W_ih's gradient and W_hh's
    what = ("output", "input gradient", "final h", "final c", "initial h gradient", "initial c gradient")
    for reference, gpu, name in zip(*results, what):
        assert_close(reference, gpu, dtype, name)


ROW_LAYERS = {
    "causal attention": (lambda: MultiHeadAttention(8, 2), lambda rows, width: (rows, width, 8)),  # width: T
    "layer norm": (lambda width: LayerNormLayer(width), lambda rows, width: (rows, width)),
}


@pytest.mark.parametrize("shape", [(2, 5), (3,), (0, 4), (2, 3, 4), ()])
@pytest.mark.parametrize("lanes", [False, True], ids=["a-lane-a-row", "all-lanes"])
def test_embeddings_on_the_gpu_lines_equal_the_reference(shape, lanes, monkeypatch):
    """A warp copies each token's row (37 entries: lanes striding past a warp); the positions' gradient is
    one GEMV adding into the rows the sequence used."""
    launched = run_gpu_lines_on_cpu(monkeypatch, lanes=lanes)
    indices = numpy.random.default_rng(9).integers(0, 6, shape)
    reference, gpu = both_ways(lambda: EmbeddingLayer(6, 37), indices, numpy.float32)
    assert launched == [cuda.EMBEDDING_ROWS.name] * bool(indices.size)
    numpy.testing.assert_array_equal(reference[0], gpu[0])  # copies of the table's rows
    numpy.testing.assert_array_equal(reference[2]["weight"], gpu[2]["weight"])  # the same scatter-add
    if len(shape) == 2:
        launched.clear()
        x = numpy.random.default_rng(10).standard_normal((*shape, 3))
        reference, gpu = both_ways(lambda: PositionalEmbeddingLayer(7, 3), x, numpy.float32)
        assert launched == ["cublas.gemv"] * bool(indices.size)
        assert_close(reference[2]["weight"], gpu[2]["weight"], numpy.float32, "the positions' gradient")


@pytest.mark.parametrize("indices", [[0, 2, -1, 1, 2], [3, 0, 1, 2, 7]], ids=["below", "above"])
def test_embeddings_on_the_gpu_lines_refuse_indices_outside_the_table(indices, launched):
    expected = rf"token indices must lie in \[0, 4\), got \[{min(indices)}, {max(indices)}\]"
    for mode in ("numpy", "fused"):
        kernels.use(mode)
        with pytest.raises(ValueError, match=expected):
            EmbeddingLayer(4, 3).forward(numpy.array(indices))
    assert launched == [cuda.EMBEDDING_ROWS.name]


@pytest.mark.parametrize("labels", [[0, 2, -1, 1, 2], [3, 0, 1, 2, 7]], ids=["below", "above"])
@pytest.mark.parametrize("lanes", [False, True], ids=["a-lane-a-row", "all-lanes"])
def test_cross_entropy_on_the_gpu_lines_refuses_labels_outside_the_classes(labels, lanes, monkeypatch):
    """The forward kernel counts them (no minimum and maximum read back): the reference lines' error."""
    launched = run_gpu_lines_on_cpu(monkeypatch, lanes=lanes)
    x = numpy.random.default_rng(8).standard_normal((5, 3)).astype(numpy.float32)
    expected = rf"target labels must lie in \[0, 3\), got \[{min(labels)}, {max(labels)}\]"
    if max(labels) > 3:  # unsigned labels beyond int64 are told as given, not as the kernel reads them
        labels[-1], expected = 2**64 - 1, expected.replace(str(max(labels)), str(2**64 - 1))
    for mode in ("numpy", "fused"):
        kernels.use(mode)
        layer = CrossEntropyLossLayer()
        with pytest.raises(ValueError, match=expected):
            layer.forward(x, numpy.array(labels, dtype=numpy.uint64 if min(labels) >= 0 else numpy.int64))
    assert launched == [cuda.CROSS_ENTROPY_ROWS.name]


@pytest.mark.parametrize("rows, width", [(1, 33), (3, 100), (5, 1000), (7, 31)])
@pytest.mark.parametrize("layer", [*ROW_LAYERS, "cross-entropy"])
def test_the_row_kernels_with_all_their_lanes_on_long_rows_and_odd_row_counts(rows, width, layer, monkeypatch):
    """Every lane of a warp (cuda_on_cpu.LANES_SHIMS): lanes striding along rows longer than a warp,
    butterflies over 32 lanes, blocks whose last warps have no row. Forward and backward."""
    launched = run_gpu_lines_on_cpu(monkeypatch, lanes=True)
    rng = numpy.random.default_rng(rows * width)
    if layer == "cross-entropy":
        x, labels = 3 * rng.standard_normal((rows, width)), numpy.arange(rows) * 7 % width

        def step(loss):
            return loss.forward(x, labels), loss.backward()
        results = both_ways(CrossEntropyLossLayer, x, numpy.float32, step=step)
    else:
        make, shape = ROW_LAYERS[layer]
        results = both_ways(lambda: make(width) if layer == "layer norm" else make(),
                            3 * rng.standard_normal(shape(rows, width)), numpy.float32)
    assert set(launched) & RAW_NAMES and set(launched) <= RAW_NAMES | CUBLAS, launched
    for reference, gpu in zip(results[0][:2], results[1][:2]):
        assert_close(reference, gpu, numpy.float32, layer)


@pytest.mark.parametrize("batch, hidden", [(1, 31), (cuda.LSTM_SAMPLES, 33), (11, 100)])
def test_the_lstm_step_kernels_with_all_their_lanes(batch, hidden, monkeypatch):
    """A warp per unit, its lanes along W_hh's row (wider than a warp here), 8 samples a warp."""
    launched = run_gpu_lines_on_cpu(monkeypatch, lanes=True)
    rng = numpy.random.default_rng(batch * hidden)
    x = rng.standard_normal((batch, 3, 5)).astype(numpy.float32)
    state, final_grad = (tuple(rng.standard_normal((batch, hidden)).astype(numpy.float32) for _ in range(2))
                         for _ in range(2))
    results = both_ways(lambda: LSTMLayer(5, hidden), x, numpy.float32,
                        step=lstm_step(x, state, final_grad, numpy.float32))
    assert launched == [cuda.LSTM_STEP.name] * 3 + [cuda.LSTM_STEP_BACKWARD.name] * 3 + ["cublas.gemm"] * 2
    for reference, gpu in zip(*results):
        assert_close(reference, gpu, numpy.float32, "the LSTM")


@pytest.mark.parametrize("rows", [0, 1, 5])
def test_a_linear_layer_on_the_gpu_lines_adds_into_its_gradients(rows, launched):
    """One cuBLAS call each for the weight's and the bias's gradient, adding to what they hold (a second
    backward pass doubles them); none for an empty batch, whose operands cuBLAS would refuse."""
    rng = numpy.random.default_rng(rows)
    layer = LinearLayer(3, 2)
    x, g = rng.standard_normal((rows, 3)).astype(numpy.float32), rng.standard_normal((rows, 2)).astype(numpy.float32)
    for _ in range(2):
        layer.forward(x)
        layer.backward(g)
    assert launched == ["cublas.gemm", "cublas.gemv"] * 2 if rows else launched == []
    numpy.testing.assert_allclose(layer.grads["w"], 2 * g.T @ x, rtol=1e-6, atol=1e-6)
    numpy.testing.assert_allclose(layer.grads["b"], 2 * g.sum(axis=0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make_layer, shape", [
    (lambda: BatchNormLayer(5), (37, 5)), (lambda: BatchNorm2dLayer(4), (3, 4, 5, 7)),
    (lambda: LayerNormLayer(6), (3, 4, 6)), (lambda: LayerNormLayer(6, bias=False), (3, 4, 6)),
    (lambda: Conv2dLayer(3, 4, 3, padding=1), (2, 3, 6, 5)), (lambda: Conv2dLayer(1, 4, 3), (2, 1, 6, 5)),
    (lambda: Conv2dLayer(3, 4, 1), (2, 3, 6, 5)), (lambda: LinearLayer(6, 3), (4, 6))],
    ids=["batch-norm", "batch-norm-2d", "layer-norm", "layer-norm-no-bias", "convolution", "convolution-grey",
         "convolution-1x1", "linear"])
def test_every_gradient_added_into_on_the_gpu_lines_accumulates_as_the_reference(make_layer, shape, launched):
    """Kernels and cuBLAS calls that add into ``grads`` (beta = 1, ``+=`` in a kernel): two backward
    passes hold the sum of both, as on the reference lines."""
    x = numpy.random.default_rng(3).standard_normal(shape)

    def twice(layer):
        for seed in (1, 2):
            y = layer.forward(x)
            layer.backward(numpy.random.default_rng(seed).standard_normal(y.shape))
        return {name: value.copy() for name, value in layer.grads.items()}

    reference, gpu = both_ways(make_layer, x, numpy.float64, step=twice)
    assert launched, "the GPU lines were not taken"
    for name in reference:
        assert_close(reference[name], gpu[name], numpy.float64, name)


def test_the_stand_in_for_cublas_refuses_what_cublas_refuses():
    """The checks above can fail: an empty operand's leading dimension, vectors with a stride."""
    cublas = CublasOnCpu([])
    with pytest.raises(AssertionError):
        cublas.gemm("N", "N", numpy.zeros((2, 0)), numpy.zeros((0, 3)), out=numpy.zeros((2, 3)), beta=1.0)
    with pytest.raises(AssertionError):
        cublas.gemv("T", 1.0, numpy.ones((4, 3)), numpy.ones(8)[::2], 1.0, numpy.zeros(3))


def product_operands(case, rng, dtype, xp=numpy):
    """``MatrixProduct``'s operands (``xp`` arrays) laid out as ``case`` says, and how many of its three
    products (forward, then each operand's gradient) cuBLAS reads in place."""
    def normal(*shape):
        return xp.asarray(rng.standard_normal(shape).astype(dtype))
    heads = normal(2, 7, 36).reshape(2, 7, 3, 3, 4).transpose(2, 0, 3, 1, 4)  # attention's Q, K, V as views
    return {
        "contiguous": (normal(3, 5, 4), normal(3, 4, 6), 3),
        "b transposed": (normal(3, 5, 4), normal(3, 6, 4).swapaxes(-1, -2), 3),
        "a transposed": (normal(3, 4, 5).swapaxes(-1, -2), normal(3, 4, 6), 3),
        "both transposed, a stack of (2, 3)": (normal(2, 3, 4, 5).swapaxes(-1, -2),
                                                normal(2, 3, 6, 4).swapaxes(-1, -2), 3),
        "rows cut from wider rows": (normal(3, 5, 10)[..., 2:6], normal(3, 9, 6)[:, 3:7], 3),
        "every other matrix": (normal(6, 5, 4)[::2], normal(3, 4, 6), 3),
        "a new axis in the stack": (normal(3, 5, 4)[None], normal(1, 3, 4, 6), 3),
        "heads cut from a projection": (heads[0], heads[1].swapaxes(-1, -2), 0),
        "a broadcast stack": (normal(1, 5, 4), normal(3, 4, 6), 1),  # dL/dA's product: (3, 5, 6) (3, 6, 4)
        "a side of one": (normal(3, 1, 4), normal(3, 4, 6), 0),
        "matrices in reverse": (normal(3, 5, 4)[::-1], normal(3, 4, 6), 1),  # dL/dA's: g and B read in place
    }[case]


PRODUCT_CASES = ["contiguous", "b transposed", "a transposed", "both transposed, a stack of (2, 3)",
                 "rows cut from wider rows", "every other matrix", "a new axis in the stack",
                 "heads cut from a projection", "a broadcast stack", "a side of one", "matrices in reverse"]


def product_and_gradients(a, b, g):
    """Eqs. (1)-(3) of ``MatrixProduct`` in float64 NumPy, named: the reference for the lines under test."""
    a, b, g = (numpy.asarray(x, dtype=numpy.float64) for x in (a, b, g))
    return [("C", a @ b), ("dL/dA", sum_to_shape(g @ b.swapaxes(-1, -2), a.shape)),
            ("dL/dB", sum_to_shape(a.swapaxes(-1, -2) @ g, b.shape))]


@pytest.mark.parametrize("case", PRODUCT_CASES)
@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
def test_stacked_products_read_in_place_equal_the_reference(case, dtype, launched):
    """Eqs. (1)-(3) of ``MatrixProduct``: one strided batched GEMM each where both stacks can be read in
    place (``cuda_products.stack_layout``), CuPy's ``matmul`` (here NumPy's) where not."""
    rng = numpy.random.default_rng(len(case))
    a, b, in_place = product_operands(case, rng, dtype)
    layer = MatrixProduct()
    y = layer.forward(a, b)
    g = rng.standard_normal(y.shape).astype(dtype)
    grad_a, grad_b = layer.backward(g)
    for (name, expected), got in zip(product_and_gradients(a, b, g), (y, grad_a, grad_b)):
        assert got.shape == expected.shape and got.dtype == dtype, name
        assert_close(expected, got, dtype, f"{case}: {name}")
    assert launched == ["cublas.gemmStridedBatched"] * in_place


def test_stacks_of_another_dtype_than_float32_or_float64_are_left_to_matmul(launched):
    """cuBLAS would read float16 or complex entries as float32 ones: not described to it at all."""
    for dtype in (numpy.float16, numpy.complex64, numpy.int32):
        a, b = numpy.ones((3, 4, 5), dtype=dtype), numpy.ones((3, 5, 6), dtype=dtype)
        assert cuda_products.batched_product(a, b) is None
    assert launched == []


def test_the_stand_in_for_the_batched_product_refuses_a_stack_off_its_operand():
    """A wrong leading dimension or batch stride reads entries that are not the operand's: refused."""
    cublas = CublasOnCpu([])
    a, b, c = numpy.ones((3, 4, 5)), numpy.ones((3, 5, 6)), numpy.empty((3, 4, 6))
    good_a, good_b = cuda_products.stack_layout(a), cuda_products.stack_layout(b)
    cublas.strided_batched_gemm(False, False, 6, 4, 5, b, good_b, a, good_a, c, 3)
    for wrong_b in (good_b._replace(leading=7), good_b._replace(batch=29)):
        with pytest.raises(AssertionError, match="not the operand's"):
            cublas.strided_batched_gemm(False, False, 6, 4, 5, b, wrong_b, a, good_a, c, 3)


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
def test_relu_on_the_gpu_lines_equals_the_reference(dtype, launched):
    x = numpy.random.default_rng(0).standard_normal((6, 7))
    x[0, :3] = 0  # the subgradient at 0 is 0
    (y, grad, _, _), (y_gpu, grad_gpu, _, _) = both_ways(ReluLayer, x, dtype)
    assert launched == [cuda.RELU_BACKWARD.name]
    numpy.testing.assert_array_equal(y_gpu, y)
    numpy.testing.assert_array_equal(grad_gpu, grad)


def images(rng, batch):
    return rng.standard_normal((batch, 1, 28, 28)), rng.integers(0, 10, batch)


def tokens(rng, batch):
    ids = rng.integers(0, 11, (batch, 9))
    return ids[:, :-1], ids[:, 1:]


MODELS = {  # each with its dropout on, so that the masks are drawn on both lines
    "mlp": (lambda: models.mlp(hidden=[32], dropout=0.3), lambda rng: images(rng, 8)),
    "cnn": (lambda: models.cnn(channels=[4, 8], hidden=[16]), lambda rng: images(rng, 4)),
    "gpt": (lambda: models.gpt(vocab_size=11, context=8, layers=2, heads=2, width=16, dropout=0.2),
            lambda rng: tokens(rng, 3)),
    "lstm": (lambda: models.lstm(vocab_size=11, context=8, width=8, hidden=[16, 12], dropout=0.2),
             lambda rng: tokens(rng, 3)),
}
EVERY_MODEL = {cuda.CROSS_ENTROPY_ROWS.name, cuda.CROSS_ENTROPY_ROWS_BACKWARD.name, cuda.DROPOUT.name,
               "cublas.gemm", "cublas.gemv"}  # the weights' gradients added to, the biases' (or layer norm's)
KERNELS = {
    "mlp": EVERY_MODEL | {cuda.RELU_BACKWARD.name},
    "cnn": EVERY_MODEL | {cuda.RELU_BACKWARD.name, cuda.IM2COL.name, cuda.COL2IM.name, cuda.MAX_POOL.name,
                          cuda.MAX_POOL_BACKWARD.name, cuda.BATCH_NORM_SUMS.name, cuda.BATCH_NORM_STATISTICS.name,
                          cuda.BATCH_NORM_APPLY.name, cuda.RUNNING_STATISTICS.name,
                          cuda.BATCH_NORM_BACKWARD_SUMS.name, cuda.BATCH_NORM_BACKWARD_MEANS.name,
                          cuda.BATCH_NORM_BACKWARD_APPLY.name},
    "gpt": EVERY_MODEL | {cuda.EMBEDDING_ROWS.name, cuda.GELU.name, cuda.GELU_BACKWARD.name, cuda.SOFTMAX_ROWS.name,
                          cuda.SOFTMAX_ROWS_BACKWARD.name, cuda.LAYER_NORM_ROWS.name,
                          cuda.LAYER_NORM_ROWS_BACKWARD.name,
                          "cublas.gemmStridedBatched"},  # attention's products, its operands read in place
    "lstm": EVERY_MODEL | {cuda.EMBEDDING_ROWS.name, cuda.LSTM_STEP.name, cuda.LSTM_STEP_BACKWARD.name},
}


def train_two_steps(builder, batch, mode, dtype, flattened=False):
    """The loss, the gradients and the parameters after two AdamW steps of a fresh model of ``dtype``
    (``flattened``: in flat buffers, as mnn train has it)."""
    kernels.use(mode)
    backend.set_default_dtype(dtype)
    try:
        backend.seed(0)
        net = builder()
        net.optimizer = optim.AdamW(net, lr=1e-2)
        if flattened:
            net.flatten()
        for _ in range(2):
            net.zero_grads()
            loss = float(net(*batch))
            net.backward()
            grads = {name: grad.copy() for name, _, grad in net.named_parameters()}
            net.step()
        return loss, grads, {name: param.copy() for name, param, _ in net.named_parameters()}
    finally:
        backend.set_default_dtype(numpy.float32)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype, tolerance", [(numpy.float64, 1e-12), (numpy.float32, 1e-4)], ids=["float64", "float32"])
@pytest.mark.parametrize("flattened", [False, True], ids=["per tensor", "flat"])
def test_models_on_the_gpu_lines_train_as_on_the_reference_lines(name, dtype, tolerance, flattened, launched):
    """float32 as well: a scalar of the wrong width would reach a GPU kernel as other bytes. Flattened,
    AdamW updates the whole buffer in one launch a step."""
    builder, make_batch = MODELS[name]
    x, y = make_batch(numpy.random.default_rng(0))
    batch = (x.astype(dtype) if x.dtype.kind == "f" else x), y
    loss, grads, params = train_two_steps(builder, batch, "numpy", dtype)
    assert launched == []
    gpu_loss, gpu_grads, gpu_params = train_two_steps(builder, batch, "fused", dtype, flattened)
    assert set(launched) == KERNELS[name] | {cuda.ADAM_UPDATE_FLAT.name if flattened else cuda.ADAM_UPDATE.name}
    if flattened:
        assert launched.count(cuda.ADAM_UPDATE_FLAT.name) == 2
    assert abs(gpu_loss - loss) <= tolerance * abs(loss)
    for key in grads:
        for reference, gpu, what in ((grads[key], gpu_grads[key], f"{key}'s gradient"), (params[key], gpu_params[key], key)):
            error = float(numpy.abs(reference - gpu).max()) / max(float(numpy.abs(reference).max()), 1e-30)
            assert error <= tolerance, f"{what}: relative error {error:.2e}"


@pytest.mark.parametrize("name, checks", [("mlp-64", 1), ("cnn-128", 1), ("gpt-12", 2), ("lstm", 2)])
def test_a_training_step_on_the_gpu_lines_reads_back_once_a_range_check(name, checks, monkeypatch):
    """The host waits for the device once for the loss's labels and once for the embedding's indices, each
    counted by the kernel that reads them, and at no other point of a step (device_operations.py)."""
    from bench.run import TINY

    count_on_gpu_lines(monkeypatch)
    operations, lines = step_operations(TINY[name])
    assert operations.count(READ_BACK) == checks, [line for line in lines if line[0] == READ_BACK]
    assert any(operation.startswith("mnn_") for operation in operations)


@pytest.mark.parametrize("dtype, big", [(numpy.float32, 1e20), (numpy.float64, 1e160)])
def test_a_future_score_that_overflows_leaves_the_past_as_it_is(dtype, big, monkeypatch):
    """Causal attention where q_t . k_3 overflows to +inf for t < 3, a key the mask hides: the mask was added,
    inf + (-inf) = NaN, and the rows came out NaN on the CPU. Written in, as the GPU kernel skips the key,
    every path gives each row what the future does not touch (and torch's scaled_dot_product_attention)."""
    x = numpy.array([[[1, 0, 0, 0], [2, 0, 0, 0], [0.5, 0, 0, 0], [0, big, 0, 0]]], dtype)

    def forward_and_backward(layer):
        w = numpy.zeros((12, 4), dtype)
        w[0, 0], w[4, 1] = big, 1.0  # q_t[0] = big x_t[0], k_t[0] = x_t[1]: only q_t . k_3 is huge
        layer.qkv.params["w"][...] = w
        layer.qkv.params["b"][...] = numpy.r_[numpy.zeros(8), numpy.arange(1, 5)]  # v: the bias alone
        y = layer.forward(x)
        return y, layer.backward(numpy.ones_like(y))

    results = {}
    for way in ("reference", "CPU kernels", "GPU lines"):
        with MonkeyPatch.context() as patches:
            if way == "GPU lines":
                run_gpu_lines_on_cpu(patches)
            kernels.use("numpy" if way == "reference" else "fused")
            backend.set_default_dtype(dtype)
            backend.seed(0)  # the same output projection every way
            try:
                with numpy.errstate(over="ignore"):  # the scenario: q_t . k_3 overflows
                    results[way] = forward_and_backward(MultiHeadAttention(4, 2))
            finally:
                backend.set_default_dtype(numpy.float32)
                kernels.use("fused")
    for way, (y, grad) in results.items():
        assert numpy.isfinite(y).all() and numpy.isfinite(grad).all(), way
        numpy.testing.assert_allclose(y, results["reference"][0], rtol=1e-6, err_msg=way)
