"""The seam between the compiled pieces: C functions called by a name registered with LLVM.

Promises: _by_name registers a numba.cfunc under a name, and _call_entry
makes an intrinsic that calls it from compiled code, arrays passed as
pointer and sizes; and the pointer intrinsics the C functions make their
views with (_address_of, _floats_at, _ints_at, _doubles_at).

    FLAT, FLAT_INTS, PACKED, INT, c_signature, C_FLAGS   a C function's arguments, signature and compile flags
    _by_name, _call_entry          register a C function; call it by name
    _address_of                    &array[index]
    _floats_at, _ints_at, _doubles_at   an address (int64) -> a typed pointer

Why: a Numba function that calls another links a copy of the callee's
code into its own and optimises and compiles it again: the products' and
depthwise rows' vector code was compiled six and four times over (gemm,
_stem_rows, _block_rows, _block_cols, the fused pass), and the first
process took 20 s. Called by name, each is compiled once; a call costs
nanoseconds, once per band of a product, row of a depthwise layer, or task
of a layer. The names are registered with LLVM as the package is imported,
before anything that calls them is compiled or read from the cache. The
seam also stops inlining between the files, but not all of it (intrinsics,
inline helpers, constants): cache.py covers the rest.
"""
import numba
from llvmlite import binding, ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .config import JIT

# ---------------------------------------------------------------------------
# C functions called by name


# A C function called by name takes the arguments of its call (_call_*), each
# array as its data pointer and its size(s), in this order; a C function's
# comment names its call's arguments. Their kinds, for c_signature:
FLAT = types.float32[::1]  # a flat float32 array: pointer, size
FLAT_INTS = types.int64[::1]  # a flat int64 array: pointer, size
PACKED = types.float32[:, :, ::1]  # packed weights (pack, pack_depthwise): pointer, first two sizes
INT = types.int64
C_FLAGS = dict(cache=JIT["cache"], error_model="numpy")  # no division by zero to check for, and nothing to raise


def c_signature(*args):
    """The signature of a C function called by name with arguments of these kinds (FLAT, PACKED, INT...)."""
    flat = []
    for ty in args:
        if isinstance(ty, types.Array):
            flat += [types.CPointer(ty.dtype)] + [types.int64] * (1 if ty.ndim == 1 else 2)
        else:
            flat.append(types.int64)
    return types.void(*flat)


def _by_name(name, function):
    """Registers the C function (a numba.cfunc) with LLVM as this module's name + name, for _call_entry."""
    binding.add_symbol(f"{__name__}.{name}", function.address)


def _call_entry(name, args):
    """An intrinsic's signature and code: a call of the C function registered as `name` (_by_name).

    An array argument goes as its data pointer and its size (1-d) or its
    first two sizes (3-d, the packed weights), any other as an int64.
    """
    for ty in args:
        if isinstance(ty, types.Array) and (ty.dtype not in (types.float32, types.int64) or ty.layout != "C"
                                            or ty.ndim not in (1, 3)):
            raise numba.core.errors.TypingError(f"{name}: arrays must be C-contiguous float32 or int64, 1-d or 3-d;"
                                                f" got {ty}")

    def codegen(context, builder, signature, args):
        values = []
        for ty, value in zip(signature.args, args):
            if isinstance(ty, types.Array):
                a = context.make_array(ty)(context, builder, value)
                values += [a.data, a.nitems] if ty.ndim == 1 else [a.data, *cgutils.unpack_tuple(builder, a.shape)[:2]]
            else:
                values.append(context.cast(builder, value, ty, types.int64))
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [v.type for v in values]),
                                            f"{__name__}.{name}")
        builder.call(fn, values)
        return context.get_dummy_value()

    return types.void(*args), codegen


# ---------------------------------------------------------------------------
# Pointers


@intrinsic
def _address_of(typingctx, array, index):
    # &array[index], as numba.carray takes it: views without slicing and reshaping, which compile to more code
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.gep(data, [context.cast(builder, args[1], signature.args[1], types.int64)])

    return types.CPointer(array.dtype)(array, index), codegen


def _pointer(dtype):
    """An intrinsic: an address (int64) -> a pointer to dtype, as numba.carray takes it."""
    @intrinsic
    def at(typingctx, address):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

        return types.CPointer(dtype)(types.int64), codegen

    return at


_floats_at, _ints_at, _doubles_at = _pointer(types.float32), _pointer(types.int64), _pointer(types.float64)

