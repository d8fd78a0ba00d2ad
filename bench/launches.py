"""Does a GPU step wait on the host or on the device? For each case, both frameworks:

    python -m bench.launches --device cuda --models gpt-12,lstm

* host ms: a step's time on the host, steps queued back to back without waiting for the GPU
  (when it matches the step's whole time, the GPU keeps up and the host sets the pace);
* kernels and GPU ms: the kernels of one step and their summed time on the device, from
  torch's profiler, whose CUPTI trace sees every kernel of the process, CuPy's included.

Then the host's cost of single calls, CuPy's beside torch's (µs per call, 64 x 64 float32):
what each launch a layer saves is worth. GPU only.
"""
import argparse
import time
from collections import Counter

import numpy
import torch

from .device import Device
from .run import CASES, step_functions


def host_and_wall_ms(step, sync, steps=30):
    for _ in range(3):
        step()
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    host = time.perf_counter() - started
    sync()
    return host / steps * 1e3, (time.perf_counter() - started) / steps * 1e3


def kernels_per_step(step, sync, steps=5):
    """(kernels, GPU ms, Counter of kernel names) per step."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        for _ in range(steps):
            step()
        sync()
    kernels = [event for event in trace.events() if event.device_type.name == "CUDA"]
    names = {name: count / steps for name, count in Counter(event.name for event in kernels).items()}
    return len(kernels) / steps, sum(event.device_time_total for event in kernels) / steps / 1e3, Counter(names)


def call_costs():
    """Host microseconds per call of single small operations, CuPy's and torch's."""
    import cupy

    a = cupy.random.standard_normal((64, 64), dtype=cupy.float32)
    b, out = a.copy(), a.copy()
    ta, tb = torch.randn(64, 64, device="cuda"), torch.randn(64, 64, device="cuda")
    add = cupy.ElementwiseKernel("T x, T y", "T z", "z = x + y", "bench_add")
    raw_add = cupy.RawKernel('extern "C" __global__ void bench_raw_add(const float* x, const float* y, float* z, '
                             "int n) { int i = blockIdx.x * blockDim.x + threadIdx.x; "
                             "if (i < n) z[i] = x[i] + y[i]; }", "bench_raw_add")
    count = numpy.int32(a.size)
    calls = {"cupy a @ b": lambda: a @ b, "torch a @ b": lambda: ta @ tb,
             "cupy a + b": lambda: a + b, "torch a + b": lambda: ta + tb,
             "cupy.ElementwiseKernel": lambda: add(a, b, out),
             "cupy.RawKernel": lambda: raw_add((4,), (1024,), (a, b, out, count)),
             "cupy.empty": lambda: cupy.empty((64, 64), cupy.float32)}
    costs = {}
    for name, call in calls.items():
        call()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(2000):
            call()
        costs[name] = (time.perf_counter() - started) / 2000 * 1e6
        torch.cuda.synchronize()
    return costs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda"])
    parser.add_argument("--models", default="mlp-64,cnn-128,gpt-12,lstm")
    parser.add_argument("--top", type=int, default=0, help="also list each step's N most frequent kernels")
    args = parser.parse_args()
    unknown = sorted(set(args.models.split(",")) - set(CASES))
    if unknown:
        parser.error(f"argument --models: no case {', '.join(map(repr, unknown))}; the cases are {', '.join(CASES)}")
    device = Device(args.device)
    print("| case | mnn: host ms, wall ms, kernels, GPU ms | torch: host ms, wall ms, kernels, GPU ms |")
    print("|---|---|---|")
    for name in args.models.split(","):
        mnn_step, torch_step, _, _ = step_functions(CASES[name], device)
        columns, names = [], []
        for step, sync in ((mnn_step, device.sync_mnn), (torch_step, device.sync_torch)):
            host, wall = host_and_wall_ms(step, sync)
            kernels, gpu_ms, counted = kernels_per_step(step, sync)
            columns.append(f"{host:.2f}, {wall:.2f}, {kernels:.0f}, {gpu_ms:.2f}")
            names.append(counted)
        print(f"| {name} | {columns[0]} | {columns[1]} |")
        for framework, counted in zip(("mnn", "torch"), names):
            for kernel, count in counted.most_common(args.top):
                print(f"    {framework} {count:6.1f} x {kernel[:100]}")
    print("\nhost µs per call:", ", ".join(f"{name} {cost:.1f}" for name, cost in call_costs().items()))


if __name__ == "__main__":
    main()
