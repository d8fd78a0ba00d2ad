"""Flash attention (``mnn.kernels.cuda_attention``) on the CPU: its CUDA C compiled by g++ and run with
whole blocks, every thread a fiber (``cuda_on_cpu.LANES_SHIMS``), against float64 attention by the
layer's reference lines; then through ``MultiHeadAttention`` and a GPT on the GPU lines."""
import numpy
import pytest

from cuda_on_cpu import RawKernelOnCpu, nvrtc_errors, require_nvrtc, run_gpu_lines_on_cpu
from mnn import backend, kernels, models
from mnn.kernels import cuda, cuda_attention
from mnn.layers import MultiHeadAttention
from mnn.layers.dropout import keep_mask, keep_threshold
from mnn.layers.softmax import softmax
from test_gpu_lines import train_two_steps

KEY = 0x0123456789ABCDEF


def reference(qkv, grad_out, heads, causal, scale_mask):
    """(O, dQKV) by Eqs. (1)-(7), float64, with the dropout factors ``scale_mask`` (B, h, T, T)."""
    batch, length, triple = qkv.shape
    width = triple // 3
    q, k, v = (part.reshape(batch, length, heads, -1).transpose(0, 2, 1, 3) for part in numpy.split(qkv, 3, axis=-1))
    scale = 1 / numpy.sqrt(width // heads)
    s = q @ k.swapaxes(-1, -2) * scale
    if causal:
        s = s + numpy.triu(numpy.full((length, length), -numpy.inf), k=1)
    a = softmax(s)
    dropped = a * scale_mask
    d_o = grad_out.reshape(batch, length, heads, -1).transpose(0, 2, 1, 3)
    d_a = d_o @ v.swapaxes(-1, -2) * scale_mask
    d_s = a * (d_a - (d_a * a).sum(axis=-1, keepdims=True)) * scale

    def merge(x):
        return x.transpose(0, 2, 1, 3).reshape(batch, length, width)
    return merge(dropped @ v), numpy.concatenate([merge(d_s @ k), merge(d_s.swapaxes(-1, -2) @ q),
                                                  merge(dropped.swapaxes(-1, -2) @ d_o)], axis=-1)


def run_kernels(qkv, grad_out, heads, causal, dropout):
    """(O, L, dQKV) from the three kernels on the CPU, outputs first filled with NaN to show an entry missed."""
    batch, length, triple = qkv.shape
    tile = cuda_attention.head_tile(triple // 3 // heads, qkv.dtype.name)
    c_type = cuda.C_FLOATING[qkv.dtype.name]
    grid, block = (-(-length // cuda_attention.FLASH_ROWS), batch * heads), (cuda.WARP, cuda_attention.FLASH_ROWS)

    def launch(template, *arrays):
        kernel = RawKernelOnCpu(cuda_attention.SOURCES[template, tile], f"mnn_{template}_{tile}_{c_type}", lanes=True)
        kernel(grid, block, (*arrays, *cuda_attention.settings(qkv, heads, scale, causal, dropout)))

    scale = 1 / numpy.sqrt(triple // 3 // heads)
    out = numpy.full((batch, length, triple // 3), numpy.nan, qkv.dtype)
    logsumexp, delta = (numpy.full((batch, heads, length), numpy.nan, qkv.dtype) for _ in range(2))
    grad_qkv = numpy.full(qkv.shape, numpy.nan, qkv.dtype)
    launch("flash_forward", qkv, out, logsumexp)
    launch("flash_backward_queries", qkv, out, grad_out, logsumexp, delta, grad_qkv)
    launch("flash_backward_keys", qkv, grad_out, logsumexp, delta, grad_qkv)
    return out, logsumexp, grad_qkv


@pytest.mark.parametrize("dtype, tolerance", [(numpy.float64, 1e-12), (numpy.float32, 2e-5)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize("batch, length, heads, head_width", [
    (1, 1, 1, 1),  # one position: the weight is 1
    (2, 9, 2, 8),  # a block's rows and one more
    (1, 33, 3, 32),  # a tile of keys and one more, a head as wide as a warp
    (2, 40, 1, 33),  # a head one wider than a warp: each lane holds two entries, most the second empty
    (1, 70, 2, 64),  # several tiles each way
])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "unmasked"])
@pytest.mark.parametrize("p", [0.0, 0.4], ids=["no dropout", "dropout"])
def test_the_flash_kernels_give_attention_and_its_gradient(dtype, tolerance, batch, length, heads, head_width, causal,
                                                           p):
    assert_attention(dtype, tolerance, batch, length, heads, head_width, causal, p)


@pytest.mark.parametrize("head_width", [65, 100, 128])  # float32's widest tile: each lane holds 4 entries
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "unmasked"])
def test_the_widest_tile_gives_attention_and_its_gradient(head_width, causal):
    assert_attention(numpy.float32, 2e-5, 1, 12, 2, head_width, causal, 0.3)


def assert_attention(dtype, tolerance, batch, length, heads, head_width, causal, p):
    rng = numpy.random.default_rng(length)
    qkv = (rng.standard_normal((batch, length, 3 * heads * head_width)) * 1.5).astype(dtype)
    grad_out = rng.standard_normal((batch, length, heads * head_width)).astype(dtype)
    factors, dropout = numpy.ones((batch, heads, length, length)), None
    if p:
        threshold = keep_threshold(1 - p)
        factors = keep_mask(KEY, threshold, factors.shape, numpy) / (1 - p)  # DropoutLayer's masks
        dropout = (KEY, threshold, dtype(1 / (1 - p)))
    out, logsumexp, grad_qkv = run_kernels(qkv, grad_out, heads, causal, dropout)
    expected_out, expected_grad = reference(qkv.astype(numpy.float64), grad_out.astype(numpy.float64), heads, causal,
                                            factors)
    numpy.testing.assert_allclose(out, expected_out, rtol=tolerance, atol=tolerance)
    numpy.testing.assert_allclose(grad_qkv, expected_grad, rtol=tolerance, atol=tolerance * 10)
    assert numpy.isfinite(logsumexp).all()


def test_the_fibers_catch_a_missing_barrier(monkeypatch):
    """The check above can fail: without the barrier that waits for every warp to finish a tile, a warp
    loads the next tile over one another warp still reads, and the outputs go wrong."""
    barrier = "        __syncthreads();  /* every warp is done with the last tile */\n"
    assert barrier in cuda_attention.CODE
    broken = cuda_attention.CODE.replace(barrier, "")
    monkeypatch.setattr(cuda_attention, "SOURCES", {key: cuda.Raw(source.name, broken)
                                                    for key, source in cuda_attention.SOURCES.items()})
    qkv = numpy.random.default_rng(6).standard_normal((1, 70, 3 * 16))
    out, _, _ = run_kernels(qkv, numpy.zeros((1, 70, 16)), 1, True, None)
    expected, _ = reference(qkv, numpy.zeros((1, 70, 16)), 1, True, numpy.ones((1, 1, 70, 70)))
    assert numpy.abs(out - expected).max() > 0.1


def test_the_log_sum_exp_is_that_of_the_scaled_scores():
    """Eq. (10): L_t = log sum_s exp(S_ts) over the keys t sees, as the backward recomputes A from it."""
    rng = numpy.random.default_rng(1)
    qkv = rng.standard_normal((2, 37, 3 * 16)) * 4
    _, logsumexp, _ = run_kernels(qkv, numpy.zeros((2, 37, 16)), 2, True, None)
    q, k, _ = (part.reshape(2, 37, 2, 8).transpose(0, 2, 1, 3) for part in numpy.split(qkv, 3, axis=-1))
    s = q @ k.swapaxes(-1, -2) / numpy.sqrt(8) + numpy.triu(numpy.full((37, 37), -numpy.inf), k=1)
    numpy.testing.assert_allclose(logsumexp, numpy.log(numpy.exp(s).sum(axis=-1)), rtol=1e-13)


def test_the_flash_kernels_keep_huge_scores_finite():
    """Scores near 900 (exp overflows float32, and float64, from 89 and 710): every exp in Eq. (9) has its
    row's running maximum taken off first. The keys differ by a few units, so the weights are spread
    and every gradient is of order one (with nearly one-hot weights dQ and dK would be ~0, and any
    error in them would hide)."""
    rng = numpy.random.default_rng(2)
    width, length = 8, 40
    common = numpy.eye(width)[0] * 30 * numpy.sqrt(numpy.sqrt(width))  # q.k gets 900 / sqrt(d) * sqrt(d)
    q, k, v = (rng.standard_normal((1, length, width)) for _ in range(3))
    k[..., 0] = 0  # the keys differ only where the queries' common part is not
    qkv = numpy.concatenate([q + common, k + common, v], axis=-1).astype(numpy.float32)
    grad_out = rng.standard_normal((1, length, width)).astype(numpy.float32)
    out, _, grad_qkv = run_kernels(qkv, grad_out, 1, True, None)
    expected_out, expected_grad = reference(qkv.astype(numpy.float64), grad_out.astype(numpy.float64), 1, True,
                                            numpy.ones((1, 1, length, length)))
    for part, (got, expected) in enumerate(zip(numpy.split(grad_qkv, 3, -1), numpy.split(expected_grad, 3, -1))):
        assert numpy.abs(expected).max() > 0.1, "a gradient of order one"
        assert numpy.abs(got - expected).max() <= 1e-4 * numpy.abs(expected).max(), "dQ dK dV"[3 * part:3 * part + 2]
    numpy.testing.assert_allclose(out, expected_out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_a_first_tile_of_keys_scored_minus_infinity_weighs_nothing(causal):
    """Queries 32-39 score the first 32 keys -inf (q.k overflowed) and the last 8 finitely: the running
    maximum was -inf through the first tile, and exp(-inf - -inf) made the rows NaN."""
    big, width, length = 1e20, 8, 40
    qkv = numpy.zeros((1, length, 3 * width), numpy.float32)
    qkv[0, 32:, 0] = big  # the queries
    qkv[0, :32, width] = -big  # the first tile's keys
    qkv[0, :, 2 * width:] = numpy.random.default_rng(3).standard_normal((length, width))
    grad_out = numpy.random.default_rng(4).standard_normal((1, length, width)).astype(numpy.float32)
    with numpy.errstate(over="ignore", invalid="ignore"):
        out, _, grad_qkv = run_kernels(qkv, grad_out, 1, causal, None)
        expected_out, _ = reference(qkv.astype(numpy.float64), grad_out.astype(numpy.float64), 1, causal,
                                    numpy.ones((1, 1, length, length)))
    assert numpy.isfinite(out).all() and numpy.isfinite(grad_qkv[..., 2 * width:]).all()
    numpy.testing.assert_allclose(out, expected_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_width, dtype, tile", [(1, "float32", 32), (32, "float32", 32), (33, "float64", 64),
                                                     (128, "float32", 128), (128, "float64", None),
                                                     (129, "float32", None), (8, "float16", None)])
def test_a_head_takes_the_narrowest_tile_that_holds_it(head_width, dtype, tile):
    assert cuda_attention.head_tile(head_width, dtype) == tile


def test_the_flash_kernels_compile_as_device_code():
    require_nvrtc()
    errors = nvrtc_errors(cuda_attention.CODE)
    assert errors is None, errors


@pytest.fixture
def flash_on_the_gpu_lines(monkeypatch):
    """The layers on their GPU lines (NumPy for CuPy, the kernels compiled for the CPU), flash attention
    chosen; yields the launches' names."""
    before = kernels.mode()
    launched = run_gpu_lines_on_cpu(monkeypatch)
    kernels.use_attention("flash")
    yield launched
    kernels.use_attention("products")
    kernels.use(before)


FLASH_KERNELS = {f"mnn_{template}_32" for template in cuda_attention.PARAMS}


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "unmasked"])
def test_multi_head_attention_on_flash_kernels_equals_its_reference_lines(flash_on_the_gpu_lines, training, causal):
    """The same output, input gradient and parameter gradients; in training the same dropout masks."""
    rng = numpy.random.default_rng(3)
    x, g = rng.standard_normal((2, 11, 12)), rng.standard_normal((2, 11, 12))
    backend.set_default_dtype(numpy.float64)
    results = {}
    try:
        for attention in ("products", "flash"):
            kernels.use_attention(attention)
            backend.seed(0)
            layer = MultiHeadAttention(12, 3, causal=causal, dropout=0.3).train(training)
            y = layer.forward(x)
            results[attention] = (y, layer.backward(g), {name: grad.copy() for name, grad in layer.grads.items()})
    finally:
        backend.set_default_dtype(numpy.float32)
    assert FLASH_KERNELS <= set(flash_on_the_gpu_lines)
    (y, grad, grads), (flash_y, flash_grad, flash_grads) = results["products"], results["flash"]
    numpy.testing.assert_allclose(flash_y, y, rtol=1e-12, atol=1e-12)
    numpy.testing.assert_allclose(flash_grad, grad, rtol=1e-12, atol=1e-12)
    for name in grads:
        numpy.testing.assert_allclose(flash_grads[name], grads[name], rtol=1e-12, atol=1e-12, err_msg=name)


def test_a_head_too_wide_for_the_tiles_takes_the_reference_lines(flash_on_the_gpu_lines):
    layer = MultiHeadAttention(130, 1)
    layer.backward(layer.forward(numpy.random.default_rng(4).standard_normal((1, 3, 130)).astype(numpy.float32)))
    assert not FLASH_KERNELS & set(flash_on_the_gpu_lines)
    assert cuda.SOFTMAX_ROWS.name in flash_on_the_gpu_lines


@pytest.mark.parametrize("dtype, tolerance", [(numpy.float64, 1e-11), (numpy.float32, 1e-4)],
                         ids=["float64", "float32"])
def test_a_gpt_trains_on_flash_attention_as_on_the_reference_lines(flash_on_the_gpu_lines, dtype, tolerance):
    """Dropout on (its masks drawn from the same keys), flat buffers as mnn train has them."""
    ids = numpy.random.default_rng(5).integers(0, 11, (3, 10))
    batch = ids[:, :-1], ids[:, 1:]

    def builder():
        return models.gpt(vocab_size=11, context=9, layers=2, heads=2, width=16, dropout=0.2)
    kernels.use_attention("products")
    loss, grads, params = train_two_steps(builder, batch, "numpy", dtype)
    kernels.use_attention("flash")
    flash_loss, flash_grads, flash_params = train_two_steps(builder, batch, "fused", dtype, flattened=True)
    assert {f"mnn_{template}_32" for template in cuda_attention.PARAMS} <= set(flash_on_the_gpu_lines)
    assert cuda.SOFTMAX_ROWS.name not in flash_on_the_gpu_lines
    assert abs(flash_loss - loss) <= tolerance * abs(loss)
    for key in grads:
        for expected, got in ((grads[key], flash_grads[key]), (params[key], flash_params[key])):
            error = float(numpy.abs(expected - got).max()) / max(float(numpy.abs(expected).max()), 1e-30)
            assert error <= tolerance, f"{key}: relative error {error:.2e}"


def test_an_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="unknown attention 'fast'"):
        kernels.use_attention("fast")
