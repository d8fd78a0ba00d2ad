"""Run a GPU kernel's CUDA C source (``mnn.kernels.cuda``) on the CPU, compiled by g++.

* ``compile_for_cpu``, for an ``Elementwise`` source. CuPy runs its ``operation`` once per index
  ``i``: each array parameter stands for its element ``i`` (inputs read-only, outputs by
  reference), each scalar for its value, ``T`` for the arrays' floating type. This writes that
  loop in C++ around the same text and preamble.
* ``compile_raw_for_cpu``, for a ``Raw`` source: the same text after shims (``RAW_SHIMS``) that
  give each block one thread and each row one lane.
* ``RawKernelOnCpu(source, entry, lanes=True)``: the same text after ``LANES_SHIMS``, which run each
  block whole, every thread a fiber, with warp shuffles and ``__syncthreads`` between them.
* ``compile_for_gpu`` and ``nvrtc_errors``: NVRTC's compile of the same kernels as device code.

A test can then compare a kernel's arithmetic with the layer's NumPy lines on a machine
without a GPU. A GPU may still round float operations differently (it contracts a * b + c
into one fused multiply-add), so floating results agree to rounding; integer arithmetic
agrees exactly.
"""
import ctypes
import hashlib
import importlib.util
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy

from mnn.kernels.cuda_products import Stack

C_TYPES = {"float64": ("double", ctypes.c_double), "float32": ("float", ctypes.c_float),
           "uint64": ("unsigned long long", ctypes.c_ulonglong), "int64": ("long long", ctypes.c_longlong),
           "uint32": ("unsigned int", ctypes.c_uint), "int32": ("int", ctypes.c_int),
           "uint8": ("unsigned char", ctypes.c_ubyte)}
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


# Threads run one at a time (or as fibers that yield only at a shuffle or a barrier): an add is atomic.
ATOMIC_ADD = """
static unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
    unsigned long long old = *address;
    *address = old + value;
    return old;
}
"""
RAW_SHIMS = """
#include <cmath>
#include <algorithm>
using namespace std;
#define LANES 1
#define __global__
#define __device__ static inline
struct mnn_index { unsigned int x, y, z; };
static mnn_index blockIdx, threadIdx, blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
template <typename T> T __shfl_xor_sync(unsigned int, T value, int) { return value; }
""" + ATOMIC_ADD
# After the source: for each entry, ``{entry}_grid(blocks, threads, rows_per_block, ...)`` runs it for
# every block, every row of a block (threadIdx.y) and every thread of a row (threadIdx.x) in turn.
# A row kernel runs with one thread per row, its one lane; an element kernel with its block's threads.
GRID_RUNNER = """
extern "C" void {entry}_grid(unsigned int blocks, unsigned int threads, unsigned int rows_per_block, {params}) {{
    gridDim.x = blocks;
    blockDim.x = threads;
    blockDim.y = rows_per_block;
    for (blockIdx.x = 0; blockIdx.x < blocks; blockIdx.x++)
        for (threadIdx.y = 0; threadIdx.y < rows_per_block; threadIdx.y++)
            for (threadIdx.x = 0; threadIdx.x < threads; threadIdx.x++) {entry}({arguments});
}}
"""
ENTRY = re.compile(r'extern "C" __global__ void (\w+)\(([^)]*)\)')


def entry_parameters(code):
    """{entry: [(C type, name)]} for the ``extern "C"`` entries of a ``Raw`` source."""
    return {entry: [tuple(param.strip().rsplit(None, 1)) for param in params.split(",")]
            for entry, params in ENTRY.findall(code)}


def raw_library(source):
    """The ``Raw`` source compiled for the CPU, with a grid runner for each entry."""
    assert shutil.which("g++"), "g++ is missing: scripts/setup test installs it"
    runners = [GRID_RUNNER.format(entry=entry, params=", ".join(" ".join(p) for p in params),
                                  arguments=", ".join(name.lstrip("*") for _, name in params))
               for entry, params in entry_parameters(source.code).items()]
    return ctypes.CDLL(str(build(RAW_SHIMS + source.code + "".join(runners))))


def compile_raw_for_cpu(source, function, argument_types):
    """``run(blocks, *arguments)``: the ``extern "C"`` entry ``function`` of a ``Raw`` source, run on the CPU
    for blocks 0 .. blocks - 1 in turn, one thread each (LANES 1). ``argument_types`` are its
    parameters' ctypes types; NumPy arrays stand for pointers."""
    runner = getattr(raw_library(source), f"{function}_grid")
    runner.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, *argument_types]

    def run(blocks, *arguments):
        runner(blocks, 1, 1, *(ctypes.c_void_p(a.ctypes.data) if isinstance(a, numpy.ndarray) else a
                               for a in arguments))
    return run


# -- a block's threads as fibers: the lanes of a warp and the threads of a block, together ---------
# With LANES_SHIMS a ``Raw`` source runs with its real block: every thread of a block is a fiber (its
# own stack, ``ucontext``), and the block's fibers take turns, each running until it waits, in an
# order shuffled afresh each turn (seeded: a run repeats). A warp shuffle waits for the warp's live
# lanes (each lane posts its value, all read, all wait again before a slot is reused),
# ``__syncthreads`` for the block's threads. So the lanes' striding, the shuffles' partners and
# ``__shared__`` tiles run as on a GPU, and a thread that reads a tile before the barrier that should
# have filled it reads, in some turn, what another thread has not yet written. Shared memory starts
# each block as NaN bytes (``shared_poisoned``), so an entry read but never written shows. The
# runner returns an error code (FIBER_ERRORS) where a GPU would hang or be undefined: a turn in which
# no thread arrives anywhere or finishes (a deadlock), lanes meeting at two different shuffles, a
# shuffle from a lane that has exited, a ``__syncthreads`` after a thread of the block has exited.
FIBER_ERRORS = {1: "deadlock: threads wait where none can arrive",
                2: "the lanes of a warp meet at two different shuffles",
                3: "a shuffle reads a lane that has exited or does not exist",
                4: "__syncthreads after a thread of the block has exited"}
LANES_SHIMS = r"""
#include <cmath>
#include <cstring>
#include <algorithm>
#include <map>
#include <vector>
#include <ucontext.h>
using namespace std;
#define __global__
#define __device__ static inline
#define __syncthreads() mnn_sync_block()
#define __shfl_xor_sync(mask, value, offset) mnn_exchange(value, (mnn_thread_id() % 32) ^ (offset), __COUNTER__)
#define __shfl_sync(mask, value, source_lane) mnn_exchange(value, source_lane, __COUNTER__)
struct mnn_index { unsigned int x, y, z; };
static mnn_index blockIdx, threadIdx, blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
""" + ATOMIC_ADD + r"""
struct mnn_fiber { ucontext_t context; mnn_index thread; bool done; };
struct mnn_barrier { int arrived; unsigned long long generation; };
static vector<mnn_fiber> mnn_fibers;
static vector<vector<char>> mnn_stacks;
static vector<int> mnn_order;
static vector<mnn_barrier> mnn_warp_barriers;
static vector<int> mnn_warp_live;
static vector<unsigned long long> mnn_slots;  /* one shuffle slot per lane of every warp */
static vector<int> mnn_sites;  /* the shuffle each lane has posted to */
static mnn_barrier mnn_block_barrier;
static int mnn_threads, mnn_block_live, mnn_current, mnn_error;
static unsigned long long mnn_progress, mnn_block_serial, mnn_random = 12345;
static map<void*, unsigned long long> mnn_poisoned;  /* shared array -> the block that last filled it */
static ucontext_t mnn_scheduler;
static void (*mnn_body)();

static void mnn_fail(int code) { if (!mnn_error) mnn_error = code; }
static int mnn_thread_id() { return threadIdx.y * blockDim.x + threadIdx.x; }
static void mnn_yield() { swapcontext(&mnn_fibers[mnn_current].context, &mnn_scheduler); }
static void mnn_release_if_full(mnn_barrier& b, int live) {
    if (b.arrived > 0 && b.arrived >= live) { b.arrived = 0; b.generation++; }
}
static void mnn_wait(mnn_barrier& b, const int& live) {
    unsigned long long generation = b.generation;
    b.arrived++;
    mnn_progress++;
    mnn_release_if_full(b, live);
    while (b.generation == generation) mnn_yield();
}
static void mnn_sync_block() {
    if (mnn_block_live < mnn_threads) mnn_fail(4);
    mnn_wait(mnn_block_barrier, mnn_block_live);
}
template <typename T> T mnn_exchange(T value, int source_lane, int site) {
    int id = mnn_thread_id(), warp = id / 32, source = warp * 32 + (source_lane & 31);
    memcpy(&mnn_slots[id], &value, sizeof(T));
    mnn_sites[id] = site;
    mnn_wait(mnn_warp_barriers[warp], mnn_warp_live[warp]);
    if (source >= mnn_threads || mnn_fibers[source].done) mnn_fail(3);
    else if (mnn_sites[source] != site) mnn_fail(2);
    T result;
    memcpy(&result, &mnn_slots[source], sizeof(T));
    mnn_wait(mnn_warp_barriers[warp], mnn_warp_live[warp]);
    return result;
}
/* A __shared__ array, filled with NaN bytes by the first of its block's threads to declare it. */
static void mnn_shared(void* array, size_t bytes) {
    unsigned long long& filled = mnn_poisoned[array];
    if (filled != mnn_block_serial) { memset(array, 0xff, bytes); filled = mnn_block_serial; }
}

static void mnn_fiber_main() {
    mnn_body();
    int warp = mnn_thread_id() / 32;
    mnn_fibers[mnn_current].done = true;
    mnn_progress++;
    mnn_release_if_full(mnn_warp_barriers[warp], --mnn_warp_live[warp]);
    mnn_release_if_full(mnn_block_barrier, --mnn_block_live);
}
static void mnn_shuffle_order() {
    for (int i = mnn_threads - 1; i > 0; i--) {
        mnn_random = mnn_random * 6364136223846793005ull + 1442695040888963407ull;
        swap(mnn_order[i], mnn_order[(mnn_random >> 33) % (i + 1)]);
    }
}
/* One block: its threads as fibers, in turns until all are done; 1 on a deadlock. */
static int mnn_run_block() {
    int threads = mnn_threads = blockDim.x * blockDim.y, warps = (threads + 31) / 32;
    mnn_block_serial++;
    mnn_fibers.assign(threads, mnn_fiber());
    mnn_stacks.resize(threads, vector<char>(1 << 17));
    mnn_order.resize(threads);
    for (int i = 0; i < threads; i++) mnn_order[i] = i;
    mnn_warp_barriers.assign(warps, mnn_barrier{0, 0});
    mnn_warp_live.assign(warps, 32);
    if (threads % 32) mnn_warp_live[warps - 1] = threads % 32;
    mnn_slots.assign(warps * 32, 0);
    mnn_sites.assign(warps * 32, 0);
    mnn_block_barrier = mnn_barrier{0, 0};
    mnn_block_live = threads;
    for (int i = 0; i < threads; i++) {
        mnn_fiber& fiber = mnn_fibers[i];
        fiber.thread = mnn_index{(unsigned)(i % blockDim.x), (unsigned)(i / blockDim.x), 0};
        getcontext(&fiber.context);
        fiber.context.uc_stack.ss_sp = mnn_stacks[i].data();
        fiber.context.uc_stack.ss_size = mnn_stacks[i].size();
        fiber.context.uc_link = &mnn_scheduler;
        makecontext(&fiber.context, mnn_fiber_main, 0);
    }
    for (int live = threads; live > 0;) {
        unsigned long long before = mnn_progress;
        live = 0;
        mnn_shuffle_order();
        for (int turn = 0; turn < threads; turn++) {
            mnn_current = mnn_order[turn];
            if (mnn_fibers[mnn_current].done) continue;
            threadIdx = mnn_fibers[mnn_current].thread;
            swapcontext(&mnn_scheduler, &mnn_fibers[mnn_current].context);
            live += !mnn_fibers[mnn_current].done;
        }
        if (live && mnn_progress == before) return 1;
    }
    return 0;
}
static int mnn_run_grid(unsigned int gx, unsigned int gy, unsigned int bx, unsigned int by, void (*body)()) {
    mnn_body = body;
    mnn_error = 0;
    gridDim = mnn_index{gx, gy, 1};
    blockDim = mnn_index{bx, by, 1};
    for (blockIdx.y = 0; blockIdx.y < gy; blockIdx.y++)
        for (blockIdx.x = 0; blockIdx.x < gx; blockIdx.x++)
            if (mnn_run_block()) return 1;
    return mnn_error;
}
"""
# After the source: ``{entry}_lanes(grid x, grid y, block x, block y, ...)`` keeps the arguments where
# the fibers' body finds them and runs the grid; 0 when it finished, else a code of FIBER_ERRORS.
LANES_RUNNER = """
{statics}
static void {entry}_body() {{ {entry}({names}); }}
extern "C" int {entry}_lanes(unsigned int gx, unsigned int gy, unsigned int bx, unsigned int by, {params}) {{
    {stores}
    return mnn_run_grid(gx, gy, bx, by, {entry}_body);
}}
"""
SHARED = re.compile(r"__shared__ ([^;]*);")


def shared_poisoned(code):
    """``code`` with each ``__shared__`` declaration a ``static`` one (one array for the block's fibers),
    followed by a call that fills each of its arrays with NaN bytes once per block."""
    def declared(match):
        names = re.findall(r"(\w+)\s*\[", match.group(1).split(None, 1)[1])
        return f"static {match.group(1)}; " + " ".join(f"mnn_shared({name}, sizeof({name}));" for name in names)
    return SHARED.sub(declared, code)


def lanes_library(source):
    """The ``Raw`` source compiled for the CPU with LANES_SHIMS, with a ``{entry}_lanes`` runner per entry."""
    assert shutil.which("g++"), "g++ is missing: scripts/setup test installs it"
    runners = []
    for entry, params in entry_parameters(source.code).items():
        typed = [(c_type + "*" * (len(name) - len(name.lstrip("*"))), name.lstrip("*")) for c_type, name in params]
        runners.append(LANES_RUNNER.format(
            entry=entry, names=", ".join(f"{entry}_{name}" for _, name in typed),
            statics="\n".join(f"static {c_type} {entry}_{name};" for c_type, name in typed),
            params=", ".join(" ".join(p) for p in params),
            stores=" ".join(f"{entry}_{name} = {name};" for _, name in typed)))
    return ctypes.CDLL(str(build(LANES_SHIMS + shared_poisoned(source.code) + "".join(runners))))


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


def require_nvrtc():
    """NVRTC, for a test that compiles device code: on Linux, where the test extra installs it, a missing one
    is a failure (the check must not vanish quietly); elsewhere the test skips."""
    import platform

    import pytest

    library = nvrtc_library()
    if library is None:
        message = "NVRTC is not installed: the test extra installs nvidia-cuda-nvrtc on Linux"
        (pytest.fail if platform.system() == "Linux" else pytest.skip)(message)
    return library


def nvrtc_errors(code):
    """None when NVRTC compiles ``code`` to machine code for sm_90 (so that the assembler's limits hold:
    48 KB of static shared memory a block, registers) with CuPy's options, else its log."""
    nvrtc = nvrtc_library()
    program = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), code.encode(), b"kernels.cu", 0, None, None) == 0
    options = [b"-arch=sm_90", b"--std=c++17", b"-ftz=true"]  # sm_: to machine code, as ptxas would check it
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


# -- CuPy's kernel objects, stood in for on the CPU ---------------------------------------------------
# With these in place of ``mnn.kernels.cuda.compiled`` and ``compiled_raw``, NumPy in place of the
# ``cupy`` module, and ``kernels.fused_gpu`` true for NumPy arrays, the layers take their GPU lines
# on the CPU: their launches, argument lists and array layouts run as a GPU would run them, a row
# kernel with one lane a row unless asked for all (``lanes``).

POINTEES = {"float": "float32", "double": "float64", "int": "int32", "long long": "int64",
            "unsigned long long": "uint64"}
SCALARS = {"float": (numpy.float32, ctypes.c_float), "double": (numpy.float64, ctypes.c_double),
           "int": (numpy.int32, ctypes.c_int), "long long": (numpy.int64, ctypes.c_longlong),
           "unsigned long long": (numpy.uint64, ctypes.c_ulonglong)}


class RawKernelOnCpu:
    """``cupy.RawKernel(code, entry)`` run on the CPU: ``kernel(grid, block, arguments)``. Each argument
    must be what the entry's parameter declares, as CuPy passes it to the GPU: a C-contiguous array of
    the pointee's dtype, or a NumPy scalar of the parameter's type (CuPy would pass a wrong one's bytes)."""

    def __init__(self, source, entry, lanes=False):
        self.entry, self.params, self.lanes = entry, entry_parameters(source.code)[entry], lanes
        library = lanes_library(source) if lanes else raw_library(source)
        self.runner = getattr(library, f"{entry}_lanes" if lanes else f"{entry}_grid")
        self.runner.restype = ctypes.c_int if lanes else None

    def __call__(self, grid, block, arguments):
        assert len(arguments) == len(self.params), f"{self.entry}: {len(arguments)} arguments for {self.params}"
        if self.lanes:
            values = [ctypes.c_uint(n) for n in (*grid, 1)[:2] + (*block, 1)[:2]]
        else:
            threads, rows_per_block = (block[0], 1) if len(block) == 1 else (1, block[1])  # a row kernel: one lane
            assert len(grid) == 1, f"{self.entry}: a grid of one axis runs one lane a row; use lanes=True"
            values = [ctypes.c_uint(n) for n in (grid[0], threads, rows_per_block)]
        for (c_type, name), value in zip(self.params, arguments):
            if c_type.endswith("*"):
                pointee = POINTEES[c_type.removeprefix("const ").rstrip("*").strip()]
                assert isinstance(value, numpy.ndarray) and value.dtype.name == pointee and value.flags.c_contiguous, \
                    f"{self.entry}: {name} must be a C-contiguous {pointee} array, got {type(value).__name__} " \
                    f"{getattr(value, 'dtype', '')} {getattr(value, 'strides', '')}"
                values.append(ctypes.c_void_p(value.ctypes.data))
            else:
                numpy_type, c_value = SCALARS[c_type]
                assert type(value) is numpy_type, f"{self.entry}: {name} must be {numpy_type.__name__}, " \
                                                  f"got {type(value).__name__}"
                values.append(c_value(value))
        error = self.runner(*values)
        assert not (self.lanes and error), f"{self.entry}: {FIBER_ERRORS.get(error, error)}"


class ElementwiseOnCpu:
    """``cupy.ElementwiseKernel`` run on the CPU: ``kernel(*inputs[, *outputs])`` broadcasts its array
    arguments, makes the outputs not given, writes those given in place, and returns the outputs."""

    def __init__(self, source):
        self.source = source
        self.inputs, self.outputs = parameters(source.in_params), parameters(source.out_params)

    def __call__(self, *arguments):
        count = len(self.inputs)
        assert len(arguments) in (count, count + len(self.outputs)), f"{self.source.name}: {len(arguments)} arguments"
        given = dict(zip(self.outputs, arguments[count:]))
        declared = list(zip(self.inputs + self.outputs, arguments))
        floating = next(value.dtype for (kind, _), value in declared if kind == "T" and hasattr(value, "dtype"))
        shape = numpy.broadcast_shapes(*(value.shape for _, value in declared if isinstance(value, numpy.ndarray)))
        values, arrays = {}, set()
        for (kind, name), value in zip(self.inputs, arguments):
            if isinstance(value, numpy.ndarray):
                assert value.dtype == (floating if kind == "T" else kind), f"{self.source.name}: {name} {value.dtype}"
                values[name], arrays = numpy.ascontiguousarray(numpy.broadcast_to(value, shape)), arrays | {name}
            else:
                assert kind != "T" or not isinstance(value, numpy.generic) or value.dtype == floating, \
                    f"{self.source.name}: {name} is {value.dtype} for {floating} arrays (CuPy refuses the mix)"
                values[name] = value
        for kind, name in self.outputs:
            values[name] = numpy.empty(shape, dtype=floating if kind == "T" else kind)
            if (kind, name) in given:
                values[name][...] = given[kind, name]  # an output may be read first (Adam's m and v)
        compile_for_cpu(self.source, floating, arrays)(**values)
        results = []
        for kind, name in self.outputs:
            if (kind, name) in given:
                given[kind, name][...] = values[name]
            results.append(given.get((kind, name), values[name]))
        return results[0] if len(results) == 1 else tuple(results)


def leading_dimension(operand):
    """What ``cupy.cublas`` passes cuBLAS as an operand's leading dimension (``_decide_ld_and_trans``,
    or the F-ordered copy it makes of an operand in neither order)."""
    return operand.shape[1] if operand.flags.c_contiguous and not operand.flags.f_contiguous else operand.shape[0]


class CublasOnCpu:
    """``cupy.cublas``'s ``gemm`` and ``gemv`` on NumPy arrays, with CuPy's checks (dimensions, one dtype,
    shapes; ``gemv`` passes its vectors with stride 1, so they must be contiguous) and cuBLAS's (every
    leading dimension at least 1: CuPy passes 0 for an empty operand, and cuBLAS refuses it); and
    ``cuda_products``' strided batched GEMM, read from memory as cuBLAS reads it."""

    def __init__(self, launched):
        self.launched = launched

    def gemm(self, transa, transb, a, b, out=None, alpha=1.0, beta=0.0):
        assert a.ndim == b.ndim == 2 and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        op_a, op_b = (a.T if transa == "T" else a), (b.T if transb == "T" else b)
        assert out is not None and out.shape == (op_a.shape[0], op_b.shape[1]) and out.dtype == a.dtype
        assert op_a.shape[1] == op_b.shape[0] and min(map(leading_dimension, (a, b, out))) >= 1
        self.launched.append("cublas.gemm")
        out[...] = alpha * (op_a @ op_b) + beta * out
        return out

    def gemv(self, transa, alpha, a, x, beta, y):
        assert a.ndim == 2 and x.ndim == y.ndim == 1 and a.dtype == x.dtype == y.dtype
        op_a = a.T if transa == "T" else a
        assert op_a.shape == (y.shape[0], x.shape[0]) and x.flags.c_contiguous and y.flags.c_contiguous
        assert leading_dimension(a) >= 1
        self.launched.append("cublas.gemv")
        y[...] = alpha * (op_a @ x) + beta * y

    def strided_batched_gemm(self, transpose_p, transpose_q, m, n, k, p, p_stack, q, q_stack, c, count):
        """``cuda_products.strided_batched_gemm``: cuBLAS's column-major ``C_i = op(P_i) op(Q_i)``, read from the
        operands' memory as the ``Stack``s describe it, which must reach each operand's entries and no others."""
        assert p.dtype == q.dtype == c.dtype and c.flags.c_contiguous and c.size == count * m * n
        p_matrices = stored_by_columns(p, p_stack, (k, m) if transpose_p else (m, k), count)
        q_matrices = stored_by_columns(q, q_stack, (n, k) if transpose_q else (k, n), count)
        op_p = p_matrices.transpose(0, 2, 1) if transpose_p else p_matrices
        op_q = q_matrices.transpose(0, 2, 1) if transpose_q else q_matrices
        self.launched.append("cublas.gemmStridedBatched")
        stored_by_columns(c, Stack(m * n, m, False), (m, n), count)[...] = op_p @ op_q


def stored_by_columns(x, stack, shape, count):
    """The ``count`` (rows, cols) matrices that cuBLAS reads from ``x``'s first entry: columns ``stack.leading``
    entries apart (at least ``rows``, as cuBLAS requires), matrices ``stack.batch`` apart. They must be
    ``x``'s own entries, each once."""
    rows, cols = shape
    assert stack.leading >= max(1, rows), (stack, shape)
    size = x.itemsize
    view = numpy.lib.stride_tricks.as_strided(x, (count, rows, cols), (stack.batch * size, size, stack.leading * size))
    assert sorted(entry_offsets(view)) == sorted(entry_offsets(x)), "the stack reaches entries not the operand's"
    return view


def entry_offsets(x):
    """Each entry's distance in bytes from ``x``'s first entry."""
    return sum(numpy.arange(size).reshape((-1,) + (1,) * (x.ndim - axis - 1)) * stride
               for axis, (size, stride) in enumerate(zip(x.shape, x.strides))).ravel().tolist()


def run_gpu_lines_on_cpu(monkeypatch, lanes=False):
    """Make the layers take their GPU lines, with the GPU kernels compiled for the CPU, on NumPy arrays.
    Returns the list to which each launch appends its kernel's name. A ``Raw`` kernel runs with one
    lane a row (fast), unless ``lanes`` or its threads share memory: then with its whole blocks."""
    import sys

    from mnn import kernels
    from mnn.kernels import cuda, cuda_products

    launched = []

    def recorded(name, kernel):
        def launch(*arguments):
            launched.append(name)
            return kernel(*arguments)
        return launch

    def compiled(source):
        return recorded(source.name, ElementwiseOnCpu(source))

    def compiled_raw(source, dtype_name):
        if dtype_name not in cuda.C_FLOATING:
            raise TypeError(f"{source.name}: no entry for {dtype_name} arrays, only for float32 and float64")
        entry = f"{source.name}_{cuda.C_FLOATING[dtype_name]}"
        shares_memory = "__syncthreads" in source.code  # its threads need each other: the whole block, as fibers
        return recorded(source.name, RawKernelOnCpu(source, entry, lanes=lanes or shares_memory))

    monkeypatch.setitem(sys.modules, "cupy", numpy)
    cublas = CublasOnCpu(launched)
    monkeypatch.setattr(numpy, "cublas", cublas, raising=False)  # from cupy import cublas
    monkeypatch.setattr(cuda_products, "strided_batched_gemm", cublas.strided_batched_gemm)
    monkeypatch.setattr(cuda, "compiled", compiled)
    monkeypatch.setattr(cuda, "compiled_raw", compiled_raw)
    monkeypatch.setattr(kernels, "fused", lambda *arrays: False)
    monkeypatch.setattr(kernels, "fused_gpu", lambda *arrays: kernels.mode() == "fused" and all(
        isinstance(a, numpy.ndarray) and a.dtype.name in kernels.COMPILED_DTYPES for a in arrays))
    return launched
