"""Run a GPU kernel's CUDA C source (``mnn.kernels.cuda.Elementwise``) on the CPU, compiled by g++.

CuPy runs an element-wise kernel's ``operation`` once per index ``i``: each array parameter
stands for its element ``i`` (inputs read-only, outputs by reference), each scalar for its
value, ``T`` for the arrays' floating type. ``compile_for_cpu`` writes that loop in C++
around the same text and preamble, so a test can compare the kernel's arithmetic with the
layer's NumPy lines on a machine without a GPU. A GPU may still round float operations
differently (it contracts a * b + c into one fused multiply-add), so floating results agree
to rounding; integer arithmetic agrees exactly.
"""
import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy

C_TYPES = {"float64": ("double", ctypes.c_double), "float32": ("float", ctypes.c_float),
           "uint64": ("unsigned long long", ctypes.c_ulonglong), "int64": ("long long", ctypes.c_longlong),
           "uint32": ("unsigned int", ctypes.c_uint), "int32": ("int", ctypes.c_int)}
BUILD = Path(tempfile.gettempdir()) / "mnn-cuda-on-cpu"


def parameters(text):
    """'T x, uint64 key' -> [('T', 'x'), ('uint64', 'key')]."""
    return [tuple(part.split()) for part in text.split(",")]


def compile_for_cpu(source, dtype, arrays):
    """A function ``run(**values)`` that applies ``source`` to NumPy arrays of ``dtype`` in place.
    ``arrays`` names the input parameters given as arrays (the others are scalars); every output
    is an array."""
    assert shutil.which("g++"), "g++ is missing: scripts/setup test installs it"
    floating = numpy.dtype(dtype).name
    inputs, outputs = parameters(source.in_params), parameters(source.out_params)
    signature, body = [], []
    for kind, name in inputs + outputs:
        c_type = C_TYPES[floating if kind == "T" else kind][0]
        if name in arrays or (kind, name) in outputs:
            signature.append(f"{c_type}* {name}_")
            body.append(f"{'' if (kind, name) in outputs else 'const '}{c_type}& {name} = {name}_[i];")
        else:
            signature.append(f"{c_type} {name}")
    code = "\n".join([
        "#include <cmath>", "#include <cstddef>", "using namespace std;", "#define __device__ static inline",
        f"typedef {C_TYPES[floating][0]} T;", source.preamble,
        f'extern "C" void run(ptrdiff_t n, {", ".join(signature)}) {{',
        "    for (ptrdiff_t i = 0; i < n; i++) {", *(f"        {line}" for line in body),
        f"        {source.operation};", "    }", "}"])
    library = ctypes.CDLL(str(build(code)))

    def run(**values):
        sizes = {values[name].size for kind, name in inputs + outputs if name in arrays or (kind, name) in outputs}
        assert len(sizes) == 1, f"{source.name}: the arrays must have one size, got {sizes}"
        arguments = [ctypes.c_ssize_t(sizes.pop())]
        for kind, name in inputs + outputs:
            value = values[name]
            if isinstance(value, numpy.ndarray):
                assert value.flags.c_contiguous and value.dtype.name == (floating if kind == "T" else kind), name
                arguments.append(ctypes.c_void_p(value.ctypes.data))
            else:
                arguments.append(C_TYPES[floating if kind == "T" else kind][1](value))
        library.run(*arguments)
    return run


def build(code):
    """The shared library g++ makes of ``code``, kept by the hash of the code."""
    BUILD.mkdir(exist_ok=True)
    library = BUILD / f"{hashlib.sha256(code.encode()).hexdigest()[:16]}.so"
    if not library.exists():
        (library.with_suffix(".cpp")).write_text(code)
        partial = library.with_suffix(".partial")
        result = subprocess.run(["g++", "-O1", "-shared", "-fPIC", "-std=c++17", "-o", str(partial),
                                 str(library.with_suffix(".cpp"))], capture_output=True, text=True)
        assert result.returncode == 0, f"g++ refused {library.with_suffix('.cpp')}:\n{result.stderr}"
        partial.replace(library)
    return library
