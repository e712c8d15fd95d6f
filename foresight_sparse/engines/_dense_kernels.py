"""Numba kernels over a dense weight matrix: its column-wise sums of ``f`` and ``f log2 f``
(a Linear's row pass, and a convolution's kernel summed over output channels) and its
row-wise products with ``1/Z`` (a Linear's column pass). Private: they take and fill plain
arrays. Imports numba: reached through :func:`foresight_sparse.backends.numba_kernels`
only."""

from __future__ import annotations

import numba
import numpy as np

from .._numba import (
    _FM_ELEMENTWISE,
    _FM_REDUCE,
    PARALLEL_MIN_WORK,
    _f_and_flogf,
    _f_only,
    _launch,
    _lin_terms,
    _wide_vectors,
    threads,
)
from ..norms import KIND_LIN, KIND_NONE

__all__: list[str] = []


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
