"""The numba machinery every kernel module shares. Private, and imported only by them.

What is here: the thread count and the choice between a kernel and its serial twin
(:func:`threads`, :func:`_chunks`, :func:`_launch`, :func:`serial_twin`,
:data:`PARALLEL_MIN_WORK`), the fastmath flag sets, the norms' elementwise maps as the
kernels evaluate them (:func:`_f_and_flogf`, :func:`_f_only`) and the vectorisable log2
(:func:`_log2_f32_bits`, :func:`_log2_f64`, :func:`_lin_terms`) with the LLVM intrinsics
they are made of.

Each algorithm's kernels live in a private module beside it (the block fills in
``connectivity/_fill_kernels.py``, the sparse reduction in ``engines/_block_kernels.py``,
the implicit passes in ``engines/_dense_kernels.py`` and ``engines/_conv_kernels.py``, the
column terms in ``_entropy_kernels.py``). Each kernel fills preallocated arrays whose row
pointers were computed (vectorised) by the caller, so the parallel loops write disjoint
slots and need no synchronisation. These modules import numba, so nothing imports them at
``import foresight_sparse``: the numeric forms reach them through
:func:`foresight_sparse.backends.numba_kernels` on first use.
"""

from __future__ import annotations

from types import FunctionType

import llvmlite.ir as ir
import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from .norms import KIND_LIN, KIND_NONE, KIND_SOFT

__all__: list[str] = []

#: Below this much work (elements touched) a kernel runs serially: waking the thread pool
#: costs more than the work, and much more on a busy machine.
PARALLEL_MIN_WORK = 1 << 16

_SERIAL: dict = {}


def threads() -> int:
    """Threads the parallel kernels use."""
    return numba.get_num_threads()


def _chunks(n: int, per_thread: int = 4, work: int | None = None) -> int:
    """How many slices to cut ``n`` items into for a parallel kernel (at least 1); one
    when ``work`` is given and small enough for :func:`_launch` to run the serial twin."""
    if work is not None and work < PARALLEL_MIN_WORK:
        return 1
    return max(1, min(threads() * per_thread, n))


def _launch(kernel, work: int, *args):
    """Run ``kernel`` in parallel for large ``work``, else its serial twin (same code,
    ``prange`` read as ``range``, compiled and cached on first use). On one thread the
    twin always runs: no parallel region opens, so a process forked after numba started
    its threading layer (a sweep's worker) never uses the pool it inherited."""
    if work >= PARALLEL_MIN_WORK and threads() > 1:
        return kernel(*args)
    serial = _SERIAL.get(kernel)
    if serial is None:
        serial = _SERIAL[kernel] = serial_twin(kernel)
    return serial(*args)


@intrinsic
def _wide_vectors(typingctx):
    """Let LLVM vectorise the function being compiled with 512-bit registers.

    On CPUs with AVX-512, LLVM caps auto-vectorisation at 256 bits unless the function
    carries ``"prefer-vector-width"="512"`` (clang's ``-mprefer-vector-width``); numba has
    no option for it, so this call, placed in a ``prange`` body (which numba compiles as a
    function of its own), adds the attribute there. The arithmetic is the same per lane:
    results do not change. Elsewhere (no AVX-512, or an llvmlite whose attribute set
    refuses the entry) it does nothing.
    """

    def codegen(context, builder, sig, args):
        try:
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        except TypeError:  # pragma: no cover - attributes no longer a set
            pass
        return context.get_dummy_value()

    return types.none(), codegen


def serial_twin(kernel):
    """A serial ``njit`` copy of the parallel ``kernel``, under its own cache name.

    numba keys its on-disk cache by qualified name, line and bytecode, not by compile
    flags: a twin compiled from the same function object would share the kernel's cache
    entry, and whichever was compiled first would be loaded for both (a parallel kernel
    run on one thread, in every later process). The twin is a copy of the function with
    ``_serial`` appended to its name.
    """
    py = kernel.py_func
    twin = FunctionType(
        py.__code__, py.__globals__, py.__name__ + "_serial", py.__defaults__, py.__closure__
    )
    twin.__qualname__ = py.__qualname__ + "_serial"
    twin.__doc__ = py.__doc__
    opts = kernel.targetoptions
    return numba.njit(
        cache=True,
        nogil=True,
        fastmath=opts.get("fastmath", False),
        error_model=opts.get("error_model", "python"),
    )(twin)


# Reductions may be reassociated (so LLVM vectorises dot products) and contracted to FMAs;
# NaN and infinity semantics are kept (no nnan/ninf). error_model='numpy' drops the
# division-by-zero check that would keep a division scalar.
_FM_REDUCE = {"reassoc", "contract", "nsz"}
_FM_ELEMENTWISE = {"contract"}


_INV_LN2 = 1.0 / np.log(2.0)


@numba.njit(inline="always")
def _f_and_flogf(a, kind, shift):
    if kind == KIND_LIN or kind == KIND_NONE:
        if a > 0.0:
            return a, a * np.log2(a)
        return (0.0 if kind == KIND_LIN else a), 0.0
    if kind == KIND_SOFT:
        z = a - shift
        e = np.exp(z)
        return e, e * z * _INV_LN2
    # logistic, with log(sigmoid) evaluated without cancellation on either side
    if a >= 0.0:
        e = np.exp(-a)
        log_s = -np.log1p(e)
        s = 1.0 / (1.0 + e)
    else:
        e = np.exp(a)
        log_s = a - np.log1p(e)
        s = e / (1.0 + e)
    return s, s * log_s * _INV_LN2


@numba.njit(inline="always")
def _f_only(a, kind, shift):
    if kind == KIND_LIN:
        return a if a > 0.0 else 0.0
    if kind == KIND_NONE:
        return a
    if kind == KIND_SOFT:
        return np.exp(a - shift)
    if a >= 0.0:
        return 1.0 / (1.0 + np.exp(-a))
    e = np.exp(a)
    return e / (1.0 + e)


# log2 of a float32 from its bits, branch-free and gather-free, so that it vectorises:
# the bits give a = m * 2**k exactly with m in [sqrt(1/2), sqrt(2)), and
# log2 m = u * P(u**2) with u = (m - 1) / (m + 1), |u| <= 0.1716, P a degree-6 polynomial
# fitted to within 8e-17 of log2 over that range. Checked against libm on every positive
# normal float32: at most 1.42e-14 absolute error (one ulp at |log2| = 127).
_P0 = 2.8853900817779308
_P1 = 0.9617966939212377
_P2 = 0.5770780180889662
_P3 = 0.4121983038147692
_P4 = 0.32062195401100185
_P5 = 0.261292896499938
_P6 = 0.2444989006619395


@intrinsic
def _i32_as_f32(typingctx, x):
    """The float32 whose bits are the (low 32 bits of the) integer ``x``."""

    def codegen(context, builder, sig, args):
        v = args[0]
        if v.type.width != 32:
            v = builder.trunc(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(x), codegen


@intrinsic
def _f32_bits_reduce(typingctx, x):
    """Bits of a positive normal float32 ``a`` -> float64 ``(m, k)``, ``a = m * 2**k``
    exactly, ``m`` in ``[sqrt(1/2), sqrt(2))``. All integer work is on 32-bit lanes (AVX2
    has no 64-bit arithmetic shift). Other inputs give finite garbage: mask the result."""
    sig = types.UniTuple(types.float64, 2)(x)

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        b = args[0]
        if b.type.width != 32:
            b = builder.trunc(b, i32)
        tmp = builder.add(b, ir.Constant(i32, 0x40000000 - 0x3F3504F3))
        k = builder.sub(builder.lshr(tmp, ir.Constant(i32, 23)), ir.Constant(i32, 128))
        mbits = builder.sub(b, builder.shl(k, ir.Constant(i32, 23)))
        m = builder.fpext(builder.bitcast(mbits, ir.FloatType()), ir.DoubleType())
        kd = builder.sitofp(k, ir.DoubleType())
        return context.make_tuple(builder, sig.return_type, (m, kd))

    return sig, codegen


@numba.njit(inline="always")
def _log2_f32_bits(b):
    """log2 of the positive normal float32 whose bits are ``b``."""
    m, k = _f32_bits_reduce(b)
    u = (m - 1.0) / (m + 1.0)
    s = u * u
    p = _P0 + s * (_P1 + s * (_P2 + s * (_P3 + s * (_P4 + s * (_P5 + s * _P6)))))
    return k + u * p


_MIN_NORMAL64 = float(np.finfo(np.float64).tiny)


@intrinsic
def _f64_reduce(typingctx, x):
    """A positive normal float64 ``a`` -> ``(m, k)``, ``a = m * 2**k`` exactly, ``m`` in
    ``[sqrt(1/2), sqrt(2))``: :func:`_f32_bits_reduce` on the 64-bit layout. Other inputs
    give finite garbage or infinities: mask the result."""
    sig = types.UniTuple(types.float64, 2)(x)

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        b = builder.bitcast(args[0], i64)
        tmp = builder.add(b, ir.Constant(i64, 0x4000000000000000 - 0x3FE6A09E667F3BCD))
        k = builder.sub(builder.lshr(tmp, ir.Constant(i64, 52)), ir.Constant(i64, 1024))
        m = builder.bitcast(builder.sub(b, builder.shl(k, ir.Constant(i64, 52))), ir.DoubleType())
        kd = builder.sitofp(k, ir.DoubleType())
        return context.make_tuple(builder, sig.return_type, (m, kd))

    return sig, codegen


@numba.njit(inline="always")
def _log2_f64(a):
    """log2 of the positive normal float64 ``a``: :func:`_log2_f32_bits`'s polynomial on
    the exact reduction of :func:`_f64_reduce`."""
    m, k = _f64_reduce(a)
    u = (m - 1.0) / (m + 1.0)
    s = u * u
    p = _P0 + s * (_P1 + s * (_P2 + s * (_P3 + s * (_P4 + s * (_P5 + s * _P6)))))
    return k + u * p


@numba.njit(inline="always")
def _lin_terms(b):
    """The float32 with bits ``b`` as a float64 ``a``, and ``relu(a) log2 relu(a)``: the
    log of a positive normal float, 0 for the rest (a subnormal's term, below 3e-36 in
    magnitude, is dropped; for a NaN or infinity ``a`` it is non-finite or 0). The log's
    argument is clamped to the smallest normal float32, so that every lane's log is
    finite and one multiply by ``max(a, 0)`` selects the term."""
    a = np.float64(_i32_as_f32(b))
    lg = _log2_f32_bits(max(b, np.int32(0x00800000)))
    return a, max(a, 0.0) * lg
