"""Parts of a batch at once, on OpenBLAS's own threads.

A recurrent layer's steps are too short to hand out one by one (a step of the benchmark's LSTM
takes some 60 microseconds), but the samples of a batch are independent for the whole sequence:
each thread can run every step for its part of the batch, and the threads meet once, at the end.

Whose threads: after every matrix product OpenBLAS's idle threads spin for 2^28 processor cycles
(about a tenth of a second) waiting for the next one. On two cores a thread of ours then shares
its core with a spinning one: two parts that took 3.5 ms side by side took 6.3 ms right after a
product. OpenBLAS hands out its own work with ``gotoblas_pthread(n, function, args, stride)``,
which runs ``function(args + i * stride)`` for ``i < n``, the first in the calling thread and
the others on those very threads, the moment they are free. So the parts run there.

Where NumPy's BLAS is not the OpenBLAS a NumPy wheel bundles (conda's and Linux distributions'
NumPy link another copy, macOS wheels Accelerate), has no ``gotoblas_pthread``, or runs one
thread, ``threads_at_hand()`` is 1 and callers keep to one thread.
"""
import ctypes
import threading
from pathlib import Path

import numpy

_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_lock = threading.Lock()  # one set of parts at a time: the callback reads them from _running
_running = {"jobs": (), "errors": []}
_openblas = {}  # "controller": threadpoolctl's controller of NumPy's OpenBLAS, or None; looked up once


def numpy_openblas():
    """threadpoolctl's controller of the OpenBLAS NumPy calls, if it has ``gotoblas_pthread``; else None."""
    if "controller" not in _openblas:
        from threadpoolctl import ThreadpoolController
        numpy_libs = Path(numpy.__file__).parent.parent / "numpy.libs"  # where a NumPy wheel keeps its OpenBLAS
        found = [c for c in ThreadpoolController().select(internal_api="openblas").lib_controllers
                 if c.filepath and Path(c.filepath).parent == numpy_libs]
        usable = [c for c in found if hasattr(c.dynlib, "gotoblas_pthread")]
        _openblas["controller"] = usable[0] if usable else None
        if usable:
            run = usable[0].dynlib.gotoblas_pthread
            run.argtypes, run.restype = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int], ctypes.c_int
    return _openblas["controller"]


def threads_at_hand():
    """How many parts may run at once: the threads NumPy's OpenBLAS runs now (1 where it cannot lend them)."""
    controller = numpy_openblas()
    return max(1, controller.get_num_threads()) if controller is not None else 1


def run_parts(jobs):
    """Call every function in ``jobs`` (no arguments) at once, the first in this thread; return when all
    have returned, raising the first exception any of them raised. Where fewer threads are at hand than
    jobs (another thread may have just lowered OpenBLAS's count), they run one after another here:
    OpenBLAS started on one thread has no other to lend, and would wait for it forever. A job must
    not call NumPy's BLAS itself: on OpenBLAS's thread, a product would wait for that very thread."""
    jobs = tuple(jobs)
    if len(jobs) <= 1 or len(jobs) > threads_at_hand():
        for job in jobs:
            job()
        return
    indices = numpy.arange(len(jobs), dtype=numpy.int64)  # job i receives the address of indices[i]
    with _lock:
        _running["jobs"], _running["errors"] = jobs, []
        numpy_openblas().dynlib.gotoblas_pthread(len(jobs), _run_job_pointer, indices.ctypes.data,
                                                 indices.itemsize)
        errors, _running["jobs"] = _running["errors"], ()
    if errors:
        raise errors[0]


def _run_job(address):
    """OpenBLAS's call into one job: ``address`` points at its index (int64)."""
    index = ctypes.cast(address, ctypes.POINTER(ctypes.c_int64))[0]
    try:
        _running["jobs"][index]()
    except BaseException as error:  # an exception cannot cross OpenBLAS's C frames: kept, raised after
        _running["errors"].append(error)


_run_job_callback = _CALLBACK(_run_job)  # kept alive as long as the module: OpenBLAS holds its address
_run_job_pointer = ctypes.cast(_run_job_callback, ctypes.c_void_p)
