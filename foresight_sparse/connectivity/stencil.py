"""Sliding-window layers (convolutions, transposed convolutions, average pools) as a
:class:`Stencil`: a kernel and two lanes of :class:`~foresight_sparse.geometry.Axis` geometry,
with the tap tables and the kernel folding that map 1-d and 3-d layers onto two lanes, and
its block fill in both forms (numba kernels in ``_fill_kernels``; torch index arithmetic)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ..backends import NUMBA_FLOATS, TORCH, numba_kernels
from ..exceptions import ShapeMismatchError
from ..geometry import Axis, AxisPairs, AxisProduct
from .base import Block, Connectivity, _buffer, _rowptr

__all__ = ["Stencil"]


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
            raise ShapeMismatchError(f"{label}: a stencil has 1 to 3 spatial axes, got {len(axes)}")
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
        return (
            super().weight_bound()
            * taps_h
            * taps_w
            * float(self.scale_h.max(initial=1.0))
            * float(self.scale_w.max(initial=1.0))
        )

    def _weights(self) -> torch.Tensor:
        return self.kernel

    def rows(
        self,
        backend,
        r0,
        r1,
        *,
        dtype=torch.float64,
        device=None,
        with_rows=False,
        index_dtype=torch.int64,
        workspace: dict | None = None,
    ):
        # the backend's form: numba kernels (CPU arrays), or torch index arithmetic on
        # ``device``
        if backend.name == "numba":
            return _numba_block(self, r0, r1, dtype, with_rows, index_dtype, workspace)
        return _torch_block(self, r0, r1, dtype, self._device(device), with_rows, index_dtype)

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
        """Rows ``r0 .. r1`` by vectorised torch index arithmetic, on any device: the torch
        backend's form (what CUDA runs), the same block as the numba kernel's."""
        return self.rows(
            TORCH, r0, r1, dtype=dtype, device=device, with_rows=with_rows, index_dtype=index_dtype
        )


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


def _numba_block(
    conn: Stencil,
    r0: int,
    r1: int,
    dtype: torch.dtype,
    with_rows: bool,
    index_dtype: torch.dtype,
    workspace: dict | None,
) -> Block:
    """The numba form of :meth:`Stencil.rows`: a kernel fills CPU arrays.

    ``workspace`` (a dict the caller keeps across blocks) lets the kernel write into the
    same buffers every time instead of mapping fresh memory per block; the returned arrays
    are then views valid until the next call.
    """
    rowptr = _rowptr(conn.row_counts(r0, r1))
    nnz = int(rowptr[-1])
    # numpy has no bfloat16: such values are made in float32 and cast by torch
    fill_dtype = dtype if dtype in NUMBA_FLOATS else torch.float32
    np_idx = np.int32 if index_dtype == torch.int32 else np.int64
    cols = _buffer(workspace, "cols", nnz, np_idx)
    vals = torch.from_numpy(
        _buffer(workspace, "vals", nnz, torch.empty((), dtype=fill_dtype).numpy().dtype)
    )
    rows = _buffer(workspace, "rows", nnz if with_rows else 0, np.int64)
    kernels = numba_kernels("connectivity._fill_kernels")
    kernels.fill_stencil_rows(r0, r1 - r0, conn, rowptr, cols, vals.numpy(), rows)
    return Block(
        r0,
        torch.from_numpy(rowptr),
        torch.from_numpy(cols),
        vals.to(dtype),
        torch.from_numpy(rows) if with_rows else None,
    )


def _torch_block(
    conn: Stencil,
    r0: int,
    r1: int,
    dtype: torch.dtype,
    device: torch.device,
    with_rows: bool,
    index_dtype: torch.dtype,
) -> Block:
    """The torch form of :meth:`Stencil.rows`, on any device.

    Every entry's position in its row is decomposed into (output channel, H pair, W pair)
    and its value gathered from the kernel, duplicate taps summed through a padded tap
    table: the same block as the numba kernel.
    """
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


def _tap_table(pairs: AxisPairs, device) -> torch.Tensor:
    """Taps of each pair, padded with -1 to the widest pair: shape ``(n_pairs, max_taps)``."""
    n_taps = np.diff(pairs.tap_ptr)
    width = int(n_taps.max(initial=1))
    table = np.full((len(pairs.out), width), -1, dtype=np.int64)
    col = np.arange(len(pairs.tap)) - np.repeat(pairs.tap_ptr[:-1], n_taps)
    table[np.repeat(np.arange(len(pairs.out)), n_taps), col] = pairs.tap
    return torch.as_tensor(table, device=device)
