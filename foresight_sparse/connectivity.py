"""Layer connectivity: the registry from module type to builder, and the sparse matrices.

A builder (an *adapter*) reads a module and its traced shapes and returns a
:class:`Connectivity`: a description of the layer's connectivity matrix ``A`` (one row per
input neuron, one column per output neuron, ``A[r, c]`` the weight from input ``r`` to output
``c``) that can produce any block of rows as sparse index arrays, or the whole matrix as a
torch sparse tensor, without ever building it densely.

Three kinds cover the built-in layers and user extensions:

- :class:`Stencil`: sliding-window layers (Conv2d, AvgPool2d), described by a kernel and two
  :class:`~foresight_sparse.geometry.Axis` objects;
- :class:`FullyConnected`: Linear, the weight transposed;
- :class:`ExplicitMatrix`: a matrix a user-supplied ``create_matrix`` function returned.
"""

from __future__ import annotations

import copy
import math
import operator
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .budget import check_budget, resolve_budget
from .exceptions import DeviceError, ShapeMismatchError, UnknownNameError, UnsupportedLayerError
from .geometry import PADDING_MODES, Axis, AxisPairs, AxisProduct, conv_output_size

__all__ = [
    "Block",
    "Connectivity",
    "Stencil",
    "FullyConnected",
    "ExplicitMatrix",
    "REGISTRY",
    "SEED_TYPES",
    "EXTENDED",
    "LAYER_SETS",
    "LayerSelection",
    "register",
    "unregister",
    "connectivity",
    "linear",
    "conv2d",
    "avgpool2d",
    "conv1d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "avgpool1d",
    "avgpool3d",
    "adaptive_avgpool1d",
    "adaptive_avgpool2d",
    "adaptive_avgpool3d",
    "LAYOUTS",
]

#: The layouts :meth:`Connectivity.to_sparse` accepts.
LAYOUTS = ("coo", "csr", "scipy")

_INT32_MAX = 2**31 - 1


@dataclass
class Block:
    """Rows ``r0 .. r0 + len(rowptr) - 1`` of a connectivity matrix, in CSR form.

    ``rowptr`` starts at 0; ``cols`` ascend within each row; ``rows`` (the row of each entry,
    absolute) is present only when asked for.
    """

    r0: int
    rowptr: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor
    rows: torch.Tensor | None = None

    @property
    def n_rows(self) -> int:
        return self.rowptr.numel() - 1


class Connectivity:
    """A layer's connectivity matrix, described rather than stored.

    Attributes
    ----------
    label : str
        How errors name the layer (its name in the model and its type).
    n_rows, n_cols : int
        Input and output neurons.
    device : torch.device
        Where the weights live; blocks are produced there.
    dtype : torch.dtype
        The dtype of the weights (the values of :meth:`to_sparse`).
    """

    label: str
    n_rows: int
    n_cols: int
    device: torch.device
    dtype: torch.dtype

    #: Names of the module's tensors the matrix is made of (``("weight",)`` for Linear and
    #: Conv2d, ``()`` for pools); ``None`` when unknown (user builders), in which case a
    #: plan rebuilds the matrix through its adapter for every set of weights.
    weight_names: tuple[str, ...] | None = None

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> Connectivity:
        """The same connectivity made of other weights: ``tensors`` maps each name of
        :attr:`weight_names` to a tensor of the same shape. The geometry is shared, nothing
        is copied, and ``self`` is left as it is."""
        raise NotImplementedError(f"{type(self).__name__} cannot be rebound to new weights")

    def _rebound(self, **changes) -> Connectivity:
        new = copy.copy(self)
        new.__dict__.update(changes)
        new.__dict__.pop("_scan_cache", None)  # the scan belongs to the old weights
        return new

    @property
    def nnz(self) -> int:
        """Number of structural (stored) entries."""
        return int(self.row_counts(0, self.n_rows).sum())

    @property
    def max_row_nnz(self) -> int:
        """Largest number of stored entries in one row."""
        return int(self.row_counts(0, self.n_rows).max(initial=0))

    def row_counts(self, r0: int, r1: int) -> np.ndarray:
        """Stored entries of each row in ``r0 .. r1`` (int64 numpy array)."""
        raise NotImplementedError

    def block(
        self,
        r0: int,
        r1: int,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        with_rows: bool = False,
        index_dtype: torch.dtype = torch.int64,
        workspace: dict | None = None,
    ) -> Block:
        """Rows ``r0 .. r1`` as a :class:`Block` with values in ``dtype`` on ``device``.

        ``workspace`` is an optional dict of reusable buffers, kept across the blocks of a
        layer; an int under its key ``"entries"`` sizes them for the largest block up front,
        so that no later block maps fresh pages (see :meth:`Stencil.block`).
        """
        raise NotImplementedError

    def weight_bound(self) -> float:
        """An upper bound on every entry (used to shift ``exp`` away from overflow)."""
        raise NotImplementedError

    @property
    def exact_dtype(self) -> torch.dtype:
        """The narrowest of float32/float64 that holds every entry exactly."""
        return torch.float64

    def check_finite(self) -> None:
        """Raise :class:`~foresight_sparse.exceptions.NonFiniteWeightsError` on NaN/Inf weights."""
        raise NotImplementedError

    def weight_range(self) -> tuple[float, float]:
        """Smallest and largest weight the entries are made of."""
        raise NotImplementedError

    def _scan(self, weights: torch.Tensor) -> tuple[float, float, int]:
        # one pass over the weights serves both check_finite and weight_bound
        cached = getattr(self, "_scan_cache", None)
        if cached is None:
            cached = self._scan_cache = weight_scan(weights)
        return cached

    def sparse_bytes(self, layout: str = "coo") -> int:
        """Bytes :meth:`to_sparse` would allocate for ``layout``."""
        layout = _layout_name(layout)
        val = torch.empty((), dtype=self.dtype).element_size()
        nnz = self.nnz
        if layout == "coo":
            return nnz * (16 + val)
        idx = 4 if _fits_int32(nnz, self.n_cols) else 8
        return nnz * (idx + val) + (self.n_rows + 1) * idx

    def to_sparse(self, layout: Any = torch.sparse_coo, *, max_memory: int | str | None = None):
        """The whole matrix as a torch sparse tensor (or a ``scipy.sparse.csr_array``).

        Parameters
        ----------
        layout : torch.layout or str
            ``torch.sparse_coo`` (default, coalesced), ``torch.sparse_csr`` (int32 indices
            where they fit, else int64) or ``'scipy'`` (a ``scipy.sparse.csr_array`` sharing
            memory with the index arrays, CPU only).
        max_memory : int or str, optional
            Refuse before allocating when the matrix needs more bytes. Defaults to half of
            the memory available on the device now.

        Raises
        ------
        MemoryBudgetError
            With the byte estimate, when the matrix is over budget.
        """
        layout = _layout_name(layout)
        budget = resolve_budget(max_memory, self.device, default=None)
        check_budget(
            self.sparse_bytes(layout),
            budget,
            f"{self.label}: the {self.n_rows} x {self.n_cols} connectivity matrix "
            f"({self.nnz} entries, {layout})",
            "pass a larger max_memory, or let the engines stream it "
            "(determinism/degeneracy/ei never hold a whole matrix)",
        )
        idx_dtype = torch.int64
        if layout in ("csr", "scipy") and _fits_int32(self.nnz, self.n_cols):
            idx_dtype = torch.int32
        size = (self.n_rows, self.n_cols)
        if layout == "coo":
            # a block that fills the workspace writes the rows and columns straight into
            # the (2, nnz) index tensor; stacking copies of them took three quarters of
            # the time (1.9 of 2.6 s for a 113M-entry conv)
            workspace = None
            if self.device.type == "cpu":  # numpy's allocation: huge pages, faster first touch
                idx_np = np.empty((2, self.nnz), dtype=np.int64)
                workspace = {"rows": idx_np[0], "cols": idx_np[1]}
                idx = torch.from_numpy(idx_np)
            else:
                idx = torch.empty((2, self.nnz), dtype=torch.int64, device=self.device)
            blk = self.block(0, self.n_rows, dtype=self.dtype, with_rows=True, workspace=workspace)
            if not (_same_memory(blk.rows, idx[0]) and _same_memory(blk.cols, idx[1])):
                idx[0].copy_(blk.rows)
                idx[1].copy_(blk.cols)
            return torch.sparse_coo_tensor(
                idx, blk.vals, size, is_coalesced=True, check_invariants=False
            )
        blk = self.block(0, self.n_rows, dtype=self.dtype, index_dtype=idx_dtype)
        crow = blk.rowptr.to(idx_dtype)
        if layout == "csr":
            with warnings.catch_warnings():  # "sparse CSR support is in beta": not news to users
                warnings.simplefilter("ignore", UserWarning)
                return torch.sparse_csr_tensor(
                    crow, blk.cols, blk.vals, size, check_invariants=False
                )
        if blk.vals.device.type != "cpu":
            raise DeviceError(
                f"{self.label}: layout='scipy' needs CPU tensors; the "
                f"layer lives on {blk.vals.device}. Move the model to the "
                "CPU or use torch.sparse_csr"
            )
        import scipy.sparse  # scipy loads only for this layout

        return scipy.sparse.csr_array(
            (blk.vals.numpy(), blk.cols.numpy(), crow.numpy()), shape=size
        )

    def to_dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense matrix (small layers only: for custom norms and tests)."""
        blk = self.block(0, self.n_rows, dtype=dtype, with_rows=True)
        dense = torch.zeros(self.n_rows, self.n_cols, dtype=dtype, device=blk.vals.device)
        dense[blk.rows, blk.cols] = blk.vals
        return dense


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.device == b.device


def _fits_int32(nnz: int, n_cols: int) -> bool:
    return nnz <= _INT32_MAX and n_cols <= _INT32_MAX


def _layout_name(layout: Any) -> str:
    if layout in (torch.sparse_coo, "coo", None):
        return "coo"
    if layout in (torch.sparse_csr, "csr"):
        return "csr"
    if layout == "scipy":
        return "scipy"
    raise UnknownNameError(
        f"unknown layout {layout!r}; valid layouts are torch.sparse_coo, "
        "torch.sparse_csr and 'scipy'"
    )


def weight_scan(t: torch.Tensor) -> tuple[float, float, int]:
    """Largest and smallest finite weight and the number of NaN/Inf weights (one pass)."""
    t = t.detach()
    if t.numel() == 0:
        return 0.0, 0.0, 0
    if t.dtype.is_floating_point:
        # torch's min and max propagate NaN: finite extremes mean finite weights, and
        # aminmax is one vectorised pass. Only weights that hold NaN or Inf (an error the
        # caller reports) go on to be counted.
        lo, hi = (float(v) for v in torch.aminmax(t))
        if math.isfinite(lo) and math.isfinite(hi):
            return hi, lo, 0
    finite = torch.isfinite(t)
    n_bad = int((~finite).sum())
    kept = t[finite] if n_bad else t
    if kept.numel() == 0:
        return 0.0, 0.0, n_bad
    return float(kept.max()), float(kept.min()), n_bad


def _check_finite_tensor(t: torch.Tensor, label: str, scan=None) -> float:
    """Raise on NaN/Inf weights; return the largest weight."""
    from .exceptions import NonFiniteWeightsError

    mx, _, n_bad = scan if scan is not None else weight_scan(t)
    if n_bad:
        raise NonFiniteWeightsError(
            f"{label}: {n_bad} of {t.numel()} weights are NaN or infinite (weight shape "
            f"{tuple(t.shape)}); entropies are undefined. Fix or reinitialise the weights"
        )
    return mx


def _buffer(workspace: dict | None, key: str, n: int, dtype) -> np.ndarray:
    """``n`` elements of a reusable buffer (fresh memory when there is no workspace).

    A new buffer holds at least ``workspace["entries"]`` elements: growing it block by
    block would touch fresh pages each time (first-touch page faults run at a seventh of
    the fill kernel's speed).
    """
    if workspace is None:
        return np.empty(n, dtype=dtype)
    buf = workspace.get(key)
    if buf is None or buf.shape[0] < n or buf.dtype != dtype:
        size = max(n, int(workspace.get("entries", 0))) if n else 0
        buf = workspace[key] = np.empty(size, dtype=dtype)
    return buf[:n]


def _rowptr(counts: np.ndarray) -> np.ndarray:
    ptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ptr


# --------------------------------------------------------------------------- stencils


@dataclass
class Stencil(Connectivity):
    """A sliding-window layer: ``A[(ci,ih,iw), (co,oh,ow)] = sum of kernel taps * scale``.

    Stored as two *lanes*, H and W; a layer with 1 or 3 spatial axes is built with
    :meth:`from_axes`, which reads a 1-d layer as a 2-d one with a unit H axis and a 3-d
    layer as a 2-d one whose H lane is the :class:`~foresight_sparse.geometry.AxisProduct`
    of its depth and height axes (the kernel folded to match). The engines see two lanes
    whatever the layer's dimension.

    Parameters
    ----------
    label : str
        The layer's name for messages.
    kernel : torch.Tensor
        ``(C_out, C_in // groups, KH, KW)``, on the layer's device.
    in_chw, out_chw : tuple of int
        Input and output ``(C, H, W)`` (``H`` the size of the H lane).
    groups : int
        Channel groups, as in ``nn.Conv2d``.
    axis_h, axis_w : Axis or AxisProduct
        The window geometry of each lane.
    scale_h, scale_w : numpy.ndarray, optional
        A per-output-row and per-output-column factor (average pooling divisors); ones if
        omitted.
    values_dtype : torch.dtype, optional
        dtype of :meth:`to_sparse` values; the kernel's dtype if omitted. (Pools keep an
        exact float64 kernel but return the default dtype, as a layer would.)
    weight_name : str, optional
        The module attribute the kernel is (``"weight"`` for a convolution); ``None`` for a
        kernel made from the layer's options alone (pools), which no weights change.
    fold : tuple, optional
        How :meth:`bind` turns the module's weight into ``kernel``: ``(transposed, groups)``
        for weights that are not already ``(C_out, C_in // groups, KH, KW)``.
    """

    label: str
    kernel: torch.Tensor
    in_chw: tuple[int, int, int]
    out_chw: tuple[int, int, int]
    groups: int
    axis_h: Axis | AxisProduct
    axis_w: Axis | AxisProduct
    scale_h: np.ndarray | None = None
    scale_w: np.ndarray | None = None
    values_dtype: torch.dtype | None = None
    weight_name: str | None = None
    fold: tuple[bool, int] | None = None
    pairs_h: AxisPairs = field(init=False, repr=False)
    pairs_w: AxisPairs = field(init=False, repr=False)

    def __post_init__(self):
        c_in, _, _ = self.in_chw
        c_out, out_h, out_w = self.out_chw
        self.cin_g = c_in // self.groups
        self.cout_g = c_out // self.groups
        self.n_rows = math.prod(self.in_chw)
        self.n_cols = math.prod(self.out_chw)
        self.device = self.kernel.device
        self.dtype = self.values_dtype or self.kernel.dtype
        self.pairs_h = self.axis_h.pairs()
        self.pairs_w = self.axis_w.pairs()
        if self.scale_h is None:
            self.scale_h = np.ones(out_h)
        if self.scale_w is None:
            self.scale_w = np.ones(out_w)
        self.scale_h = np.ascontiguousarray(self.scale_h, dtype=np.float64)
        self.scale_w = np.ascontiguousarray(self.scale_w, dtype=np.float64)
        self.scaled = bool((self.scale_h != 1).any() or (self.scale_w != 1).any())
        self._kernel_np = None
        self.weight_names = () if self.weight_name is None else (self.weight_name,)

    @classmethod
    def from_axes(
        cls,
        label: str,
        weight: torch.Tensor,
        channels: tuple[int, int],
        groups: int,
        axes,
        scales=None,
        *,
        transposed: bool = False,
        values_dtype: torch.dtype | None = None,
        weight_name: str | None = None,
    ) -> Stencil:
        """A stencil over 1, 2 or 3 spatial axes.

        Parameters
        ----------
        weight : torch.Tensor
            ``(C_out, C_in // groups, *K)``, or for ``transposed`` layers
            ``(C_in, C_out // groups, *K)`` (as ``nn.ConvTranspose*d`` stores it).
        channels : (int, int)
            ``(C_in, C_out)``.
        axes : sequence of Axis
            One per spatial axis, in the tensor's order.
        scales : sequence of numpy.ndarray or None, optional
            A per-output factor of each axis; the entry is their product.
        """
        axes = tuple(axes)
        if not 1 <= len(axes) <= 3:  # pragma: no cover - adapters pass 1 to 3 axes
            raise ValueError(f"{label}: a stencil has 1 to 3 spatial axes, got {len(axes)}")
        unit = Axis(1, 1, 1)
        if len(axes) == 1:
            lanes = (unit, axes[0])
        elif len(axes) == 2:
            lanes = axes
        else:
            lanes = (AxisProduct(axes[:-1]), axes[-1])
        scales = list(scales) if scales is not None else [None] * len(axes)
        scales = [
            np.ones(a.size_out) if v is None else np.asarray(v, dtype=np.float64)
            for a, v in zip(axes, scales)
        ]
        lead = np.ones(1)
        for v in scales[:-1]:
            lead = np.multiply.outer(lead, v).reshape(-1)
        fold = (transposed, groups) if transposed or len(axes) != 2 else None
        c_in, c_out = channels
        return cls(
            label,
            _fold_kernel(weight, fold),
            (c_in, lanes[0].size_in, lanes[1].size_in),
            (c_out, lanes[0].size_out, lanes[1].size_out),
            groups,
            *lanes,
            lead,
            scales[-1],
            values_dtype,
            weight_name,
            fold,
        )

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> Stencil:
        if self.weight_name is None:
            return self
        kernel = _fold_kernel(tensors[self.weight_name], self.fold)
        return self._rebound(
            kernel=kernel,
            device=kernel.device,
            _kernel_np=None,
            dtype=self.values_dtype or kernel.dtype,
        )

    @property
    def exact_dtype(self) -> torch.dtype:
        # single taps of a float32 (or narrower) kernel are its weights; sums and
        # scaled entries need float64
        narrow = self.kernel.dtype in (torch.float32, torch.float16, torch.bfloat16)
        return torch.float32 if narrow and self.single_tap and not self.scaled else torch.float64

    @property
    def single_tap(self) -> bool:
        """True when no output reaches an input through two taps (no summed duplicates)."""
        return self.pairs_h.single_tap and self.pairs_w.single_tap

    @property
    def kernel_np(self) -> np.ndarray:
        if self._kernel_np is None:
            self._kernel_np = np.ascontiguousarray(
                self.kernel.detach().to("cpu", torch.float64).numpy()
            )
        return self._kernel_np

    @property
    def nnz(self) -> int:
        return self.in_chw[0] * self.cout_g * len(self.pairs_h.out) * len(self.pairs_w.out)

    def row_counts(self, r0: int, r1: int) -> np.ndarray:
        _, height, width = self.in_chw
        r = np.arange(r0, r1, dtype=np.int64)
        ih = (r // width) % height
        iw = r % width
        return self.cout_g * self.pairs_h.counts[ih] * self.pairs_w.counts[iw]

    def weight_bound(self) -> float:
        taps_h = int(np.diff(self.pairs_h.tap_ptr).max(initial=1))
        taps_w = int(np.diff(self.pairs_w.tap_ptr).max(initial=1))
        k = self._scan(self.kernel)[0]
        return (
            max(k, 0.0)
            * taps_h
            * taps_w
            * float(self.scale_h.max(initial=1.0))
            * float(self.scale_w.max(initial=1.0))
        )

    def check_finite(self) -> None:
        _check_finite_tensor(self.kernel, self.label, self._scan(self.kernel))

    def weight_range(self) -> tuple[float, float]:
        mx, mn, _ = self._scan(self.kernel)
        return mn, mx

    def block(
        self,
        r0,
        r1,
        *,
        dtype=torch.float64,
        device=None,
        with_rows=False,
        index_dtype=torch.int64,
        workspace: dict | None = None,
    ):
        """Rows ``r0 .. r1``; see :meth:`Connectivity.block`.

        ``workspace`` (a dict the caller keeps across blocks) lets the CPU path write into
        the same buffers every time instead of mapping fresh memory per block; the returned
        arrays are then views valid until the next call.
        """
        device = torch.device(device) if device is not None else self.device
        if device.type == "cpu":
            return self._block_numba(r0, r1, dtype, with_rows, index_dtype, workspace)
        return self.block_torch(
            r0, r1, dtype=dtype, device=device, with_rows=with_rows, index_dtype=index_dtype
        )

    def _block_numba(self, r0, r1, dtype, with_rows, index_dtype, workspace=None) -> Block:
        rowptr = _rowptr(self.row_counts(r0, r1))
        nnz = int(rowptr[-1])
        # numpy has no bfloat16: such values are made in float32 and cast by torch
        fill_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        np_idx = np.int32 if index_dtype == torch.int32 else np.int64
        cols = _buffer(workspace, "cols", nnz, np_idx)
        vals = torch.from_numpy(
            _buffer(workspace, "vals", nnz, torch.empty((), dtype=fill_dtype).numpy().dtype)
        )
        rows = _buffer(workspace, "rows", nnz if with_rows else 0, np.int64)
        from . import _kernels

        _kernels.fill_stencil_rows(r0, r1 - r0, self, rowptr, cols, vals.numpy(), rows)
        return Block(
            r0,
            torch.from_numpy(rowptr),
            torch.from_numpy(cols),
            vals.to(dtype),
            torch.from_numpy(rows) if with_rows else None,
        )

    def block_torch(
        self,
        r0: int,
        r1: int,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        with_rows: bool = False,
        index_dtype: torch.dtype = torch.int64,
    ) -> Block:
        """Rows ``r0 .. r1`` by vectorised torch index arithmetic (the CUDA path).

        Produces the same block as the numba kernel, on any device: every entry's position
        in the row is decomposed into (output channel, H pair, W pair) and its value gathered
        from the kernel, duplicate taps summed through a padded tap table.
        """
        device = torch.device(device) if device is not None else self.device
        _, height, width = self.in_chw
        _, out_h, out_w = self.out_chw

        def t(a):
            return torch.tensor(a, device=device)  # copies: geometry arrays are read-only

        counts = t(self.row_counts(r0, r1))
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
        nh = t(self.pairs_h.counts)[ih]
        nw = t(self.pairs_w.counts)[iw]
        lq = pos % nw
        rest = pos // nw
        lp = rest % nh
        co_l = rest // nh
        del rest, pos
        p = t(self.pairs_h.ptr)[ih] + lp
        q = t(self.pairs_w.ptr)[iw] + lq
        oh = t(self.pairs_h.out)[p]
        ow = t(self.pairs_w.out)[q]
        g = ci // self.cin_g
        co = g * self.cout_g + co_l
        ci_l = ci - g * self.cin_g
        kernel = self.kernel.detach().to(device, torch.float64)
        taps_h = _tap_table(self.pairs_h, device)
        taps_w = _tap_table(self.pairs_w, device)
        vals = torch.zeros(nnz, dtype=torch.float64, device=device)
        for a in range(taps_h.shape[1]):
            kh = taps_h[p, a]
            for b in range(taps_w.shape[1]):
                kw = taps_w[q, b]
                ok = (kh >= 0) & (kw >= 0)
                vals += torch.where(ok, kernel[co, ci_l, kh.clamp(min=0), kw.clamp(min=0)], 0.0)
        vals *= t(self.scale_h)[oh] * t(self.scale_w)[ow]
        cols = (co * out_h + oh) * out_w + ow
        return Block(r0, rowptr, cols.to(index_dtype), vals.to(dtype), r if with_rows else None)


def _fold_kernel(weight: torch.Tensor, fold: tuple[bool, int] | None) -> torch.Tensor:
    """A layer's weight as the ``(C_out, C_in // groups, KH, KW)`` kernel of its two lanes:
    a transposed layer's ``(C_in, C_out // groups, *K)`` regrouped output-channel first, and
    the taps of every leading axis flattened into the H lane (a 1-d kernel gets KH = 1)."""
    if fold is None:
        return weight
    transposed, groups = fold
    if transposed:
        c_in, cout_g, *k = weight.shape
        weight = (
            weight.reshape(groups, c_in // groups, cout_g, *k)
            .transpose(1, 2)
            .reshape(groups * cout_g, c_in // groups, *k)
        )
    k = weight.shape[2:]
    return weight.reshape(*weight.shape[:2], math.prod(k[:-1]), k[-1])


def _tap_table(pairs: AxisPairs, device) -> torch.Tensor:
    """Taps of each pair, padded with -1 to the widest pair: shape ``(n_pairs, max_taps)``."""
    n_taps = np.diff(pairs.tap_ptr)
    width = int(n_taps.max(initial=1))
    table = np.full((len(pairs.out), width), -1, dtype=np.int64)
    col = np.arange(len(pairs.tap)) - np.repeat(pairs.tap_ptr[:-1], n_taps)
    table[np.repeat(np.arange(len(pairs.out)), n_taps), col] = pairs.tap
    return torch.as_tensor(table, device=device)


# --------------------------------------------------------------------------- dense layers


@dataclass
class FullyConnected(Connectivity):
    """A fully connected layer: ``A = weight.T`` with every entry stored.

    Parameters
    ----------
    label : str
        The layer's name for messages.
    weight : torch.Tensor
        ``(out_features, in_features)``, as ``nn.Linear`` stores it.
    """

    label: str
    weight: torch.Tensor
    weight_names = ("weight",)

    def __post_init__(self):
        self.n_cols, self.n_rows = self.weight.shape
        self.device = self.weight.device
        self.dtype = self.weight.dtype

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> FullyConnected:
        weight = tensors["weight"]
        return self._rebound(weight=weight, device=weight.device, dtype=weight.dtype)

    @property
    def nnz(self) -> int:
        return self.n_rows * self.n_cols

    @property
    def max_row_nnz(self) -> int:
        return self.n_cols

    @property
    def exact_dtype(self) -> torch.dtype:
        narrow = self.weight.dtype in (torch.float32, torch.float16, torch.bfloat16)
        return torch.float32 if narrow else torch.float64

    def row_counts(self, r0, r1):
        return np.full(r1 - r0, self.n_cols, dtype=np.int64)

    def weight_bound(self) -> float:
        return max(self._scan(self.weight)[0], 0.0)

    def check_finite(self, non_finite: int | None = None) -> None:
        """As :meth:`Connectivity.check_finite`; ``non_finite``, the count of NaN/Inf
        weights a pass over the weight already made, saves the scan."""
        scan = (0.0, 0.0, non_finite) if non_finite is not None else self._scan(self.weight)
        _check_finite_tensor(self.weight, self.label, scan)

    def weight_range(self) -> tuple[float, float]:
        mx, mn, _ = self._scan(self.weight)
        return mn, mx

    def block(
        self,
        r0,
        r1,
        *,
        dtype=torch.float64,
        device=None,
        with_rows=False,
        index_dtype=torch.int64,
        workspace=None,
    ):
        device = torch.device(device) if device is not None else self.device
        n = r1 - r0
        vals = self.weight.detach()[:, r0:r1].to(device=device, dtype=dtype).t().reshape(-1)
        rowptr = torch.arange(n + 1, device=device, dtype=torch.int64) * self.n_cols
        if device.type == "cpu":
            np_idx = np.int32 if index_dtype == torch.int32 else np.int64
            cols = np.empty(n * self.n_cols, dtype=np_idx)
            rows = np.empty(n * self.n_cols if with_rows else 0, dtype=np.int64)
            from . import _kernels

            _kernels.fill_dense_rows(r0, n, self.n_cols, cols, rows)
            return Block(
                r0,
                rowptr,
                torch.from_numpy(cols),
                vals,
                torch.from_numpy(rows) if with_rows else None,
            )
        cols = torch.arange(self.n_cols, device=device, dtype=index_dtype).repeat(n)
        rows = None
        if with_rows:
            rows = torch.arange(r0, r1, device=device).repeat_interleave(self.n_cols)
        return Block(r0, rowptr, cols, vals, rows)


@dataclass
class ExplicitMatrix(Connectivity):
    """A connectivity matrix given outright (dense or torch sparse), e.g. by a user builder."""

    label: str
    matrix: torch.Tensor

    def __post_init__(self):
        m = self.matrix
        if m.dim() != 2:
            raise ShapeMismatchError(
                f"{self.label}: a create_matrix function must return a "
                f"2-d matrix, got shape {tuple(m.shape)}"
            )
        self.n_rows, self.n_cols = m.shape
        self.device = m.device
        self.dtype = m.dtype
        with warnings.catch_warnings():  # "sparse CSR support is in beta": not news to users
            warnings.filterwarnings(
                "ignore", message="Sparse CSR tensor support is in beta", category=UserWarning
            )
            if m.layout == torch.sparse_csr:
                self._csr = m
            elif m.layout == torch.sparse_coo:
                self._csr = m.coalesce().to_sparse_csr()
            else:
                self._csr = m.to_sparse_csr()
        self._crow = self._csr.crow_indices().to(torch.int64)

    def row_counts(self, r0, r1):
        return torch.diff(self._crow[r0 : r1 + 1]).cpu().numpy()

    def weight_bound(self) -> float:
        return max(self._scan(self._csr.values())[0], 0.0)

    def weight_range(self) -> tuple[float, float]:
        mx, mn, _ = self._scan(self._csr.values())
        return mn, mx

    def check_finite(self) -> None:
        _check_finite_tensor(self._csr.values(), self.label)

    def block(
        self,
        r0,
        r1,
        *,
        dtype=torch.float64,
        device=None,
        with_rows=False,
        index_dtype=torch.int64,
        workspace=None,
    ):
        device = torch.device(device) if device is not None else self.device
        lo, hi = int(self._crow[r0]), int(self._crow[r1])
        rowptr = (self._crow[r0 : r1 + 1] - lo).to(device)
        cols = self._csr.col_indices()[lo:hi].to(device=device, dtype=index_dtype)
        vals = self._csr.values()[lo:hi].to(device=device, dtype=dtype)
        rows = None
        if with_rows:
            rows = torch.repeat_interleave(
                torch.arange(r0, r1, device=device), torch.diff(rowptr), output_size=hi - lo
            )
        return Block(r0, rowptr, cols, vals, rows)


# --------------------------------------------------------------------------- adapters

Adapter = Callable[..., Connectivity]

#: Module type -> adapter ``(module, in_shape, out_shape, *, legacy, label) -> Connectivity``.
#: One entry per built-in type and per type a user registered. Which entries count depends
#: on ``layers=`` (see :class:`LayerSelection`): the old module's three types and the
#: user's always do; the built-in types in :data:`EXTENDED` only under ``layers="all"``.
REGISTRY: dict[type, Adapter] = {}

#: The old module's layer types: what ``layers="seed"`` (the default) and the drop-in
#: functions count, by exact type.
SEED_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv2d, nn.AvgPool2d)

#: Built-in entries of :data:`REGISTRY` that count only under ``layers="all"`` (or when
#: named in ``layers=``): the flag that keeps one registry for every selection.
EXTENDED: set[type] = set()

#: Every type this package ships a builder for (seed and extended); their subclasses that
#: inherit the forward pass count under ``layers="all"``.
BUILTIN: set[type] = set()

#: The names ``layers=`` accepts besides a sequence of module types.
LAYER_SETS = ("seed", "all")

#: Methods of a built-in layer that run its forward pass: a subclass that overrides one of
#: them may compute with something other than ``.weight`` as stored.
_FORWARD_METHODS = ("forward", "_conv_forward")


def register(module_type: type, adapter: Adapter | None = None):
    """Register ``adapter`` as the connectivity builder of ``module_type``.

    The adapter is called as ``adapter(module, in_shape, out_shape, *, legacy, label)`` and
    returns a :class:`Connectivity` (for instance an :class:`ExplicitMatrix`). Usable as a
    decorator: ``@register(MyLayer)``. A registered type counts whatever ``layers=`` says.
    """
    if not isinstance(module_type, type):
        raise TypeError(f"register() takes a module class, got {module_type!r}")

    def deco(fn: Adapter) -> Adapter:
        REGISTRY[module_type] = fn
        EXTENDED.discard(module_type)
        return fn

    return deco(adapter) if adapter is not None else deco


def unregister(module_type: type) -> None:
    """Remove the builder of ``module_type`` (a KeyError if there is none)."""
    del REGISTRY[module_type]
    EXTENDED.discard(module_type)


def _builtin(*module_types: type, extended: bool = True):
    """Register a built-in adapter for ``module_types``; ``extended``: counted only under
    ``layers="all"``."""

    def deco(fn: Adapter) -> Adapter:
        for t in module_types:
            REGISTRY[t] = fn
            BUILTIN.add(t)
            if extended:
                EXTENDED.add(t)
        return fn

    return deco


def _builtin_base(t: type) -> type | None:
    """The nearest built-in layer type ``t`` derives from (``None`` if none)."""
    for base in t.__mro__[1:]:
        if base in BUILTIN and base in REGISTRY:
            return base
    return None


def _overrides_forward(t: type, base: type) -> bool:
    return any(getattr(t, m, None) is not getattr(base, m, None) for m in _FORWARD_METHODS)


class LayerSelection:
    """Which module types count towards EI, and the builder of each: ``layers=`` resolved.

    Parameters
    ----------
    layers : {'seed', 'all'} or sequence of module types, default 'seed'
        ``'seed'``: the old module's types (:data:`SEED_TYPES`), by exact type.
        ``'all'``: every built-in type, and subclasses of them that inherit the forward
        pass unchanged (their ``.weight`` is what the layer computes with); a subclass
        with its own ``forward`` is skipped and listed in :attr:`refused`.
        A sequence of types: exactly those (a subclass of a built-in type that inherits
        its forward pass is built as that type). Types registered with :func:`register`
        count in every case.

    Raises
    ------
    UnknownNameError
        For a string other than ``'seed'`` or ``'all'``.
    UnsupportedLayerError
        For a listed type with no builder (or with its own forward pass).
    """

    def __init__(self, layers: Any = "seed"):
        if isinstance(layers, LayerSelection):
            layers = layers.layers
        if isinstance(layers, str):
            if layers not in LAYER_SETS:
                raise UnknownNameError(
                    f"unknown layers={layers!r}; use 'seed' (the old "
                    "module's Linear, Conv2d and AvgPool2d), 'all' (every "
                    "built-in layer type) or a sequence of module types"
                )
            self.layers = layers
            self._listed: dict[type, Adapter] | None = None
        else:
            try:
                types = tuple(layers)
            except TypeError:
                raise UnknownNameError(
                    f"layers={layers!r} is neither 'seed', 'all' nor a sequence of module types"
                ) from None
            self._listed = {}
            for t in types:
                adapter = self._inherited(t) if isinstance(t, type) else None
                if adapter is None:
                    what = t.__name__ if isinstance(t, type) else repr(t)
                    raise UnsupportedLayerError(
                        f"layers= lists {what}, which has no connectivity builder (or defines "
                        "its own forward pass). Register one with foresight_sparse.register("
                        f"{what}, builder); built-in types: "
                        f"{', '.join(sorted(b.__name__ for b in BUILTIN))}"
                    )
                self._listed[t] = adapter
            self.layers = types
        self.refused: dict[type, type] = {}  # subclass -> the built-in type it derives from
        self._cache: dict[type, Adapter | None] = {}

    @staticmethod
    def _inherited(t: type) -> Adapter | None:
        if t in REGISTRY:
            return REGISTRY[t]
        base = _builtin_base(t)
        if base is None or _overrides_forward(t, base):
            return None
        return REGISTRY[base]

    def get(self, t: type, default=None) -> Adapter | None:
        """The builder of modules of exact type ``t``, or ``default`` when they do not count."""
        if t not in self._cache:
            self._cache[t] = self._resolve(t)
        adapter = self._cache[t]
        return default if adapter is None else adapter

    def _resolve(self, t: type) -> Adapter | None:
        if t in REGISTRY and (t not in BUILTIN or (t not in EXTENDED and t not in SEED_TYPES)):
            return REGISTRY[t]  # the user's own registrations count whatever layers= says
        if self._listed is not None:
            return self._listed.get(t)
        if self.layers == "seed":
            return REGISTRY[t] if t in REGISTRY and t not in EXTENDED else None
        if t in REGISTRY:
            return REGISTRY[t]
        base = _builtin_base(t)
        if base is None:
            return None
        if _overrides_forward(t, base):
            self.refused[t] = base
            return None
        return REGISTRY[base]

    def __contains__(self, t: object) -> bool:
        return isinstance(t, type) and self.get(t) is not None

    def __iter__(self):
        """The types that count by name (for messages): listed, registered, or built in."""
        if self._listed is not None:
            keys = set(self._listed) | (set(REGISTRY) - BUILTIN)
        elif self.layers == "seed":
            keys = set(REGISTRY) - EXTENDED
        else:
            keys = set(REGISTRY)
        return iter(sorted(keys, key=lambda t: t.__name__))

    def __repr__(self) -> str:
        return f"LayerSelection({self.layers!r})"

    @property
    def label(self) -> str:
        """The option as one string for records and metadata: ``'seed'``, ``'all'``, or the
        listed types' names joined by commas."""
        if isinstance(self.layers, str):
            return self.layers
        return ",".join(t.__name__ for t in self.layers)


def connectivity(
    module: nn.Module,
    in_shape,
    out_shape,
    *,
    legacy: bool = False,
    label: str | None = None,
    adapter: Adapter | None = None,
) -> Connectivity:
    """The :class:`Connectivity` of ``module`` for the traced shapes, via :data:`REGISTRY`.

    ``adapter`` overrides the registry's builder (a :class:`LayerSelection` picks the
    built-in one for a subclass).

    Raises
    ------
    UnsupportedLayerError
        When no builder is registered for ``type(module)``.
    ShapeMismatchError
        From the built-in adapters, when a shape is not a sequence of ints or does not fit
        the layer; the message names the layer.
    """
    label = label or type(module).__name__
    if adapter is None:
        adapter = REGISTRY.get(type(module))
    if adapter is None:
        valid = ", ".join(sorted(t.__name__ for t in REGISTRY))
        raise UnsupportedLayerError(
            f"{label}: no connectivity builder is registered for {type(module).__name__} "
            f"(input {tuple(in_shape)}, output {tuple(out_shape)}). Registered types: "
            f"{valid}. Register one with foresight_sparse.register({type(module).__name__}, "
            "builder)"
        )
    return adapter(module, tuple(in_shape), tuple(out_shape), legacy=legacy, label=label)


def _dims(shape, label: str, what: str, module) -> tuple[int, ...]:
    # a malformed shape (not a sequence of ints) is a shape error naming the layer, not a
    # bare TypeError/ValueError from len() or int()
    try:
        if isinstance(shape, (str, bytes)):
            raise TypeError
        return tuple(operator.index(d) for d in shape)
    except TypeError:
        raise ShapeMismatchError(
            f"{label}: the {what} shape of {type(module).__name__} must be a tuple of ints, "
            f"got {shape!r}. Pass shapes traced from this model (get_shapes)"
        ) from None


@_builtin(nn.Linear, extended=False)
def linear(
    module: nn.Linear, in_shape, out_shape, *, legacy: bool = False, label: str | None = None
) -> FullyConnected:
    """Adapter for ``nn.Linear``: the weight transposed (bias ignored).

    Only the last dimension of the shapes is checked: extra leading dimensions share the
    same weights and do not add neurons, as in the old module.
    """
    label = label or "Linear"
    weight = module.weight
    in_shape = _dims(in_shape, label, "input", module)
    out_shape = _dims(out_shape, label, "output", module)
    if (
        not in_shape
        or not out_shape
        or in_shape[-1] != weight.shape[1]
        or out_shape[-1] != weight.shape[0]
    ):
        raise ShapeMismatchError(
            f"{label}: Linear({weight.shape[1]}, {weight.shape[0]}) cannot map input "
            f"{tuple(in_shape)} to output {tuple(out_shape)}; the last dimensions must be "
            f"{weight.shape[1]} and {weight.shape[0]}. Were the shapes traced from another "
            "model?"
        )
    return FullyConnected(label, weight)


def _ntuple(v, n: int) -> tuple[int, ...]:
    if isinstance(v, (tuple, list)):
        if len(v) == 1:
            return (int(v[0]),) * n
        return tuple(int(x) for x in v)
    return (int(v),) * n


def _spatial(shape, nd: int, label: str, what: str, module) -> tuple[int, ...]:
    """``(C, *spatial)`` of a batched ``(N, C, ...)`` or unbatched ``(C, ...)`` shape."""
    dims = _dims(shape, label, what, module)
    if len(dims) not in (nd + 1, nd + 2):
        names = ("L",) if nd == 1 else ("H", "W") if nd == 2 else ("D", "H", "W")
        unbatched = ", ".join(("C", *names))
        raise ShapeMismatchError(
            f"{label}: {type(module).__name__} needs a {nd + 2}-d (N, {unbatched}) or "
            f"{nd + 1}-d ({unbatched}) {what} shape, got {tuple(shape)}. Pass shapes traced "
            f"from this model (get_shapes) or an input of shape (1, {unbatched})"
        )
    return dims[-(nd + 1) :]


def _conv_pads(module, in_sizes, kernel, dilation, label) -> list[tuple[int, int]]:
    nd = len(kernel)
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * nd
        if padding == "same":
            pads = []
            for d, k in zip(dilation, kernel):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
            return pads
        raise UnsupportedLayerError(
            f"{label}: unknown padding {padding!r}; use 'same', 'valid', an int or a tuple"
        )
    return [(p, p) for p in _ntuple(padding, nd)]


def _shape_error(label, what: str, in_shape, expected, out_shape) -> ShapeMismatchError:
    return ShapeMismatchError(
        f"{label}: {what} maps input {tuple(in_shape)} to (N, {', '.join(map(str, expected))})"
        f", but the shapes say output {tuple(out_shape)}. Pass shapes traced from this "
        "model (get_shapes)"
    )


def _conv(module, in_shape, out_shape, nd: int, label: str) -> Stencil:
    """A convolution over ``nd`` spatial axes (see :func:`conv2d`)."""
    c_in, *size = _spatial(in_shape, nd, label, "input", module)
    c_out, *osize = _spatial(out_shape, nd, label, "output", module)
    kernel = _ntuple(module.kernel_size, nd)
    stride = _ntuple(module.stride, nd)
    dilation = _ntuple(module.dilation, nd)
    mode = module.padding_mode
    if mode not in PADDING_MODES:
        raise UnsupportedLayerError(
            f"{label}: padding_mode {mode!r} is not supported; "
            f"supported modes are {', '.join(PADDING_MODES)}"
        )
    pads = _conv_pads(module, size, kernel, dilation, label)
    expected = tuple(
        conv_output_size(n, k, s, d, pb + pa)
        for n, k, s, d, (pb, pa) in zip(size, kernel, stride, dilation, pads)
    )
    if c_in != module.in_channels or c_out != module.out_channels or tuple(osize) != expected:
        raise _shape_error(
            label,
            f"{type(module).__name__}({module.in_channels}, {module.out_channels}, "
            f"kernel_size={kernel}, stride={stride}, padding={module.padding}, "
            f"dilation={dilation})",
            in_shape,
            (module.out_channels, *expected),
            out_shape,
        )
    axes = [
        Axis(n, o, k, s, d, pb, pa, mode)
        for n, o, k, s, d, (pb, pa) in zip(size, osize, kernel, stride, dilation, pads)
    ]
    return Stencil.from_axes(
        label, module.weight, (c_in, c_out), module.groups, axes, weight_name="weight"
    )


@_builtin(nn.Conv2d, extended=False)
def conv2d(
    module: nn.Conv2d, in_shape, out_shape, *, legacy: bool = False, label: str | None = None
) -> Stencil:
    """Adapter for ``nn.Conv2d``: the transposed Jacobian of the bias-free layer.

    Honours stride, int/tuple/``'same'``/``'valid'`` padding, dilation, groups and every
    ``padding_mode`` (non-zero modes sum the taps that land on the same input).
    """
    return _conv(module, in_shape, out_shape, 2, label or "Conv2d")


@_builtin(nn.Conv1d)
def conv1d(
    module: nn.Conv1d, in_shape, out_shape, *, legacy: bool = False, label: str | None = None
) -> Stencil:
    """Adapter for ``nn.Conv1d``: as :func:`conv2d`, over one axis (counted under
    ``layers="all"``)."""
    return _conv(module, in_shape, out_shape, 1, label or "Conv1d")


@_builtin(nn.Conv3d)
def conv3d(
    module: nn.Conv3d, in_shape, out_shape, *, legacy: bool = False, label: str | None = None
) -> Stencil:
    """Adapter for ``nn.Conv3d``: as :func:`conv2d`, over three axes (counted under
    ``layers="all"``)."""
    return _conv(module, in_shape, out_shape, 3, label or "Conv3d")


def _conv_transpose(module, in_shape, out_shape, nd: int, label: str) -> Stencil:
    """A transposed convolution: input ``i`` writes output ``i * stride - padding +
    k * dilation`` with ``weight[ci, co_local, k]``."""
    c_in, *size = _spatial(in_shape, nd, label, "input", module)
    c_out, *osize = _spatial(out_shape, nd, label, "output", module)
    kernel = _ntuple(module.kernel_size, nd)
    stride = _ntuple(module.stride, nd)
    dilation = _ntuple(module.dilation, nd)
    padding = _ntuple(module.padding, nd)
    if module.padding_mode != "zeros":  # pragma: no cover - torch refuses other modes
        raise UnsupportedLayerError(
            f"{label}: padding_mode {module.padding_mode!r}; "
            "transposed convolutions support only 'zeros'"
        )
    base = tuple(
        (n - 1) * s - 2 * p + d * (k - 1) + 1
        for n, s, p, d, k in zip(size, stride, padding, dilation, kernel)
    )
    # output_padding (or forward's output_size) adds up to max(stride, dilation) - 1
    fits = all(b <= o < b + max(s, d) for b, o, s, d in zip(base, osize, stride, dilation))
    if c_in != module.in_channels or c_out != module.out_channels or not fits:
        expected = tuple(b + op for b, op in zip(base, _ntuple(module.output_padding, nd)))
        raise _shape_error(
            label,
            f"{type(module).__name__}({module.in_channels}, {module.out_channels}, "
            f"kernel_size={kernel}, stride={stride}, padding={padding}, "
            f"output_padding={module.output_padding}, dilation={dilation})",
            in_shape,
            (module.out_channels, *expected),
            out_shape,
        )
    axes = [
        Axis(n, o, k, s, d, p, 0, "zeros", "transposed")
        for n, o, k, s, d, p in zip(size, osize, kernel, stride, dilation, padding)
    ]
    return Stencil.from_axes(
        label,
        module.weight,
        (c_in, c_out),
        module.groups,
        axes,
        transposed=True,
        weight_name="weight",
    )


@_builtin(nn.ConvTranspose1d)
def conv_transpose1d(
    module: nn.ConvTranspose1d,
    in_shape,
    out_shape,
    *,
    legacy: bool = False,
    label: str | None = None,
) -> Stencil:
    """Adapter for ``nn.ConvTranspose1d`` (stride, padding, output_padding, dilation,
    groups): ``A[(ci, i), (co, o)] = weight[ci, co_local, k]`` where ``o = i * stride -
    padding + k * dilation``."""
    return _conv_transpose(module, in_shape, out_shape, 1, label or "ConvTranspose1d")


@_builtin(nn.ConvTranspose2d)
def conv_transpose2d(
    module: nn.ConvTranspose2d,
    in_shape,
    out_shape,
    *,
    legacy: bool = False,
    label: str | None = None,
) -> Stencil:
    """Adapter for ``nn.ConvTranspose2d``; see :func:`conv_transpose1d`."""
    return _conv_transpose(module, in_shape, out_shape, 2, label or "ConvTranspose2d")


@_builtin(nn.ConvTranspose3d)
def conv_transpose3d(
    module: nn.ConvTranspose3d,
    in_shape,
    out_shape,
    *,
    legacy: bool = False,
    label: str | None = None,
) -> Stencil:
    """Adapter for ``nn.ConvTranspose3d``; see :func:`conv_transpose1d`."""
    return _conv_transpose(module, in_shape, out_shape, 3, label or "ConvTranspose3d")


def _avgpool(module, in_shape, out_shape, nd: int, label: str, legacy: bool = False):
    """An average pool over ``nd`` axes, per channel, with PyTorch's divisors."""
    c_in, *size = _spatial(in_shape, nd, label, "input", module)
    c_out, *osize = _spatial(out_shape, nd, label, "output", module)
    kernel = _ntuple(module.kernel_size, nd)
    stride = _ntuple(module.stride if module.stride not in (None, ()) else module.kernel_size, nd)
    pads = _ntuple(module.padding, nd)
    expected = tuple(
        _pool_out(n, k, s, p, module.ceil_mode) for n, k, s, p in zip(size, kernel, stride, pads)
    )
    if c_out != c_in or tuple(osize) != expected:
        raise _shape_error(
            label,
            f"{type(module).__name__}(kernel_size={kernel}, stride={stride}, "
            f"padding={pads}, ceil_mode={module.ceil_mode})",
            in_shape,
            (c_in, *expected),
            out_shape,
        )
    if legacy:
        if any(pads):
            raise UnsupportedLayerError(
                f"{label}: legacy=True reproduces the old module, which refuses AvgPool2d "
                f"padding (got padding={module.padding}, input {tuple(in_shape)}); use "
                "legacy=False for the true pooling connectivity"
            )
        axes = [Axis(n, o, k, s) for n, o, k, s in zip(size, osize, kernel, stride)]
        weight = torch.full((c_in, c_in) + kernel, 1.0 / math.prod(kernel), dtype=torch.float64)
        return Stencil(
            label,
            weight,
            (c_in, *size),
            (c_in, *osize),
            1,
            *axes,
            values_dtype=torch.get_default_dtype(),
        )
    axes = [Axis(n, o, k, s, 1, p, p) for n, o, k, s, p in zip(size, osize, kernel, stride, pads)]
    override = getattr(module, "divisor_override", None)
    if override:
        scales = [np.full(osize[0], 1.0 / override)] + [None] * (nd - 1)
    else:
        pick = 0 if module.count_include_pad else 1
        scales = [1.0 / a.window_lengths()[pick] for a in axes]
    weight = torch.ones((c_in, 1) + kernel, dtype=torch.float64)
    return Stencil.from_axes(
        label, weight, (c_in, c_in), c_in, axes, scales, values_dtype=torch.get_default_dtype()
    )


@_builtin(nn.AvgPool2d, extended=False)
def avgpool2d(
    module: nn.AvgPool2d, in_shape, out_shape, *, legacy: bool = False, label: str | None = None
) -> Stencil:
    """Adapter for ``nn.AvgPool2d``.

    By default each output connects to its window in its own channel with the divisor
    PyTorch uses (``padding``, ``ceil_mode``, ``count_include_pad`` and
    ``divisor_override`` honoured). ``legacy=True`` reproduces the old module: every output
    connects to the window in *all* input channels with entry ``1 / (kh * kw)``, and
    padding is refused.
    """
    return _avgpool(module, in_shape, out_shape, 2, label or "AvgPool2d", legacy)


@_builtin(nn.AvgPool1d)
def avgpool1d(
    module: nn.AvgPool1d, in_shape, out_shape, *, legacy: bool = False, label: str | None = None
) -> Stencil:
    """Adapter for ``nn.AvgPool1d``: per channel, PyTorch's divisors (``legacy`` is an
    AvgPool2d option and is ignored)."""
    return _avgpool(module, in_shape, out_shape, 1, label or "AvgPool1d")


@_builtin(nn.AvgPool3d)
def avgpool3d(
    module: nn.AvgPool3d, in_shape, out_shape, *, legacy: bool = False, label: str | None = None
) -> Stencil:
    """Adapter for ``nn.AvgPool3d``: per channel, PyTorch's divisors (``padding``,
    ``ceil_mode``, ``count_include_pad``, ``divisor_override``)."""
    return _avgpool(module, in_shape, out_shape, 3, label or "AvgPool3d")


def _adaptive(module, in_shape, out_shape, nd: int, label: str) -> Stencil:
    """An adaptive average pool: output ``o`` averages inputs ``floor(o * In / Out)`` to
    ``ceil((o + 1) * In / Out) - 1`` of its channel, entry ``1 / window length``."""
    c_in, *size = _spatial(in_shape, nd, label, "input", module)
    c_out, *osize = _spatial(out_shape, nd, label, "output", module)
    wanted = module.output_size
    wanted = (wanted,) * nd if not isinstance(wanted, (tuple, list)) else tuple(wanted)
    ok = len(wanted) == nd and all(w is None or w == o for w, o in zip(wanted, osize))
    if c_out != c_in or not ok or any(o < 1 for o in osize):
        expected = tuple(n if w is None else w for n, w in zip(size, wanted))
        raise _shape_error(
            label,
            f"{type(module).__name__}(output_size={module.output_size})",
            in_shape,
            (c_in, *expected),
            out_shape,
        )
    axes = []
    for n, o in zip(size, osize):
        lengths = Axis(n, o, 1, kind="adaptive").window_lengths()[0]
        axes.append(Axis(n, o, int(lengths.max(initial=1)), kind="adaptive"))
    scales = [1.0 / a.window_lengths()[0] for a in axes]
    weight = torch.ones((c_in, 1) + tuple(a.kernel for a in axes), dtype=torch.float64)
    return Stencil.from_axes(
        label, weight, (c_in, c_in), c_in, axes, scales, values_dtype=torch.get_default_dtype()
    )


@_builtin(nn.AdaptiveAvgPool1d)
def adaptive_avgpool1d(
    module: nn.AdaptiveAvgPool1d,
    in_shape,
    out_shape,
    *,
    legacy: bool = False,
    label: str | None = None,
) -> Stencil:
    """Adapter for ``nn.AdaptiveAvgPool1d``: PyTorch's windows ``floor(i * In / Out)`` to
    ``ceil((i + 1) * In / Out)`` (they may overlap), entry ``1 / window length``."""
    return _adaptive(module, in_shape, out_shape, 1, label or "AdaptiveAvgPool1d")


@_builtin(nn.AdaptiveAvgPool2d)
def adaptive_avgpool2d(
    module: nn.AdaptiveAvgPool2d,
    in_shape,
    out_shape,
    *,
    legacy: bool = False,
    label: str | None = None,
) -> Stencil:
    """Adapter for ``nn.AdaptiveAvgPool2d``; see :func:`adaptive_avgpool1d`."""
    return _adaptive(module, in_shape, out_shape, 2, label or "AdaptiveAvgPool2d")


@_builtin(nn.AdaptiveAvgPool3d)
def adaptive_avgpool3d(
    module: nn.AdaptiveAvgPool3d,
    in_shape,
    out_shape,
    *,
    legacy: bool = False,
    label: str | None = None,
) -> Stencil:
    """Adapter for ``nn.AdaptiveAvgPool3d``; see :func:`adaptive_avgpool1d`."""
    return _adaptive(module, in_shape, out_shape, 3, label or "AdaptiveAvgPool3d")


def _pool_out(n: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    out = conv_output_size(n, k, s, 1, 2 * p, ceil_mode)
    # PyTorch drops a last window that would start inside the right padding.
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out
