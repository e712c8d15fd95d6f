"""Numba kernels of the block fills (:class:`~foresight_sparse.connectivity.Stencil` and
:class:`~foresight_sparse.connectivity.FullyConnected` rows). Private: they take and fill
plain arrays; tensors are built around them. Imports numba: reached through
:func:`foresight_sparse.backends.numba_kernels` only."""

from __future__ import annotations

import numba
import numpy as np

from .._numba import _launch

__all__: list[str] = []


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
