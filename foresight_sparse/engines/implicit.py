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
pass is then a float64 matrix product of the kernel with ``1/Z`` gathered per class;
everything is float64. Both passes run in the form of the job's backend
(:mod:`.conv`: a few numba kernels, or torch matrix products and
:func:`~foresight_sparse.engines.conv.column_classes`).

Average pools have a constant kernel and a per-output divisor, so ``f`` of an entry depends
only on its column: ``F[j] = f(d_j)``; the row sums are ``Mh_o @ F @ Mw_o.T`` with the 0/1
input-to-output matrices, and the column pass is a window sum of ``1/Z`` (:mod:`.pool`:
torch operations, whatever the backend).

Linear layers are read twice, with float64 accumulation: one pass for ``Z`` and ``T``,
one for the columns, in the form of the job's backend (:mod:`.linear`).

Layers with summed duplicate taps (most reflect/replicate padding), custom norms and
user-registered builders are not expressible this way: :func:`supports` says so and
``engine='auto'`` hands them to the sparse engine.

Working memory is float64 copies of the kernel and class-sized maps per layer (never the
matrix, nor an image-sized map); it is checked against ``max_memory`` before a layer
starts.
"""

from __future__ import annotations

from ..budget import check_budget
from ..connectivity import FullyConnected, Stencil
from ..entropy import row_entropy
from ..exceptions import Opt, UnsupportedEngineError
from ..norms import ElementwiseNorm, SoftNorm
from .base import LayerJob, LayerStats, layer_shift
from .conv import GATHER_BYTES
from .dispatch import form
from .pool import pool_pass

__all__ = [
    "supports",
    "layer_stats",
    "working_bytes",
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
        ok = conn.memo.get("implicit")
        if ok is None:
            ok = conn.memo["implicit"] = _stencil_supported(conn)
        return ok
    return False


def _stencil_supported(conn: Stencil) -> bool:
    if not conn.single_tap:
        return False
    if _constant_kernel(conn):  # pools: zero padding only (their windows clip)
        return conn.axis_h.mode == conn.axis_w.mode == "zeros"
    return not conn.scaled


def layer_stats(job: LayerJob) -> LayerStats:
    """Reduce one layer implicitly (see module docstring)."""
    if not supports(job):
        raise UnsupportedEngineError(
            f"{job.conn.label}: the implicit engine cannot express this layer (padding that "
            "folds two taps onto one input, a custom norm or a custom builder); use ",
            Opt("engine", "auto", "sparse"),
        )
    conn = job.conn
    check_budget(
        working_bytes(conn, job.budget),
        job.budget,
        f"{conn.label}: the implicit engine's maps ({conn.n_rows} inputs, {conn.n_cols} outputs)",
        ("raise ", Opt("max_memory")),
    )
    if isinstance(conn, FullyConnected):
        return _linear(conn, job.norm, job)  # the form checks finiteness
    if _constant_kernel(conn):
        conn.check_finite()
        return _pool(conn, job.norm, job)
    return _conv(conn, job.norm, job)  # the form checks finiteness


def working_bytes(conn, budget: int | None = None) -> int:
    """Bytes the implicit engine allocates for one layer (an upper estimate).

    Convolutions: the gathered ``1/Z`` of the column pass (at most 64 MiB) and three
    float64 copies of one block of output channels of the kernel; the blocks are as large
    as ``budget`` allows (the whole kernel when ``budget`` is None), and at least one output
    channel per group. Pools: float64 maps of the input and output size. Linear: per-input
    float64 sums and one block of the float64 weight. Computed once per geometry and
    budget (:attr:`~foresight_sparse.connectivity.Connectivity.memo`).
    """
    key = ("implicit_bytes", budget)
    needed = conn.memo.get(key)
    if needed is None:
        needed = conn.memo[key] = _working_bytes(conn, budget)
    return needed


def _working_bytes(conn, budget: int | None) -> int:
    if isinstance(conn, FullyConnected):
        return _linear_sums_bytes(conn) + _LINEAR_BYTES_PER_ELEMENT * min(
            _LINEAR_BLOCK, conn.weight.numel()
        )
    if _constant_kernel(conn):
        return 8 * (3 * conn.n_rows + 2 * conn.n_cols)
    return (
        _conv_fixed_bytes(conn)
        + _KERNEL_COPIES * 8 * conn.groups * _block_step(conn, budget) * conn.kernel[0].numel()
    )


#: float64 copies of a block of the kernel that a convolution's column pass holds at once.
_KERNEL_COPIES = 3


def _conv_fixed_bytes(conn: Stencil) -> int:
    """A convolution's bytes outside its kernel blocks: the gathered ``1/Z`` and the
    per-class maps (memoised)."""
    fixed = conn.memo.get("conv_fixed_bytes")
    if fixed is None:
        fixed = conn.memo["conv_fixed_bytes"] = _conv_fixed_bytes_of(conn)
    return fixed


def _conv_fixed_bytes_of(conn: Stencil) -> int:
    ch, cw = conn.axis_h.classes(), conn.axis_w.classes()
    per_class_row = conn.in_chw[0] * conn.kernel[0, 0].numel() * len(cw.out_mult) * 8
    gather = min(max(GATHER_BYTES, per_class_row), per_class_row * len(ch.out_mult))
    maps = 8 * 6 * conn.in_chw[0] * len(ch.in_mult) * len(cw.in_mult)
    return gather + maps + 8 * 2 * conn.out_chw[0] * len(ch.out_mult) * len(cw.out_mult)


def _cout_step(conn: Stencil, budget: int | None, fixed: int) -> int:
    """Output channels per group in one block of a convolution's column pass."""
    if budget is None:
        return conn.cout_g
    per_channel = _KERNEL_COPIES * 8 * conn.groups * conn.kernel[0].numel()
    return max(1, min(conn.cout_g, (budget - fixed) // max(per_channel, 1)))


def _block_step(conn: Stencil, budget: int | None) -> int:
    """:func:`_cout_step` for the layer's own fixed bytes, once per geometry and budget (the
    plan's memory estimate and every report's column pass use it)."""
    key = ("cout_step", budget)
    step = conn.memo.get(key)
    if step is None:
        step = conn.memo[key] = _cout_step(conn, budget, _conv_fixed_bytes(conn))
    return step


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


def _conv(conn: Stencil, norm: ElementwiseNorm, job: LayerJob) -> LayerStats:
    """Row and column pass on the layer's position classes (see :class:`AxisClasses`);
    the column pass streams blocks of output channels when the kernel is large."""
    shift = layer_shift(norm, conn)
    step = _block_step(conn, job.budget)
    h_sum, off, col, weights = form("implicit", job)(job, shift, step)
    return LayerStats(h_sum, conn.n_rows, col, "implicit", off, weights, backend=job.backend.name)


def _pool(conn: Stencil, norm: ElementwiseNorm, job: LayerJob) -> LayerStats:
    """Constant kernel ``kappa`` times a per-output scale: f depends on the column only
    (:mod:`.pool`)."""
    h_sum, col, off = pool_pass(conn, norm, job.device)
    return LayerStats(h_sum, conn.n_rows, col, "implicit", off, backend=job.backend.name)


def _linear(conn: FullyConnected, norm: ElementwiseNorm, job: LayerJob) -> LayerStats:
    """Two reads of the weight: row sums ``Z, T`` per input, then the column products."""
    shift = layer_shift(norm, conn)
    spare = job.budget - _linear_sums_bytes(conn)
    block = max(_LINEAR_BLOCK, spare // _LINEAR_BYTES_PER_ELEMENT)
    z, t, _, col = form("implicit", job)(job, shift, block)
    h_sum = row_entropy(z, t).sum()
    return LayerStats(float(h_sum), conn.n_rows, col, "implicit", backend=job.backend.name)
