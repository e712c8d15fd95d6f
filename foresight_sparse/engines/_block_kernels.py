"""Numba kernels of the sparse engine's block reduction (:mod:`.blocks`). Private: they take
and fill plain arrays. Imports numba: reached through
:func:`foresight_sparse.backends.numba_kernels` only."""

from __future__ import annotations

import numba
import numpy as np

from .._numba import _FM_REDUCE, _INV_LN2, _f_and_flogf, _launch, _lin_terms, threads
from ..norms import KIND_LIN, KIND_SOFT

__all__: list[str] = []


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
