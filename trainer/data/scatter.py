"""Write a chunk's rows, widened to float32 and scaled, to their shuffled places in a window.

This is the loader's own work on the CPU, on top of what a raw download costs: each row is read
once, from the per-thread buffer the socket just filled (a chunk, mostly still in cache), and
written once, straight to where the window's permutation puts it, so a batch is then a slice of
the window with no work left. Half floats are widened by LLVM's ``fpext`` (``vcvtph2ps`` on x86),
bfloat16 by a shift.

When rows are whole cache lines (a multiple of 16 float32s) and the window starts on one, each
line is written with one non-temporal store: the window is written now and read a batch at a time
later, and a plain store would first read every line it writes (read-for-ownership) and push this
core's cache out for it. bench/train.py (e) prints the cost: ~95 ns a row of 384 half floats on
this project's 2-core box, against ~255 with plain stores and ~160 for the gather-a-batch design
it replaced. Compiled by numba on first use (well under a second); runs without the GIL.
"""

import platform

import numpy as np
from jaxtyping import Float, Int
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_LINE = 16
"""float32s in a 64-byte cache line."""


def _load_halves(builder: ir.IRBuilder, pointer: ir.Value) -> ir.Value:
    bits = builder.load(builder.bitcast(pointer, ir.VectorType(ir.IntType(16), _LINE).as_pointer()), align=2)
    return builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), _LINE)), ir.VectorType(ir.FloatType(), _LINE))


def _load_bfloats(builder: ir.IRBuilder, pointer: ir.Value) -> ir.Value:
    """bfloat16 bits are a float32's upper half."""
    bits = builder.load(builder.bitcast(pointer, ir.VectorType(ir.IntType(16), _LINE).as_pointer()), align=2)
    wide = builder.zext(bits, ir.VectorType(ir.IntType(32), _LINE))
    wide = builder.shl(wide, ir.VectorType(ir.IntType(32), _LINE)([ir.IntType(32)(16)] * _LINE))
    return builder.bitcast(wide, ir.VectorType(ir.FloatType(), _LINE))


def _load_singles(builder: ir.IRBuilder, pointer: ir.Value) -> ir.Value:
    return builder.load(builder.bitcast(pointer, ir.VectorType(ir.FloatType(), _LINE).as_pointer()), align=4)


def _line_writer(load, nontemporal: bool):
    """An intrinsic ``(src, i, dst, j, scale)``: ``dst.flat[j : j + 16] = load(src.flat[i : i + 16]) *
    scale``, as one store of a whole line (``dst.flat[j]`` 64-byte aligned when ``nontemporal``)."""

    @intrinsic
    def write_line(typingctx, src, i, dst, j, scale):
        def codegen(context, builder, signature, args):
            source = context.make_array(signature.args[0])(context, builder, value=args[0])
            target = context.make_array(signature.args[2])(context, builder, value=args[2])
            floats = ir.VectorType(ir.FloatType(), _LINE)
            splat = builder.insert_element(floats(ir.Undefined), args[4], ir.IntType(32)(0))
            splat = builder.shuffle_vector(splat, splat, ir.VectorType(ir.IntType(32), _LINE)(None))
            value = builder.fmul(load(builder, builder.gep(source.data, [args[1]])), splat)
            pointer = builder.bitcast(builder.gep(target.data, [args[3]]), floats.as_pointer())
            store = builder.store(value, pointer, align=64 if nontemporal else 4)
            if nontemporal:
                store.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
            return context.get_dummy_value()

        return types.none(src, i, dst, j, scale), codegen

    return write_line


@intrinsic
def _fence(typingctx):
    """Non-temporal stores are weakly ordered: order them before whatever this thread does next
    (``sfence``, as x86 documents for them; a full fence elsewhere)."""

    def codegen(context, builder, signature, args):
        if platform.machine().lower() in ("x86_64", "amd64"):
            sfence = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                    "llvm.x86.sse.sfence")
            builder.call(sfence, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen


def _scatter_kernel(load, nontemporal: bool):
    write_line = _line_writer(load, nontemporal)

    @njit(nogil=True, boundscheck=False)
    def scatter(rows, places, scale, out, component):
        """``out[places[r], component] = load(rows[r]) * scale``: rows a multiple of 16 wide, both
        arrays C-contiguous (``out`` on a 64-byte boundary when ``nontemporal``)."""
        d, stride = rows.shape[1], out.shape[1] * out.shape[2]
        for r in range(rows.shape[0]):
            src, dst = r * d, places[r] * stride + component * d
            for j in range(0, d, _LINE):
                write_line(rows, src + j, out, dst + j, scale)
        _fence()

    return scatter


@intrinsic
def _half_bits_to_float(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _bfloat_bits_to_float(typingctx, bits):
    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return types.float32(types.uint16), codegen


@njit(inline="always")
def _half(bits):
    return _half_bits_to_float(bits)


@njit(inline="always")
def _bfloat(bits):
    return _bfloat_bits_to_float(bits)


@njit(inline="always")
def _single(value):
    return value


@njit(nogil=True, boundscheck=False)
def _scatter_any_width(rows, places, scale, out, component, widen):
    """The same for any width and layout, a value at a time (LLVM vectorises the inner loop)."""
    for r in range(rows.shape[0]):
        src, dst = rows[r], out[places[r], component]
        for j in range(src.shape[0]):
            dst[j] = widen(src[j]) * scale


_LOADS = {"float16": (_load_halves, _half), "bfloat16": (_load_bfloats, _bfloat), "float32": (_load_singles, _single)}
_LINE_KERNELS = {(name, nt): _scatter_kernel(load, nt) for name, (load, _) in _LOADS.items() for nt in (True, False)}


def scatter_scaled(rows: Float[np.ndarray, "rows d"], places: Int[np.ndarray, " rows"], scale: float,
                   out: Float[np.ndarray, "window component d"], component: int, dtype: str) -> None:
    """``out[places[r], component] = float32(rows[r]) * scale``, for rows stored as ``dtype``
    (``float16``, ``bfloat16`` as its uint16 bits, or ``float32``)."""
    if dtype not in _LOADS or rows.itemsize != (4 if dtype == "float32" else 2):
        raise TypeError(f"cannot widen {rows.dtype} rows as {dtype}; stored rows are float16, bfloat16 or float32")
    if len(places) != len(rows) or (len(places) and not 0 <= places.min() <= places.max() < len(out)):
        raise IndexError(f"{len(rows)} rows with places out of range for a window of {len(out)} rows")
    if out.dtype != np.float32 or out.ndim != 3 or out.shape[2] != rows.shape[1] or not 0 <= component < out.shape[1]:
        raise ValueError(f"cannot write [{rows.shape[1]}]-wide rows to component {component} of {out.dtype} {out.shape}")
    stored = rows.view(np.float32 if dtype == "float32" else np.uint16)
    kernel = _kernel_for(rows, out, dtype)
    if kernel is _scatter_any_width:
        kernel(stored, places.astype(np.int64, copy=False), np.float32(scale), out, component, _LOADS[dtype][1])
    else:
        kernel(stored, places.astype(np.int64, copy=False), np.float32(scale), out, component)


def _kernel_for(rows: np.ndarray, out: np.ndarray, dtype: str):
    if rows.shape[1] % _LINE or not (rows.flags.c_contiguous and out.flags.c_contiguous):
        return _scatter_any_width
    return _LINE_KERNELS[dtype, out.ctypes.data % 64 == 0]
