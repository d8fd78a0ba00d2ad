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
