"""Run a GPU kernel's CUDA C source (``mnn.kernels.cuda``) on the CPU, compiled by g++.

* ``compile_for_cpu``, for an ``Elementwise`` source. CuPy runs its ``operation`` once per index
  ``i``: each array parameter stands for its element ``i`` (inputs read-only, outputs by
  reference), each scalar for its value, ``T`` for the arrays' floating type. This writes that
  loop in C++ around the same text and preamble.
* ``compile_raw_for_cpu``, for a ``Raw`` source: the same text after shims (``RAW_SHIMS``) that
  give each block one thread and each row one lane.
* ``compile_for_gpu`` and ``nvrtc_errors``: NVRTC's compile of the same kernels as device code.

A test can then compare a kernel's arithmetic with the layer's NumPy lines on a machine
without a GPU. A GPU may still round float operations differently (it contracts a * b + c
into one fused multiply-add), so floating results agree to rounding; integer arithmetic
agrees exactly.
"""
import ctypes
import hashlib
import importlib.util
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


def loop(source, floating, arrays, function, indices):
    """C++ for ``function(n, params...)`` applying ``source`` at every index of ``indices``: each array
    parameter a pointer, bound by reference to its element i, each scalar by value."""
    inputs, outputs = parameters(source.in_params), parameters(source.out_params)
    signature, body = [], []
    for kind, name in inputs + outputs:
        c_type = C_TYPES[floating if kind == "T" else kind][0]
        if name in arrays or (kind, name) in outputs:
            signature.append(f"{c_type}* {name}_")
            body.append(f"{'' if (kind, name) in outputs else 'const '}{c_type}& {name} = {name}_[i];")
        else:
            signature.append(f"{c_type} {name}")
    return "\n".join([f"{function}(ptrdiff_t n, {', '.join(signature)}) {{", f"    for (ptrdiff_t i = {indices}) {{",
                      *(f"        {line}" for line in body), f"        {source.operation};", "    }", "}"])


def compile_for_cpu(source, dtype, arrays):
    """A function ``run(**values)`` that applies ``source`` to NumPy arrays of ``dtype`` in place.
    ``arrays`` names the input parameters given as arrays (the others are scalars); every output
    is an array."""
    assert shutil.which("g++"), "g++ is missing: scripts/setup test installs it"
    floating = numpy.dtype(dtype).name
    inputs, outputs = parameters(source.in_params), parameters(source.out_params)
    code = "\n".join([
        "#include <cmath>", "#include <cstddef>", "using namespace std;", "#define __device__ static inline",
        f"typedef {C_TYPES[floating][0]} T;", source.preamble,
        loop(source, floating, arrays, 'extern "C" void run', "0; i < n; i++")])
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


RAW_SHIMS = """
#include <cmath>
#include <algorithm>
using namespace std;
#define LANES 1
#define __global__
#define __device__ static inline
struct mnn_index { unsigned int x, y, z; };
static mnn_index blockIdx, threadIdx, blockDim = {1, 1, 1}, gridDim = {1, 1, 1};  /* grid-stride loops: one pass */
template <typename T> T __shfl_xor_sync(unsigned int, T value, int) { return value; }
extern "C" void mnn_set_block(unsigned int block) { blockIdx.x = block; }
"""


def compile_raw_for_cpu(source, function, argument_types):
    """``run(blocks, *arguments)``: the ``extern "C"`` entry ``function`` of a ``Raw`` source, run on the CPU
    for blocks 0 .. blocks - 1 in turn, one thread each (LANES 1); a kernel whose threads stride over
    all elements runs as one block of one thread. ``argument_types`` are its parameters' ctypes
    types; NumPy arrays stand for pointers."""
    assert shutil.which("g++"), "g++ is missing: scripts/setup test installs it"
    library = ctypes.CDLL(str(build(RAW_SHIMS + source.code)))
    entry = getattr(library, function)
    entry.argtypes = argument_types

    def run(blocks, *arguments):
        values = [ctypes.c_void_p(a.ctypes.data) if isinstance(a, numpy.ndarray) else a for a in arguments]
        for block in range(blocks):
            library.mnn_set_block(block)
            entry(*values)
    return run


def compile_for_gpu(kernels, dtype):
    """NVRTC's verdict on ``kernels``, (source, array input names) pairs, as device code for an H100
    (sm_90): each a grid-stride loop around its operation, as CuPy writes it, compiled though not
    run. None when all compile, else the compiler's log."""
    floating = numpy.dtype(dtype).name
    units = [f"typedef {C_TYPES[floating][0]} T;"]
    for source, arrays in kernels:
        units += [f"namespace {source.name} {{", source.preamble,
                  loop(source, floating, arrays, "__global__ void kernel",
                       "blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x"), "}"]
    return nvrtc_errors("\n".join(units))


def nvrtc_library():
    """NVRTC, the compiler CuPy uses, from the pip package ``nvidia-cuda-nvrtc`` (the test extra, on Linux)."""
    spec = importlib.util.find_spec("nvidia")
    found = sorted(path for folder in (spec.submodule_search_locations if spec else [])
                   for path in Path(folder).glob("*/lib/libnvrtc.so*"))
    return ctypes.CDLL(str(found[-1])) if found else None


def nvrtc_errors(code):
    """None when NVRTC compiles ``code`` for sm_90 with CuPy's options, else its log."""
    nvrtc = nvrtc_library()
    program = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), code.encode(), b"kernels.cu", 0, None, None) == 0
    options = [b"-arch=compute_90", b"--std=c++17", b"-ftz=true"]
    status = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    return None if status == 0 else log.value.decode()


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
