"""The sparse engine's numerics: stream a layer's row blocks and reduce each exactly, in
both forms.

A block of rows in CSR form is reduced to the sum of its rows' entropies, the constant
``sum c/Z`` every column receives and the float64 column sums without it, with the
absent-entry formulas of the mathematics page. :func:`reduce_blocks_numba` runs the numba
kernels of ``_block_kernels`` on CPU arrays; :func:`reduce_blocks_torch` (segment sums and
``index_add_``, through :func:`reduce_block_torch`) runs on any device. The engine picks one
by the job's backend (:mod:`.dispatch`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..backends import numba_kernels
from ..entropy import row_entropy, safe_inverse
from ..norms import ElementwiseNorm, SoftNorm
from .base import LayerJob

__all__ = ["reduce_blocks_numba", "reduce_blocks_torch", "reduce_block_torch"]


def reduce_blocks_numba(
    job: LayerJob, shift: float, blocks: list[tuple[int, int]], counts: np.ndarray
) -> tuple[float, float, torch.Tensor]:
    """Fill and reduce ``blocks`` of rows (``counts`` stored entries per row) with the
    numba kernels, into per-thread column accumulators: the sum of the rows' entropies,
    the constant ``sum c/Z`` every column receives, and the float64 column sums without
    it (a CPU tensor)."""
    conn, norm, backend = job.conn, job.norm, job.backend
    k = numba_kernels("engines._block_kernels")
    n_cols = conn.n_cols
    c, clogc = norm.zero(shift), norm.zero_log2(shift)
    acc = k.column_accumulator(n_cols)
    h_sum = off_sum = 0.0
    # one set of block buffers per layer, sized for the largest block: no fresh pages
    bounds = np.concatenate([[0], np.cumsum(counts)])
    workspace: dict = {"entries": max(int(bounds[r1] - bounds[r0]) for r0, r1 in blocks)}
    # int32 columns halve the index traffic, where every column index fits
    index_dtype = torch.int32 if n_cols <= torch.iinfo(torch.int32).max else torch.int64
    for r0, r1 in blocks:
        # values in the narrowest exact dtype: float32 halves the traffic and lets
        # the kernel take log2 from the bits; the reduction is float64 either way
        b = conn.rows(
            backend,
            r0,
            r1,
            device="cpu",
            dtype=conn.exact_dtype,
            workspace=workspace,
            index_dtype=index_dtype,
        )
        h, off = k.reduce_rows(
            b.rowptr.numpy(),
            b.cols.numpy(),
            b.vals.numpy(),
            backend.kind,
            shift,
            c,
            clogc,
            n_cols,
            norm.normalizes,
            acc,
        )
        h_sum += h
        off_sum += off
    return h_sum, off_sum, torch.from_numpy(acc.sum(axis=0))


def reduce_blocks_torch(
    job: LayerJob, shift: float, blocks: list[tuple[int, int]], counts: np.ndarray
) -> tuple[float, float, torch.Tensor]:
    """:func:`reduce_blocks_numba` with torch operations on ``job.device``, one block at a
    time through :func:`reduce_block_torch` (``counts`` is unused: torch allocates per
    block)."""
    conn, device = job.conn, job.device
    n_cols = conn.n_cols
    col = torch.zeros(n_cols, dtype=torch.float64, device=device)
    h_sum = torch.zeros((), dtype=torch.float64, device=device)
    off_sum = torch.zeros((), dtype=torch.float64, device=device)
    for r0, r1 in blocks:
        b = conn.rows(job.backend, r0, r1, device=device)
        h, off = reduce_block_torch(b.rowptr, b.cols, b.vals, job.norm, shift, n_cols, col)
        h_sum += h
        off_sum += off
    return float(h_sum), float(off_sum), col


def reduce_block_torch(
    rowptr: torch.Tensor,
    cols: torch.Tensor,
    vals: torch.Tensor,
    norm: ElementwiseNorm,
    shift: float,
    n_cols: int,
    col: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch form of the block reduction: add to ``col``; return (sum of H, sum of c/Z).

    Segment sums over the stored values and ``index_add_`` into the columns; never
    ``torch.sparse.sum``. The constant ``sum(c/Z)`` is left to the caller. The softmax
    shifts each row by its own largest entry (0 if the row has absent entries), as the
    numba kernel does.
    """
    vals = vals.to(torch.float64)
    counts = torch.diff(rowptr)
    absent = (n_cols - counts).to(torch.float64)
    rows = torch.repeat_interleave(
        torch.arange(len(counts), device=vals.device), counts, output_size=vals.numel()
    )
    if isinstance(norm, SoftNorm):
        row_max = torch.segment_reduce(vals, "max", offsets=rowptr, unsafe=True)
        row_max = torch.where(counts > 0, row_max, float("-inf"))
        s = torch.where(absent > 0, row_max.clamp(min=0.0), row_max)
        c = torch.where(absent > 0, torch.exp(-s), 0.0)
        clogc = torch.where(absent > 0, c * (-s) / math.log(2.0), 0.0)
        z_vals = vals - s[rows]
        f = torch.exp(z_vals)
        flf = f * z_vals / math.log(2.0)
    else:
        # rows with no absent entry take c = 0: exact, and free of cancellation
        c = torch.where(absent > 0, norm.zero(shift), 0.0)
        clogc = torch.where(absent > 0, norm.zero_log2(shift), 0.0)
        f = norm.f(vals, shift)
        flf = norm.f_log2f(vals, shift)
    z = torch.segment_reduce(f, "sum", offsets=rowptr)
    t = torch.segment_reduce(flf, "sum", offsets=rowptr)
    if norm.normalizes:
        z = z + c * absent
        t = t + clogc * absent
    else:
        z = torch.ones_like(z)
    inv = safe_inverse(z)
    col.index_add_(0, cols, (f - c[rows]) * inv[rows])
    return row_entropy(z, t).sum(), (c * inv).sum()
