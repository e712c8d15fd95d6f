"""Numba kernels. Private: they take and return plain arrays; tensors are built around them.

Each kernel fills preallocated arrays whose row pointers were computed (vectorised) by the
caller, so the parallel loops write disjoint slots and need no synchronisation.
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


@numba.njit(parallel=True, cache=True, nogil=True)
def _fill_stencil_rows(
    r0,
    n_rows,
    height,
    width,
    cin_g,
    cout_g,
    out_h,
    out_w,
    hp_ptr,
    hp_out,
    hp_tptr,
    hp_tap,
    wp_ptr,
    wp_out,
    wp_tptr,
    wp_tap,
    kernel,
    scale_h,
    scale_w,
    scaled,
    rowptr,
    cols,
    vals,
    rows,
):
    """Entries of rows ``r0 .. r0+n_rows`` of a sliding-window layer, in (row, column) order.

    Row ``r = (ci, ih, iw)`` holds, for every output channel ``co`` of its group, every
    output ``oh`` that input row ``ih`` feeds (ascending) and every ``ow`` that ``iw`` feeds,
    the sum over the contributing taps of ``kernel[co, ci_local, kh, kw]``, times the column
    scale ``scale_h[oh] * scale_w[ow]`` when ``scaled``. Columns come out ascending, so the
    result is coalesced. ``rows`` is filled only when it has room for every entry (COO).
    """
    plane = height * width
    single = hp_tap.shape[0] == hp_out.shape[0] and wp_tap.shape[0] == wp_out.shape[0]
    write_rows = rows.shape[0] == cols.shape[0]
    for t in numba.prange(n_rows):
        r = r0 + t
        ci = r // plane
        rem = r - ci * plane
        ih = rem // width
        iw = rem - ih * width
        g = ci // cin_g
        ci_l = ci - g * cin_g
        pos = rowptr[t]
        p0, p1 = hp_ptr[ih], hp_ptr[ih + 1]
        q0, q1 = wp_ptr[iw], wp_ptr[iw + 1]
        for co in range(g * cout_g, (g + 1) * cout_g):
            k2 = kernel[co, ci_l]
            base = co * out_h * out_w
            for p in range(p0, p1):
                row_base = base + hp_out[p] * out_w
                for q in range(q0, q1):
                    if single:
                        acc = k2[hp_tap[p], wp_tap[q]]
                    else:
                        acc = 0.0
                        for a in range(hp_tptr[p], hp_tptr[p + 1]):
                            for b in range(wp_tptr[q], wp_tptr[q + 1]):
                                acc += k2[hp_tap[a], wp_tap[b]]
                    if scaled:
                        acc *= scale_h[hp_out[p]] * scale_w[wp_out[q]]
                    cols[pos] = row_base + wp_out[q]
                    vals[pos] = acc
                    pos += 1
        if write_rows:
            for e in range(rowptr[t], pos):
                rows[e] = r


@numba.njit(parallel=True, cache=True, nogil=True)
def _fill_dense_rows(r0, n_rows, n_cols, cols, rows):
    """Column (and optionally row) indices of rows ``r0 .. r0+n_rows`` of a dense block."""
    write_rows = rows.shape[0] == cols.shape[0]
    for t in numba.prange(n_rows):
        pos = t * n_cols
        for j in range(n_cols):
            cols[pos + j] = j
            if write_rows:
                rows[pos + j] = r0 + t


def fill_stencil_rows(
    r0: int,
    n_rows: int,
    spec,
    rowptr: np.ndarray,
    cols: np.ndarray,
    vals: np.ndarray,
    rows: np.ndarray,
) -> None:
    """Fill ``cols``, ``vals`` (and ``rows`` when sized for it) from a stencil description.

    ``spec`` is a :class:`foresight_sparse.connectivity.Stencil`; its arrays are read as they
    are, so the kernel compiles once per dtype combination.
    """
    hp, wp = spec.pairs_h, spec.pairs_w
    _, height, width = spec.in_chw
    _, out_h, out_w = spec.out_chw
    _launch(
        _fill_stencil_rows,
        len(cols),
        r0,
        n_rows,
        height,
        width,
        spec.cin_g,
        spec.cout_g,
        out_h,
        out_w,
        hp.ptr,
        hp.out,
        hp.tap_ptr,
        hp.tap,
        wp.ptr,
        wp.out,
        wp.tap_ptr,
        wp.tap,
        spec.kernel_np,
        spec.scale_h,
        spec.scale_w,
        spec.scaled,
        rowptr,
        cols,
        vals,
        rows,
    )


def fill_dense_rows(r0: int, n_rows: int, n_cols: int, cols: np.ndarray, rows: np.ndarray) -> None:
    """Fill the indices of a fully connected row block."""
    _launch(_fill_dense_rows, len(cols), r0, n_rows, n_cols, cols, rows)


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


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=_FM_REDUCE, error_model="numpy")
def _reduce_rows(
    rowptr,
    cols,
    vals,
    bits,
    kind,
    shift,
    c,
    clogc,
    n_cols,
    normalizes,
    max_row,
    col_acc,
    h_out,
    off_out,
):
    """Row entropies and column sums of one CSR block under an elementwise norm.

    For each row: ``Z = sum f + c * m``, ``T = sum f log2 f + c log2 c * m`` with ``m`` the
    absent entries, ``H = log2 Z - T / Z``; each stored entry adds ``(f - c) / Z`` to its
    column and every column receives ``c / Z``. Thread ``t`` accumulates its rows' columns
    into ``col_acc[t]`` (no races), its sum of ``H`` into ``h_out[t]`` and of ``c / Z``
    into ``off_out[t]``. The softmax (``KIND_SOFT``) shifts each row by its own largest entry
    (and 0 when it has absent entries), so no row underflows whatever the layer's range.
    A row with no absent entry uses ``c = 0``, which is exact and avoids cancellation.
    """
    n_rows = rowptr.shape[0] - 1
    n_chunks = col_acc.shape[0]
    fast = bits.shape[0] == vals.shape[0]  # float32 values under relu: vectorised log2
    for t in numba.prange(n_chunks):
        lo = n_rows * t // n_chunks
        hi = n_rows * (t + 1) // n_chunks
        buf = np.empty(max_row, dtype=np.float64)
        acc = col_acc[t]
        h_sum = 0.0
        off_sum = 0.0
        for r in range(lo, hi):
            start = rowptr[r]
            stop = rowptr[r + 1]
            m = n_cols - (stop - start)
            s_r, c_r, clogc_r = shift, c, clogc
            if kind == KIND_SOFT:
                s_r = 0.0 if m > 0 else -np.inf
                for e in range(start, stop):
                    s_r = max(s_r, np.float64(vals[e]))
                c_r = np.exp(-s_r)
                clogc_r = c_r * (-s_r) * _INV_LN2
            if m == 0:
                # a full row: c cancels out of its column terms, and keeping it would make
                # c/Z - c/Z + f/Z lose every digit when Z << c (very negative weights)
                c_r = 0.0
                clogc_r = 0.0
            z = 0.0
            tt = 0.0
            if fast:  # branch-free, so this loop vectorises
                for e in range(start, stop):
                    a, flf = _lin_terms(bits[e])
                    f = max(a, 0.0)
                    buf[e - start] = f
                    z += f
                    tt += flf
            else:
                for e in range(start, stop):
                    f, flf = _f_and_flogf(np.float64(vals[e]), kind, s_r)
                    buf[e - start] = f
                    z += f
                    tt += flf
            if normalizes:
                z += c_r * m
                tt += clogc_r * m
            else:
                z = 1.0
            if z > 0.0:
                inv = 1.0 / z
                h_sum += np.log2(z) - tt * inv
                off_sum += c_r * inv
                for e in range(start, stop):
                    acc[cols[e]] += (buf[e - start] - c_r) * inv
        h_out[t] = h_sum
        off_out[t] = off_sum


def reduce_rows(
    rowptr: np.ndarray,
    cols: np.ndarray,
    vals: np.ndarray,
    kind: int,
    shift: float,
    c: float,
    clogc: float,
    n_cols: int,
    normalizes: bool,
    col_acc: np.ndarray,
) -> tuple[float, float]:
    """Add one block's column contributions to ``col_acc``; return (sum of H, sum of c/Z).

    ``col_acc`` is a ``(threads, n_cols)`` float64 array from :func:`column_accumulator`,
    kept across the blocks of a layer; its rows sum to the layer's column sums. The
    constant ``sum(c/Z)`` that every column receives is left to the caller.
    """
    n_chunks = col_acc.shape[0]
    h_out = np.zeros(n_chunks)
    off_out = np.zeros(n_chunks)
    max_row = int(np.max(np.diff(rowptr), initial=0))
    bits = (
        vals.view(np.int32)
        if vals.dtype == np.float32 and kind == KIND_LIN
        else np.empty(0, dtype=np.int32)
    )
    _launch(
        _reduce_rows,
        len(vals),
        rowptr,
        cols,
        vals,
        bits,
        kind,
        shift,
        c,
        clogc,
        n_cols,
        normalizes,
        max_row,
        col_acc,
        h_out,
        off_out,
    )
    return float(h_out.sum()), float(off_out.sum())


def column_accumulator(n_cols: int) -> np.ndarray:
    """Per-thread column sums for :func:`reduce_rows`: zeros of shape ``(threads, n_cols)``."""
    return np.zeros((threads(), n_cols), dtype=np.float64)


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


@numba.njit(parallel=True, cache=True, nogil=True)
def _dense_row_sums(w, kind, shift, z, t, n_chunks):
    """``z[g, i] = sum_o f(w[g, o, i])`` and ``t[g, i] = sum_o f log2 f``; threads own
    (group, column slice) pairs."""
    n_g, n_out, n_in = w.shape
    for task in numba.prange(n_g * n_chunks):
        g = task // n_chunks
        ch = task - g * n_chunks
        lo = n_in * ch // n_chunks
        hi = n_in * (ch + 1) // n_chunks
        for o in range(n_out):
            for i in range(lo, hi):
                f, flf = _f_and_flogf(np.float64(w[g, o, i]), kind, shift)
                z[g, i] += f
                t[g, i] += flf


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=_FM_ELEMENTWISE, error_model="numpy")
def _dense_row_sums_relu32(bits, keep_negative, z_out, t_out, n_chunks, bad_out):
    """:func:`_dense_row_sums` for float32 weights (read as their bits) under ``relu``, or
    with no norm (``keep_negative``: ``z`` sums every entry, ``t`` the positive ones).
    ``bad_out[task]`` is 1 where the task read a NaN or infinite weight, else 0, so that
    the pass doubles as the layer's finiteness check: the float64 sum of every weight it
    read (``z`` itself with no norm) is finite exactly when they all are, since no sum of
    float32 values overflows a float64.

    Branch-free with the polynomial :func:`_log2_f32_bits`, so LLVM vectorises it across
    columns (four lanes with AVX2, eight with AVX-512: see :func:`_wide_vectors`). Each
    task sums its column slice into local arrays, four rows per sweep (one load and store
    of the sums per four rows), and writes them out once. It stores nothing per entry:
    the implicit engine makes ``f(K)`` with torch where it needs it.
    """
    n_g, n_out, n_in = bits.shape
    rows = bits.reshape((n_g * n_out, n_in))  # 2-d row slices keep their contiguity
    for task in numba.prange(n_g * n_chunks):
        _wide_vectors()  # the polynomial log is compute-bound: twice the lanes pay
        g = task // n_chunks
        ch = task - g * n_chunks
        lo = n_in * ch // n_chunks
        hi = n_in * (ch + 1) // n_chunks
        n = hi - lo
        z = np.zeros(n)
        t = np.zeros(n)
        # under relu, the sum of every weight read. Its own array even with no norm (where
        # z is that sum): with s bound to z the loop lost its vectorisation, 4x slower
        s = np.zeros(n)
        o = 0
        base = g * n_out
        while o + 4 <= n_out:
            r0 = rows[base + o, lo:hi]
            r1 = rows[base + o + 1, lo:hi]
            r2 = rows[base + o + 2, lo:hi]
            r3 = rows[base + o + 3, lo:hi]
            for j in range(n):
                a0, t0 = _lin_terms(r0[j])
                a1, t1 = _lin_terms(r1[j])
                a2, t2 = _lin_terms(r2[j])
                a3, t3 = _lin_terms(r3[j])
                z0 = _relu_or_identity(a0, keep_negative)
                z1 = _relu_or_identity(a1, keep_negative)
                z2 = _relu_or_identity(a2, keep_negative)
                z3 = _relu_or_identity(a3, keep_negative)
                z[j] += (z0 + z1) + (z2 + z3)
                t[j] += (t0 + t1) + (t2 + t3)
                if not keep_negative:
                    s[j] += (a0 + a1) + (a2 + a3)
            o += 4
        while o < n_out:
            r0 = rows[base + o, lo:hi]
            for j in range(n):
                a0, t0 = _lin_terms(r0[j])
                z[j] += _relu_or_identity(a0, keep_negative)
                t[j] += t0
                if not keep_negative:
                    s[j] += a0
            o += 1
        z_out[g, lo:hi] = z
        t_out[g, lo:hi] = t
        total = 0.0
        read = z if keep_negative else s
        for j in range(n):
            total += read[j]
        bad_out[task] = 0 if np.isfinite(total) else 1


@numba.njit(inline="always")
def _relu_or_identity(x, keep_negative):
    if keep_negative:
        return x
    return max(x, 0.0)


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=_FM_REDUCE, error_model="numpy")
def _dense_cols(w, kind, shift, c, inv, col):
    """``col[o] = sum_i (f(w[o, i]) - c) * inv[i]``.

    ``relu`` and no norm: four rows per task share each load of ``inv``, and the
    reassociated dot products vectorise (W is read once, streaming). Other norms: one row
    per task through :func:`_f_only` (``exp`` stays scalar).
    """
    n_out, n_in = w.shape
    if kind == KIND_LIN or kind == KIND_NONE:
        keep_negative = kind == KIND_NONE
        for ob in numba.prange((n_out + 3) // 4):
            o = ob * 4
            if o + 4 <= n_out:
                r0 = w[o]
                r1 = w[o + 1]
                r2 = w[o + 2]
                r3 = w[o + 3]
                a0 = 0.0
                a1 = 0.0
                a2 = 0.0
                a3 = 0.0
                for i in range(n_in):
                    v = inv[i]
                    a0 += (_relu_or_identity(np.float64(r0[i]), keep_negative) - c) * v
                    a1 += (_relu_or_identity(np.float64(r1[i]), keep_negative) - c) * v
                    a2 += (_relu_or_identity(np.float64(r2[i]), keep_negative) - c) * v
                    a3 += (_relu_or_identity(np.float64(r3[i]), keep_negative) - c) * v
                col[o] = a0
                col[o + 1] = a1
                col[o + 2] = a2
                col[o + 3] = a3
            else:
                for oo in range(o, n_out):
                    acc = 0.0
                    for i in range(n_in):
                        acc += (_relu_or_identity(np.float64(w[oo, i]), keep_negative) - c) * inv[i]
                    col[oo] = acc
    else:
        for o in numba.prange(n_out):
            acc = 0.0
            for i in range(n_in):
                acc += (_f_only(np.float64(w[o, i]), kind, shift) - c) * inv[i]
            col[o] = acc


def dense_row_sums(
    w: np.ndarray, kind: int, shift: float, non_finite: list | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise ``sum f`` and ``sum f log2 f`` of a weight matrix (float64).

    ``w`` is ``(n_out, n_in)``, or ``(groups, n_out, n_in)`` for one sum per group (a
    grouped convolution's kernel, flattened per output channel); the sums have ``w``'s
    shape without the ``n_out`` axis. Where the pass reads float32 bits under ``relu`` or
    no norm, it also counts the NaN and infinite weights, appended to ``non_finite`` when
    a list is given (nothing is appended on the other paths).
    """
    w3 = w if w.ndim == 3 else w[None]
    n_g, _, n_in = w3.shape
    z = np.zeros((n_g, n_in))
    t = np.zeros((n_g, n_in))
    # column slices of at least 256: each task takes four row views per sweep, which cost
    # more than a short slice's arithmetic; one slice per group when the work runs serially
    n_chunks = 1 if w3.size < PARALLEL_MIN_WORK else max(1, min(threads() * 4 // n_g, n_in // 256))
    if w3.dtype == np.float32 and kind in (KIND_LIN, KIND_NONE):
        bad = np.zeros(n_g * n_chunks, dtype=np.int64)
        _launch(
            _dense_row_sums_relu32,
            w3.size,
            w3.view(np.int32),
            kind == KIND_NONE,
            z,
            t,
            n_chunks,
            bad,
        )
        if non_finite is not None:
            # the pass only flags them: count them where there are any
            n_bad = 0
            if bad.any():
                n_bad = int(np.count_nonzero(~np.isfinite(w3)))
            non_finite.append(n_bad)
    else:
        _launch(_dense_row_sums, w3.size, w3, kind, shift, z, t, n_chunks)
    return (z, t) if w.ndim == 3 else (z[0], t[0])


def dense_cols(w: np.ndarray, kind: int, shift: float, c: float, inv: np.ndarray) -> np.ndarray:
    """Row-wise ``sum (f - c) * inv`` of a weight matrix (float64)."""
    col = np.empty(w.shape[0])
    _launch(_dense_cols, w.size, w, kind, shift, c, inv, col)
    return col


@numba.njit(inline="always")
def _signed_x_log_x(x, w):
    """``w x`` and ``w x log2 x`` for positive ``x``, ``w x`` and ``-w x log2 -x`` for negative
    ``x`` (zeros elsewhere, NaN included; a subnormal ``|x|``'s log term, below 1e-305 in
    magnitude, is dropped). Branch-free, with :func:`_log2_f64`, so that loops vectorise."""
    ax = abs(x)
    wx = w * x
    wxl = wx * _log2_f64(ax) if ax >= _MIN_NORMAL64 else 0.0
    pos = x > 0.0
    neg = x < 0.0
    return (wx if pos else 0.0), (wxl if pos else 0.0), (wx if neg else 0.0), (-wxl if neg else 0.0)


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=_FM_REDUCE, error_model="numpy")
def _column_terms(v, add, weights, n_chunks, out):
    n = v.shape[0]
    weighted = weights.shape[0] == n
    for ch in numba.prange(n_chunks):
        _wide_vectors()
        lo = n * ch // n_chunks
        hi = n * (ch + 1) // n_chunks
        ap = 0.0
        bp = 0.0
        an = 0.0
        bn = 0.0
        # two loops, so that neither loads a weight conditionally (which would keep LLVM
        # from vectorising it)
        if weighted:
            for i in range(lo, hi):
                a, b, c, d = _signed_x_log_x(np.float64(v[i]) + add, weights[i])
                ap += a
                bp += b
                an += c
                bn += d
        else:
            for i in range(lo, hi):
                a, b, c, d = _signed_x_log_x(np.float64(v[i]) + add, 1.0)
                ap += a
                bp += b
                an += c
                bn += d
        out[ch, 0] = ap
        out[ch, 1] = bp
        out[ch, 2] = an
        out[ch, 3] = bn


#: The vectorised float64 log2 costs about as much as this many elements of a streaming
#: kernel: what :func:`_launch` weighs such an element as.
_LOG_WORK = 4


def column_terms(v: np.ndarray, add: float = 0.0, weights: np.ndarray | None = None) -> np.ndarray:
    """``[sum x, sum x log2 x]`` over positive ``x = v + add`` and the same for ``-x`` over
    negative ``x``, entry ``i`` counted ``weights[i]`` times if given: what the entropy of
    the normalised vector needs (float64, shape (4,))."""
    work = _LOG_WORK * v.shape[0]
    n_chunks = _chunks(v.shape[0], work=work)
    out = np.zeros((n_chunks, 4))
    w = np.empty(0) if weights is None else weights
    _launch(_column_terms, work, v, add, w, n_chunks, out)
    return out.sum(axis=0)


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


# --------------------------------------------------------------------------- position classes


@numba.njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _class_rows(
    sf,
    st,
    mh,
    mw,
    cnt_h,
    cnt_w,
    mult_h,
    mult_w,
    cout_g,
    n_cols,
    c,
    clogc,
    normalizes,
    n_chunks,
    inv_full,
    inv_part,
):
    """The implicit engine's row pass on position classes (see
    :func:`foresight_sparse.engines.implicit.column_classes`).

    For input channel ``ci`` and input classes ``(a, b)``: ``Z = sum mh[a, kh] mw[b, kw]
    sf[ci, kh, kw]`` plus ``c`` per absent entry (``T`` likewise with ``st``), ``H = log2 Z
    - T / Z``; the double sum is taken along W first, then along H (separable: about
    ``KH + KW`` multiply-adds per class instead of ``KH * KW``). ``1/Z`` goes to
    ``inv_full`` for rows with no absent entry (whose columns take ``f`` alone) and to
    ``inv_part`` otherwise. Returns the class-weighted sum of ``H`` and of ``c / Z``.
    """
    n_ci, n_kh, n_kw = sf.shape
    n_a = mh.shape[0]
    n_b = mw.shape[0]
    h_sum = 0.0
    off = 0.0
    for ch in numba.prange(n_chunks):
        uz = np.empty((n_kh, n_b))
        ut = np.empty((n_kh, n_b))
        h_part = 0.0
        off_part = 0.0
        for ci in range(n_ci * ch // n_chunks, n_ci * (ch + 1) // n_chunks):
            for kh in range(n_kh):
                for b in range(n_b):
                    z = 0.0
                    t = 0.0
                    for kw in range(n_kw):
                        w = mw[b, kw]
                        z += w * sf[ci, kh, kw]
                        t += w * st[ci, kh, kw]
                    uz[kh, b] = z
                    ut[kh, b] = t
            for a in range(n_a):
                for b in range(n_b):
                    z = 0.0
                    t = 0.0
                    for kh in range(n_kh):
                        ph = mh[a, kh]
                        z += ph * uz[kh, b]
                        t += ph * ut[kh, b]
                    stored = cout_g * cnt_h[a] * cnt_w[b]
                    if normalizes:
                        z += c * (n_cols - stored)
                        t += clogc * (n_cols - stored)
                    else:
                        z = 1.0
                    m = mult_h[a] * mult_w[b]
                    inv = 0.0
                    if z > 0.0:
                        inv = 1.0 / z
                        h_part += m * (np.log2(z) - t * inv)
                    if stored == n_cols:
                        inv_full[ci, a, b] = inv
                        inv_part[ci, a, b] = 0.0
                    else:
                        inv_full[ci, a, b] = 0.0
                        inv_part[ci, a, b] = inv
                        off_part += m * inv
        h_sum += h_part
        off += off_part
    return h_sum, c * off


@numba.njit(parallel=True, cache=True, nogil=True)
def _gather(src, index, out):
    """``out[g, k, l] = src[g, index[k, l]]``: the ``1/Z`` each output class reads through
    each tap, for every group (``index`` points at a zero where a tap reads no input)."""
    n_k, n_l = index.shape
    for g in numba.prange(src.shape[0]):
        s = src[g]
        for k in range(n_k):
            row = index[k]
            o = out[g, k]
            for j in range(n_l):
                o[j] = s[row[j]]


def class_index(
    taps_h: np.ndarray, taps_w: np.ndarray, cin_g: int, n_a: int, n_b: int
) -> np.ndarray:
    """For :func:`_gather`: ``index[p * Q + q, (ci, kh, kw)]`` is the position of
    ``inv[ci, taps_h[p, kh], taps_w[q, kw]]`` in a group's map of ``1/Z`` per input class,
    laid out as ``(C_in/g, A * B + 1)`` with a zero closing each channel's row, and the
    position of that zero where a tap reads no input (so the index is one broadcast sum)."""
    th = taps_h[:, None, :, None]
    tw = taps_w[None, :, None, :]
    ab = n_a * n_b
    hw = np.where((th >= 0) & (tw >= 0), th * n_b + tw, ab).astype(np.int64)
    n_k = taps_h.shape[0] * taps_w.shape[0]
    ci = np.arange(0, cin_g * (ab + 1), ab + 1, dtype=np.int64)
    return (hw.reshape(n_k, 1, -1) + ci[None, :, None]).reshape(n_k, -1)


@numba.njit(inline="always")
def _add_dots(g, o, n_rows, x, col, buf):
    """``col[g, o + r, k] += sum_l buf[r, l] x[g, k, l]`` for the ``n_rows`` (at most 4)
    mapped kernel rows in ``buf`` (rows ``o``, ``o + 1``, ... of group ``g``) and every
    class ``k``.

    Four rows and four classes at a time make 16 dot products in one sweep over ``l``, so
    each load of a row or of a class's ``1/Z`` serves four multiply-adds instead of one
    (the gathered ``1/Z`` of a layer's classes lives in L2, and loads, not arithmetic,
    bound the single dot product): 2-3x faster on ResNet-50's 3x3 layers.
    """
    n_l = buf.shape[1]
    n_k = x.shape[1]
    if n_rows < 4:
        for r in range(n_rows):
            br = buf[r]
            for k in range(n_k):
                xk = x[g, k]
                acc = 0.0
                for j in range(n_l):
                    acc += br[j] * xk[j]
                col[g, o + r, k] += acc
        return
    b0 = buf[0]
    b1 = buf[1]
    b2 = buf[2]
    b3 = buf[3]
    k = 0
    while k + 4 <= n_k:
        x0 = x[g, k]
        x1 = x[g, k + 1]
        x2 = x[g, k + 2]
        x3 = x[g, k + 3]
        a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = 0.0
        a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = 0.0
        for j in range(n_l):
            v0 = b0[j]
            v1 = b1[j]
            v2 = b2[j]
            v3 = b3[j]
            y0 = x0[j]
            y1 = x1[j]
            y2 = x2[j]
            y3 = x3[j]
            a00 += v0 * y0
            a01 += v0 * y1
            a02 += v0 * y2
            a03 += v0 * y3
            a10 += v1 * y0
            a11 += v1 * y1
            a12 += v1 * y2
            a13 += v1 * y3
            a20 += v2 * y0
            a21 += v2 * y1
            a22 += v2 * y2
            a23 += v2 * y3
            a30 += v3 * y0
            a31 += v3 * y1
            a32 += v3 * y2
            a33 += v3 * y3
        col[g, o, k] += a00
        col[g, o, k + 1] += a01
        col[g, o, k + 2] += a02
        col[g, o, k + 3] += a03
        col[g, o + 1, k] += a10
        col[g, o + 1, k + 1] += a11
        col[g, o + 1, k + 2] += a12
        col[g, o + 1, k + 3] += a13
        col[g, o + 2, k] += a20
        col[g, o + 2, k + 1] += a21
        col[g, o + 2, k + 2] += a22
        col[g, o + 2, k + 3] += a23
        col[g, o + 3, k] += a30
        col[g, o + 3, k + 1] += a31
        col[g, o + 3, k + 2] += a32
        col[g, o + 3, k + 3] += a33
        k += 4
    while k < n_k:
        xk = x[g, k]
        a0 = a1 = a2 = a3 = 0.0
        for j in range(n_l):
            y = xk[j]
            a0 += b0[j] * y
            a1 += b1[j] * y
            a2 += b2[j] * y
            a3 += b3[j] * y
        col[g, o, k] += a0
        col[g, o + 1, k] += a1
        col[g, o + 2, k] += a2
        col[g, o + 3, k] += a3
        k += 1


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=_FM_REDUCE, error_model="numpy")
def _class_cols(w, kind, shift, c, xf, xp, use_f, use_p, n_chunks, col):
    """``col[g, o, k] = sum_l f(w[g, o, l]) xf[g, k, l] + (f(w[g, o, l]) - c) xp[g, k, l]``:
    the column sums of every output class against the gathered ``1/Z`` of the full and
    the partial rows (``use_f``/``use_p``: whether any row is full / has absent entries),
    four kernel rows at a time (:func:`_add_dots`)."""
    n_g, n_o, n_l = w.shape
    n_tasks = n_g * n_o
    for ch in numba.prange(n_chunks):
        _wide_vectors()
        buf = np.empty((4, n_l))
        task = n_tasks * ch // n_chunks
        hi = n_tasks * (ch + 1) // n_chunks
        while task < hi:
            g = task // n_o
            o = task - g * n_o
            n_rows = min(4, hi - task, n_o - o)
            col[g, o : o + n_rows] = 0.0
            # each row mapped once: f for the full rows, then f - c for the partial ones
            for r in range(n_rows):
                for j in range(n_l):
                    buf[r, j] = _f_only(np.float64(w[g, o + r, j]), kind, shift)
            if use_f:
                _add_dots(g, o, n_rows, xf, col, buf)
            if use_p:
                if c != 0.0:
                    for r in range(n_rows):
                        for j in range(n_l):
                            buf[r, j] -= c
                _add_dots(g, o, n_rows, xp, col, buf)
            task += n_rows


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=_FM_REDUCE, error_model="numpy")
def _class_cols_direct(w, kind, shift, c, inv_f, inv_p, index, use_f, use_p, n_chunks, col):
    """:func:`_class_cols` reading ``1/Z`` through ``index`` as it goes, with no gathered
    copy: for kernels with few output channels per group (depthwise convolutions), where
    the copy would be written and read once for every output channel it serves.

    Channel-major: ``inv_f``/``inv_p`` are the groups' maps of ``1/Z`` transposed,
    ``(C_in/g * (A * B + 1), groups)``, and the kernel is mapped into ``(C_in/g * KH *
    KW, groups)`` buffers, so that each index entry, read once, serves every group in one
    vectorised multiply-add over contiguous rows (the groups share the geometry, so the
    index). Threads take slices of the classes. Reading ``1/Z`` group by group through
    the index (one gathered load per multiply-add) was slower: ConvNeXt-T's 384-channel
    7x7 layer 1.12 -> 0.41 ms, EfficientNet-B0's 1152-channel 5x5 layer 0.50-0.66 ->
    0.40-0.45 ms, on the 2-core VM.
    """
    n_g, n_o, n_l = w.shape
    n_k = index.shape[0]
    fk = np.empty((n_g, n_l))
    bf = np.empty((n_l, n_g) if use_f else (0, n_g))
    bp = np.empty((n_l, n_g) if use_p else (0, n_g))
    for o in range(n_o):
        # f(K) row by row, then transposed column by column: one pass doing both took
        # 0.21 ms against 0.06 ms for 768 channels of 7x7 taps
        for ch in numba.prange(n_chunks):
            for g in range(n_g * ch // n_chunks, n_g * (ch + 1) // n_chunks):
                for j in range(n_l):
                    fk[g, j] = _f_only(np.float64(w[g, o, j]), kind, shift)
        for j in numba.prange(n_l):
            if use_f:
                for g in range(n_g):
                    bf[j, g] = fk[g, j]
            if use_p:
                for g in range(n_g):
                    bp[j, g] = fk[g, j] - c
        for ch in numba.prange(n_chunks):
            _wide_vectors()
            acc = np.empty(n_g)
            for k in range(n_k * ch // n_chunks, n_k * (ch + 1) // n_chunks):
                acc[:] = 0.0
                if use_f:
                    _add_taps(acc, bf, inv_f, index[k])
                if use_p:
                    _add_taps(acc, bp, inv_p, index[k])
                for g in range(n_g):
                    col[g, o, k] = acc[g]


@numba.njit(inline="always")
def _add_taps(acc, b, x, taps):
    """``acc += sum_j b[j] * x[taps[j]]`` (rows of length ``acc.shape[0]``), four taps per
    sweep over ``acc``."""
    n = acc.shape[0]
    n_l = taps.shape[0]
    j = 0
    while j + 4 <= n_l:
        b0 = b[j]
        b1 = b[j + 1]
        b2 = b[j + 2]
        b3 = b[j + 3]
        x0 = x[taps[j]]
        x1 = x[taps[j + 1]]
        x2 = x[taps[j + 2]]
        x3 = x[taps[j + 3]]
        for g in range(n):
            acc[g] += (b0[g] * x0[g] + b1[g] * x1[g]) + (b2[g] * x2[g] + b3[g] * x3[g])
        j += 4
    while j < n_l:
        bj = b[j]
        xj = x[taps[j]]
        for g in range(n):
            acc[g] += bj[g] * xj[g]
        j += 1


#: Output channels per group up to which the column pass reads ``1/Z`` through the index
#: (:func:`_class_cols_direct`) rather than from a gathered copy.
DIRECT_MAX_OUT = 2


def class_pass(
    w3: np.ndarray,
    sf: np.ndarray,
    st: np.ndarray,
    geometry,
    index: np.ndarray,
    rows_full: tuple[bool, bool],
    kind: int,
    shift: float,
    c: float,
    clogc: float,
    normalizes: bool,
    cout_g: int,
    n_cols: int,
    gather_bytes: int,
) -> tuple[float, float, np.ndarray]:
    """A convolution's row and column passes on its position classes.

    ``w3`` is the kernel as ``(groups, C_out/groups, C_in/groups * KH * KW)``; ``sf``/``st``
    its channel sums (:func:`dense_row_sums`); ``geometry`` holds the classes' arrays
    ``(mh, mw, cnt_h, cnt_w, mult_h, mult_w, taps_h, taps_w)``, ``index`` comes from
    :func:`class_index` and ``rows_full`` says whether any row class stores all
    ``n_cols`` entries and whether any has absent ones (a row class stores
    ``cout_g * cnt_h[a] * cnt_w[b]``). Returns the weighted sum of row entropies, the constant
    ``sum c / Z`` and the columns ``(groups, C_out/groups, P * Q)``, with the gathered
    ``1/Z`` held to about ``gather_bytes`` per slice of output classes.
    """
    mh, mw, cnt_h, cnt_w, mult_h, mult_w, taps_h, taps_w = geometry
    n_g, n_o, n_l = w3.shape
    n_a, n_b = mh.shape[0], mw.shape[0]
    cin_g, ab = sf.shape[0] // n_g, n_a * n_b
    # 1/Z per group as (C_in/g, A * B + 1), a zero closing each channel's row for the taps
    # that read no input (class_index), flattened
    inv_full = np.zeros((n_g, cin_g, ab + 1))
    inv_part = np.zeros((n_g, cin_g, ab + 1))
    shape = (sf.shape[0], n_a, n_b)
    full3 = np.empty(shape)
    part3 = np.empty(shape)
    n_ci = sf.shape[0]
    work = n_ci * n_a * n_b * (sf.shape[1] + sf.shape[2])
    h_sum, off = _launch(
        _class_rows,
        work,
        sf,
        st,
        mh,
        mw,
        cnt_h,
        cnt_w,
        mult_h,
        mult_w,
        cout_g,
        n_cols,
        c,
        clogc,
        normalizes,
        _chunks(n_ci, work=work),
        full3,
        part3,
    )
    inv_full[:, :, :ab] = full3.reshape(n_g, cin_g, ab)
    inv_part[:, :, :ab] = part3.reshape(n_g, cin_g, ab)
    inv_full = inv_full.reshape(n_g, -1)
    inv_part = inv_part.reshape(n_g, -1)
    n_k = index.shape[0]
    col = np.empty((n_g, n_o, n_k))
    use_f, use_p = rows_full
    if c == 0.0 and use_p:
        # f(K) - c is f(K): the full and partial rows' 1/Z (disjoint) go through one
        # gather and one dot product per class, not two
        inv_part += inv_full
        use_f = False
    if n_o <= DIRECT_MAX_OUT:
        work = w3.size * n_k
        empty = np.empty((0, n_g))
        _launch(
            _class_cols_direct,
            work,
            w3,
            kind,
            shift,
            c,
            np.ascontiguousarray(inv_full.T) if use_f else empty,
            np.ascontiguousarray(inv_part.T) if use_p else empty,
            index,
            use_f,
            use_p,
            _chunks(n_k, work=work),
            col,
        )
        return h_sum, off, col
    step = max(1, gather_bytes // max(8 * n_g * n_l * (use_f + use_p), 1))
    for k0 in range(0, n_k, step):
        rows = index[k0 : k0 + step]
        xf = np.empty((n_g, rows.shape[0], n_l) if use_f else (n_g, 0, n_l))
        xp = np.empty((n_g, rows.shape[0], n_l) if use_p else (n_g, 0, n_l))
        if use_f:
            _launch(_gather, xf.size, inv_full, rows, xf)
        if use_p:
            _launch(_gather, xp.size, inv_part, rows, xp)
        out = col if step >= n_k else np.empty((n_g, n_o, rows.shape[0]))
        work = w3.size * rows.shape[0]
        _launch(
            _class_cols,
            work,
            w3,
            kind,
            shift,
            c,
            xf,
            xp,
            use_f,
            use_p,
            _chunks(n_g * n_o, work=work),
            out,
        )
        if out is not col:
            col[:, :, k0 : k0 + rows.shape[0]] = out
    return h_sum, off, col
