"""Sixteen float32 numbers as one value: what a matrix product's inner loop is written in.

A fast product keeps its running sums in registers: each sum a vector of sixteen columns of
the output, updated at every k by one fused multiply-add, ``sums = w[k, j:j + 16] * x[k] + sums``,
and added into memory once, at the end. numba vectorises loops by itself, but not this way: it
cannot hold a vector across a loop unless the vector is a value of the program. This module
makes it one. ``Float32x16`` is a numba type whose values are LLVM's ``<16 x float>``, and the
functions below are its only operations, each a line of LLVM (``numba.extending.intrinsic``):

- ``load(row, k)``: ``row[k:k + 16]`` as a vector;
- ``store(row, k, v)``: ``row[k:k + 16] = v``;
- ``splat(x)``: sixteen copies of the float32 ``x``;
- ``zeros()``;
- ``fma(a, b, c)``: ``a * b + c`` lane by lane, rounded once (``llvm.fma``).

``row`` is a one-dimensional, contiguous float32 array (numba refuses others, and read-only ones
for ``store``); ``load`` and ``store`` do not check that sixteen numbers from ``k`` on lie inside
it: their callers guarantee it. With AVX-512 a vector is one register; with AVX2, LLVM splits
each operation in two.

numba's disk cache knows a kernel by its own file only: after editing this one, delete the cached
kernels of the files that use it (``cpu_sequence``'s, in ``__pycache__`` or ``NUMBA_CACHE_DIR``).
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16
_VECTOR = ir.VectorType(ir.FloatType(), LANES)


class Float32x16(types.Type):
    """numba's type of a value of sixteen float32 lanes."""

    def __init__(self):
        super().__init__(name="float32x16")


float32x16 = Float32x16()


@register_model(Float32x16)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VECTOR)


def _is_float32_row(row, written=False):
    """A one-dimensional, contiguous float32 array (a strided row would be read as if contiguous); one
    that ``store`` writes must be writable."""
    return (isinstance(row, types.Array) and row.ndim == 1 and row.dtype == types.float32 and row.layout == "C"
            and (row.mutable or not written))


def _vector_pointer(context, builder, row_type, row, k):
    """The address of row[k], as a pointer to sixteen floats."""
    array = context.make_array(row_type)(context, builder, row)
    element = cgutils.get_item_pointer(context, builder, row_type, array, [k], wraparound=False)
    return builder.bitcast(element, _VECTOR.as_pointer())


@intrinsic
def load(typingctx, row, k):
    if not (_is_float32_row(row) and isinstance(k, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        return builder.load(_vector_pointer(context, builder, signature.args[0], *args), align=4)
    return float32x16(row, k), codegen


@intrinsic
def store(typingctx, row, k, vector):
    if not (_is_float32_row(row, written=True) and isinstance(k, types.Integer) and vector == float32x16):
        return None

    def codegen(context, builder, signature, args):
        row_value, k_value, vector_value = args
        builder.store(vector_value, _vector_pointer(context, builder, signature.args[0], row_value, k_value),
                      align=4)
        return context.get_dummy_value()
    return types.none(row, k, vector), codegen


@intrinsic
def splat(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        one = builder.insert_element(ir.Constant(_VECTOR, ir.Undefined), args[0], ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(one, ir.Constant(_VECTOR, ir.Undefined),
                                      ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES))
    return float32x16(x), codegen


@intrinsic
def zeros(typingctx):
    def codegen(context, builder, signature, args):
        return ir.Constant(_VECTOR, [0.0] * LANES)
    return float32x16(), codegen


@intrinsic
def fma(typingctx, a, b, c):
    if not a == b == c == float32x16:
        return None

    def codegen(context, builder, signature, args):
        function_type = ir.FunctionType(_VECTOR, [_VECTOR] * 3)
        return builder.call(cgutils.get_or_insert_function(builder.module, function_type, "llvm.fma.v16f32"), args)
    return float32x16(a, b, c), codegen
