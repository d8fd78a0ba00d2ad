"""Time training steps of mnn and of the same model in PyTorch, interleaved in one process.

    python -m bench                      # MLP at batch 64 and 1024, the CNN, the GPT and the LSTM
    python -m bench --models mlp-1024 --repeats 50 --json bench/results.json
    python -m bench --device cuda        # CuPy against torch CUDA, on an NVIDIA GPU, with three GPU sizes more

Both run in float32, on the same batch and the same optimizer (AdamW). On the CPU (the
default) they use the same thread count: ``mnn.backend.tune_cpu`` sets NumPy's BLAS
threads and ``torch.set_num_threads`` torch's. On a GPU mnn runs on CuPy and torch on
CUDA, with TF32 turned off in torch so that both multiply in float32. Steps are timed in
alternating blocks (see ``measure``); the table reports medians, the ratio mnn/torch, the
GEMM FLOPs of a step and the GFLOP/s they imply, beside the measured float32 GEMM rate. Peak memory of a
training step is measured in a fresh subprocess per framework, over three steps, after one step
at batch 2 that loads the code a framework loads once (numba's compiled kernels for mnn, about
130 MB of RSS, as torch's libraries when it is imported): peak RSS growth on the CPU, the bytes
its memory pool holds on a GPU (CuPy's pool, torch's peak reserved memory).
"""
import argparse
import json
import math
import os
import tempfile
import platform
import statistics
import subprocess
import sys
import time

import numpy
import torch

import mnn
from mnn import backend, kernels, models, optim
from mnn.arguments import integer
from mnn.layers.recurrent import RecurrentLayer

from .device import Device, timed
from .torch_mirror import mirror

CASES = {
    "mlp-64": {"model": {"name": "mlp", "kwargs": {"hidden": [256], "dropout": 0}}, "batch": 64, "input": (1, 28, 28)},
    "mlp-1024": {"model": {"name": "mlp", "kwargs": {"hidden": [256], "dropout": 0}}, "batch": 1024,
                 "input": (1, 28, 28)},
    "cnn-128": {"model": {"name": "cnn", "kwargs": {}}, "batch": 128, "input": (1, 28, 28)},
    "gpt-12": {"model": {"name": "gpt", "kwargs": {"vocab_size": 65, "context": 64}}, "batch": 12, "tokens": (65, 64)},
    "lstm": {"model": {"name": "lstm", "kwargs": {"vocab_size": 65, "context": 64}}, "batch": 32, "tokens": (65, 64)},
    # GPU sizes, where launches no longer hide the arithmetic (run by default with --device cuda only):
    # nanoGPT's GPU Shakespeare configuration, and the MLP and the CNN at large batches
    "gpt-nano": {"model": {"name": "gpt", "kwargs": {"vocab_size": 65, "context": 256, "layers": 6, "heads": 6,
                                                     "width": 384}}, "batch": 64, "tokens": (65, 256)},
    "mlp-2048": {"model": {"name": "mlp", "kwargs": {"hidden": [2048, 2048], "dropout": 0}}, "batch": 2048,
                 "input": (1, 28, 28)},
    "cnn-512": {"model": {"name": "cnn", "kwargs": {}}, "batch": 512, "input": (1, 28, 28)},
}
GPU_SIZES = ("gpt-nano", "mlp-2048", "cnn-512")
TINY = {
    "mlp-64": {"model": {"name": "mlp", "kwargs": {"hidden": [16], "dropout": 0}}, "batch": 8, "input": (1, 28, 28)},
    "cnn-128": {"model": {"name": "cnn", "kwargs": {"channels": [4, 8], "hidden": [16]}}, "batch": 4,
                "input": (1, 28, 28)},
    "gpt-12": {"model": {"name": "gpt", "kwargs": {"vocab_size": 11, "context": 8, "layers": 1, "width": 16}},
               "batch": 2, "tokens": (11, 8)},
    "lstm": {"model": {"name": "lstm", "kwargs": {"vocab_size": 11, "context": 8, "width": 8, "hidden": [16]}},
             "batch": 2, "tokens": (11, 8)},
    "gpt-nano": {"model": {"name": "gpt", "kwargs": {"vocab_size": 11, "context": 16, "layers": 2, "heads": 2,
                                                     "width": 16}}, "batch": 2, "tokens": (11, 16)},
    "mlp-2048": {"model": {"name": "mlp", "kwargs": {"hidden": [32, 32], "dropout": 0}}, "batch": 16,
                 "input": (1, 28, 28)},
    "cnn-512": {"model": {"name": "cnn", "kwargs": {"channels": [4, 8], "hidden": [16]}}, "batch": 8,
                "input": (1, 28, 28)},
}


def make_batch(case, rng):
    if case.get("tokens"):
        vocab, context = case["tokens"]
        x = rng.integers(0, vocab, (case["batch"], context))
        return x, rng.integers(0, vocab, (case["batch"], context))
    x = rng.standard_normal((case["batch"], *case["input"])).astype(numpy.float32)
    return x, rng.integers(0, 10, case["batch"])


def step_functions(case, device, seed=0):
    """(mnn step, torch step, mnn network, batch) on the same weights and the same batch."""
    backend.seed(seed)
    net = models.build(case["model"])
    net.input_grad = False
    net.optimizer = optim.AdamW(net, lr=1e-4)
    net.flatten()  # as mnn train does: the gradients zeroed in one pass, AdamW in one launch on a GPU
    model, loss_fn, _ = mirror(net)
    model = device.torch_model(model)
    torch_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = make_batch(case, numpy.random.default_rng(seed))
    (x, y), (tx, ty) = map(device.mnn_array, batch), map(device.torch_tensor, batch)

    def mnn_step():
        net.zero_grads()
        net(x, y)
        net.backward()
        net.step()

    def torch_step():
        torch_optimizer.zero_grad(set_to_none=False)
        loss_fn(model(tx), ty).backward()
        torch_optimizer.step()

    return mnn_step, torch_step, net, (x, y)


def gemm_flops(net, batch):
    """FLOPs of one training step's matrix products: each forward GEMM once more for the weight
    (or second operand) gradient, and once more for the input gradient where it is computed.
    A recurrent layer's product with the state always needs its input gradient: the state's."""
    net(batch[0])
    total = 0
    for layer in iter_layers(net):
        needs_input_grad = layer.input_grad or isinstance(layer, mnn.MatrixProduct)
        total += (2 + needs_input_grad) * layer_flops(layer)
        if isinstance(layer, RecurrentLayer):
            total += 3 * recurrent_flops(layer)
    return total


def iter_layers(layer):
    yield layer
    if isinstance(layer, mnn.CompositeLayer):
        for sub in layer.sublayers().values():
            yield from iter_layers(sub)


def layer_flops(layer):
    if isinstance(layer, mnn.LinearLayer):
        rows = layer.saved()[0]
        return 2 * rows.size * layer.out_features
    if isinstance(layer, mnn.Conv2dLayer):  # each output entry: a dot product of kh kw C
        (kh, kw), outputs = layer.kernel_size, math.prod(layer._output_shape)
        return 2 * outputs * kh * kw * layer.in_channels
    if isinstance(layer, mnn.MatrixProduct):
        a, b = layer.saved()
        return 2 * a.size * b.shape[-1]
    if isinstance(layer, RecurrentLayer):  # the input's product, X W_ih^T, for all steps at once
        rows = layer.saved()[0]
        return 2 * rows.size * layer.params["weight_ih"].shape[0]
    return 0


def recurrent_flops(layer):
    """The products with the state, h_{t-1} W_hh^T, one per step: B T H x GH."""
    rows, weight_hh = layer.saved()[0], layer.params["weight_hh"]
    return 2 * (rows.shape[0] * weight_hh.shape[1]) * weight_hh.shape[0]


def measure(case, repeats, warmup, device, block=5, settle_s=0.2):
    """Median step times, interleaved in blocks of ``block`` steps per framework.

    Both frameworks keep worker threads that spin for a while after their last operation
    (OpenBLAS under NumPy, OpenMP under torch); timed next to the other's spinning threads,
    either looks slower than it is when used alone. So each block starts after a pause
    that lets those threads sleep, and with untimed warm-up steps.
    """
    mnn_step, torch_step, net, batch = step_functions(case, device)
    mnn_times, torch_times = [], []
    for _ in range(max(1, repeats // block)):
        for step, sync, times in ((mnn_step, device.sync_mnn, mnn_times),
                                  (torch_step, device.sync_torch, torch_times)):
            time.sleep(settle_s)
            for _ in range(warmup):
                step()
            times.extend(timed(step, sync) for _ in range(block))
    flops = gemm_flops(net, batch)
    mnn_s, torch_s = statistics.median(mnn_times), statistics.median(torch_times)
    return {"mnn_ms": mnn_s * 1e3, "torch_ms": torch_s * 1e3, "ratio": mnn_s / torch_s, "gflop_per_step": flops / 1e9,
            "mnn_gflops": flops / mnn_s / 1e9, "torch_gflops": flops / torch_s / 1e9}


def peak_memory_mb(name, framework, args):
    """Peak memory growth over three training steps, in a fresh process (MiB)."""
    command = [sys.executable, "-m", "bench.run", "--memory-child", name, framework, "--threads", str(args.threads),
               "--device", args.device]
    command += ["--tiny"] if args.tiny else []
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=repository)
    return float(result.stdout.strip().splitlines()[-1])


def rss_kib(field):
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in KiB."""
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


def memory_child(name, framework, cases, device):
    index = 0 if framework == "mnn" else 1
    step_functions({**cases[name], "batch": 2}, device)[index]()  # loads the code (numba's kernels), not the data
    step = step_functions(cases[name], device)[index]
    if device.name == "cuda":
        device.reset_peak()
        before, peak = device.pool_bytes(framework), lambda: device.pool_bytes(framework)
    else:
        before, peak = rss_kib("VmRSS") * 1024, lambda: rss_kib("VmHWM") * 1024
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset the peak (VmHWM) to the current RSS
    for _ in range(3):
        step()
    print(max(peak() - before, 0) / 2 ** 20)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def blas_kernel():
    """NumPy's BLAS and the kernel it runs (threadpoolctl): ``openblas Haswell``, for instance."""
    from threadpoolctl import threadpool_info

    blas = next((pool for pool in threadpool_info() if pool["user_api"] == "blas"), {})
    return f"{blas.get('internal_api', '?')} {blas.get('architecture') or ''}".strip()


def machine(device):
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "blas": blas_kernel(), **device.describe(),
            "python": platform.python_version(), "numpy": numpy.__version__, "torch": torch.__version__,
            "mnn": mnn.__version__}


def table(results, rate, where):
    rates = ", ".join(f"{key.removesuffix('_gflops')} {value:.0f} GFLOP/s" for key, value in rate.items())
    lines = [f"float32 GEMM: {rates}; {where}", "",
             "| model | mnn ms/step | torch ms/step | mnn/torch | GFLOP/step | mnn GFLOP/s (% of GEMM) "
             "| torch GFLOP/s | mnn peak MiB | torch peak MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    limit = max(rate.values())
    for name, r in results.items():
        lines.append(f"| {name} | {r['mnn_ms']:.2f} | {r['torch_ms']:.2f} | {r['ratio']:.2f}x | "
                     f"{r['gflop_per_step']:.3f} | {r['mnn_gflops']:.0f} ({100 * r['mnn_gflops'] / limit:.0f}%) | "
                     f"{r['torch_gflops']:.0f} | {r.get('mnn_peak_mb', float('nan')):.0f} | "
                     f"{r.get('torch_peak_mb', float('nan')):.0f} |")
    return "\n".join(lines)


def main(argv=None, prog="python -m bench"):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated, from {', '.join(CASES)} (default: all on cuda, all but "
                        f"{', '.join(GPU_SIZES)} on the CPU)")
    parser.add_argument("--repeats", type=integer(1), default=30)
    parser.add_argument("--warmup", type=integer(0), default=2, help="untimed steps at the start of each block")
    parser.add_argument("--threads", type=integer(1, 1024), help="CPU threads for both (default: the first of "
                        "$OMP_NUM_THREADS, $OPENBLAS_NUM_THREADS and $MKL_NUM_THREADS that is set, else the cores this "
                        "process may use)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: CuPy against torch CUDA")
    parser.add_argument("--attention", choices=kernels.ATTENTIONS,
                        default=os.environ.get("MNN_ATTENTION") or "products",
                        help="MultiHeadAttention's GPU lines (mnn.kernels.use_attention; default: $MNN_ATTENTION, "
                             "else products)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: checks that everything runs (not timed)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.attention not in kernels.ATTENTIONS:  # a default from $MNN_ATTENTION, which argparse does not check
        parser.error(f"MNN_ATTENTION={args.attention!r}: expected one of {', '.join(kernels.ATTENTIONS)}")
    if args.models is None:
        args.models = ",".join(name for name in CASES if args.device == "cuda" or name not in GPU_SIZES)
    unknown = sorted(set(args.models.split(",")) - set(CASES))
    if unknown:
        parser.error(f"argument --models: no case {', '.join(map(repr, unknown))}; the cases are {', '.join(CASES)}")
    if args.json:
        problem = unwritable(args.json)
        if problem:
            parser.error(f"argument --json: {problem}")
    device = Device(args.device)
    try:
        return run(args, device, argv)
    finally:
        device.close()


def unwritable(path):
    """Why the results could not be written to ``path`` after the run, or None: told before it, not after."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"no folder {folder} to write it in"
    if os.path.isdir(path):
        return f"{path} is a folder; name a file in it"
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else f"cannot write {path} (Permission denied)"
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as error:
        return f"cannot write in {folder} ({error.strerror})"


def run(args, device, argv):
    kernels.use_attention(args.attention)
    os.environ["MNN_ATTENTION"] = args.attention  # the peak-memory subprocesses' too
    args.threads, _ = backend.tune_cpu(args.threads)
    torch.set_num_threads(args.threads)
    cases = TINY if args.tiny else CASES
    if args.memory_child:
        return memory_child(*args.memory_child, cases, device) or 0
    names = [n for n in args.models.split(",") if n in cases]
    rate = device.gemm_rate(256 if args.tiny else 2048 if device.name == "cpu" else 8192)
    results = {}
    for name in names:
        results[name] = measure(cases[name], args.repeats, args.warmup, device)
        if not args.no_memory:
            for framework in ("mnn", "torch"):
                results[name][f"{framework}_peak_mb"] = peak_memory_mb(name, framework, args)
        print(f"{name}: mnn {results[name]['mnn_ms']:.2f} ms, torch {results[name]['torch_ms']:.2f} ms", flush=True)
    where = (f"{cpu_name()}, {args.threads} threads, NumPy's BLAS: {blas_kernel()}" if device.name == "cpu"
             else device.describe()["gpu"])
    print(table(results, rate, where))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": machine(device), "threads": args.threads, "attention": args.attention,
                       "gemm": rate, "results": results,
                       "command": " ".join(["python -m bench", *(argv or sys.argv[1:])])}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
