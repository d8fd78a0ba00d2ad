"""Where the benchmark runs: the CPU (NumPy against torch) or an NVIDIA GPU (CuPy against torch CUDA)."""
import time

import numpy
import torch

from mnn import backend


def timed(function, sync):
    """Seconds ``function`` takes, its queued device work included (``sync`` waits for it)."""
    sync()
    started = time.perf_counter()
    function()
    sync()
    return time.perf_counter() - started


class Device:
    """Moves batches and models to one device, synchronises before a clock is read, and
    measures the float32 GEMM rate there, for mnn's array module and for torch alike."""

    def __init__(self, name):
        if name not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {name!r}; expected 'cpu' or 'cuda'")
        self.name = name
        self.module = "numpy"
        if name == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda: torch sees no CUDA GPU")
            backend.use("cupy")
            self.module = "cupy"
            # float32 against float32: no TF32 shortcuts in torch's matrix products or convolutions
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False

    def close(self):
        backend.use("numpy")

    def mnn_array(self, array):
        return backend.to_device(array)

    def torch_tensor(self, array):
        return torch.tensor(array, device=self.name)

    def torch_model(self, model):
        return model.to(self.name)

    def sync_mnn(self):
        """Wait for mnn's queued GPU work (a no-op on the CPU, where NumPy returns when done)."""
        if self.name == "cuda":
            import cupy
            cupy.cuda.Device().synchronize()

    def sync_torch(self):
        if self.name == "cuda":
            torch.cuda.synchronize()

    def describe(self):
        if self.name == "cpu":
            return {"device": "cpu"}
        import cupy
        return {"device": "cuda", "gpu": torch.cuda.get_device_name(), "cupy": cupy.__version__,
                "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion()}

    def pool_bytes(self, framework):
        """Bytes held by a framework's GPU memory pool (its peak, for torch)."""
        if framework == "mnn":
            import cupy
            return cupy.get_default_memory_pool().total_bytes()
        return torch.cuda.max_memory_reserved()

    def reset_peak(self):
        if self.name == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def gemm_rate(self, size, repeats=5):
        """Float32 GEMM GFLOP/s of mnn's array module and of torch: the practical limit here."""
        a = numpy.random.default_rng(0).standard_normal((size, size)).astype(numpy.float32)
        ours, theirs = self.mnn_array(a), self.torch_tensor(a)
        flops = 2 * size ** 3
        ours_s = min(timed(lambda: ours @ ours, self.sync_mnn) for _ in range(repeats))
        theirs_s = min(timed(lambda: theirs @ theirs, self.sync_torch) for _ in range(repeats))
        return {f"{self.module}_gflops": flops / ours_s / 1e9, "torch_gflops": flops / theirs_s / 1e9}
