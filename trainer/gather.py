"""Gather a batch of rows from a window, widen them to float32 and scale them: in one pass.

This is the loader's own work per batch, on top of what a raw download costs. With torch ops it
is three passes over memory (gather in the storage dtype, widen, scale in place); the kernel below
reads each stored row once and writes each float32 once. bench/train.py (e) prints it: ~125–165 ns
a row of 384 half floats on this project's 2-core box, against ~245 with the torch ops. It is
compiled by numba on first use (well under a second) and runs without the GIL. A window on a GPU
takes the torch ops, which run there."""

import numpy as np
import torch
from jaxtyping import Float, Int
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from torch import Tensor


@intrinsic
def _half_bits_to_float(typingctx, bits):
    """IEEE half (as its uint16 bits) -> float32: LLVM's ``fpext``, one vector instruction
    (``vcvtph2ps``) for 16 values on x86, ``fcvtl`` on ARM."""

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _bfloat_bits_to_float(typingctx, bits):
    """bfloat16 (as its uint16 bits) -> float32: the bits are a float32's upper half."""

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


@intrinsic
def _prefetch(typingctx, array, index):
    """Ask the CPU to start loading the cache line of ``array[index]`` (LLVM's ``prefetch``)."""

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, value=args[0])
        index = cgutils.unpack_tuple(builder, args[1], array_type.ndim)
        pointer = cgutils.get_item_pointer(context, builder, array_type, array, index)
        byte_pointer, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]), "llvm.prefetch.p0")
        builder.call(prefetch, [builder.bitcast(pointer, byte_pointer), i32(0), i32(3), i32(1)])  # read, keep, data
        return context.get_dummy_value()

    return types.none(array, index), codegen


_AHEAD = 8
"""Rows prefetched ahead. The window was just written by the kernel's socket copy and is not in this
core's caches, and rows come in random order, so the hardware prefetcher cannot guess the next one:
without this, the gather waits on memory for each row (~260 against ~160 ns a row, measured)."""


@njit(nogil=True, boundscheck=False)
def _gather_widened(window, order, scales, out, widen):
    """``out[i, c] = widen(window[c, order[i]]) * scales[c]``, one row at a time (vectorised)."""
    components, d, line = window.shape[0], window.shape[2], 64 // window.itemsize
    for i in range(order.shape[0] + _AHEAD):
        if i + _AHEAD < order.shape[0]:
            for c in range(components):
                for j in range(0, d, line):
                    _prefetch(window, (c, order[i + _AHEAD], j))
        if i < order.shape[0]:
            row = order[i]
            for c in range(components):
                src, dst, scale = window[c, row], out[i, c], scales[c]
                for j in range(d):
                    dst[j] = widen(src[j]) * scale


_WIDEN = {torch.float16: _half, torch.bfloat16: _bfloat, torch.float32: _single}


def gather_scaled(window: Float[Tensor, "component rows d"], order: Int[Tensor, " batch"],
                  scales: Float[Tensor, " component"],
                  out: Float[Tensor, "batch component d"] | None = None) -> Float[Tensor, "batch component d"]:
    """Rows ``order`` of every component of ``window`` (float16, bfloat16 or float32, on any
    device), as float32 times their component's scale; written to ``out`` when given (a batch
    made of two windows' rows is filled in two calls, with no concatenation)."""
    if out is None:
        out = torch.empty(order.shape[0], window.shape[0], window.shape[2], dtype=torch.float32, device=window.device)
    if out.shape != (order.shape[0], window.shape[0], window.shape[2]) or out.dtype != torch.float32:
        raise ValueError(f"cannot write {order.shape[0]} rows of {tuple(window.shape)} to {out.dtype} {tuple(out.shape)}")
    if window.dtype not in _WIDEN:
        raise TypeError(f"cannot widen {window.dtype} rows; stored rows are float16, bfloat16 or float32")
    if window.device.type != "cpu":  # index_select checks the order there, without a sync per batch
        return gather_scaled_torch(window, order, scales, out)
    if order.numel() and not 0 <= int(order.min()) <= int(order.max()) < window.shape[1]:
        raise IndexError(f"row order out of range for a window of {window.shape[1]} rows")  # the kernel does not
    stored = (window if window.dtype == torch.float32 else window.view(torch.int16)).numpy()
    _gather_widened(stored if stored.dtype == np.float32 else stored.view(np.uint16), order.numpy(),
                    scales.numpy().astype(np.float32, copy=False), out.numpy(), _WIDEN[window.dtype])
    return out


def gather_scaled_torch(window: Float[Tensor, "component rows d"], order: Int[Tensor, " batch"],
                        scales: Float[Tensor, " component"],
                        out: Float[Tensor, "batch component d"]) -> Float[Tensor, "batch component d"]:
    """The same with torch ops (three passes), for a window on a GPU, which has the bandwidth."""
    return out.copy_(window.transpose(0, 1).index_select(0, order)).mul_(scales.view(-1, 1))
