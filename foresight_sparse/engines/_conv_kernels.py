"""Numba kernels of a convolution's row and column passes on its position classes
(:mod:`.conv`). Private: they take and fill plain arrays. Imports numba: reached through
:func:`foresight_sparse.backends.numba_kernels` only."""

from __future__ import annotations

import numba
import numpy as np

from .._numba import _FM_REDUCE, _chunks, _f_only, _launch, _wide_vectors

__all__: list[str] = []


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
