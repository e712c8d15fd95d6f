"""Numba kernels of the column terms (:func:`foresight_sparse.entropy.column_terms`).
Private: they take plain arrays. Imports numba: reached through
:func:`foresight_sparse.backends.numba_kernels` only."""

from __future__ import annotations

import numba
import numpy as np

from ._numba import _FM_REDUCE, _MIN_NORMAL64, _chunks, _launch, _log2_f64, _wide_vectors

__all__: list[str] = []


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
