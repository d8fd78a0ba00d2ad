"""The array module behind mnn: NumPy on the CPU (the default), CuPy on an NVIDIA GPU.

Layer math never imports NumPy for computation. It asks the data which module
it lives in, ``xp = array_module(x)``, so the same lines run under either.
This module holds the few global choices: which module new parameters are
created in, the default floating dtype (float32), and the random generator.
"""
import functools
import os

import numpy

_state = {"xp": numpy, "dtype": numpy.float32, "rng": numpy.random.default_rng(0)}


def use(name):
    """Select the array module for new parameters and data: ``"numpy"`` or ``"cupy"``."""
    if name == "numpy":
        _state["xp"] = numpy
    elif name == "cupy":
        try:
            import cupy
        except ImportError as error:
            raise RuntimeError("backend 'cupy' needs CuPy and an NVIDIA GPU: in mnn's folder, "
                               "pip install -e '.[gpu]' (CUDA 12; for another CUDA, the matching "
                               f"cupy-cudaXXx wheel) ({error})") from error
        try:
            cupy.cuda.runtime.getDeviceCount()
        except Exception as error:  # CuPy's CUDA errors share no base class worth naming
            raise RuntimeError(f"backend 'cupy': CuPy is installed but finds no usable NVIDIA GPU ({error})") from error
        _state["xp"] = cupy
    else:
        raise ValueError(f"unknown backend {name!r}; expected 'numpy' or 'cupy'")


def xp():
    """The array module selected with :func:`use`."""
    return _state["xp"]


def array_module(array):
    """The array module that ``array`` belongs to (CuPy for a CuPy array, else NumPy)."""
    module = type(array).__module__
    if module.startswith("cupy"):
        import cupy
        return cupy
    return numpy


def is_array(x):
    """Whether ``x`` is a NumPy or a CuPy array, or a NumPy scalar (a torch tensor, a list is not)."""
    on_gpu = type(x).__module__.startswith("cupy") and hasattr(x, "shape")
    return isinstance(x, (numpy.ndarray, numpy.generic)) or on_gpu


def default_dtype():
    return _state["dtype"]


def set_default_dtype(dtype):
    """Set the dtype of new parameters: float32 (default) or float64 (gradient checks)."""
    try:
        dtype = numpy.dtype(dtype)
    except TypeError as error:
        raise ValueError(f"default dtype must be floating point (float32, float64), got {dtype!r}") from error
    if dtype.kind != "f":
        raise ValueError(f"default dtype must be floating point, got {dtype}")
    _state["dtype"] = dtype.type


def seed(value):
    """Seed mnn's random generator (initialisation, dropout, shuffling)."""
    _state["rng"] = numpy.random.default_rng(value)


def rng():
    """mnn's NumPy random generator; state travels in checkpoints."""
    return _state["rng"]


def get_rng_state():
    return _state["rng"].bit_generator.state


def set_rng_state(state):
    _state["rng"].bit_generator.state = state


def to_device(array, dtype=None):
    """Move a host array to the selected module, cast to ``dtype`` if given."""
    array = xp().asarray(array)
    return array if dtype is None else array.astype(dtype, copy=False)


def to_numpy(array):
    """A NumPy copy of any array (a CuPy array comes back to the host)."""
    if hasattr(array, "get"):
        return array.get()
    return numpy.asarray(array)


def at_least_float32(x):
    """``x`` widened to float32 if it is float16 (or narrower): where float16's range ends too soon (its squares
    overflow past 256), and where the compiled kernels, which have no float16, take it."""
    return x.astype("float32") if x.dtype.itemsize < 4 else x


def kept_vector(xp, value, count, dtype):
    """A read-only vector of ``count`` entries equal to ``value``, in module ``xp`` (on the current GPU),
    made once and kept: a GPU would spend a launch filling a new one at every use (the ones of a sum
    over rows, the zero shift of a layer norm without bias)."""
    device = xp.cuda.Device().id if xp.__name__ == "cupy" else None
    return _kept_vector(xp, value, count, numpy.dtype(dtype), device)


@functools.lru_cache(maxsize=64)
def _kept_vector(xp, value, count, dtype, device):
    vector = xp.full(count, value, dtype=dtype)
    if hasattr(vector.flags, "writeable"):
        vector.flags.writeable = False  # shared by every caller
    return vector


def uniform(low, high, shape, dtype=None):
    """Parameters drawn from U(low, high) with mnn's generator, on the selected module."""
    values = rng().uniform(low, high, size=shape)
    return to_device(values, dtype or default_dtype())


def normal(std, shape, dtype=None):
    """Parameters drawn from N(0, std^2) with mnn's generator, on the selected module."""
    return to_device(rng().normal(0, std, size=shape), dtype or default_dtype())


def random_key():
    """One 64-bit key from mnn's generator: the seed of a counter-based draw (dropout's masks)."""
    return int(rng().integers(0, 2**64, dtype=numpy.uint64))


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_threads(requested=None):
    """How many threads to compute with: ``requested``, else the first of ``OMP_NUM_THREADS``,
    ``OPENBLAS_NUM_THREADS`` and ``MKL_NUM_THREADS`` that is set, else the cores this process
    may run on (its CPU affinity, which ``taskset`` or a container can narrow)."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"threads must be an integer >= 1, got {requested!r}")
        return requested
    for name in THREAD_VARIABLES:
        value = os.environ.get(name, "").split(",")[0].strip()
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def tune_cpu(threads=None):
    """Settings that make CPU training steps faster; ``mnn train`` and the benchmark call it.

    * BLAS threads: NumPy's OpenBLAS, left at its start-up defaults, ran mnn's training
      steps 20-30% slower here than after its thread count is set explicitly (to the same
      number). The count is ``cpu_threads(threads)``: the environment's thread variables and
      the process's CPU affinity are respected. Results differ between thread counts by
      floating-point reassociation (~1e-8), so a resumed run is bit for bit only at the
      thread count it started with.

    * Memory: a training step allocates the same large temporaries every time. glibc's
      malloc hands big blocks straight back to the kernel and trims the heap, so each step
      pays page faults to get them again; raising its thresholds (the settings behind
      ``MALLOC_MMAP_THRESHOLD_`` and friends) keeps them. A no-op where libc is not glibc.
    """
    from threadpoolctl import threadpool_limits

    threads = cpu_threads(threads)
    threadpool_limits(limits=threads, user_api="blas")
    return threads, keep_freed_memory()


def keep_freed_memory():
    """Raise glibc's mmap and trim thresholds so freed temporaries are reused (see ``tune_cpu``)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    trim_threshold, top_pad, mmap_threshold = -1, -2, -3
    return all(mallopt(option, value) == 1 for option, value in
               [(mmap_threshold, 1 << 30), (trim_threshold, 1 << 31), (top_pad, 1 << 28)])
