"""Backends: the numeric forms that depend on where a plan runs, chosen once per plan.

Every quantity the engines compute has two forms:

- :class:`NumbaBackend`: numba kernels over NumPy views of CPU tensors
  (``foresight_sparse._kernels``), for the norms they know (``lin``, ``soft``, ``sig`` and
  ``none``). What the CPU runs.
- :class:`TorchBackend`: torch operations, on any device. What CUDA runs, what custom norms
  run everywhere, and what ``backend='torch'`` runs on the CPU.

:func:`resolve_backend` turns the ``backend=`` option of :func:`foresight_sparse.plan` into
one of them, once per plan. Each layer's :class:`~foresight_sparse.engines.LayerJob` carries
it (after :meth:`Backend.for_layer`, where a layer the numba kernels cannot take falls back
to torch), the engines call its methods, and the report records which backend served each
layer (:attr:`LayerReport.backend <foresight_sparse.results.LayerReport>`).

The interface (:class:`Backend`) has one method per operation:

- block fill: :meth:`~Backend.stencil_block`, :meth:`~Backend.dense_block` (what
  :meth:`Connectivity.block <foresight_sparse.connectivity.Connectivity.block>` runs);
- block reduction (the sparse engine): :meth:`~Backend.reduce_blocks`;
- kernel terms and ``f(K)`` (the implicit engine's convolutions): :meth:`~Backend.kernel_terms`,
  :meth:`~Backend.f_kernel`, :meth:`~Backend.conv_pass`;
- the Linear passes (row sums, then columns): :meth:`~Backend.linear_passes`;
- column terms (degeneracy's sufficient statistics): :meth:`~Backend.column_terms`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .connectivity import FullyConnected, Stencil
from .connectivity.base import Block, _buffer, _rowptr
from .entropy import complete_row_sums, row_entropy, safe_inverse
from .exceptions import DeviceError, UnknownNameError, UnsupportedEngineError
from .geometry import AxisClasses, AxisPairs
from .norms import (
    KERNEL_CODES,
    KIND_LIN,
    KIND_NONE,
    NORMS,
    ElementwiseNorm,
    LinNorm,
    Norm,
    SoftNorm,
)

__all__ = [
    "BACKENDS",
    "GATHER_BYTES",
    "Backend",
    "TorchBackend",
    "NumbaBackend",
    "TORCH",
    "resolve_backend",
    "default_backend",
    "column_classes",
    "reduce_block_torch",
]

#: The names ``backend=`` accepts.
BACKENDS = ("auto", "numba", "torch")

#: Bytes of the gathered ``1/Z`` taps that one step of a convolution's column pass may hold
#: (both forms).
GATHER_BYTES = 64 << 20


class Backend:
    """Where and how a plan's numeric forms run. Engines call these methods; they never
    branch on the device themselves.

    Attributes
    ----------
    name : str
        ``'numba'`` or ``'torch'``: what :attr:`LayerReport.backend
        <foresight_sparse.results.LayerReport>` records.
    bytes_per_entry : int
        Working bytes per stored entry while the sparse engine reduces a block (indices,
        values and temporaries).
    """

    name = "backend"
    bytes_per_entry = 0

    def __repr__(self) -> str:
        return f"<{self.name} backend>"

    def for_layer(self, conn) -> Backend:
        """The backend that serves ``conn``: this one, or the torch one where this one's
        kernels cannot take the layer."""
        return self

    def threads(self) -> int:
        """Per-thread column accumulators the sparse engine keeps."""
        raise NotImplementedError

    # ------------------------------------------------------------------ block fill

    def stencil_block(
        self,
        conn: Stencil,
        r0: int,
        r1: int,
        dtype: torch.dtype,
        device: torch.device,
        with_rows: bool,
        index_dtype: torch.dtype,
        workspace: dict | None,
    ) -> Block:
        """Rows ``r0 .. r1`` of a :class:`~foresight_sparse.connectivity.Stencil` (see
        :meth:`Connectivity.block <foresight_sparse.connectivity.Connectivity.block>`)."""
        raise NotImplementedError

    def dense_block(
        self,
        conn: FullyConnected,
        r0: int,
        r1: int,
        dtype: torch.dtype,
        device: torch.device,
        with_rows: bool,
        index_dtype: torch.dtype,
    ) -> Block:
        """Rows ``r0 .. r1`` of a :class:`~foresight_sparse.connectivity.FullyConnected`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ sparse engine

    def reduce_blocks(
        self,
        conn,
        norm: ElementwiseNorm,
        shift: float,
        blocks: list[tuple[int, int]],
        counts: np.ndarray,
        device: torch.device,
    ) -> tuple[float, float, torch.Tensor]:
        """Stream ``blocks`` of rows (``counts`` stored entries per row) and reduce them:
        the sum of the rows' entropies, the constant ``sum c/Z`` every column receives, and
        the float64 column sums without it."""
        raise NotImplementedError

    # ------------------------------------------------------------------ implicit engine

    def kernel_terms(
        self,
        conn: Stencil,
        norm: ElementwiseNorm,
        shift: float,
        device: torch.device,
        non_finite: list | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Sf, St)``: the channel-summed ``f(K)`` and ``f(K) log2 f(K)`` per input
        channel, ``(C_in, KH, KW)`` float64 on ``device``. Where the pass counts NaN/Inf
        weights, their number is appended to ``non_finite``."""
        raise NotImplementedError

    def f_kernel(
        self,
        conn: Stencil,
        norm: ElementwiseNorm,
        shift: float,
        device: torch.device,
        o0: int = 0,
        o1: int | None = None,
    ) -> torch.Tensor:
        """``f(K)`` for output channels ``o0 .. o1`` of every group, float64 on ``device``:
        shape ``(groups, o1 - o0, C_in/groups, KH, KW)``."""
        raise NotImplementedError

    def conv_pass(
        self, conn: Stencil, norm: ElementwiseNorm, shift: float, device: torch.device, step: int
    ) -> tuple[float, float, torch.Tensor, torch.Tensor]:
        """A convolution's row and column passes on its position classes (checking its
        weights are finite): the class-weighted sum of row entropies, the constant
        ``sum c/Z``, the column sum of every output class (flattened ``(C_out, P, Q)``) and
        the number of columns each stands for. ``step``: output channels per group that
        one block of the column pass may hold (the budget's bound)."""
        raise NotImplementedError

    def linear_passes(
        self,
        conn: FullyConnected,
        norm: ElementwiseNorm,
        shift: float,
        device: torch.device,
        block: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A Linear layer's two reads of the weight (checking it is finite): ``Z``, ``T``
        and ``1/Z`` per input, then the column sums. ``block``: elements of the weight one
        torch block may hold."""
        raise NotImplementedError

    # ------------------------------------------------------------------ columns

    def column_terms(
        self, v: torch.Tensor, add: float = 0.0, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Sufficient statistics of ``H(x / sum x)`` for ``x = v + add``, as a float64
        CPU tensor of shape ``(4,)`` (see :func:`foresight_sparse.entropy.column_terms`)."""
        raise NotImplementedError


# --------------------------------------------------------------------------- torch


class TorchBackend(Backend):
    """The torch forms: vectorised torch operations on any device (what CUDA runs)."""

    name = "torch"
    bytes_per_entry = 96

    def threads(self) -> int:
        return 1

    def stencil_block(self, conn, r0, r1, dtype, device, with_rows, index_dtype, workspace=None):
        # Every entry's position in its row is decomposed into (output channel, H pair,
        # W pair) and its value gathered from the kernel, duplicate taps summed through a
        # padded tap table: the same block as the numba kernel.
        _, height, width = conn.in_chw
        _, out_h, out_w = conn.out_chw

        def t(a):
            return torch.tensor(a, device=device)  # copies: geometry arrays are read-only

        counts = t(conn.row_counts(r0, r1))
        rowptr = torch.zeros(r1 - r0 + 1, dtype=torch.int64, device=device)
        torch.cumsum(counts, 0, out=rowptr[1:])
        nnz = int(rowptr[-1])
        local_row = torch.repeat_interleave(
            torch.arange(r1 - r0, device=device), counts, output_size=nnz
        )
        pos = torch.arange(nnz, device=device) - rowptr[local_row]
        r = local_row + r0
        ci = r // (height * width)
        ih = (r // width) % height
        iw = r % width
        nh = t(conn.pairs_h.counts)[ih]
        nw = t(conn.pairs_w.counts)[iw]
        lq = pos % nw
        rest = pos // nw
        lp = rest % nh
        co_l = rest // nh
        del rest, pos
        p = t(conn.pairs_h.ptr)[ih] + lp
        q = t(conn.pairs_w.ptr)[iw] + lq
        oh = t(conn.pairs_h.out)[p]
        ow = t(conn.pairs_w.out)[q]
        g = ci // conn.cin_g
        co = g * conn.cout_g + co_l
        ci_l = ci - g * conn.cin_g
        kernel = conn.kernel.detach().to(device, torch.float64)
        taps_h = _tap_table(conn.pairs_h, device)
        taps_w = _tap_table(conn.pairs_w, device)
        vals = torch.zeros(nnz, dtype=torch.float64, device=device)
        for a in range(taps_h.shape[1]):
            kh = taps_h[p, a]
            for b in range(taps_w.shape[1]):
                kw = taps_w[q, b]
                ok = (kh >= 0) & (kw >= 0)
                vals += torch.where(ok, kernel[co, ci_l, kh.clamp(min=0), kw.clamp(min=0)], 0.0)
        vals *= t(conn.scale_h)[oh] * t(conn.scale_w)[ow]
        cols = (co * out_h + oh) * out_w + ow
        return Block(r0, rowptr, cols.to(index_dtype), vals.to(dtype), r if with_rows else None)

    def dense_block(self, conn, r0, r1, dtype, device, with_rows, index_dtype):
        n = r1 - r0
        vals, rowptr = _dense_values(conn, r0, r1, dtype, device)
        cols = torch.arange(conn.n_cols, device=device, dtype=index_dtype).repeat(n)
        rows = None
        if with_rows:
            rows = torch.arange(r0, r1, device=device).repeat_interleave(conn.n_cols)
        return Block(r0, rowptr, cols, vals, rows)

    def reduce_blocks(self, conn, norm, shift, blocks, counts, device):
        n_cols = conn.n_cols
        col = torch.zeros(n_cols, dtype=torch.float64, device=device)
        h_sum = torch.zeros((), dtype=torch.float64, device=device)
        off_sum = torch.zeros((), dtype=torch.float64, device=device)
        for r0, r1 in blocks:
            b = conn.rows(self, r0, r1, device=device)
            h, off = reduce_block_torch(b.rowptr, b.cols, b.vals, norm, shift, n_cols, col)
            h_sum += h
            off_sum += off
        return float(h_sum), float(off_sum), col

    def kernel_terms(self, conn, norm, shift, device, non_finite=None, step=None):
        """Over blocks of ``step`` output channels per group (all at once by default)."""
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

    def f_kernel(self, conn, norm, shift, device, o0=0, o1=None):
        k = conn.kernel.detach()
        k = k.reshape(conn.groups, conn.cout_g, *k.shape[1:])[:, o0:o1]
        if isinstance(norm, LinNorm):
            # relu at the kernel's own width, then widen: fewer bytes moved
            return k.to(device).clamp_min(0.0).to(torch.float64)
        return norm.f(k.to(device, torch.float64), shift)

    def conv_pass(self, conn, norm, shift, device, step):
        conn.check_finite()
        c = norm.zero(shift)
        sf, st = self.kernel_terms(conn, norm, shift, device)
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
            fk = self.f_kernel(conn, norm, shift, device, o0, o0 + step)
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

    def linear_passes(self, conn, norm, shift, device, block):
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

    def column_terms(self, v, add=0.0, weights=None):
        x = v.to(torch.float64) + add
        pos, neg = x > 0, x < 0
        ax = torch.where(pos | neg, x.abs(), torch.ones_like(x))
        xlx = ax * torch.log2(ax)
        if weights is not None:
            w = weights.to(x.device, torch.float64)
            x, xlx = x * w, xlx * w
        zero = torch.zeros((), dtype=torch.float64, device=x.device)
        return torch.stack(
            [
                torch.where(pos, x, zero).sum(),
                torch.where(pos, xlx, zero).sum(),
                torch.where(neg, x, zero).sum(),
                torch.where(neg, xlx, zero).sum(),
            ]
        ).cpu()


def _dense_values(conn: FullyConnected, r0: int, r1: int, dtype, device):
    """A Linear block's values (the weight's columns ``r0 .. r1``, transposed) and row
    pointers: torch operations in both backends."""
    vals = conn.weight.detach()[:, r0:r1].to(device=device, dtype=dtype).t().reshape(-1)
    rowptr = torch.arange(r1 - r0 + 1, device=device, dtype=torch.int64) * conn.n_cols
    return vals, rowptr


def _full_rows(norm: ElementwiseNorm, z: torch.Tensor):
    """``Z`` and ``1/Z`` of rows with every entry stored (Linear): no absent-entry term."""
    if not norm.normalizes:
        z = torch.ones_like(z)
    return z, safe_inverse(z)


def _tap_table(pairs: AxisPairs, device) -> torch.Tensor:
    """Taps of each pair, padded with -1 to the widest pair: shape ``(n_pairs, max_taps)``."""
    n_taps = np.diff(pairs.tap_ptr)
    width = int(n_taps.max(initial=1))
    table = np.full((len(pairs.out), width), -1, dtype=np.int64)
    col = np.arange(len(pairs.tap)) - np.repeat(pairs.tap_ptr[:-1], n_taps)
    table[np.repeat(np.arange(len(pairs.out)), n_taps), col] = pairs.tap
    return torch.as_tensor(table, device=device)


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


# --------------------------------------------------------------------------- numba


class NumbaBackend(TorchBackend):
    """The numba forms: kernels over NumPy views of CPU tensors, for the norms they know.

    ``kind`` is the norm's code in :data:`foresight_sparse.norms.KERNEL_CODES`, fixed per
    plan (``None`` for a backend that only fills blocks and column terms, as
    :func:`default_backend` gives). Where a layer is beyond the kernels (a Linear weight in
    float16 or bfloat16), :meth:`for_layer` hands it to the torch forms this class
    inherits.
    """

    name = "numba"
    bytes_per_entry = 16

    def __init__(self, kind: int | None = None):
        self.kind = kind

    def for_layer(self, conn) -> Backend:
        # the Linear passes read the weight as float32 or float64 arrays
        if isinstance(conn, FullyConnected) and conn.weight.dtype not in _NUMBA_FLOATS:
            return TORCH
        return self

    def threads(self) -> int:
        return _kernels().threads()

    def stencil_block(self, conn, r0, r1, dtype, device, with_rows, index_dtype, workspace=None):
        # ``workspace`` (a dict the caller keeps across blocks) lets the kernel write into
        # the same buffers every time instead of mapping fresh memory per block; the
        # returned arrays are then views valid until the next call.
        rowptr = _rowptr(conn.row_counts(r0, r1))
        nnz = int(rowptr[-1])
        # numpy has no bfloat16: such values are made in float32 and cast by torch
        fill_dtype = dtype if dtype in _NUMBA_FLOATS else torch.float32
        np_idx = np.int32 if index_dtype == torch.int32 else np.int64
        cols = _buffer(workspace, "cols", nnz, np_idx)
        vals = torch.from_numpy(
            _buffer(workspace, "vals", nnz, torch.empty((), dtype=fill_dtype).numpy().dtype)
        )
        rows = _buffer(workspace, "rows", nnz if with_rows else 0, np.int64)
        _kernels().fill_stencil_rows(r0, r1 - r0, conn, rowptr, cols, vals.numpy(), rows)
        return Block(
            r0,
            torch.from_numpy(rowptr),
            torch.from_numpy(cols),
            vals.to(dtype),
            torch.from_numpy(rows) if with_rows else None,
        )

    def dense_block(self, conn, r0, r1, dtype, device, with_rows, index_dtype):
        n = r1 - r0
        vals, rowptr = _dense_values(conn, r0, r1, dtype, device)
        np_idx = np.int32 if index_dtype == torch.int32 else np.int64
        cols = np.empty(n * conn.n_cols, dtype=np_idx)
        rows = np.empty(n * conn.n_cols if with_rows else 0, dtype=np.int64)
        _kernels().fill_dense_rows(r0, n, conn.n_cols, cols, rows)
        return Block(
            r0, rowptr, torch.from_numpy(cols), vals, torch.from_numpy(rows) if with_rows else None
        )

    def reduce_blocks(self, conn, norm, shift, blocks, counts, device):
        k = _kernels()
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
                self,
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
                self.kind,
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

    def kernel_terms(self, conn, norm, shift, device, non_finite=None):
        """One numba pass over the kernel (for each group, the column sums of its
        ``(C_out/g, C_in/g * KH * KW)`` matrix), with no copy of it."""
        _, sf, st = self._kernel_sums(conn, shift, non_finite)
        return torch.from_numpy(sf), torch.from_numpy(st)

    def _kernel_sums(self, conn, shift, non_finite):
        """The kernel as ``(groups, C_out/g, C_in/g * KH * KW)`` (a view) and its sums of
        ``f`` and ``f log2 f`` per input tap, ``(C_in, KH, KW)`` float64 arrays."""
        k = _kernel_as_float(conn)
        w3 = k.numpy().reshape(conn.groups, conn.cout_g, -1)
        z, t = _kernels().dense_row_sums(w3, self.kind, shift, non_finite)
        shape = (conn.in_chw[0], *k.shape[-2:])
        return w3, z.reshape(shape), t.reshape(shape)

    def conv_pass(self, conn, norm, shift, device, step):
        # the kernel is read once per pass and never copied; the class arrays are planned
        # per geometry. A float32 kernel under relu or no norm is checked for NaN/Inf by its
        # row pass, as a Linear weight is (no separate scan).
        fused = conn.kernel.dtype == torch.float32 and self.kind in (KIND_LIN, KIND_NONE)
        if not fused:
            conn.check_finite()
        non_finite: list = []
        w3, sf, st = self._kernel_sums(conn, shift, non_finite)
        if fused:
            conn.check_finite(non_finite[0])
        key = (conn.axis_h, conn.axis_w, conn.cin_g, conn.cout_g, conn.out_chw[0])
        classes = conn.shared_memo("class_arrays", key, lambda: _class_arrays(conn))
        geometry, index, rows_full, weights = classes
        h_sum, off, col = _kernels().class_pass(
            w3,
            sf,
            st,
            geometry,
            index,
            rows_full,
            self.kind,
            shift,
            norm.zero(shift),
            norm.zero_log2(shift),
            norm.normalizes,
            conn.cout_g,
            conn.n_cols,
            GATHER_BYTES,
        )
        return h_sum, off, torch.from_numpy(col.reshape(-1)), weights

    def linear_passes(self, conn, norm, shift, device, block):
        k = _kernels()
        w = conn.weight.detach()
        # float32 under relu or no norm: the row pass counts NaN/Inf weights as it goes,
        # which saves a read of the weight for the finiteness scan (those norms need no
        # bound on the weights: their shift is 0)
        fused = w.dtype == torch.float32 and self.kind in (KIND_LIN, KIND_NONE)
        if not fused:
            conn.check_finite()
        w_np = w.cpu().contiguous().numpy()
        non_finite: list = []
        sums = k.dense_row_sums(w_np, self.kind, shift, non_finite)
        if fused:
            conn.check_finite(non_finite[0])
        z, t = (torch.from_numpy(a) for a in sums)
        z, inv = _full_rows(norm, z)
        # every entry is stored: no absent-entry constant (c = 0) reaches the columns
        col = torch.from_numpy(k.dense_cols(w_np, self.kind, shift, 0.0, inv.numpy()))
        return z, t, inv, col

    def column_terms(self, v, add=0.0, weights=None):
        arr = v.detach().contiguous().numpy()
        w = None if weights is None else weights.detach().to(torch.float64).contiguous().numpy()
        return torch.from_numpy(_kernels().column_terms(arr, float(add), w))


_NUMBA_FLOATS = (torch.float32, torch.float64)


def _kernels():
    """The numba kernels' module: numba loads on first use, not on import."""
    global _KERNELS
    if _KERNELS is None:
        from . import _kernels as module

        _KERNELS = module
    return _KERNELS


_KERNELS = None


def _kernel_as_float(conn: Stencil) -> torch.Tensor:
    """The kernel on the CPU as a contiguous float32 or float64 tensor (no copy if it is)."""
    k = conn.kernel.detach().cpu()
    if k.dtype not in _NUMBA_FLOATS:
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
    index = _kernels().class_index(
        geometry[6], geometry[7], conn.cin_g, len(ch.in_mult), len(cw.in_mult)
    )
    stored = conn.cout_g * np.multiply.outer(geometry[2], geometry[3])
    rows_full = bool((stored == conn.n_cols).any()), bool((stored != conn.n_cols).any())
    mult = np.outer(ch.out_mult, cw.out_mult).astype(np.float64).reshape(-1)
    return geometry, index, rows_full, torch.from_numpy(np.tile(mult, conn.out_chw[0]))


# --------------------------------------------------------------------------- choice

#: The torch backend (stateless: one instance serves every plan).
TORCH = TorchBackend()

#: One numba backend per kernel code (and one for fills alone, under ``None``).
_NUMBA = {kind: NumbaBackend(kind) for kind in (None, *sorted(set(KERNEL_CODES.values())))}


def resolve_backend(backend: str = "auto", device="cpu", norm: Norm | None = None) -> Backend:
    """The backend a plan runs with: the ``backend=`` option resolved for its device and
    norm, once.

    Parameters
    ----------
    backend : {'auto', 'numba', 'torch'}, default 'auto'
        ``'auto'``: numba on a CPU device for the norms the kernels know (``lin``,
        ``soft``, ``sig``, ``none``), torch otherwise (CUDA, custom norms). ``'torch'``:
        the torch forms on any device (what CUDA runs, here also on CPU tensors).
        ``'numba'``: the numba kernels; CPU only, built-in norms only.
    device : torch.device or str
        Where the plan's reductions run.
    norm : Norm, optional
        The plan's norm; ``None`` asks for a backend that only fills blocks.

    Raises
    ------
    UnknownNameError
        For a name not in :data:`BACKENDS`.
    DeviceError
        For ``'numba'`` on a device other than the CPU.
    UnsupportedEngineError
        For ``'numba'`` with a norm the kernels do not have (a custom norm).
    """
    if isinstance(backend, Backend):
        return backend
    if backend not in BACKENDS:
        raise UnknownNameError(
            f"unknown backend {backend!r}; valid backends are {', '.join(BACKENDS)}"
        )
    dev = torch.device(device)
    if backend == "torch":
        return TORCH
    kind = None if norm is None else KERNEL_CODES.get(type(norm))
    if backend == "numba":
        if dev.type != "cpu":
            raise DeviceError(
                f"backend='numba' runs on the CPU only, and the device is {dev}; use "
                "backend='auto' or 'torch' there, or device='cpu'"
            )
        if norm is not None and kind is None:
            raise UnsupportedEngineError(
                f"backend='numba' has no kernel for the norm {norm.name!r} (the kernels know "
                f"{', '.join(NORMS)}); use backend='auto' or 'torch', which evaluate any "
                "norm with torch"
            )
        return _NUMBA[kind]
    if dev.type == "cpu" and (norm is None or kind is not None):
        return _NUMBA[kind]
    return TORCH


def default_backend(device) -> Backend:
    """The backend for work outside a plan (filling blocks, column terms): numba on the
    CPU, torch elsewhere. The one place that decides by the device alone."""
    return _NUMBA[None] if torch.device(device).type == "cpu" else TORCH
