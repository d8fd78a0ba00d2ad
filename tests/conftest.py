import numpy
import pytest

from mnn import backend


@pytest.fixture
def float64():
    """Create parameters in float64, as gradient checks need; restore float32 after."""
    backend.set_default_dtype(numpy.float64)
    backend.seed(0)
    yield
    backend.set_default_dtype(numpy.float32)


@pytest.fixture
def rng():
    return numpy.random.default_rng(1234)


@pytest.fixture(params=["fused", "numpy"])
def kernel_mode(request):
    """Run a test with the fused CPU kernels and with the NumPy reference lines (MNN_KERNELS=numpy)."""
    from mnn import kernels

    before = kernels.mode()
    kernels.use(request.param)
    yield request.param
    kernels.use(before)
