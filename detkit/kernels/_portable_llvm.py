"""LLVM intrinsics for the portable kernels: a real fused multiply-add, exact rint, bit casts.

Python 3.11 has no ``math.fma`` and numba (without fastmath, which detkit never uses)
never contracts ``a * b + c``; ``fma32`` emits ``llvm.fma.f32``, which LLVM lowers to
``vfmadd`` where the target CPU has FMA and to the C library's correctly rounded
``fmaf`` where it does not (``NUMBA_CPU_NAME=generic``). Either way the result is the
single-rounding IEEE fma that the canonical orders require.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

_F32 = ir.FloatType()
_F64 = ir.DoubleType()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


@intrinsic
def fma32(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """fp32 ``a * b + c`` rounded once."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.fma(args[0], args[1], args[2])

    return sig, codegen


@intrinsic
def rint32(typingctx, x):  # type: ignore[no-untyped-def]
    """Round to integral, ties to even (exact)."""
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        fn = builder.module.declare_intrinsic("llvm.rint", [_F32])
        return builder.call(fn, [args[0]])

    return sig, codegen


@intrinsic
def rint64(typingctx, x):  # type: ignore[no-untyped-def]
    """binary64 round to integral, ties to even (exact): Pow's ``rint``."""
    sig = types.float64(types.float64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        fn = builder.module.declare_intrinsic("llvm.rint", [_F64])
        return builder.call(fn, [args[0]])

    return sig, codegen


@intrinsic
def bits_to_f64(typingctx, x):  # type: ignore[no-untyped-def]
    """Reinterpret an int64 bit pattern as binary64."""
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], _F64)

    return sig, codegen


@intrinsic
def f64_to_bits(typingctx, x):  # type: ignore[no-untyped-def]
    """Reinterpret a binary64 as its int64 bit pattern."""
    sig = types.int64(types.float64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], _I64)

    return sig, codegen


@intrinsic
def bits_to_f32(typingctx, x):  # type: ignore[no-untyped-def]
    """Reinterpret an int32 bit pattern as fp32."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], _F32)

    return sig, codegen


@intrinsic
def f32_to_bits(typingctx, x):  # type: ignore[no-untyped-def]
    """Reinterpret an fp32 as its int32 bit pattern."""
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], _I32)

    return sig, codegen

