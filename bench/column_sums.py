"""Sums over the rows of a (N, C) matrix, the reduction of every bias and normalisation gradient,
four ways: ``sum(axis=0)``, the GEMV ``ones(N) @ x`` (``mnn.layers.sums.column_sums``), and for the
sum of a product ``einsum("nc,nc->c")`` against the product and one GEMV (``column_dots``).

    python -m bench.column_sums                  # NumPy on the CPU
    python -m bench.column_sums --device cuda    # CuPy on a GPU

The shapes are the GPT's at nanoGPT's GPU size (64 x 256 rows of width 384 and 1536), a large
MLP's batch, and batch norm's partial sums over chunks (float64).
"""
import argparse
import statistics

import numpy

from .device import timed

SHAPES = [((16384, 384), "float32"), ((16384, 1536), "float32"), ((2048, 2048), "float32"),
          ((25088, 64), "float64")]


def median_us(function, sync, repeats=50, warmup=5):
    for _ in range(warmup):
        function()
    return statistics.median(timed(function, sync) for _ in range(repeats)) * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    if args.device == "cuda":
        import cupy as xp
        sync = xp.cuda.Device().synchronize
    else:
        xp, sync = numpy, (lambda: None)
    print("| shape | dtype | sum(axis=0) us | ones @ x us | einsum us | x * y, then ones @ us |")
    print("|---|---|---|---|---|---|")
    for shape, dtype in SHAPES:
        x = xp.asarray(numpy.random.default_rng(0).standard_normal(shape).astype(dtype))
        y = x[::-1].copy()
        ones = xp.ones(shape[0], dtype=dtype)
        times = [median_us(function, sync) for function in (lambda: x.sum(axis=0), lambda: ones @ x,
                                                             lambda: xp.einsum("nc,nc->c", x, y),
                                                             lambda: ones @ (x * y))]
        print(f"| {shape} | {dtype} | " + " | ".join(f"{t:.1f}" for t in times) + " |")


if __name__ == "__main__":
    main()
