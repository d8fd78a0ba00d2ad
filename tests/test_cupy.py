"""The same layer code under CuPy: runs wherever CuPy and a GPU are present (pytest -m cupy)."""
import numpy
import pytest

from mnn import backend, kernels, models, optim
from mnn.layers import DropoutLayer

cupy = pytest.importorskip("cupy", reason="CuPy is not installed (no GPU here)")
pytestmark = pytest.mark.cupy


@pytest.fixture
def on_gpu():
    backend.use("cupy")
    backend.seed(0)
    yield
    backend.use("numpy")


def images(rng, batch):
    return rng.standard_normal((batch, 1, 28, 28)).astype(numpy.float32), rng.integers(0, 10, batch)


def tokens(rng, batch):
    ids = rng.integers(0, 11, (batch, 9))
    return ids[:, :-1], ids[:, 1:]


CASES = {
    "mlp": (lambda: models.mlp(hidden=[32]), lambda rng: images(rng, 8)),
    "cnn": (lambda: models.cnn(channels=[4, 8], hidden=[16]), lambda rng: images(rng, 4)),
    "gpt": (lambda: models.gpt(vocab_size=11, context=8, layers=2, heads=2, width=16), lambda rng: tokens(rng, 3)),
    "lstm": (lambda: models.lstm(vocab_size=11, context=8, width=8, hidden=[16, 12]), lambda rng: tokens(rng, 3)),
}


def cpu_copy(builder, gpu_net):
    backend.use("numpy")
    cpu_net = builder()
    cpu_net.load_weights({k: backend.to_numpy(v) for k, v in gpu_net.state_dict().items()})
    backend.use("cupy")
    return cpu_net


@pytest.fixture(params=["fused", "numpy"])
def kernel_mode(request):
    """Both ways on the GPU: with mnn.kernels.cuda, and on the reference lines (a failure in the first
    alone points at a kernel)."""
    kernels.use(request.param)
    yield request.param
    kernels.use("fused")


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "training"])
def test_models_give_the_same_gradients_on_gpu_and_cpu(name, training, on_gpu, kernel_mode):
    """In training mode too: batch norm's batch statistics, and dropout with the same masks (the same key)."""
    builder, make_batch = CASES[name]
    gpu_net = builder()
    cpu_net = cpu_copy(builder, gpu_net)
    x, y = make_batch(numpy.random.default_rng(0))
    for net in (gpu_net, cpu_net):
        net.train(training)
    backend.seed(5)
    cpu_loss = float(cpu_net(x, y))
    cpu_net.backward()
    backend.seed(5)
    gpu_loss = float(gpu_net(cupy.asarray(x), cupy.asarray(y)))
    gpu_net.backward()
    assert abs(cpu_loss - gpu_loss) < 1e-4
    for param_name, grad in cpu_net.grads.items():
        gpu_grad = gpu_net.grads[param_name]
        assert isinstance(gpu_grad, cupy.ndarray), param_name
        assert numpy.allclose(backend.to_numpy(gpu_grad), grad, rtol=1e-3, atol=1e-5), param_name


@pytest.mark.parametrize("flattened", [False, True], ids=["per tensor", "flat"])
def test_adamw_steps_on_gpu_follow_the_cpu(on_gpu, flattened):
    """Flattened, AdamW runs one launch over the buffer (optim.FlatMoments), vectors left undecayed."""
    builder, make_batch = CASES["gpt"]
    gpu_net = builder()
    cpu_net = cpu_copy(builder, gpu_net)
    for net in (gpu_net, cpu_net):
        net.optimizer = optim.AdamW(net, lr=1e-2, weight_decay=0.1, decay_vectors=not flattened)
        if flattened:
            net.flatten()
    rng = numpy.random.default_rng(1)
    for _ in range(5):
        x, y = make_batch(rng)
        losses = []
        for net, move in ((cpu_net, numpy.asarray), (gpu_net, cupy.asarray)):
            net.zero_grads()
            losses.append(float(net(move(x), move(y))))
            net.backward()
            net.step()
        assert abs(losses[0] - losses[1]) < 1e-4
    for param_name, value in cpu_net.state_dict().items():
        assert numpy.allclose(backend.to_numpy(gpu_net.state_dict()[param_name]), value, atol=1e-4), param_name
    flat_moments = gpu_net.optimizer.flat_moments()
    assert len(flat_moments.runs) == 1 if flattened else flat_moments is None  # one buffer: one launch a step
    for buffer_name, value in cpu_net.optimizer.buffers.items():
        assert numpy.allclose(backend.to_numpy(gpu_net.optimizer.buffers[buffer_name]), value, atol=1e-4), buffer_name


def test_a_flat_adamw_state_loads_back_on_gpu(on_gpu):
    """Moments saved from flat buffers and loaded into fresh ones: the next steps are the same, bit for bit.
    (An MLP without dropout: an embedding's backward adds rows with atomics, in no fixed order.)"""
    _, make_batch = CASES["mlp"]
    nets = [models.mlp(hidden=[32], dropout=0) for _ in range(2)]
    for net in nets:
        net.optimizer = optim.AdamW(net, lr=1e-2, weight_decay=0.1)
        net.flatten()
    x, y = (cupy.asarray(a) for a in make_batch(numpy.random.default_rng(2)))

    def train(net):
        net.zero_grads()
        net(x, y)
        net.backward()
        net.step()

    train(nets[0])
    nets[1].load_weights(nets[0].state_dict())
    nets[1].optimizer.load_state_dict(nets[0].optimizer.state_dict())
    for _ in range(2):
        for net in nets:
            train(net)
    for name, value in nets[0].state_dict().items():
        cupy.testing.assert_array_equal(nets[1].state_dict()[name], value, err_msg=name)


@pytest.mark.parametrize("mode", ["fused", "numpy"])
def test_dropout_on_gpu_draws_there_the_masks_of_the_cpu(on_gpu, mode):
    """Eqs. (3), (4) of DropoutLayer: the GPU kernel (and the reference lines under CuPy) give the CPU's masks."""
    x = numpy.random.default_rng(0).standard_normal((64, 129)).astype(numpy.float32)
    kernels.use(mode)
    try:
        results = []
        for move in (cupy.asarray, numpy.asarray):
            backend.seed(3)
            layer = DropoutLayer(0.3)
            results.append([backend.to_numpy(a) for a in (layer.forward(move(x)), layer.backward(move(x)))])
    finally:
        kernels.use("fused")
    for gpu, cpu in zip(*results):
        numpy.testing.assert_array_equal(gpu, cpu)


def test_the_gpu_kernels_take_the_inputs_the_reference_lines_take(on_gpu):
    """A single number through dropout, and class labels left in host memory for the cross-entropy."""
    from mnn.layers import CrossEntropyLossLayer

    dropped = DropoutLayer(0.5).forward(cupy.asarray(numpy.float32(0.75)))
    assert dropped.shape == () and float(dropped) in (0.0, 1.5)
    logits = numpy.random.default_rng(0).standard_normal((6, 5)).astype(numpy.float32)
    labels = numpy.arange(6) % 5
    losses = [float(CrossEntropyLossLayer().forward(move(logits), labels)) for move in (cupy.asarray, numpy.asarray)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.parametrize("rows, width", [(1, 33), (3, 100), (5, 1000), (7, 31)])
@pytest.mark.parametrize("layer", ["softmax", "causal attention", "layer norm", "cross-entropy"])
def test_the_row_kernels_on_long_rows_and_odd_row_counts(on_gpu, rows, width, layer):
    """Rows longer than a warp (each lane loops) and row counts off a block's 4 rows (a block's last
    warps idle): what the CPU harness, one lane at a time, cannot see. Forward and backward against the CPU."""
    from mnn.layers import CrossEntropyLossLayer, LayerNormLayer, MultiHeadAttention, SoftmaxLayer

    rng = numpy.random.default_rng(rows * width)
    x = (3 * rng.standard_normal((rows, width))).astype(numpy.float32)
    g = rng.standard_normal((rows, width)).astype(numpy.float32)
    tokens = rng.standard_normal((rows, width, 8)).astype(numpy.float32)  # attention: width is the context

    def forward_and_backward(move):
        if layer == "cross-entropy":
            loss = CrossEntropyLossLayer()
            return loss.forward(move(x), numpy.arange(rows) * 7 % width), loss.backward()
        if layer == "causal attention":  # the masked, scaled softmax over rows of `width` scores
            attention = MultiHeadAttention(8, 2, causal=True)
            y = attention.forward(move(tokens))
            return y, attention.backward(move(numpy.ones(y.shape, numpy.float32)))
        made = SoftmaxLayer() if layer == "softmax" else LayerNormLayer(width)
        return made.forward(move(x)), made.backward(move(g))

    results = []
    for name, move in (("cupy", cupy.asarray), ("numpy", numpy.asarray)):
        backend.use(name)
        backend.seed(0)  # the same attention weights both times
        results.append([backend.to_numpy(output) for output in forward_and_backward(move)])
    backend.use("cupy")
    for gpu, cpu in zip(*results):
        numpy.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch, hidden", [(1, 31), (8, 33), (11, 100), (20, 256)])
def test_the_lstm_step_kernels_on_wide_states_and_odd_batches(on_gpu, batch, hidden):
    """The step kernels' products with the state on a GPU: states wider than a warp (each lane loops
    over W_hh's row), batches of part of a tile of samples, one tile, and several with a rest. Output,
    every gradient and both state gradients against the CPU, from a given state and final-state gradient."""
    from mnn.layers import LSTMLayer

    rng = numpy.random.default_rng(batch * hidden)
    x = rng.standard_normal((batch, 6, 5)).astype(numpy.float32)
    state, final_grad = (tuple(rng.standard_normal((batch, hidden)).astype(numpy.float32) for _ in range(2))
                         for _ in range(2))
    g = rng.standard_normal((batch, 6, hidden)).astype(numpy.float32)
    results = []
    for name, move in (("cupy", cupy.asarray), ("numpy", numpy.asarray)):
        backend.use(name)
        backend.seed(0)
        layer = LSTMLayer(5, hidden)
        y = layer.forward(move(x), state=tuple(map(move, state)))
        grad = layer.backward(move(g), final_state_grad=tuple(map(move, final_grad)))
        arrays = (y, grad, *layer.final_state, *layer.state_grad, *layer.grads.values())
        results.append([backend.to_numpy(array) for array in arrays])
    backend.use("cupy")
    for gpu, cpu in zip(*results):
        numpy.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch, length, heads, width", [(1, 1, 1, 8), (3, 33, 3, 96), (2, 70, 2, 128),
                                                          (2, 256, 6, 384), (1, 100, 1, 100)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "training"])
def test_flash_attention_on_gpu_equals_the_cpus_attention(on_gpu, batch, length, heads, width, dtype, training,
                                                          monkeypatch):
    """The flash kernels (mnn.kernels.cuda_attention) with real warps and blocks: tiles of keys and queries
    past a block's rows, heads of 8 to 100 entries (the tiles of 32, 64 and 128; a float64 head of 100
    has none, and must take the products), dropout with the CPU's masks. Output, input gradient and
    every parameter gradient against the CPU's reference lines."""
    from mnn.kernels import cuda_attention
    from mnn.layers import MultiHeadAttention

    launched = []
    launch = cuda_attention.launch
    monkeypatch.setattr(cuda_attention, "launch", lambda template, *rest: launched.append(template) or
                        launch(template, *rest))
    rng = numpy.random.default_rng(length * width)
    x, g = (rng.standard_normal((batch, length, width)).astype(dtype) for _ in range(2))
    results = []
    kernels.use_attention("flash")
    try:
        for name, move in (("cupy", cupy.asarray), ("numpy", numpy.asarray)):
            backend.use(name)
            backend.set_default_dtype(numpy.dtype(dtype))
            backend.seed(0)
            layer = MultiHeadAttention(width, heads, dropout=0.2).train(training)
            y = layer.forward(move(x))
            grad = layer.backward(move(g))
            results.append([backend.to_numpy(array) for array in (y, grad, *layer.grads.values())])
    finally:
        kernels.use_attention("products")
        backend.set_default_dtype(numpy.float32)
        backend.use("cupy")
    has_tile = cuda_attention.head_tile(width // heads, dtype) is not None
    assert launched == (["flash_forward", "flash_backward_queries", "flash_backward_keys"] if has_tile else [])
    tolerance = 1e-4 if dtype == "float32" else 1e-10
    for gpu, cpu in zip(*results):
        numpy.testing.assert_allclose(gpu, cpu, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("layer", ["linear", "layer norm", "convolution", "lstm", "batch norm"])
def test_gradients_added_into_on_gpu_follow_the_cpu(on_gpu, layer):
    """Two backward passes: each adds into the gradients (one cuBLAS GEMM or GEMV with beta = 1,
    mnn.layers.sums.add_product and add_column_sums; batch norm's kernel), so both passes must show,
    as on the CPU."""
    from mnn.layers import BatchNorm2dLayer, Conv2dLayer, LayerNormLayer, LinearLayer, LSTMLayer

    makers = {"linear": (lambda: LinearLayer(5, 7), (6, 5)), "layer norm": (lambda: LayerNormLayer(5), (2, 3, 5)),
              "convolution": (lambda: Conv2dLayer(2, 3, 3, padding=1), (2, 2, 5, 5)),
              "lstm": (lambda: LSTMLayer(5, 6), (2, 3, 5)),
              "batch norm": (lambda: BatchNorm2dLayer(3), (4, 3, 5, 5))}
    make, shape = makers[layer]
    rng = numpy.random.default_rng(7)
    x = rng.standard_normal(shape).astype(numpy.float32)
    results = []
    for name, move in (("cupy", cupy.asarray), ("numpy", numpy.asarray)):
        backend.use(name)
        backend.seed(0)
        made = make()
        for _ in range(2):
            y = made.forward(move(x))
            made.backward(move(numpy.linspace(-1, 1, y.size, dtype=numpy.float32).reshape(y.shape)))
        results.append({key: backend.to_numpy(grad) for key, grad in made.grads.items()})
    backend.use("cupy")
    for key, grad in results[1].items():
        numpy.testing.assert_allclose(results[0][key], grad, rtol=1e-4, atol=1e-5, err_msg=key)


def test_labels_and_token_indices_outside_are_refused_on_gpu_as_on_the_cpu(on_gpu):
    """The kernels count them as they read them (one read back): the reference lines' errors, word for word."""
    from mnn.layers import CrossEntropyLossLayer, EmbeddingLayer

    scores = cupy.zeros((3, 4), dtype=cupy.float32)
    for labels in ([0, 4, 1], [-1, 0, 2]):
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, 4\), got \[{min(labels)}, {max(labels)}\]"):
            CrossEntropyLossLayer().forward(scores, cupy.asarray(labels))
    table = EmbeddingLayer(5, 3)
    with pytest.raises(ValueError, match=r"token indices must lie in \[0, 5\), got \[0, 5\]"):
        table.forward(cupy.asarray([[0, 5]]))
    assert table.forward(cupy.asarray(2)).shape == (3,)  # one index: one row


@pytest.mark.parametrize("case", ["contiguous", "b transposed", "a transposed", "both transposed, a stack of (2, 3)",
                                  "rows cut from wider rows", "every other matrix", "a new axis in the stack",
                                  "heads cut from a projection", "a broadcast stack", "a side of one",
                                  "matrices in reverse"])
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_stacked_products_read_in_place_on_gpu_equal_the_cpu(on_gpu, case, dtype, monkeypatch):
    """``MatrixProduct`` on stacks laid out every way attention lays them (cuda_products): one cuBLAS call each
    where both operands can be read where they lie, CuPy's matmul where not; every result as NumPy's."""
    from mnn.kernels import cuda_products
    from mnn.layers import MatrixProduct
    from test_gpu_lines import product_and_gradients, product_operands

    monkeypatch.setitem(kernels._state, "mode", "fused")  # whatever MNN_KERNELS says: the GPU lines are under test
    calls = []
    gemm = cuda_products.strided_batched_gemm
    monkeypatch.setattr(cuda_products, "strided_batched_gemm", lambda *args: calls.append(1) or gemm(*args))
    rng = numpy.random.default_rng(3)
    a, b, in_place = product_operands(case, rng, dtype, xp=cupy)
    layer = MatrixProduct()
    y = layer.forward(a, b)
    g = cupy.asarray(rng.standard_normal(y.shape).astype(dtype))
    grad_a, grad_b = layer.backward(g)
    tolerance = 1e-5 if dtype == numpy.float32 else 1e-12
    for (name, expected), got in zip(product_and_gradients(*map(cupy.asnumpy, (a, b, g))), (y, grad_a, grad_b)):
        assert got.dtype == dtype, name
        numpy.testing.assert_allclose(cupy.asnumpy(got), expected, rtol=tolerance, atol=tolerance, err_msg=name)
    assert len(calls) == in_place
