"""The implicit engine: EI quantities as convolutions of the kernel; no matrix is built.

For a sliding-window layer in which no output reaches an input through two taps (always so
with zero padding; also for circular padding narrower than the input, and for the
reflect/replicate layers whose folded taps never meet in one window) every quantity the
norms need is a product of small per-axis matrices with channel-summed kernels, or one
forward convolution (see the mathematics page of the docs). With ``Mh[ih, kh]`` the number
of outputs that reach input row ``ih`` through kernel row ``kh`` (and ``Mw`` likewise)::

    sum over S_r of f(a)           = Mh @ Sf[ci] @ Mw.T,  Sf[ci] = sum over the group's co of f(K)
    sum over S_r of f(a) log2 f(a) = Mh @ St[ci] @ Mw.T
    number of stored entries       = C_out/groups * pairs_h[ih] * pairs_w[iw]
    column j                       = c * sum_r 1/Z_r + conv2d(1/Z, f(K) - c)[j]

The first three are the channel-summed ("depthwise") transposed convolutions of a map of
ones, written as two small matrix products per channel. None of them is evaluated per
position: ``Z`` depends on an input only through its row of ``Mh`` (and of ``Mw``), and a
column only through the input classes its taps read, so both passes run on the layer's
position classes (:class:`~foresight_sparse.geometry.AxisClasses`; one interior class per
stride offset plus the border positions), each class weighted by its size. The column
pass is then a float64 matrix product of the kernel with ``1/Z`` gathered per class
(:func:`column_classes`); everything is float64.

Average pools have a constant kernel and a per-output divisor, so ``f`` of an entry depends
only on its column: ``F[j] = f(d_j)``; the row sums are ``Mh_o @ F @ Mw_o.T`` with the 0/1
input-to-output matrices, and the column pass is a window sum of ``1/Z``.

Linear layers are read twice, with float64 accumulation: one pass for ``Z`` and ``T``,
one for the columns.

Layers with summed duplicate taps (most reflect/replicate padding), custom norms and
user-registered builders are not expressible this way: :func:`supports` says so and
``engine='auto'`` hands them to the sparse engine.

Working memory is float64 copies of the kernel and class-sized maps per layer (never the
matrix, nor an image-sized map); it is checked against ``max_memory`` before a layer
starts.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from ..budget import check_budget
from ..connectivity import FullyConnected, Stencil
from ..entropy import row_entropy, safe_inverse
from ..exceptions import UnsupportedEngineError
from ..geometry import AxisClasses
from ..norms import KERNEL_CODES as _KINDS
from ..norms import KIND_LIN, KIND_NONE, ElementwiseNorm, LinNorm, SoftNorm
from . import LayerJob, LayerStats, layer_shift

__all__ = [
    "supports",
    "layer_stats",
    "working_bytes",
    "kernel_terms",
    "kernel_terms_torch",
    "f_kernel",
    "column_classes",
    "linear_torch",
    "SOFTMAX_SPAN",
]

#: Fewest elements of a Linear weight the torch passes take per block. Blocks grow with the
#: budget (a few blocks per layer on a GPU: each costs a dozen kernel launches).
_LINEAR_BLOCK = 1 << 21

#: Bytes of float64 temporaries per weight element in a block of the torch Linear passes.
_LINEAR_BYTES_PER_ELEMENT = 64


#: Softmax layers whose weights span more than this many nats go to the sparse engine,
#: which shifts every row by its own maximum; one shift per layer would underflow there.
SOFTMAX_SPAN = 600.0


def supports(job: LayerJob) -> bool:
    """True when the implicit engine computes ``job`` exactly."""
    if not job.norm.elementwise:
        return False
    conn = job.conn
    if isinstance(job.norm, SoftNorm) and isinstance(conn, (FullyConnected, Stencil)):
        lo, hi = conn.weight_range()
        if max(hi, 0.0) - min(lo, 0.0) > SOFTMAX_SPAN:
            return False
    if isinstance(conn, FullyConnected):
        return True
    if isinstance(conn, Stencil):
        if not conn.single_tap:
            return False
        if _constant_kernel(conn):  # pools: zero padding only (their windows clip)
            return conn.axis_h.mode == conn.axis_w.mode == "zeros"
        return not conn.scaled
    return False


def layer_stats(job: LayerJob) -> LayerStats:
    """Reduce one layer implicitly (see module docstring)."""
    if not supports(job):
        raise UnsupportedEngineError(
            f"{job.conn.label}: the implicit engine cannot express this layer (padding that "
            "folds two taps onto one input, a custom norm or a custom builder); use "
            "engine='auto' or 'sparse'"
        )
    conn = job.conn
    check_budget(
        working_bytes(conn, job.budget),
        job.budget,
        f"{conn.label}: the implicit engine's maps ({conn.n_rows} inputs, {conn.n_cols} outputs)",
        "raise max_memory",
    )
    if isinstance(conn, FullyConnected):
        return _linear(conn, job.norm, job.device, job.budget)  # checks finiteness itself
    if _constant_kernel(conn):
        conn.check_finite()
        return _pool(conn, job.norm, job.device)
    return _conv(conn, job.norm, job.device, job.budget)  # checks finiteness itself


def working_bytes(conn, budget: int | None = None) -> int:
    """Bytes the implicit engine allocates for one layer (an upper estimate).

    Convolutions: the gathered ``1/Z`` of :func:`column_classes` (at most 64 MiB) and three
    float64 copies of one block of output channels of the kernel; the blocks are as large
    as ``budget`` allows (the whole kernel when ``budget`` is None), and at least one output
    channel per group. Pools: float64 maps of the input and output size. Linear: per-input
    float64 sums and one block of the float64 weight.
    """
    if isinstance(conn, FullyConnected):
        return _linear_sums_bytes(conn) + _LINEAR_BYTES_PER_ELEMENT * min(
            _LINEAR_BLOCK, conn.weight.numel()
        )
    if _constant_kernel(conn):
        return 8 * (3 * conn.n_rows + 2 * conn.n_cols)
    fixed = _conv_fixed_bytes(conn)
    return (
        fixed
        + _KERNEL_COPIES
        * 8
        * conn.groups
        * _cout_step(conn, budget, fixed)
        * conn.kernel[0].numel()
    )


#: float64 copies of a block of the kernel that a convolution's column pass holds at once.
_KERNEL_COPIES = 3


def _conv_fixed_bytes(conn: Stencil) -> int:
    """A convolution's bytes outside its kernel blocks: the gathered ``1/Z`` and the
    per-class maps."""
    ch, cw = _classes(conn)
    per_class_row = conn.in_chw[0] * conn.kernel[0, 0].numel() * len(cw.out_mult) * 8
    gather = min(max(_GATHER_BYTES, per_class_row), per_class_row * len(ch.out_mult))
    maps = 8 * 6 * conn.in_chw[0] * len(ch.in_mult) * len(cw.in_mult)
    return gather + maps + 8 * 2 * conn.out_chw[0] * len(ch.out_mult) * len(cw.out_mult)


def _cout_step(conn: Stencil, budget: int | None, fixed: int) -> int:
    """Output channels per group in one block of a convolution's column pass."""
    if budget is None:
        return conn.cout_g
    per_channel = _KERNEL_COPIES * 8 * conn.groups * conn.kernel[0].numel()
    return max(1, min(conn.cout_g, (budget - fixed) // max(per_channel, 1)))


def _linear_sums_bytes(conn: FullyConnected) -> int:
    """The Linear passes' per-input and per-output float64 vectors."""
    return 8 * (4 * conn.n_rows + 2 * conn.n_cols)


def _constant_kernel(conn: Stencil) -> bool:
    """A pool's kernel: made from the layer's options (no weights), every tap equal. A
    convolution takes the convolution path whatever its weights, so this reads no weight
    that a new state dict would change."""
    if conn.weight_name is not None:
        return False
    lo, hi = conn.weight_range()  # a pool's kernel is bound once: scanned once
    return conn.kernel.numel() > 0 and lo == hi


def _absent_terms(
    norm: ElementwiseNorm,
    shift: float,
    stored: torch.Tensor,
    n_cols: int,
    z: torch.Tensor,
    t: torch.Tensor,
):
    """Complete the stored-entry sums with the absent entries; return (Z, T, 1/Z)."""
    if norm.normalizes:
        absent = n_cols - stored
        z = z + norm.zero(shift) * absent
        t = t + norm.zero_log2(shift) * absent
    else:
        z = torch.ones_like(z)
    return z, t, safe_inverse(z)


def _full_rows(norm: ElementwiseNorm, z: torch.Tensor):
    """``Z`` and ``1/Z`` of rows with every entry stored (Linear): no absent-entry term."""
    if not norm.normalizes:
        z = torch.ones_like(z)
    return z, safe_inverse(z)


def _stored_counts(conn: Stencil, device) -> torch.Tensor:
    nh = torch.tensor(conn.pairs_h.counts, device=device, dtype=torch.float64)
    nw = torch.tensor(conn.pairs_w.counts, device=device, dtype=torch.float64)
    return conn.cout_g * nh[:, None] * nw[None, :]


def _conv(conn: Stencil, norm: ElementwiseNorm, device, budget: int) -> LayerStats:
    """Row and column pass on the layer's position classes (see :class:`AxisClasses`);
    the column pass streams blocks of output channels when the kernel is large."""
    kind = _KINDS.get(type(norm))
    if device.type == "cpu" and kind is not None:
        return _conv_numba(conn, norm, kind)
    conn.check_finite()
    shift = layer_shift(norm, conn)
    c = norm.zero(shift)
    sf, st = kernel_terms(conn, norm, shift, device)
    ch, cw = _classes(conn)
    f64 = dict(dtype=torch.float64, device=device)
    mh, mw = torch.tensor(ch.in_profile, **f64), torch.tensor(cw.in_profile, **f64)
    z = mh @ sf @ mw.T  # (C_in, input classes along H, along W)
    t = mh @ st @ mw.T
    stored = conn.cout_g * torch.outer(
        torch.tensor(ch.in_counts, **f64), torch.tensor(cw.in_counts, **f64)
    )
    z, t, inv = _absent_terms(norm, shift, stored, conn.n_cols, z, t)
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
    step = _cout_step(conn, budget, _conv_fixed_bytes(conn))
    for o0 in range(0, cout_g, step):
        fk = f_kernel(conn, norm, shift, device, o0, o0 + step)
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
    return LayerStats(
        h_sum,
        conn.n_rows,
        col.reshape(-1),
        "implicit",
        c * float((inv_part * mult_in).sum()),
        mult_out.expand(conn.out_chw[0], -1, -1).reshape(-1),
    )


def _conv_numba(conn: Stencil, norm: ElementwiseNorm, kind: int) -> LayerStats:
    """The CPU form of :func:`_conv`: the same passes as a few numba kernels over the
    kernel (read once per pass, never copied) and the class arrays planned per geometry.
    A float32 kernel under relu or no norm is checked for NaN/Inf by its row pass, as a
    Linear weight is (no separate scan)."""
    from .. import _kernels

    fused = conn.kernel.dtype == torch.float32 and kind in (KIND_LIN, KIND_NONE)
    if not fused:
        conn.check_finite()
    shift = layer_shift(norm, conn)  # 0 under relu or no norm: no scan
    non_finite: list = []
    sf, st = kernel_terms(conn, norm, shift, torch.device("cpu"), non_finite)
    if fused:
        conn.check_finite(non_finite[0])
    w3 = _kernel_as_float(conn).numpy().reshape(conn.groups, conn.cout_g, -1)
    geometry, index, weights = _class_arrays(conn.axis_h, conn.axis_w, conn.cin_g, conn.out_chw[0])
    h_sum, off, col = _kernels.class_pass(
        w3,
        sf.numpy(),
        st.numpy(),
        geometry,
        index,
        kind,
        shift,
        norm.zero(shift),
        norm.zero_log2(shift),
        norm.normalizes,
        conn.cout_g,
        conn.n_cols,
        _GATHER_BYTES,
    )
    return LayerStats(
        h_sum, conn.n_rows, torch.from_numpy(col.reshape(-1)), "implicit", off, weights
    )


@functools.lru_cache(maxsize=1024)
def _class_arrays(axis_h, axis_w, cin_g: int, c_out: int):
    """The position classes of a geometry as the numba kernels take them (writable,
    contiguous, float64 or int64), the gather index of the column pass, and the
    multiplicity of every output column of the class columns (``(C_out, P, Q)`` flattened;
    never written to)."""
    ch, cw = axis_h.classes(), axis_w.classes()

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
    from .. import _kernels

    index = _kernels.class_index(geometry[6], geometry[7], cin_g, len(ch.in_mult), len(cw.in_mult))
    mult = np.outer(ch.out_mult, cw.out_mult).astype(np.float64).reshape(-1)
    return geometry, index, torch.from_numpy(mult).repeat(c_out)


def _classes(conn: Stencil) -> tuple[AxisClasses, AxisClasses]:
    return conn.axis_h.classes(), conn.axis_w.classes()


def _kernel_as_float(conn: Stencil) -> torch.Tensor:
    """The kernel on the CPU as a contiguous float32 or float64 tensor (no copy if it is)."""
    k = conn.kernel.detach().cpu()
    if k.dtype not in (torch.float32, torch.float64):
        k = k.to(torch.float32 if k.element_size() < 4 else torch.float64)
    return k.contiguous()


def kernel_terms(
    conn: Stencil, norm: ElementwiseNorm, shift: float, device, non_finite: list | None = None
):
    """``(Sf, St)``: the channel-summed ``f(K)`` and ``f(K) log2 f(K)`` per input channel,
    ``(C_in, KH, KW)`` float64 on ``device``.

    On the CPU, for the built-in norms, one numba pass over the kernel (for each group, the
    column sums of its ``(C_out/g, C_in/g * KH * KW)`` matrix), with no copy of it; torch
    elsewhere. ``non_finite``: as in :func:`foresight_sparse._kernels.dense_row_sums`.
    """
    kind = _KINDS.get(type(norm))
    if device.type != "cpu" or kind is None:
        return kernel_terms_torch(conn, norm, shift, device)
    from .. import _kernels

    k = _kernel_as_float(conn)
    w3 = k.numpy().reshape(conn.groups, conn.cout_g, -1)
    z, t = _kernels.dense_row_sums(w3, kind, shift, non_finite)
    c_in, kh, kw = conn.in_chw[0], *k.shape[-2:]
    return (torch.from_numpy(z).reshape(c_in, kh, kw), torch.from_numpy(t).reshape(c_in, kh, kw))


def kernel_terms_torch(
    conn: Stencil, norm: ElementwiseNorm, shift: float, device, step: int | None = None
):
    """Torch form of :func:`kernel_terms` (CUDA, custom elementwise norms; CPU tensors too),
    over blocks of ``step`` output channels per group (all at once by default)."""
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


def f_kernel(
    conn: Stencil, norm: ElementwiseNorm, shift: float, device, o0: int = 0, o1: int | None = None
) -> torch.Tensor:
    """``f(K)`` for output channels ``o0 .. o1`` of every group, float64 on ``device``:
    shape ``(groups, o1 - o0, C_in/groups, KH, KW)``."""
    k = conn.kernel.detach()
    k = k.reshape(conn.groups, conn.cout_g, *k.shape[1:])[:, o0:o1]
    if device.type == "cpu" and isinstance(norm, LinNorm):
        # relu at the kernel's own width, then widen: fewer bytes moved
        return k.cpu().clamp_min(0.0).to(torch.float64)
    return norm.f(k.to(device, torch.float64), shift)


#: Bytes of the gathered ``1/Z`` taps one step of :func:`column_classes` may hold.
_GATHER_BYTES = 64 << 20


def column_classes(
    conn: Stencil, ch: AxisClasses, cw: AxisClasses, inv: torch.Tensor, g_kernel: torch.Tensor
) -> torch.Tensor:
    """Column sums of every output class: ``conv2d(1/Z, G)`` evaluated once per class.

    ``inv`` is ``1/Z`` per (input channel, input class along H, along W); ``g_kernel`` is
    ``(groups, n, C_in/groups, KH, KW)``: ``n`` output channels of each group. Output class
    ``(p, q)`` reads input class ``out_taps[p, kh]`` through tap ``kh`` (and likewise along
    W), so its column of output channel ``co`` is
    ``sum over ci, kh, kw of inv[ci, taps_h[p, kh], taps_w[q, kw]] * G[co, ci, kh, kw]``:
    a float64 matrix product with the taps gathered, in slices of output classes that
    keep the gathered copy under 64 MiB. Returns ``(groups, n, P, Q)`` float64.
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
    step = max(1, _GATHER_BYTES // max(per_row, 1))
    out = torch.empty(g, n_co, n_p, n_q, dtype=torch.float64, device=dev)
    for p0 in range(0, n_p, step):
        th = taps_h[p0 : p0 + step]
        x = inv0[:, th[:, :, None, None], taps_w[None, None, :, :]]  # (C_in, p, KH, Q, KW)
        x = x.reshape(g, cin_g, len(th), n_kh, n_q, n_kw).permute(0, 1, 3, 5, 2, 4)
        x = x.reshape(g, cin_g * n_kh * n_kw, len(th) * n_q)
        out[:, :, p0 : p0 + len(th)] = torch.bmm(kmat, x).reshape(g, n_co, len(th), n_q)
    return out


def _pool(conn: Stencil, norm: ElementwiseNorm, device) -> LayerStats:
    """Constant kernel ``kappa`` times a per-output scale: f depends on the column only."""
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
    z, t, inv = _absent_terms(norm, shift, _stored_counts(conn, device), conn.n_cols, z, t)
    c_in = conn.in_chw[0]
    h_sum = row_entropy(z, t).sum() * c_in
    # sum of 1/Z over each output's window, summed over the input channels of its group
    inv_map = inv.expand(c_in, -1, -1)
    grouped = inv_map.reshape(conn.groups, conn.cin_g, *inv_map.shape[1:]).sum(1)
    window = ch.T @ grouped @ cw  # (groups, OH, OW)
    window = window.repeat_interleave(conn.cout_g, dim=0)
    col = ((fv - c) * window).reshape(-1)
    return LayerStats(float(h_sum), conn.n_rows, col, "implicit", c * float(inv.sum()) * c_in)


def _in_out_matrix(pairs, size_out: int, device) -> torch.Tensor:
    m = np.zeros((len(pairs.ptr) - 1, size_out))
    m[np.repeat(np.arange(len(pairs.ptr) - 1), pairs.counts), pairs.out] = 1.0
    return torch.as_tensor(m, device=device)


def _linear(conn: FullyConnected, norm: ElementwiseNorm, device, budget: int) -> LayerStats:
    """Two reads of the weight: row sums ``Z, T`` per input, then the column products."""
    w = conn.weight.detach()
    if w.device != device:
        w = w.to(device)
    # every entry is stored: no absent-entry term (c drops out), so the column sums are
    # f(W) @ (1/Z) and no constant reaches the columns
    kind = _KINDS.get(type(norm))
    if device.type == "cpu" and kind is not None and w.dtype in (torch.float32, torch.float64):
        from .. import _kernels

        # float32 under relu or no norm: the row pass counts NaN/Inf weights as it goes,
        # which saves a read of the weight for the finiteness scan (those norms need no
        # bound on the weights: their shift is 0)
        fused = w.dtype == torch.float32 and kind in (KIND_LIN, KIND_NONE)
        if not fused:
            conn.check_finite()
        shift = layer_shift(norm, conn)  # 0 under relu or no norm: no scan
        w_np = w.contiguous().numpy()
        non_finite: list = []
        sums = _kernels.dense_row_sums(w_np, kind, shift, non_finite)
        if fused:
            conn.check_finite(non_finite[0])
        z, t = (torch.from_numpy(a) for a in sums)
        z, inv = _full_rows(norm, z)
        col = torch.from_numpy(_kernels.dense_cols(w_np, kind, shift, 0.0, inv.numpy()))
    else:
        conn.check_finite()
        shift = layer_shift(norm, conn)
        spare = budget - _linear_sums_bytes(conn)
        block = max(_LINEAR_BLOCK, spare // _LINEAR_BYTES_PER_ELEMENT)
        z, t, inv, col = linear_torch(w, norm, shift, block)
    h_sum = row_entropy(z, t).sum()
    return LayerStats(float(h_sum), conn.n_rows, col, "implicit")


def linear_torch(w: torch.Tensor, norm: ElementwiseNorm, shift: float, block: int = _LINEAR_BLOCK):
    """Torch form of the Linear passes (CUDA, and half/bfloat16 weights on the CPU), over
    blocks of whole rows of about ``block`` elements.

    Returns ``Z``, ``T``, ``1/Z`` per input and the column sums (every entry is stored:
    no absent-entry constant).
    """
    n_out, n_in = w.shape
    rows = max(1, block // max(n_in, 1))
    z = torch.zeros(n_in, dtype=torch.float64, device=w.device)
    t = torch.zeros(n_in, dtype=torch.float64, device=w.device)
    for o0 in range(0, n_out, rows):
        blk = w[o0 : o0 + rows].to(torch.float64)
        z += norm.f(blk, shift).sum(0)
        t += norm.f_log2f(blk, shift).sum(0)
    z, inv = _full_rows(norm, z)
    col = torch.empty(n_out, dtype=torch.float64, device=w.device)
    for o0 in range(0, n_out, rows):
        blk = w[o0 : o0 + rows].to(torch.float64)
        col[o0 : o0 + rows] = norm.f(blk, shift) @ inv
    return z, t, inv, col
