"""The implicit engine's numerics for a Linear layer: two reads of the weight, in both forms.

The first read sums ``f`` and ``f log2 f`` over each input's column of the weight (``Z``,
``T`` and ``1/Z`` per input, every entry stored), the second takes each output's row
against ``1/Z`` (the column sums). :func:`linear_passes_numba` runs the numba kernels of
``_dense_kernels`` on CPU arrays; :func:`linear_passes_torch` runs torch operations on any
device, in blocks of rows. The engine picks one by the job's backend (:mod:`.dispatch`).
"""

from __future__ import annotations

import torch

from ..backends import numba_kernels
from ..entropy import safe_inverse
from ..norms import KIND_LIN, KIND_NONE, ElementwiseNorm
from .base import LayerJob

__all__ = ["linear_passes_numba", "linear_passes_torch"]

Passes = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def linear_passes_numba(job: LayerJob, shift: float, block: int) -> Passes:
    """A Linear layer's two reads of the weight by the numba kernels (checking it is
    finite): ``Z``, ``T`` and ``1/Z`` per input, then the column sums, float64 CPU
    tensors. The kernels stream the weight as it is, so ``block`` (the elements one torch
    block may hold, which :func:`linear_passes_torch` takes) is unused."""
    conn, norm, kind = job.conn, job.norm, job.backend.kind
    k = numba_kernels("engines._dense_kernels")
    w = conn.weight.detach()
    # float32 under relu or no norm: the row pass counts NaN/Inf weights as it goes,
    # which saves a read of the weight for the finiteness scan (those norms need no
    # bound on the weights: their shift is 0)
    fused = w.dtype == torch.float32 and kind in (KIND_LIN, KIND_NONE)
    if not fused:
        conn.check_finite()
    w_np = w.cpu().contiguous().numpy()
    non_finite: list = []
    sums = k.dense_row_sums(w_np, kind, shift, non_finite)
    if fused:
        conn.check_finite(non_finite[0])
    z, t = (torch.from_numpy(a) for a in sums)
    z, inv = _full_rows(norm, z)
    # every entry is stored: no absent-entry constant (c = 0) reaches the columns
    col = torch.from_numpy(k.dense_cols(w_np, kind, shift, 0.0, inv.numpy()))
    return z, t, inv, col


def linear_passes_torch(job: LayerJob, shift: float, block: int) -> Passes:
    """:func:`linear_passes_numba` with torch operations on ``job.device``, in blocks of
    rows of at most ``block`` elements of the weight."""
    conn, norm, device = job.conn, job.norm, job.device
    conn.check_finite()
    w = conn.weight.detach()
    if w.device != device:
        w = w.to(device)
    n_out, n_in = w.shape
    rows = max(1, block // max(n_in, 1))
    z = torch.zeros(n_in, dtype=torch.float64, device=device)
    t = torch.zeros(n_in, dtype=torch.float64, device=device)
    for o0 in range(0, n_out, rows):
        blk = w[o0 : o0 + rows].to(torch.float64)
        z += norm.f(blk, shift).sum(0)
        t += norm.f_log2f(blk, shift).sum(0)
    z, inv = _full_rows(norm, z)
    # every entry is stored: no absent-entry constant reaches the columns
    col = torch.empty(n_out, dtype=torch.float64, device=device)
    for o0 in range(0, n_out, rows):
        blk = w[o0 : o0 + rows].to(torch.float64)
        col[o0 : o0 + rows] = norm.f(blk, shift) @ inv
    return z, t, inv, col


def _full_rows(norm: ElementwiseNorm, z: torch.Tensor):
    """``Z`` and ``1/Z`` of rows with every entry stored (Linear): no absent-entry term."""
    if not norm.normalizes:
        z = torch.ones_like(z)
    return z, safe_inverse(z)
