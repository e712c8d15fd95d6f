"""Numba kernels. Private: they take and return plain arrays; tensors are built around them.

Each kernel fills preallocated arrays whose row pointers were computed (vectorised) by the
caller, so the parallel loops write disjoint slots and need no synchronisation.
"""

from __future__ import annotations

import numba
import numpy as np

__all__: list[str] = []


@numba.njit(parallel=True, cache=True, nogil=True)
def _fill_stencil_rows(r0, n_rows, height, width, cin_g, cout_g, out_h, out_w,
                       hp_ptr, hp_out, hp_tptr, hp_tap,
                       wp_ptr, wp_out, wp_tptr, wp_tap,
                       kernel, scale_h, scale_w, rowptr, cols, vals, rows):
    """Entries of rows ``r0 .. r0+n_rows`` of a sliding-window layer, in (row, column) order.

    Row ``r = (ci, ih, iw)`` holds, for every output channel ``co`` of its group, every
    output ``oh`` that input row ``ih`` feeds (ascending) and every ``ow`` that ``iw`` feeds,
    the sum over the contributing taps of ``kernel[co, ci_local, kh, kw]``, times the column
    scale ``scale_h[oh] * scale_w[ow]``. Columns come out ascending, so the result is
    coalesced. ``rows`` is filled only when it has room for every entry (COO output).
    """
    plane = height * width
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
        for co in range(g * cout_g, (g + 1) * cout_g):
            base = co * out_h * out_w
            for p in range(hp_ptr[ih], hp_ptr[ih + 1]):
                oh = hp_out[p]
                sh = scale_h[oh]
                for q in range(wp_ptr[iw], wp_ptr[iw + 1]):
                    ow = wp_out[q]
                    acc = 0.0
                    for a in range(hp_tptr[p], hp_tptr[p + 1]):
                        kh = hp_tap[a]
                        for b in range(wp_tptr[q], wp_tptr[q + 1]):
                            acc += kernel[co, ci_l, kh, wp_tap[b]]
                    cols[pos] = base + oh * out_w + ow
                    vals[pos] = acc * sh * scale_w[ow]
                    if write_rows:
                        rows[pos] = r
                    pos += 1


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


def fill_stencil_rows(r0: int, n_rows: int, spec, rowptr: np.ndarray, cols: np.ndarray,
                      vals: np.ndarray, rows: np.ndarray) -> None:
    """Fill ``cols``, ``vals`` (and ``rows`` when sized for it) from a stencil description.

    ``spec`` is a :class:`foresight_sparse.connectivity.Stencil`; its arrays are read as they
    are, so the kernel compiles once per dtype combination.
    """
    hp, wp = spec.pairs_h, spec.pairs_w
    _, height, width = spec.in_chw
    _, out_h, out_w = spec.out_chw
    _fill_stencil_rows(r0, n_rows, height, width, spec.cin_g, spec.cout_g, out_h, out_w,
                       hp.ptr, hp.out, hp.tap_ptr, hp.tap, wp.ptr, wp.out, wp.tap_ptr, wp.tap,
                       spec.kernel_np, spec.scale_h, spec.scale_w, rowptr, cols, vals, rows)


def fill_dense_rows(r0: int, n_rows: int, n_cols: int, cols: np.ndarray,
                    rows: np.ndarray) -> None:
    """Fill the indices of a fully connected row block."""
    _fill_dense_rows(r0, n_rows, n_cols, cols, rows)


# Elementwise maps the reduction kernel knows, by code (see foresight_sparse.norms).
KIND_LIN, KIND_SOFT, KIND_SIG, KIND_NONE = 0, 1, 2, 3
_INV_LN2 = 1.0 / np.log(2.0)


@numba.njit(inline="always")
def _f_and_flogf(a, kind, shift):
    if kind == 0 or kind == 3:
        if a > 0.0:
            return a, a * np.log2(a)
        return (0.0 if kind == 0 else a), 0.0
    if kind == 1:
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


@numba.njit(parallel=True, cache=True, nogil=True)
def _reduce_rows(rowptr, cols, vals, kind, shift, c, clogc, n_cols, normalizes, max_row,
                 col_acc, h_out, inv_out):
    """Row entropies and column sums of one CSR block under an elementwise norm.

    For each row: ``Z = sum f + c * m``, ``T = sum f log2 f + c log2 c * m`` with ``m`` the
    absent entries, ``H = log2 Z - T / Z``; each stored entry adds ``(f - c) / Z`` to its
    column. Thread ``t`` accumulates its rows' columns into ``col_acc[t]`` (no races) and
    its sums of ``H`` and ``1/Z`` into ``h_out[t]``, ``inv_out[t]``.
    """
    n_rows = rowptr.shape[0] - 1
    n_chunks = col_acc.shape[0]
    for t in numba.prange(n_chunks):
        lo = n_rows * t // n_chunks
        hi = n_rows * (t + 1) // n_chunks
        buf = np.empty(max_row, dtype=np.float64)
        acc = col_acc[t]
        h_sum = 0.0
        inv_sum = 0.0
        for r in range(lo, hi):
            start = rowptr[r]
            stop = rowptr[r + 1]
            z = 0.0
            tt = 0.0
            for e in range(start, stop):
                f, flf = _f_and_flogf(vals[e], kind, shift)
                buf[e - start] = f
                z += f
                tt += flf
            if normalizes:
                m = n_cols - (stop - start)
                z += c * m
                tt += clogc * m
            else:
                z = 1.0
            if z > 0.0:
                inv = 1.0 / z
                h_sum += np.log2(z) - tt * inv
                inv_sum += inv
                for e in range(start, stop):
                    acc[cols[e]] += (buf[e - start] - c) * inv
        h_out[t] = h_sum
        inv_out[t] = inv_sum


def reduce_rows(rowptr: np.ndarray, cols: np.ndarray, vals: np.ndarray, kind: int,
                shift: float, c: float, clogc: float, n_cols: int, normalizes: bool,
                col_acc: np.ndarray) -> tuple[float, float]:
    """Add one block's column contributions to ``col_acc``; return (sum of H, sum of 1/Z).

    ``col_acc`` is a ``(threads, n_cols)`` float64 array from :func:`column_accumulator`,
    kept across the blocks of a layer; its rows sum to the layer's column sums. The
    constant ``c * sum(1/Z)`` that every column receives is left to the caller.
    """
    n_chunks = col_acc.shape[0]
    h_out = np.zeros(n_chunks)
    inv_out = np.zeros(n_chunks)
    max_row = int(np.max(np.diff(rowptr), initial=0))
    _reduce_rows(rowptr, cols, vals, kind, shift, c, clogc, n_cols, normalizes, max_row,
                 col_acc, h_out, inv_out)
    return float(h_out.sum()), float(inv_out.sum())


def column_accumulator(n_cols: int) -> np.ndarray:
    """Per-thread column sums for :func:`reduce_rows`: zeros of shape ``(threads, n_cols)``."""
    return np.zeros((numba.get_num_threads(), n_cols), dtype=np.float64)
