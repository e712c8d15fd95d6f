"""Numba kernels of the perturbation measure. Private: plain arrays in, plain arrays out.

The pair histograms use one layout, ``hist[ia * E * ob + e * ob + jb]`` (``E`` pairs of a
chunk, ``ob`` output bins): the pairs of one input neuron are consecutive entries ``e``, so
one sample's increments for that input land 4 * ``ob`` bytes apart (no cache-set aliasing),
and ``prange`` over input neurons writes disjoint cells.
"""

from __future__ import annotations

import math

from numba import njit, prange

__all__: list[str] = []

_LN2 = math.log(2.0)


@njit(cache=True, parallel=True)
def pair_counts(hist, xbt, yb, rowptr, cols, out_bins):  # pragma: no cover - numba
    """Add one batch of samples to the pair histograms.

    hist : int32[in_bins * E * out_bins], xbt : int16[rows, samples] (input bins, -1 out of
    range), yb : int16[samples, n_out] (output bins, -1 out of range), rowptr : int64[rows + 1]
    and cols : int64[E] (the pairs of each input row, CSR).

    A row whose pairs are one run of consecutive outputs (every row of a Linear) reads them
    straight from the sample's output bins, without the gather through ``cols`` that costs
    about a third of the time of the general loop.
    """
    n_rows = xbt.shape[0]
    n_samples = xbt.shape[1]
    n_pairs = cols.shape[0]
    stride = n_pairs * out_bins
    for r in prange(n_rows):
        e0 = rowptr[r]
        e1 = rowptr[r + 1]
        m = e1 - e0
        if m == 0:
            continue
        c = cols[e0:e1]
        first = c[0]
        run = True
        for k in range(1, m):
            if c[k] != first + k:
                run = False
                break
        for s in range(n_samples):
            ia = xbt[r, s]
            if ia < 0:
                continue
            h = hist[ia * stride + e0 * out_bins : ia * stride + e1 * out_bins]
            y = yb[s]
            if run:
                y = y[first : first + m]
                for k in range(m):
                    jb = y[k]
                    if jb >= 0:
                        h[k * out_bins + jb] += 1
            else:
                for k in range(m):
                    jb = y[c[k]]
                    if jb >= 0:
                        h[k * out_bins + jb] += 1


@njit(cache=True, parallel=True)
def pair_mi(hist, n_pairs, in_bins, out_bins, out):  # pragma: no cover - numba
    """Plug-in mutual information (bits) of every pair's histogram, over its own total."""
    stride = n_pairs * out_bins
    for e in prange(n_pairs):
        cells = 0.0
        rows = 0.0
        total = 0
        for ia in range(in_bins):
            base = ia * stride + e * out_bins
            n_i = 0
            for jb in range(out_bins):
                c = hist[base + jb]
                if c > 0:
                    n_i += c
                    cells += c * math.log(c)
            if n_i > 0:
                rows += n_i * math.log(n_i)
            total += n_i
        if total == 0:
            out[e] = 0.0
            continue
        columns = 0.0
        for jb in range(out_bins):
            n_j = 0
            for ia in range(in_bins):
                n_j += hist[ia * stride + e * out_bins + jb]
            if n_j > 0:
                columns += n_j * math.log(n_j)
        out[e] = (cells - rows - columns + total * math.log(total)) / (total * _LN2)


@njit(cache=True)
def _log_hypergeom(n, a, b, total):  # pragma: no cover - numba
    return (
        math.lgamma(a + 1)
        + math.lgamma(b + 1)
        + math.lgamma(total - a + 1)
        + math.lgamma(total - b + 1)
        - math.lgamma(total + 1)
        - math.lgamma(n + 1)
        - math.lgamma(a - n + 1)
        - math.lgamma(b - n + 1)
        - math.lgamma(total - a - b + n + 1)
    )


@njit(cache=True)
def expected_mi(a, b, total):  # pragma: no cover - numba
    """Exact expectation (bits) of the plug-in MI of two independent variables given their
    marginal counts ``a`` and ``b`` (each summing to ``total``): under independence, given
    the marginals, each cell count is hypergeometric (Vinh, Epps and Bailey, JMLR 2010).

    Each cell's sum runs outwards from the mode until the terms fall below 1e-18 of it,
    so it costs a few standard deviations per cell, not ``min(a, b)`` terms.
    """
    acc = 0.0
    for i in range(a.shape[0]):
        ai = a[i]
        if ai == 0:
            continue
        for j in range(b.shape[0]):
            bj = b[j]
            if bj == 0:
                continue
            lo = max(1, ai + bj - total)
            hi = min(ai, bj)
            if lo > hi:
                continue
            mode = ((ai + 1) * (bj + 1)) // (total + 2)
            mode = min(max(mode, lo), hi)
            p_mode = math.exp(_log_hypergeom(mode, ai, bj, total))
            # upwards from the mode
            p = p_mode
            n = mode
            while n <= hi:
                acc += p * n / total * math.log(total * n / (ai * bj))
                if p < 1e-18 * p_mode:
                    break
                p *= (ai - n) * (bj - n) / ((n + 1.0) * (total - ai - bj + n + 1.0))
                n += 1
            # downwards
            p = p_mode
            n = mode
            while n > lo:
                p *= n * (total - ai - bj + n) / ((ai - n + 1.0) * (bj - n + 1.0))
                n -= 1
                acc += p * n / total * math.log(total * n / (ai * bj))
                if p < 1e-18 * p_mode:
                    break
    return acc / _LN2


@njit(cache=True, parallel=True)
def bin_values(values, edges, out):  # pragma: no cover - numba
    """The bin of each value of the 2-d ``values`` among the equal bins ``edges`` (float64,
    ``numpy.linspace``), -1 outside them, into ``out`` (int16, same shape): the arithmetic
    guess corrected against the edges, so that the bins are ``numpy.histogram``'s (the
    last one holds its upper edge)."""
    bins = edges.shape[0] - 1
    lo = edges[0]
    hi = edges[bins]
    scale = bins / (hi - lo)
    n, m = values.shape
    for i in prange(n):
        for j in range(m):
            v = float(values[i, j])
            if not (lo <= v <= hi):  # NaN included
                out[i, j] = -1
                continue
            k = min(max(int((v - lo) * scale), 0), bins - 1)
            if v < edges[k]:
                k -= 1
            elif k < bins - 1 and v >= edges[k + 1]:
                k += 1
            out[i, j] = k
