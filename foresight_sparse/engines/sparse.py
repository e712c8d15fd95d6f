"""The sparse engine: stream row blocks of the connectivity matrix, reduce them exactly.

Rows are produced in blocks sized to the memory budget; each block is reduced to row
entropies and column contributions with the absent-entry formulas of the mathematics page,
in float64. On the CPU both steps are numba kernels; on CUDA they are torch operations
(:func:`reduce_block_torch`, which also runs on CPU tensors and is tested there).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..budget import row_blocks
from ..entropy import H, row_entropy, safe_inverse
from ..norms import KERNEL_CODES, ElementwiseNorm, SoftNorm
from . import LayerJob, LayerStats, layer_shift

__all__ = ["layer_stats", "reduce_block_torch", "working_bytes", "BYTES_PER_ENTRY"]

#: Working bytes per stored entry while the torch path reduces a block (indices, values
#: and temporaries); the numba path needs only its index and value arrays.
BYTES_PER_ENTRY = 96
_BYTES_PER_ENTRY_NUMBA = 16

#: Norm class -> the code of its elementwise map in the numba kernels.
KINDS = KERNEL_CODES


def layer_stats(job: LayerJob) -> LayerStats:
    """Reduce one layer with the sparse engine (see module docstring)."""
    conn, norm = job.conn, job.norm
    conn.check_finite()
    n_cols = conn.n_cols
    counts = conn.row_counts(0, conn.n_rows)
    if not norm.elementwise:
        return _rowwise(job, counts)
    shift = layer_shift(norm, conn)
    c, clogc = norm.zero(shift), norm.zero_log2(shift)
    kind = KINDS.get(type(norm))
    numba_path = job.device.type == "cpu" and kind is not None
    fixed = n_cols * 8 * (1 + _threads(job.device))
    blocks = row_blocks(
        counts,
        _BYTES_PER_ENTRY_NUMBA if numba_path else BYTES_PER_ENTRY,
        64,
        job.budget,
        conn.label,
        reserved=fixed,
    )
    if numba_path:
        from .. import _kernels  # numba loads on first use, not on import

        acc = _kernels.column_accumulator(n_cols)
        h_sum = off_sum = 0.0
        # one set of block buffers per layer, sized for the largest block: no fresh pages
        bounds = np.concatenate([[0], np.cumsum(counts)])
        workspace: dict = {"entries": max(int(bounds[r1] - bounds[r0]) for r0, r1 in blocks)}
        # int32 columns halve the index traffic, where every column index fits
        index_dtype = torch.int32 if n_cols <= torch.iinfo(torch.int32).max else torch.int64
        for r0, r1 in blocks:
            # values in the narrowest exact dtype: float32 halves the traffic and lets
            # the kernel take log2 from the bits; the reduction is float64 either way
            b = conn.block(
                r0,
                r1,
                device="cpu",
                dtype=conn.exact_dtype,
                workspace=workspace,
                index_dtype=index_dtype,
            )
            h, off = _kernels.reduce_rows(
                b.rowptr.numpy(),
                b.cols.numpy(),
                b.vals.numpy(),
                kind,
                shift,
                c,
                clogc,
                n_cols,
                norm.normalizes,
                acc,
            )
            h_sum += h
            off_sum += off
        col = torch.from_numpy(acc.sum(axis=0))
        return LayerStats(h_sum, conn.n_rows, col, "sparse", off_sum)
    col = torch.zeros(n_cols, dtype=torch.float64, device=job.device)
    h_sum = torch.zeros((), dtype=torch.float64, device=job.device)
    off_sum = torch.zeros((), dtype=torch.float64, device=job.device)
    for r0, r1 in blocks:
        b = conn.block(r0, r1, device=job.device)
        h, off = reduce_block_torch(b.rowptr, b.cols, b.vals, norm, shift, n_cols, col)
        h_sum += h
        off_sum += off
    return LayerStats(float(h_sum), conn.n_rows, col, "sparse", float(off_sum))


def working_bytes(conn, budget: int, device: torch.device) -> int:
    """Bytes the sparse engine holds for one layer: its column accumulators and the largest
    row block the budget lets it stream (an estimate, for plans)."""
    fixed = conn.n_cols * 8 * (1 + _threads(device))
    per_entry = _BYTES_PER_ENTRY_NUMBA if device.type == "cpu" else BYTES_PER_ENTRY
    return min(budget, fixed + conn.nnz * per_entry + conn.n_rows * 64)


def _threads(device: torch.device) -> int:
    if device.type != "cpu":
        return 1
    from .. import _kernels

    return _kernels.threads()


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


def _rowwise(job: LayerJob, counts: np.ndarray) -> LayerStats:
    """A custom row-wise norm: densify row blocks under the budget and apply it."""
    conn = job.conn
    # each dense row: the block, the norm's output and H's temporaries, float64
    blocks = row_blocks(
        np.zeros_like(counts),
        0,
        conn.n_cols * 8 * 4,
        job.budget,
        f"{conn.label} (custom norm {job.norm.name}, dense rows)",
    )
    col = torch.zeros(conn.n_cols, dtype=torch.float64, device=job.device)
    h_sum = torch.zeros((), dtype=torch.float64, device=job.device)
    for r0, r1 in blocks:
        b = conn.block(r0, r1, device=job.device, with_rows=True)
        dense = torch.zeros(r1 - r0, conn.n_cols, dtype=torch.float64, device=job.device)
        dense[b.rows - r0, b.cols] = b.vals
        p = job.norm(dense)
        h_sum += H(p, dim=1).sum()
        col += p.sum(0)
    return LayerStats(float(h_sum), conn.n_rows, col, "sparse")
