"""What a training step asks of a GPU, counted on the CPU: every operation CuPy would run as a kernel
(a ufunc, a reduction, a product, a copy) or as a cuBLAS call, every one of mnn's own kernels, and
every value read back to the host (the host then waits for the device).

On a GPU a small model's step waits on the host, which pays for each launch (``docs/performance.md``,
"Host time, launches and what changed"), so the count is what a change to the GPU lines can save.
The layers take their GPU lines with ``cuda_on_cpu``'s stand-ins, and NumPy stands in for CuPy through
``Counted`` arrays, which note each operation and the line of ``src/mnn`` that asked for it. An
allocation (``empty``) and a view are not operations; a ``zeros`` is (a memset), and so is each copy
CuPy's ``matmul`` makes of an operand before the product (``matmul`` below). The counts are of calls:
a call may run more than one kernel on a GPU (cuBLAS may split a product in two), which the GPU's
profiler counts (``python -m bench.launches``).

    python tests/device_operations.py cnn-128 gpt-12     # the counts, then each line's share
"""
import collections
import contextlib
import sys
import traceback
import types

import numpy

from cuda_on_cpu import run_gpu_lines_on_cpu

NOT_OPERATIONS = {"empty", "empty_like", "asarray", "broadcast_to", "moveaxis", "transpose", "expand_dims",
                  "swapaxes", "reshape", "ravel", "squeeze", "shares_memory", "may_share_memory", "result_type",
                  "ndim", "shape", "isscalar", "issubdtype", "dtype", "can_cast", "broadcast_shapes", "iinfo", "finfo",
                  "as_strided", "atleast_1d", "split"}


class Operations:
    """The operations noted, in order, with the line of mnn that asked for each; none while ``quiet``."""

    def __init__(self):
        self.names, self.lines, self.depth = [], collections.Counter(), 0

    def note(self, name):
        if self.depth:
            return
        self.names.append(name)
        frames = [frame for frame in traceback.extract_stack(limit=14)[:-2] if "/src/mnn/" in frame.filename]
        callers = [frame for frame in frames if "/src/mnn/kernels/" not in frame.filename] or frames
        if callers:  # the layer's line (or the optimizer's) that asked, rather than a launch helper's
            self.lines[name, callers[-1].filename.split("/src/mnn/")[1], callers[-1].lineno] += 1

    @contextlib.contextmanager
    def quiet(self):
        """Inside a stood-in kernel or cuBLAS call, whose NumPy work is the GPU's one operation."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def clear(self):
        self.names.clear()
        self.lines.clear()


OPERATIONS = Operations()
READ_BACK = "read back (the host waits)"


def plain(value):
    if isinstance(value, Counted):
        return value.view(numpy.ndarray)
    if isinstance(value, (list, tuple)):
        return type(value)(plain(item) for item in value)
    return value


def counted(value):
    """``value`` as CuPy would return it: an array (a reduction's or an index's one number too) on the device."""
    if isinstance(value, numpy.generic):
        value = numpy.asarray(value)
    if type(value) is numpy.ndarray:
        return value.view(Counted)
    if isinstance(value, (tuple, list)):  # split's arrays come as a list
        return type(value)(counted(item) for item in value)
    return value


class Counted(numpy.ndarray):
    """A NumPy array that notes each operation run on it as CuPy would launch it."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        OPERATIONS.note(ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}")
        if "out" in kwargs:
            kwargs["out"] = plain(kwargs["out"])
        return counted(getattr(ufunc, method)(*plain(inputs), **kwargs))

    def __array_function__(self, function, types, args, kwargs):
        name = function.__name__
        result = function(*plain(args), **{key: plain(value) for key, value in kwargs.items()})
        if name in ("asarray", "ascontiguousarray"):
            if not numpy.shares_memory(result, args[0]):
                OPERATIONS.note(f"copy ({name})")
        elif name not in NOT_OPERATIONS:
            OPERATIONS.note(name)
        return counted(result)

    def astype(self, dtype, *args, **kwargs):
        result = numpy.ndarray.astype(self, dtype, *args, **kwargs)
        if not numpy.shares_memory(result, self):
            OPERATIONS.note("astype")
        return result

    def copy(self, *args, **kwargs):
        OPERATIONS.note("copy")
        return numpy.ndarray.copy(self, *args, **kwargs)

    def reshape(self, *args, **kwargs):
        result = numpy.ndarray.reshape(self, *args, **kwargs)
        if result.size and not numpy.shares_memory(result, self):
            OPERATIONS.note("copy (reshape)")
        return result

    def __int__(self):
        OPERATIONS.note(READ_BACK)
        return int(plain(self))

    def __float__(self):
        OPERATIONS.note(READ_BACK)
        return float(plain(self))

    def __bool__(self):
        OPERATIONS.note(READ_BACK)
        return bool(plain(self))

    def item(self, *args):
        OPERATIONS.note(READ_BACK)
        return plain(self).item(*args)

    def __getitem__(self, key):
        return counted(numpy.ndarray.__getitem__(self, key))

    def __setitem__(self, key, value):
        OPERATIONS.note("setitem")
        numpy.ndarray.__setitem__(self, key, plain(value))

    def __matmul__(self, other):
        return matmul(self, other)

    def __rmatmul__(self, other):
        return matmul(other, self)


def matmul(a, b):
    """``a @ b`` as CuPy runs it: first a copy of each operand cuBLAS is not given as it lies (in a stack of
    matrices, one that is not C-contiguous; alone, a matrix in neither order), then the product."""
    a, b = plain(a), plain(b)
    stacked = a.ndim > 2 or b.ndim > 2
    for operand in (a, b):
        if not operand.flags.c_contiguous and (stacked or not operand.flags.f_contiguous):
            OPERATIONS.note("copy (matmul's operand)")
    OPERATIONS.note("matmul")
    return counted(numpy.matmul(a, b))


Counted.__module__ = "cupy.counted"  # backend.array_module takes it for a CuPy array: the stand-in below


class CountingCupy(types.ModuleType):
    """NumPy as the ``cupy`` the layers call: every array it makes is ``Counted``."""

    cuda = types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=0))  # one GPU

    def __getattr__(self, name):
        value = getattr(numpy, name)
        if not callable(value) or isinstance(value, (type, numpy.ufunc)):
            return value

        def made_counted(*args, **kwargs):
            result = value(*plain(args), **{key: plain(item) for key, item in kwargs.items()})
            if name in ("asarray", "ascontiguousarray"):
                if isinstance(args[0], numpy.ndarray) and not numpy.shares_memory(result, args[0]):
                    OPERATIONS.note(f"copy ({name})")
            elif name in ("zeros", "zeros_like", "full", "ones"):
                OPERATIONS.note(f"{name} (fill)")
            elif name not in NOT_OPERATIONS:
                OPERATIONS.note(name)
            return counted(result)
        return made_counted


def quietly(name, call):
    """``call``, one operation named ``name`` (its NumPy work is the GPU's one launch)."""
    def counted_call(*args, **kwargs):
        OPERATIONS.note(name)
        with OPERATIONS.quiet():
            return call(*args, **kwargs)
    return counted_call


class QuietCublas:
    """The stand-in for ``cupy.cublas``, one operation a call."""

    def __init__(self, cublas):
        self.cublas = cublas

    def __getattr__(self, name):
        return quietly(f"cublas.{name}", getattr(self.cublas, name))


def count_on_gpu_lines(monkeypatch):
    """Make the layers take their GPU lines on ``Counted`` arrays; returns the ``cupy`` stand-in."""
    from mnn import backend
    from mnn.kernels import cuda, cuda_products

    launched = run_gpu_lines_on_cpu(monkeypatch)
    monkeypatch.setattr(cuda_products, "strided_batched_gemm", quietly("cublas.gemmStridedBatched",
                                                                       cuda_products.strided_batched_gemm))
    cupy = CountingCupy("cupy")
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(numpy, "cublas", QuietCublas(numpy.cublas))
    for maker in ("compiled", "compiled_raw"):
        monkeypatch.setattr(cuda, maker, counting_kernels(getattr(cuda, maker), launched))
    monkeypatch.setitem(backend._state, "xp", cupy)
    return cupy


def counting_kernels(make, launched):
    """``make`` (``cuda.compiled`` or ``compiled_raw``), its kernels noting their launches."""
    def made(*args):
        kernel = make(*args)

        def launch(*arguments):
            with OPERATIONS.quiet():
                result = kernel(*arguments)
            OPERATIONS.note(launched[-1])
            return counted(result)
        return launch
    return made


def step_operations(case):
    """The operations of one training step (the third) of a bench case, as ``mnn.train`` runs it."""
    from bench.run import make_batch
    from mnn import backend, models, optim

    backend.seed(0)
    net = models.build(case["model"])
    net.input_grad = False
    net.optimizer = optim.AdamW(net, lr=1e-4)
    net.flatten()
    x, y = (backend.to_device(array) for array in make_batch(case, numpy.random.default_rng(0)))
    for _ in range(3):
        OPERATIONS.clear()
        net.zero_grads()
        net(x, y)
        net.backward()
        net.step()
    return list(OPERATIONS.names), collections.Counter(OPERATIONS.lines)


def main(names):
    from _pytest.monkeypatch import MonkeyPatch

    from bench.run import CASES

    with MonkeyPatch.context() as monkeypatch:
        count_on_gpu_lines(monkeypatch)
        for name in names:
            case = dict(CASES[name], batch=min(CASES[name]["batch"], 4))  # the count does not grow with it
            operations, lines = step_operations(case)
            reads = operations.count(READ_BACK)
            print(f"{name}: {len(operations) - reads} operations and {reads} reads back a step")
            for (operation, file, line), count in sorted(lines.items(), key=lambda item: item[0][1:]):
                print(f"  {count:3d}  {operation:34s} {file}:{line}")


if __name__ == "__main__":
    sys.path[:0] = [__file__.rsplit("/", 2)[0]]  # the repository, for bench
    main(sys.argv[1:] or ["mlp-64", "cnn-128", "gpt-12", "lstm"])
