"""The same layer code under CuPy: runs wherever CuPy and a GPU are present (pytest -m cupy)."""
import numpy
import pytest

from mnn import backend, models

cupy = pytest.importorskip("cupy", reason="CuPy is not installed (no GPU here)")
pytestmark = pytest.mark.cupy


@pytest.fixture
def on_gpu():
    backend.use("cupy")
    backend.seed(0)
    yield
    backend.use("numpy")


@pytest.mark.parametrize("builder,inputs,labels", [
    (lambda: models.mlp(hidden=[32]), (8, 1, 28, 28), 10),
    (lambda: models.cnn(channels=[4, 8], hidden=[16]), (4, 1, 28, 28), 10),
])
def test_models_give_the_same_gradients_on_gpu_and_cpu(builder, inputs, labels, on_gpu):
    gpu_net = builder()
    backend.use("numpy")
    cpu_net = builder()
    cpu_net.load_weights({k: backend.to_numpy(v) for k, v in gpu_net.state_dict().items()})
    rng = numpy.random.default_rng(0)
    x, y = rng.standard_normal(inputs).astype(numpy.float32), rng.integers(0, labels, inputs[0])
    for net in (gpu_net, cpu_net):
        net.eval()
    cpu_loss = float(cpu_net(x, y))
    cpu_net.backward()
    gpu_loss = float(gpu_net(cupy.asarray(x), cupy.asarray(y)))
    gpu_net.backward()
    assert abs(cpu_loss - gpu_loss) < 1e-4
    for name, grad in cpu_net.grads.items():
        assert numpy.allclose(backend.to_numpy(gpu_net.grads[name]), grad, rtol=1e-3, atol=1e-5), name


def test_gpt_runs_on_gpu(on_gpu):
    net = models.gpt(vocab_size=11, context=8, layers=1, heads=2, width=16)
    x = cupy.asarray(numpy.random.default_rng(0).integers(0, 11, (2, 8)))
    loss = net(x, x)
    net.backward()
    assert numpy.isfinite(float(loss)) and isinstance(net.grads["0.weight"], cupy.ndarray)
