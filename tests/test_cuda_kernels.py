"""Every GPU kernel's CUDA C source, compiled for the CPU by g++ (``cuda_on_cpu``), against the
NumPy lines it replaces. ``tests/test_cupy.py`` runs the kernels themselves where a GPU is."""
import ctypes

import numpy
import pytest

from cuda_on_cpu import compile_for_cpu, compile_for_gpu, compile_raw_for_cpu, nvrtc_errors, require_nvrtc
from mnn import backend, flat, kernels, models, optim
from mnn.kernels import cuda
from mnn.layers import BatchNormLayer, CrossEntropyLossLayer, GeluLayer, LayerNormLayer
from mnn.layers.dropout import keep_mask, keep_threshold
from mnn.layers.softmax import softmax

DTYPES = [numpy.float32, numpy.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_the_dropout_kernel_draws_the_masks_of_the_numpy_lines(dtype, p):
    x = numpy.random.default_rng(0).standard_normal((37, 53)).astype(dtype)
    key, threshold, scale = 0xFEDCBA9876543210, keep_threshold(1 - p), dtype(1 / (1 - p))
    y, scaled_mask = numpy.empty_like(x), numpy.empty_like(x)
    compile_for_cpu(cuda.DROPOUT, dtype, arrays={"x"})(x=x, key=key, threshold=threshold, scale=scale, y=y,
                                                       scaled_mask=scaled_mask)
    mask = keep_mask(key, threshold, x.shape, numpy)
    numpy.testing.assert_array_equal(scaled_mask, mask * scale)
    numpy.testing.assert_array_equal(y, x * (mask * scale))
    fused_y, fused_mask = kernels.cpu.dropout(x, key, threshold, scale)  # and the CPU kernel, the same
    numpy.testing.assert_array_equal(fused_mask, scaled_mask)
    numpy.testing.assert_array_equal(fused_y, y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer", [optim.Adam, optim.AdamW])
def test_the_adam_kernel_takes_the_steps_of_the_numpy_lines(dtype, optimizer):
    """AdamW's decay included: the kernel multiplies theta by shrink = 1 - lr lambda first."""
    rng = numpy.random.default_rng(1)
    start, grads = rng.standard_normal(500).astype(dtype), rng.standard_normal((3, 500)).astype(dtype)
    param, grad = start.copy(), numpy.empty_like(start)
    decay = 0.1 if optimizer is optim.AdamW else 0.0  # Adam's decay goes into the gradient, before the kernel
    adam = optimizer([("w", param, grad)], lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=decay)
    kernels.use("numpy")
    try:
        for step_grad in grads:
            grad[...] = step_grad
            adam.step()
    finally:
        kernels.use("fused")
    on_cpu = compile_for_cpu(cuda.ADAM_UPDATE, dtype, arrays={"g"})
    theta, m, v = start.copy(), numpy.zeros_like(start), numpy.zeros_like(start)
    shrink = 1 - 1e-2 * decay
    for step, step_grad in enumerate(grads, 1):
        step_size, unbias = 1e-2 / (1 - 0.8**step), 1 / numpy.sqrt(1 - 0.99**step)
        settings = {"beta1": 0.8, "one_minus_beta1": 1 - 0.8, "beta2": 0.99, "one_minus_beta2": 1 - 0.99,
                    "step_size": step_size, "unbias": unbias, "eps": 1e-6, "shrink": shrink}  # rounded, as the wrapper
        on_cpu(g=step_grad, **{name: dtype(value) for name, value in settings.items()}, theta=theta, m=m, v=v)
    tolerance = 1e-12 if dtype == numpy.float64 else 2e-6
    for ours, reference in ((theta, param), (m, adam.buffers["w.m"]), (v, adam.buffers["w.v"])):
        numpy.testing.assert_allclose(ours, reference, rtol=tolerance, atol=tolerance)


def flattened_with_a_parameter_left_out(dtype, decay_vectors):
    """A network in flat buffers (vectors and matrices, padding between them), and an AdamW that holds
    all its parameters but one, ``1.b``."""
    backend.set_default_dtype(dtype)
    backend.seed(0)
    try:
        net = models.mlp(in_features=5, hidden=[7, 3], classes=4, dropout=0)
    finally:
        backend.set_default_dtype(numpy.float32)
    net.flatten()
    held = [triple for triple in net.named_parameters() if triple[0] != "1.b"]
    return net, optim.AdamW(held, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, decay_vectors=decay_vectors)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay_vectors", [True, False])
def test_the_flat_adam_kernel_takes_the_steps_of_the_numpy_lines(dtype, decay_vectors):
    """One launch over a whole flat buffer (optim.FlatMoments): each parameter the optimizer holds takes
    the per-tensor steps, its decay or none included; padding and the parameter it leaves out stay."""
    (net, reference), (flat_net, adam) = (flattened_with_a_parameter_left_out(dtype, decay_vectors) for _ in range(2))
    (flat_param, flat_grad, members), = flat.buffers_behind(adam.parameters)
    run = optim.FlatMoments.run(adam, flat_param, flat_grad, members)
    on_cpu = compile_for_cpu(cuda.ADAM_UPDATE_FLAT, dtype, arrays={"g", "code"})
    before, rng = flat_param.copy(), numpy.random.default_rng(2)
    kernels.use("numpy")
    try:
        for step in range(1, 4):
            flat_grad[...] = net.flat.grads[flat_grad.dtype][...] = rng.standard_normal(flat_grad.size)
            reference.step()
            settings = {"beta1": 0.8, "one_minus_beta1": 1 - 0.8, "beta2": 0.99, "one_minus_beta2": 1 - 0.99,
                        "step_size": 1e-2 / (1 - 0.8**step), "unbias": 1 / numpy.sqrt(1 - 0.99**step), "eps": 1e-6,
                        "shrink": 1 - 1e-2 * 0.1}  # rounded to the dtype, as the wrapper does
            on_cpu(g=flat_grad, code=run.codes, **{name: dtype(value) for name, value in settings.items()},
                   theta=flat_param, m=run.m, v=run.v)
    finally:
        kernels.use("fused")
    tolerance = 1e-12 if dtype == numpy.float64 else 2e-6
    for name, value in net.state_dict().items():
        numpy.testing.assert_allclose(flat_net.state_dict()[name], value, rtol=tolerance, atol=tolerance, err_msg=name)
    assert adam.buffers.keys() == reference.buffers.keys()
    for name, value in reference.buffers.items():
        numpy.testing.assert_allclose(adam.buffers[name], value, rtol=tolerance, atol=tolerance, err_msg=name)
    left_out = {name: param for name, param, _ in flat_net.named_parameters()}["1.b"]
    offset = flat.offset_in(flat_param, left_out)
    assert not run.codes[offset:offset + left_out.size].any()
    left_alone = run.codes == 0  # that parameter, and the padding
    numpy.testing.assert_array_equal(flat_param[left_alone], before[left_alone])


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_running_statistics_kernel_takes_the_steps_of_the_numpy_lines(dtype):
    """Batch norm's Eq. (4) in one launch, as BatchNormLayer's six lines."""
    rng = numpy.random.default_rng(3)
    layer = BatchNormLayer(6, momentum=0.3)
    start = {name: rng.random(6).astype(dtype) for name in ("running_mean", "running_var")}
    layer.buffers = {name: value.copy() for name, value in start.items()}
    mean, var = rng.standard_normal(6).astype(dtype), rng.random(6).astype(dtype)
    layer.update_running_stats(mean, var, 10)
    running_mean, running_var = start["running_mean"], start["running_var"]
    on_cpu = compile_for_cpu(cuda.RUNNING_STATISTICS, dtype, arrays={"mean", "var"})
    on_cpu(mean=mean, var=var, keep=dtype(0.7), momentum=dtype(0.3), var_scale=dtype(0.3 * 10 / 9),
           running_mean=running_mean, running_var=running_var)
    tolerance = 1e-15 if dtype == numpy.float64 else 1e-6
    numpy.testing.assert_allclose(running_mean, layer.buffers["running_mean"], rtol=tolerance, atol=tolerance)
    numpy.testing.assert_allclose(running_var, layer.buffers["running_var"], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_gelu_kernels_give_the_numpy_lines_output_and_gradient(dtype):
    rng = numpy.random.default_rng(2)
    x, g = (rng.standard_normal((41, 29)) * 3).astype(dtype), rng.standard_normal((41, 29)).astype(dtype)
    kernels.use("numpy")
    try:
        layer = GeluLayer()
        reference_y, reference_grad = layer.forward(x), layer.backward(g)
    finally:
        kernels.use("fused")
    y, grad = numpy.empty_like(x), numpy.empty_like(x)
    c, k = dtype(GeluLayer.C), dtype(GeluLayer.K)
    compile_for_cpu(cuda.GELU, dtype, arrays={"x"})(x=x, c=c, k=k, y=y)
    compile_for_cpu(cuda.GELU_BACKWARD, dtype, arrays={"g", "x"})(g=g, x=x, c=c, k=k, grad=grad)
    tolerance = 1e-14 if dtype == numpy.float64 else 2e-6
    numpy.testing.assert_allclose(y, reference_y, rtol=tolerance, atol=tolerance)
    numpy.testing.assert_allclose(grad, reference_grad, rtol=tolerance, atol=tolerance)


def c_types(dtype):
    return {numpy.float32: ("float", ctypes.c_float), numpy.float64: ("double", ctypes.c_double)}[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "unmasked"])
@pytest.mark.parametrize("length", [1, 5, 37])  # 37: more keys than a warp has lanes
def test_the_softmax_kernels_give_the_attentions_numpy_lines(dtype, causal, length):
    rng = numpy.random.default_rng(3)
    s, g = (rng.standard_normal((2, 3, length, length)).astype(dtype) for _ in range(2))
    scale = dtype(0.35)
    mask = numpy.triu(numpy.full((length, length), -numpy.inf, dtype=dtype), k=1) if causal else dtype(0)
    reference = softmax(s * scale + mask)  # MultiHeadAttention's lines
    reference_grad = reference * (g - (g * reference).sum(axis=-1, keepdims=True)) * scale
    name, scalar = c_types(dtype)
    pointer, rows = ctypes.c_void_p, s.size // length
    y, d = numpy.empty_like(s), numpy.empty_like(s)
    count = ctypes.c_longlong
    compile_raw_for_cpu(cuda.SOFTMAX_ROWS, f"mnn_softmax_rows_{name}", [pointer, pointer, ctypes.c_int, scalar,
                                                                         ctypes.c_int, count])(
        rows, s, y, length, scale, int(causal), rows)
    compile_raw_for_cpu(cuda.SOFTMAX_ROWS_BACKWARD, f"mnn_softmax_rows_backward_{name}",
                        [pointer, pointer, pointer, ctypes.c_int, scalar, count])(rows, y, g, d, length, scale, rows)
    tolerance = 1e-14 if dtype == numpy.float64 else 1e-6
    numpy.testing.assert_allclose(y, reference, rtol=tolerance, atol=tolerance)
    numpy.testing.assert_allclose(d, reference_grad, rtol=tolerance, atol=tolerance)


def test_a_row_kernel_leaves_alone_the_rows_past_the_last():
    """The last block may hold more warps than rows are left: those return before touching memory."""
    rows, n = 3, 4
    s = numpy.ones((rows, n), numpy.float32)
    y = numpy.full((rows + cuda.ROWS_PER_BLOCK, n), numpy.nan, numpy.float32)  # room past the end, to see writes
    softmax = compile_raw_for_cpu(cuda.SOFTMAX_ROWS, "mnn_softmax_rows_float", [ctypes.c_void_p] * 2 + [
        ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_longlong])
    softmax(rows + cuda.ROWS_PER_BLOCK, s, y, n, 1.0, 0, rows)  # blocks of one row each here: some past the end
    numpy.testing.assert_allclose(y[:rows], 0.25)
    assert numpy.isnan(y[rows:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1, 7, 96])
def test_the_layer_norm_kernels_give_the_numpy_lines(dtype, width):
    rng = numpy.random.default_rng(4)
    x, g = (rng.standard_normal((3, 5, width)) * 2 + 1).astype(dtype), rng.standard_normal((3, 5, width)).astype(dtype)
    weight, bias = (rng.standard_normal(width).astype(dtype) for _ in range(2))
    kernels.use("numpy")
    backend.set_default_dtype(dtype)
    try:
        layer = LayerNormLayer(width)
        layer.params["weight"][...], layer.params["bias"][...] = weight, bias
        reference_y, reference_grad = layer.forward(x), layer.backward(g)
    finally:
        kernels.use("fused")
        backend.set_default_dtype(numpy.float32)
    name, scalar = c_types(dtype)
    pointer, rows = ctypes.c_void_p, x.size // width
    y, x_hat, grad, inv_std = numpy.empty_like(x), numpy.empty_like(x), numpy.empty_like(x), numpy.empty(rows, dtype)
    count = ctypes.c_longlong
    compile_raw_for_cpu(cuda.LAYER_NORM_ROWS, f"mnn_layer_norm_rows_{name}",
                        [pointer] * 6 + [ctypes.c_int, scalar, count])(
        rows, x, weight, bias, y, x_hat, inv_std, width, scalar(1e-5), rows)
    products = numpy.empty_like(x)
    compile_raw_for_cpu(cuda.LAYER_NORM_ROWS_BACKWARD, f"mnn_layer_norm_rows_backward_{name}",
                        [pointer] * 6 + [ctypes.c_int, count])(rows, g, x_hat, weight, inv_std, grad, products, width,
                                                               rows)
    tolerance = 1e-12 if dtype == numpy.float64 else 1e-5
    numpy.testing.assert_allclose(y, reference_y, rtol=tolerance, atol=tolerance)
    numpy.testing.assert_allclose(grad, reference_grad, rtol=tolerance, atol=tolerance)
    numpy.testing.assert_array_equal(products, g * x_hat)  # Eq. (2)'s terms


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", [1, 5, 65])
def test_the_cross_entropy_kernels_give_the_numpy_lines(dtype, classes):
    rng = numpy.random.default_rng(5)
    x, labels = (rng.standard_normal((4, 6, classes)) * 3).astype(dtype), rng.integers(0, classes, (4, 6))
    kernels.use("numpy")
    try:
        layer = CrossEntropyLossLayer()
        reference_loss, reference_grad = layer.forward(x, labels), layer.backward()
    finally:
        kernels.use("fused")
    name, scalar = c_types(dtype)
    pointer, rows = ctypes.c_void_p, x.size // classes
    flat_labels = labels.reshape(-1).astype(numpy.int64)
    p, losses, grad = numpy.empty_like(x), numpy.empty(rows, dtype), numpy.empty_like(x)
    count, outside = ctypes.c_longlong, numpy.zeros(1, numpy.uint64)
    compile_raw_for_cpu(cuda.CROSS_ENTROPY_ROWS, f"mnn_cross_entropy_rows_{name}",
                        [pointer] * 5 + [ctypes.c_int, count])(rows, x, flat_labels, p, losses, outside, classes, rows)
    assert outside[0] == 0
    compile_raw_for_cpu(cuda.CROSS_ENTROPY_ROWS_BACKWARD, f"mnn_cross_entropy_rows_backward_{name}",
                        [pointer] * 3 + [ctypes.c_int, scalar, count])(rows, p, flat_labels, grad, classes, 1 / rows,
                                                                       rows)
    tolerance = 1e-13 if dtype == numpy.float64 else 2e-6
    numpy.testing.assert_allclose(losses.mean(), reference_loss, rtol=tolerance)
    numpy.testing.assert_allclose(grad, reference_grad, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_cross_entropy_kernel_counts_the_labels_outside_the_classes(dtype):
    """Each label below 0 or at C and above counted once, none read from outside its row; the rows with
    a label inside keep their losses."""
    rng, classes = numpy.random.default_rng(6), 4
    x, labels = rng.standard_normal((7, classes)).astype(dtype), numpy.array([0, -1, 3, 4, 2, -9, 99])
    name, _ = c_types(dtype)
    p, losses, outside = numpy.empty_like(x), numpy.full(7, -1, dtype), numpy.zeros(1, numpy.uint64)
    compile_raw_for_cpu(cuda.CROSS_ENTROPY_ROWS, f"mnn_cross_entropy_rows_{name}",
                        [ctypes.c_void_p] * 5 + [ctypes.c_int, ctypes.c_longlong])(7, x, labels, p, losses, outside,
                                                                                   classes, 7)
    assert outside[0] == 4
    inside = [0, 2, 4]
    expected = numpy.log(numpy.exp(x.astype(numpy.float64)).sum(axis=1)) - x[range(7), labels.clip(0, 3)]
    numpy.testing.assert_allclose(losses[inside], expected[inside], rtol=1e-6)
    numpy.testing.assert_array_equal(losses[[1, 3, 5, 6]], -1)  # unwritten


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, size", [(1, 1), (3, 5), (4, 33), (cuda.LSTM_SAMPLES, 2),
                                         (2 * cuda.LSTM_SAMPLES + 3, 7)])
@pytest.mark.parametrize("last_step", [False, True])
def test_the_lstm_step_kernels_take_the_steps_of_the_cpu_kernels(dtype, batch, size, last_step):
    """Against ``mnn.kernels.cpu``'s step kernels, which tests/test_kernels.py holds to the reference lines,
    with the products the GPU kernels compute themselves: h_{t-1} W_hh^T forward, delta_{t+1} W_hh backward
    (or, at the last step, the final state's gradient). Batches of one tile of samples, and of three."""
    rng = numpy.random.default_rng(6)
    a, delta_next = (rng.standard_normal((batch, 4 * size)).astype(dtype) for _ in range(2))
    w_hh, bias = rng.standard_normal((4 * size, size)).astype(dtype), rng.standard_normal(4 * size).astype(dtype)
    h_prev, c_prev, g, final_h, carry_c = (rng.standard_normal((batch, size)).astype(dtype) for _ in range(5))
    expected_gates, expected = a.copy(), [numpy.empty_like(c_prev) for _ in range(3)]  # c, tanh c, h
    kernels.cpu.lstm_step_forward(expected_gates, numpy.ascontiguousarray(w_hh @ h_prev.T), bias, c_prev, *expected)
    carry_h = final_h if last_step else delta_next @ w_hh
    expected_delta = numpy.empty_like(a)
    expected_carry = kernels.cpu.lstm_step_backward(g, numpy.ascontiguousarray(carry_h.T), carry_c, expected_gates,
                                                    expected[1], c_prev, expected_delta)
    name, pointer, rows = c_types(dtype)[0], ctypes.c_void_p, -(-batch // cuda.LSTM_SAMPLES) * size
    gates, ours = a.copy(), [numpy.empty_like(c_prev) for _ in range(3)]
    compile_raw_for_cpu(cuda.LSTM_STEP, f"mnn_lstm_step_{name}", [pointer] * 8 + [ctypes.c_int] * 2)(
        rows, gates, h_prev, w_hh, bias, c_prev, *ours, batch, size)
    delta, carry = numpy.empty_like(a), numpy.empty_like(c_prev)
    compile_raw_for_cpu(cuda.LSTM_STEP_BACKWARD, f"mnn_lstm_step_backward_{name}", [pointer] * 10 + [ctypes.c_int] * 3)(
        rows, g, delta_next, numpy.ascontiguousarray(w_hh.T), final_h, carry_c, gates, ours[1], c_prev, delta, carry,
        batch, size, int(not last_step))
    tolerance = 1e-13 if dtype == numpy.float64 else 1e-5  # the products summed in another order
    for mine, theirs in zip([gates, *ours, delta, carry], [expected_gates, *expected, expected_delta, expected_carry]):
        numpy.testing.assert_allclose(mine, theirs, rtol=tolerance, atol=tolerance)


GPU_KERNELS = [(cuda.ADAM_UPDATE, {"g"}), (cuda.ADAM_UPDATE_FLAT, {"g", "code"}), (cuda.DROPOUT, {"x"}),
               (cuda.GELU, {"x"}), (cuda.GELU_BACKWARD, {"g", "x"}), (cuda.RELU_BACKWARD, {"g", "y"}),
               (cuda.RUNNING_STATISTICS, {"mean", "var"})]


RAW_KERNELS = [cuda.SOFTMAX_ROWS, cuda.SOFTMAX_ROWS_BACKWARD, cuda.LAYER_NORM_ROWS, cuda.LAYER_NORM_ROWS_BACKWARD,
               cuda.CROSS_ENTROPY_ROWS, cuda.CROSS_ENTROPY_ROWS_BACKWARD, cuda.EMBEDDING_ROWS, cuda.LSTM_STEP,
               cuda.LSTM_STEP_BACKWARD, cuda.IM2COL, cuda.COL2IM, cuda.MAX_POOL, cuda.MAX_POOL_BACKWARD,
               cuda.BATCH_NORM_SUMS, cuda.BATCH_NORM_STATISTICS, cuda.BATCH_NORM_APPLY, cuda.BATCH_NORM_BACKWARD_SUMS,
               cuda.BATCH_NORM_BACKWARD_MEANS, cuda.BATCH_NORM_BACKWARD_APPLY]


def test_the_lists_name_every_gpu_kernel():
    kinds = vars(cuda).values()
    assert {value for value in kinds if isinstance(value, cuda.Elementwise)} == {source for source, _ in GPU_KERNELS}
    assert {value for value in kinds if isinstance(value, cuda.Raw)} == set(RAW_KERNELS)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_gpu_kernel_compiles_as_device_code(dtype):
    """What g++ cannot check: that the source is CUDA that NVRTC, CuPy's compiler, takes without
    headers (device functions, math overloads for T, warp shuffles)."""
    require_nvrtc()
    errors = compile_for_gpu(GPU_KERNELS, dtype)
    assert errors is None, errors
    for source in RAW_KERNELS:  # each holds its float and its double entry
        errors = nvrtc_errors(source.code)
        assert errors is None, errors


def test_nvrtc_refuses_what_a_gpu_cannot_run():
    """The check above can fail: a host function called from a kernel, a macro only headers define."""
    require_nvrtc()
    assert "INFINITY" in nvrtc_errors('extern "C" __global__ void f(float* y) { y[0] = INFINITY; }')
    assert nvrtc_errors('int host() { return 1; } extern "C" __global__ void f(int* y) { y[0] = host(); }')
    too_much = 'extern "C" __global__ void f(double* y) { __shared__ double s[8192]; s[threadIdx.x] = 1; y[0] = s[5]; }'
    assert "shared data" in nvrtc_errors(too_much)  # 64 KB: more than a block's static 48 KB
