"""The fiber runner of ``cuda_on_cpu`` (``LANES_SHIMS``) catches what would go wrong on a GPU and pass
when a block's threads run one after another: each kernel here is wrong in one such way."""
import numpy
import pytest

from cuda_on_cpu import RawKernelOnCpu
from mnn.kernels import cuda

WRONG = cuda.Raw("wrong", cuda.ROWS + r"""
/* warp 0 writes a tile that warp 1 reads, with no barrier between */
extern "C" __global__ void race_float(const float* x, float* y) {
    __shared__ float tile[32];
    if (threadIdx.y == 0) tile[threadIdx.x] = x[threadIdx.x];
    if (threadIdx.y == 1) y[threadIdx.x] = tile[threadIdx.x];
}
/* the two halves of a warp at two different shuffles */
extern "C" __global__ void diverge_float(const float* x, float* y) {
    int lane = threadIdx.x;
    y[lane] = lane < 16 ? __shfl_sync(0xffffffffu, x[lane], lane ^ 16) : __shfl_sync(0xffffffffu, x[lane], lane ^ 16);
}
/* lanes past n leave; the rest sum over all 32 lanes, the departed ones included */
extern "C" __global__ void departed_float(const float* x, float* y, int n) {
    if (threadIdx.x >= n) return;
    y[threadIdx.x] = lanes_sum(x[threadIdx.x]);
}
/* reads half a tile no thread wrote */
extern "C" __global__ void unwritten_float(const float* x, float* y) {
    __shared__ float tile[64];
    tile[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    y[threadIdx.x] = tile[threadIdx.x] + tile[threadIdx.x + 32];
}
/* warps past the rows leave, and the others wait at __syncthreads for the whole block */
extern "C" __global__ void early_float(const float* x, float* y, int rows) {
    __shared__ float tile[4];
    if (threadIdx.y >= rows) return;
    if (threadIdx.x == 0) tile[threadIdx.y] = x[threadIdx.y];
    __syncthreads();
    y[threadIdx.y * 32 + threadIdx.x] = tile[(threadIdx.y + 1) % rows];
}
""")


def run(entry, block, *arguments):
    x, y = numpy.arange(64, dtype=numpy.float32), numpy.zeros(128, numpy.float32)
    RawKernelOnCpu(WRONG, entry, lanes=True)((1,), block, (x, y, *arguments))
    return x, y


def test_a_missing_barrier_gives_wrong_values():
    x, y = run("race_float", (32, 2))
    assert not (y[:32] == x[:32]).all()


def test_an_unwritten_shared_entry_reads_as_nan():
    _, y = run("unwritten_float", (32, 1))
    assert numpy.isnan(y[:32]).all()


@pytest.mark.parametrize("entry, block, arguments, message", [
    ("diverge_float", (32, 1), (), "two different shuffles"),
    ("departed_float", (32, 1), (numpy.int32(20),), "a lane that has exited"),
    ("early_float", (32, 4), (numpy.int32(2),), "after a thread of the block has exited"),
])
def test_what_a_gpu_leaves_undefined_is_an_error(entry, block, arguments, message):
    with pytest.raises(AssertionError, match=message):
        run(entry, block, *arguments)


def test_a_correct_kernel_passes_whatever_the_order_of_turns():
    """The row kernels' butterflies: every lane ends with the row's sum, on rows past a block's last."""
    s = numpy.random.default_rng(0).standard_normal((7, 100)).astype(numpy.float32)
    y = numpy.empty_like(s)
    kernel = RawKernelOnCpu(cuda.SOFTMAX_ROWS, "mnn_softmax_rows_float", lanes=True)
    kernel((2,), (32, 4), (s, y, numpy.int32(100), numpy.float32(1), numpy.int32(0), numpy.int64(7)))
    expected = numpy.exp(s - s.max(axis=1, keepdims=True))
    numpy.testing.assert_allclose(y, expected / expected.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)
