"""Every GPU kernel's CUDA C source, compiled for the CPU by g++ (``cuda_on_cpu``), against the
NumPy lines it replaces. ``tests/test_cupy.py`` runs the kernels themselves where a GPU is."""
import numpy
import pytest

from cuda_on_cpu import compile_for_cpu
from mnn import kernels, optim
from mnn.kernels import cuda
from mnn.layers.dropout import keep_mask, keep_threshold

DTYPES = [numpy.float32, numpy.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_the_dropout_kernel_draws_the_masks_of_the_numpy_lines(dtype, p):
    x = numpy.random.default_rng(0).standard_normal((37, 53)).astype(dtype)
    key, threshold, scale = 0xFEDCBA9876543210, keep_threshold(1 - p), dtype(1 / (1 - p))
    y, kept = numpy.empty_like(x), numpy.empty_like(x)
    compile_for_cpu(cuda.DROPOUT, dtype, arrays={"x"})(x=x, key=key, threshold=threshold, scale=scale, y=y, kept=kept)
    mask = keep_mask(key, threshold, x.shape, numpy)
    numpy.testing.assert_array_equal(kept, mask * scale)
    numpy.testing.assert_array_equal(y, x * (mask * scale))
    fused_y, fused_kept = kernels.cpu.dropout(x, key, threshold, scale)  # and the CPU kernel, the same
    numpy.testing.assert_array_equal(fused_kept, kept)
    numpy.testing.assert_array_equal(fused_y, y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_adam_kernel_takes_the_steps_of_the_numpy_lines(dtype):
    rng = numpy.random.default_rng(1)
    start, grads = rng.standard_normal(500).astype(dtype), rng.standard_normal((3, 500)).astype(dtype)
    param, grad = start.copy(), numpy.empty_like(start)
    adam = optim.Adam([("w", param, grad)], lr=1e-2, betas=(0.8, 0.99), eps=1e-6)
    kernels.use("numpy")
    try:
        for step_grad in grads:
            grad[...] = step_grad
            adam.step()
    finally:
        kernels.use("fused")
    on_cpu = compile_for_cpu(cuda.ADAM_UPDATE, dtype, arrays={"g"})
    theta, m, v = start.copy(), numpy.zeros_like(start), numpy.zeros_like(start)
    for step, step_grad in enumerate(grads, 1):
        step_size, unbias = 1e-2 / (1 - 0.8**step), 1 / numpy.sqrt(1 - 0.99**step)
        on_cpu(g=step_grad, beta1=0.8, beta2=0.99, step_size=step_size, unbias=unbias, eps=1e-6, theta=theta, m=m, v=v)
    tolerance = 1e-12 if dtype == numpy.float64 else 2e-6
    for ours, reference in ((theta, param), (m, adam.buffers["w.m"]), (v, adam.buffers["w.v"])):
        numpy.testing.assert_allclose(ours, reference, rtol=tolerance, atol=tolerance)
