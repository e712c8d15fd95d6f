"""The sparse engine: stream row blocks of the connectivity matrix, reduce them exactly.

Rows are produced in blocks sized to the memory budget; each block is reduced to row
entropies and column contributions with the absent-entry formulas of the mathematics page,
in float64, in the form of the job's backend (:mod:`.blocks`): numba kernels on the CPU,
torch operations on CUDA or with ``backend='torch'``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..budget import row_blocks
from ..entropy import H
from .base import LayerJob, LayerStats, layer_shift
from .dispatch import form

__all__ = ["layer_stats", "working_bytes"]


def layer_stats(job: LayerJob) -> LayerStats:
    """Reduce one layer with the sparse engine (see module docstring)."""
    conn, norm, backend = job.conn, job.norm, job.backend
    conn.check_finite()
    counts = conn.row_counts(0, conn.n_rows)
    if not norm.elementwise:
        return _rowwise(job, counts)
    shift = layer_shift(norm, conn)
    blocks = row_blocks(
        counts,
        backend.bytes_per_entry,
        64,
        job.budget,
        conn.label,
        reserved=_column_bytes(conn, backend),
    )
    h_sum, off_sum, col = form("sparse", job)(job, shift, blocks, counts)
    return LayerStats(h_sum, conn.n_rows, col, "sparse", off_sum, backend=backend.name)


def working_bytes(conn, budget: int, backend) -> int:
    """Bytes the sparse engine holds for one layer under ``backend``: its column
    accumulators and the largest row block the budget lets it stream (an estimate, for
    plans)."""
    fixed = _column_bytes(conn, backend)
    return min(budget, fixed + conn.nnz * backend.bytes_per_entry + conn.n_rows * 64)


def _column_bytes(conn, backend) -> int:
    """The column sums, one float64 vector per thread plus the total."""
    return conn.n_cols * 8 * (1 + backend.threads())


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
        b = conn.rows(job.backend, r0, r1, device=job.device, with_rows=True)
        dense = torch.zeros(r1 - r0, conn.n_cols, dtype=torch.float64, device=job.device)
        dense[b.rows - r0, b.cols] = b.vals
        p = job.norm(dense)
        h_sum += H(p, dim=1).sum()
        col += p.sum(0)
    return LayerStats(float(h_sum), conn.n_rows, col, "sparse", backend=job.backend.name)
