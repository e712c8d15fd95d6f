"""The implicit engine's numerics for a convolution: its row and column passes on the
layer's position classes, in both forms.

The row pass takes the kernel summed over each group's output channels (:func:`kernel_terms_numba`,
:func:`kernel_terms_torch`), then ``Z``, ``T`` and ``1/Z`` per input class; the column pass
is ``conv2d(1/Z, f(K) - c)`` evaluated once per output class (see :mod:`.implicit`).
:func:`conv_pass_numba` runs the numba kernels of ``_dense_kernels`` and ``_conv_kernels``
on CPU arrays; :func:`conv_pass_torch` runs torch matrix products and
:func:`column_classes` on any device. The engine picks one by the job's backend
(:mod:`.dispatch`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..backends import NUMBA_FLOATS, numba_kernels
from ..connectivity import Stencil
from ..entropy import complete_row_sums, row_entropy
from ..geometry import AxisClasses
from ..norms import KIND_LIN, KIND_NONE, ElementwiseNorm, LinNorm
from .base import LayerJob

__all__ = [
    "GATHER_BYTES",
    "conv_pass_numba",
    "conv_pass_torch",
    "kernel_terms_numba",
    "kernel_terms_torch",
    "column_classes",
]

#: Bytes of the gathered ``1/Z`` taps that one step of a convolution's column pass may hold
#: (both forms).
GATHER_BYTES = 64 << 20


# --------------------------------------------------------------------------- numba


def conv_pass_numba(
    job: LayerJob, shift: float, step: int
) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """A convolution's row and column passes on its position classes, by the numba kernels
    (checking its weights are finite): the class-weighted sum of row entropies, the
    constant ``sum c/Z``, the column sum of every output class (flattened ``(C_out, P,
    Q)``) and the number of columns each stands for. The kernel is read once per pass and
    never copied, so ``step`` (the budget's bound on output channels per block, which
    :func:`conv_pass_torch` takes) is unused."""
    conn, norm, kind = job.conn, job.norm, job.backend.kind
    # the class arrays are planned per geometry. A float32 kernel under relu or no norm is
    # checked for NaN/Inf by its row pass, as a Linear weight is (no separate scan).
    fused = conn.kernel.dtype == torch.float32 and kind in (KIND_LIN, KIND_NONE)
    if not fused:
        conn.check_finite()
    non_finite: list = []
    w3, sf, st = _kernel_sums(conn, kind, shift, non_finite)
    if fused:
        conn.check_finite(non_finite[0])
    key = (conn.axis_h, conn.axis_w, conn.cin_g, conn.cout_g, conn.out_chw[0])
    classes = conn.shared_memo("class_arrays", key, lambda: _class_arrays(conn))
    geometry, index, rows_full, weights = classes
    h_sum, off, col = numba_kernels("engines._conv_kernels").class_pass(
        w3,
        sf,
        st,
        geometry,
        index,
        rows_full,
        kind,
        shift,
        norm.zero(shift),
        norm.zero_log2(shift),
        norm.normalizes,
        conn.cout_g,
        conn.n_cols,
        GATHER_BYTES,
    )
    return h_sum, off, torch.from_numpy(col.reshape(-1)), weights


def kernel_terms_numba(
    conn: Stencil, kind: int, shift: float, non_finite: list | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Sf, St)``: the channel-summed ``f(K)`` and ``f(K) log2 f(K)`` per input channel,
    ``(C_in, KH, KW)`` float64 CPU tensors, under the norm of kernel code ``kind``. One
    numba pass over the kernel (for each group, the column sums of its ``(C_out/g, C_in/g
    * KH * KW)`` matrix), with no copy of it. Where the pass counts NaN/Inf weights, their
    number is appended to ``non_finite``."""
    _, sf, st = _kernel_sums(conn, kind, shift, non_finite)
    return torch.from_numpy(sf), torch.from_numpy(st)


def _kernel_sums(conn: Stencil, kind: int, shift: float, non_finite: list | None):
    """The kernel as ``(groups, C_out/g, C_in/g * KH * KW)`` (a view) and its sums of
    ``f`` and ``f log2 f`` per input tap, ``(C_in, KH, KW)`` float64 arrays."""
    k = _kernel_as_float(conn)
    w3 = k.numpy().reshape(conn.groups, conn.cout_g, -1)
    z, t = numba_kernels("engines._dense_kernels").dense_row_sums(w3, kind, shift, non_finite)
    shape = (conn.in_chw[0], *k.shape[-2:])
    return w3, z.reshape(shape), t.reshape(shape)


def _kernel_as_float(conn: Stencil) -> torch.Tensor:
    """The kernel on the CPU as a contiguous float32 or float64 tensor (no copy if it is)."""
    k = conn.kernel.detach().cpu()
    if k.dtype not in NUMBA_FLOATS:
        k = k.to(torch.float32 if k.element_size() < 4 else torch.float64)
    return k.contiguous()


def _class_arrays(conn: Stencil):
    """The position classes of a convolution's geometry as the numba kernels take them
    (writable, contiguous, float64 or int64), the gather index of the column pass, whether
    any row class stores every entry and whether any has absent ones, and the multiplicity
    of every output column of the class columns (``(C_out, P, Q)`` flattened; never
    written to). Made once per plan for all the layers of the same window geometry and
    channel counts (:meth:`~foresight_sparse.connectivity.Connectivity.shared_memo`)."""
    ch, cw = conn.axis_h.classes(), conn.axis_w.classes()

    def f64(a):
        return np.array(a, dtype=np.float64)

    def i64(a):
        return np.array(a, dtype=np.int64)

    geometry = (
        f64(ch.in_profile),
        f64(cw.in_profile),
        i64(ch.in_counts),
        i64(cw.in_counts),
        f64(ch.in_mult),
        f64(cw.in_mult),
        i64(ch.out_taps),
        i64(cw.out_taps),
    )
    index = numba_kernels("engines._conv_kernels").class_index(
        geometry[6], geometry[7], conn.cin_g, len(ch.in_mult), len(cw.in_mult)
    )
    stored = conn.cout_g * np.multiply.outer(geometry[2], geometry[3])
    rows_full = bool((stored == conn.n_cols).any()), bool((stored != conn.n_cols).any())
    mult = np.outer(ch.out_mult, cw.out_mult).astype(np.float64).reshape(-1)
    return geometry, index, rows_full, torch.from_numpy(np.tile(mult, conn.out_chw[0]))


# --------------------------------------------------------------------------- torch


def conv_pass_torch(
    job: LayerJob, shift: float, step: int
) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """:func:`conv_pass_numba` with torch operations on ``job.device``: the column pass
    holds ``f(K)`` for ``step`` output channels per group at a time."""
    conn, norm, device = job.conn, job.norm, job.device
    conn.check_finite()
    c = norm.zero(shift)
    sf, st = kernel_terms_torch(conn, norm, shift, device)
    ch, cw = conn.axis_h.classes(), conn.axis_w.classes()
    f64 = dict(dtype=torch.float64, device=device)
    mh, mw = torch.tensor(ch.in_profile, **f64), torch.tensor(cw.in_profile, **f64)
    z = mh @ sf @ mw.T  # (C_in, input classes along H, along W)
    t = mh @ st @ mw.T
    stored = conn.cout_g * torch.outer(
        torch.tensor(ch.in_counts, **f64), torch.tensor(cw.in_counts, **f64)
    )
    z, t, inv = complete_row_sums(norm, shift, stored, conn.n_cols, z, t)
    mult_in = torch.outer(torch.tensor(ch.in_mult, **f64), torch.tensor(cw.in_mult, **f64))
    h_sum = float((row_entropy(z, t) * mult_in).sum())
    # Full rows (no absent entry) take c = 0: exact, and no c/Z - c/Z cancellation when
    # Z << c; their 1/Z goes through f(K), the other rows' through f(K) - c.
    full = stored == conn.n_cols
    any_full, all_full = bool(full.any()), bool(full.all())
    inv_full = torch.where(full, inv, 0.0) if any_full else None
    inv_part = torch.where(full, 0.0, inv) if any_full else inv
    g, cout_g = conn.groups, conn.cout_g
    col = torch.empty(g, cout_g, len(ch.out_mult), len(cw.out_mult), **f64)
    for o0 in range(0, cout_g, step):
        fk = _f_kernel(conn, norm, shift, device, o0, o0 + step)
        if any_full:
            col[:, o0 : o0 + step] = column_classes(conn, ch, cw, inv_full, fk)
        if not all_full:
            part = column_classes(conn, ch, cw, inv_part, fk - c if c != 0.0 else fk)
            if any_full:
                col[:, o0 : o0 + step] += part
            else:
                col[:, o0 : o0 + step] = part
        del fk
    mult_out = torch.outer(torch.tensor(ch.out_mult, **f64), torch.tensor(cw.out_mult, **f64))
    return (
        h_sum,
        c * float((inv_part * mult_in).sum()),
        col.reshape(-1),
        mult_out.expand(conn.out_chw[0], -1, -1).reshape(-1),
    )


def kernel_terms_torch(
    conn: Stencil, norm: ElementwiseNorm, shift: float, device, step: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kernel_terms_numba` with torch operations on ``device``, over blocks of
    ``step`` output channels per group (all at once by default)."""
    g, cout_g, cin_g = conn.groups, conn.cout_g, conn.cin_g
    kh, kw = conn.kernel.shape[-2:]
    step = step or cout_g
    sf = torch.zeros(g, cin_g * kh * kw, dtype=torch.float64, device=device)
    st = torch.zeros_like(sf)
    k = conn.kernel.detach().reshape(g, cout_g, -1)
    for o0 in range(0, cout_g, step):
        blk = k[:, o0 : o0 + step].to(device, torch.float64)
        sf += norm.f(blk, shift).sum(1)
        st += norm.f_log2f(blk, shift).sum(1)
    return sf.reshape(-1, kh, kw), st.reshape(-1, kh, kw)


def _f_kernel(
    conn: Stencil, norm: ElementwiseNorm, shift: float, device, o0: int = 0, o1: int | None = None
) -> torch.Tensor:
    """``f(K)`` for output channels ``o0 .. o1`` of every group, float64 on ``device``:
    shape ``(groups, o1 - o0, C_in/groups, KH, KW)``."""
    k = conn.kernel.detach()
    k = k.reshape(conn.groups, conn.cout_g, *k.shape[1:])[:, o0:o1]
    if isinstance(norm, LinNorm):
        # relu at the kernel's own width, then widen: fewer bytes moved
        return k.to(device).clamp_min(0.0).to(torch.float64)
    return norm.f(k.to(device, torch.float64), shift)


def column_classes(
    conn: Stencil, ch: AxisClasses, cw: AxisClasses, inv: torch.Tensor, g_kernel: torch.Tensor
) -> torch.Tensor:
    """Column sums of every output class: ``conv2d(1/Z, G)`` evaluated once per class (the
    torch form of a convolution's column pass).

    ``inv`` is ``1/Z`` per (input channel, input class along H, along W); ``g_kernel`` is
    ``(groups, n, C_in/groups, KH, KW)``: ``n`` output channels of each group. Output class
    ``(p, q)`` reads input class ``out_taps[p, kh]`` through tap ``kh`` (and likewise along
    W), so its column of output channel ``co`` is
    ``sum over ci, kh, kw of inv[ci, taps_h[p, kh], taps_w[q, kw]] * G[co, ci, kh, kw]``:
    a float64 matrix product with the taps gathered, in slices of output classes that
    keep the gathered copy under :data:`GATHER_BYTES`. Returns ``(groups, n, P, Q)``
    float64.
    """
    g, cin_g = conn.groups, conn.cin_g
    n_co = g_kernel.shape[1]
    n_kh, n_kw = g_kernel.shape[-2:]
    dev = inv.device
    inv0 = F.pad(inv, (0, 1, 0, 1))  # class -1 (no input) reads the appended zero
    taps_h = torch.as_tensor(np.where(ch.out_taps < 0, inv.shape[1], ch.out_taps), device=dev)
    taps_w = torch.as_tensor(np.where(cw.out_taps < 0, inv.shape[2], cw.out_taps), device=dev)
    n_p, n_q = taps_h.shape[0], taps_w.shape[0]
    kmat = g_kernel.to(torch.float64).reshape(g, n_co, cin_g * n_kh * n_kw)
    per_row = inv.shape[0] * n_kh * n_q * n_kw * 8
    step = max(1, GATHER_BYTES // max(per_row, 1))
    out = torch.empty(g, n_co, n_p, n_q, dtype=torch.float64, device=dev)
    for p0 in range(0, n_p, step):
        th = taps_h[p0 : p0 + step]
        x = inv0[:, th[:, :, None, None], taps_w[None, None, :, :]]  # (C_in, p, KH, Q, KW)
        x = x.reshape(g, cin_g, len(th), n_kh, n_q, n_kw).permute(0, 1, 3, 5, 2, 4)
        x = x.reshape(g, cin_g * n_kh * n_kw, len(th) * n_q)
        out[:, :, p0 : p0 + len(th)] = torch.bmm(kmat, x).reshape(g, n_co, len(th), n_q)
    return out
