"""The implicit engine's numerics for an average pool: one form, torch operations on maps
of the output's size, whatever the backend (they are small: no kernel pays for itself).

A pool's kernel is a constant ``kappa`` times a per-output divisor, so ``f`` of an entry
depends only on its column: ``F[j] = f(kappa d_j)``. With the 0/1 input-to-output matrices
``Mh_o``, ``Mw_o`` of each axis, the row sums are ``Mh_o @ F @ Mw_o.T`` and the column pass
is a window sum of ``1/Z``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..connectivity import Stencil
from ..entropy import complete_row_sums, row_entropy
from ..norms import ElementwiseNorm

__all__ = ["pool_pass"]


def pool_pass(conn: Stencil, norm: ElementwiseNorm, device) -> tuple[float, torch.Tensor, float]:
    """A pool's sum of row entropies, its column sums (flattened ``(C_out, OH, OW)``,
    float64 on ``device``) and the constant ``sum c/Z`` every column receives."""
    kappa = conn.weight_range()[1]
    _, oh, ow = conn.out_chw
    v = kappa * torch.as_tensor(np.outer(conn.scale_h, conn.scale_w), device=device)
    shift = norm.shift(float(v.max()))
    c = norm.zero(shift)
    fv, tv = norm.f(v, shift), norm.f_log2f(v, shift)
    # 0/1 input->output matrices per axis (zero padding: one tap per pair)
    ch = _in_out_matrix(conn.pairs_h, oh, device)
    cw = _in_out_matrix(conn.pairs_w, ow, device)
    z = (conn.cout_g * (ch @ fv @ cw.T))[None]  # same for every input channel
    t = (conn.cout_g * (ch @ tv @ cw.T))[None]
    z, t, inv = complete_row_sums(norm, shift, _stored_counts(conn, device), conn.n_cols, z, t)
    c_in = conn.in_chw[0]
    h_sum = row_entropy(z, t).sum() * c_in
    # sum of 1/Z over each output's window, summed over the input channels of its group
    inv_map = inv.expand(c_in, -1, -1)
    grouped = inv_map.reshape(conn.groups, conn.cin_g, *inv_map.shape[1:]).sum(1)
    window = ch.T @ grouped @ cw  # (groups, OH, OW)
    window = window.repeat_interleave(conn.cout_g, dim=0)
    col = ((fv - c) * window).reshape(-1)
    return float(h_sum), col, c * float(inv.sum()) * c_in


def _stored_counts(conn: Stencil, device) -> torch.Tensor:
    nh = torch.tensor(conn.pairs_h.counts, device=device, dtype=torch.float64)
    nw = torch.tensor(conn.pairs_w.counts, device=device, dtype=torch.float64)
    return conn.cout_g * nh[:, None] * nw[None, :]


def _in_out_matrix(pairs, size_out: int, device) -> torch.Tensor:
    m = np.zeros((len(pairs.ptr) - 1, size_out))
    m[np.repeat(np.arange(len(pairs.ptr) - 1), pairs.counts), pairs.out] = 1.0
    return torch.as_tensor(m, device=device)
