"""The base of every connectivity description: :class:`Connectivity`, its row :class:`Block`,
and the weight scan and reusable buffers that its subclasses share."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..backends import default_backend
from ..budget import check_budget, resolve_budget
from ..exceptions import DeviceError, NonFiniteWeightsError, Opt, UnknownNameError

__all__ = ["Block", "Connectivity", "weight_scan"]

_INT32_MAX = 2**31 - 1

#: The :attr:`Connectivity.memo` entry, one dict per plan, through which
#: :meth:`Connectivity.shared_memo` makes a value once for the plan's layers of equal key.
SHARED_MEMO = "plan_shared"


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

    @property
    def memo(self) -> dict:
        """Values that depend on the layer's geometry alone (position classes, memory
        estimates), computed once by whoever needs them and shared with every connectivity
        :meth:`bind` makes from this one: a plan evaluates new weights without redoing them."""
        memo = self.__dict__.get("_memo")
        if memo is None:
            memo = self.__dict__["_memo"] = {}
        return memo

    def shared_memo(self, name: str, key: Hashable, make: Callable[[], Any]) -> Any:
        """``memo[name]``, made by ``make()`` on first use; in a plan, made once for every
        layer whose ``key`` is equal. ``key`` holds everything ``make`` reads (a
        convolution's position classes are the same for every layer of the same window
        geometry and channel counts), and the plan puts one dict under the entry
        ``SHARED_MEMO`` of each of its layers' memos."""
        memo = self.memo
        value = memo.get(name)
        if value is None:
            shared = memo.get(SHARED_MEMO)
            if shared is None:
                value = make()
            else:
                value = shared.get((name, key))
                if value is None:
                    value = shared[(name, key)] = make()
            memo[name] = value
        return value

    def _rebound(self, **changes) -> Connectivity:
        self.memo  # noqa: B018 - made before the copy, so that the copy shares it
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
        backend=None,
    ) -> Block:
        """Rows ``r0 .. r1`` as a :class:`Block` with values in ``dtype`` on ``device``.

        ``workspace`` is an optional dict of reusable buffers, kept across the blocks of a
        layer; an int under its key ``"entries"`` sizes them for the largest block up front,
        so that no later block maps fresh pages (the numba fill writes into them; the
        returned arrays are then views valid until the next call). ``backend`` (a
        :class:`~foresight_sparse.backends.Backend`) fills the block; by default the one
        for ``device`` (numba on the CPU, torch elsewhere).

        A subclass implements this method, or :meth:`rows` to fill its blocks with the
        backend's forms, as the built-in classes do.
        """
        device = self._device(device)
        return self.rows(
            _fill_backend(backend, device),
            r0,
            r1,
            dtype=dtype,
            device=device,
            with_rows=with_rows,
            index_dtype=index_dtype,
            workspace=workspace,
        )

    def rows(
        self,
        backend,
        r0: int,
        r1: int,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        with_rows: bool = False,
        index_dtype: torch.dtype = torch.int64,
        workspace: dict | None = None,
    ) -> Block:
        """Rows ``r0 .. r1`` filled by ``backend`` (see :meth:`block`): what the engines
        call, with the backend of their plan. By default the subclass's own :meth:`block`,
        which knows how to make its rows (a user's connectivity: the backend is unused)."""
        if type(self).block is Connectivity.block:
            raise NotImplementedError(f"{type(self).__name__} implements neither block nor rows")
        return self.block(
            r0,
            r1,
            dtype=dtype,
            device=device,
            with_rows=with_rows,
            index_dtype=index_dtype,
            workspace=workspace,
        )

    def _device(self, device) -> torch.device:
        return torch.device(device) if device is not None else self.device

    def _weights(self) -> torch.Tensor:
        """The tensor whose values the entries are made of (scanned for NaN/Inf and for
        its range); the built-in subclasses name theirs."""
        raise NotImplementedError

    def weight_bound(self) -> float:
        """An upper bound on every entry (used to shift ``exp`` away from overflow)."""
        return max(self._scan(self._weights())[0], 0.0)

    @property
    def exact_dtype(self) -> torch.dtype:
        """The narrowest of float32/float64 that holds every entry exactly."""
        return torch.float64

    def check_finite(self, non_finite: int | None = None) -> None:
        """Raise :class:`~foresight_sparse.exceptions.NonFiniteWeightsError` on NaN/Inf
        weights. ``non_finite``, the count of NaN/Inf weights a pass over the weights
        already made, saves the scan."""
        weights = self._weights()
        scan = (0.0, 0.0, non_finite) if non_finite is not None else self._scan(weights)
        _check_finite_tensor(weights, self.label, scan)

    def weight_range(self) -> tuple[float, float]:
        """Smallest and largest weight the entries are made of."""
        mx, mn, _ = self._scan(self._weights())
        return mn, mx

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
            (
                "pass a larger ",
                Opt("max_memory"),
                ", or let the engines stream it "
                "(determinism/degeneracy/ei never hold a whole matrix)",
            ),
        )
        idx_dtype = torch.int64
        if layout in ("csr", "scipy") and _fits_int32(self.nnz, self.n_cols):
            idx_dtype = torch.int32
        size = (self.n_rows, self.n_cols)
        if layout == "coo":
            # a block that fills the workspace writes the rows and columns straight into
            # the (2, nnz) index tensor: stacking copies of them would move every index
            # twice more, which costs more than building it
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
                f"{self.label}: ",
                Opt("layout", "scipy"),
                f" needs CPU tensors; the layer lives on {blk.vals.device}. Move the model "
                "to the CPU or use ",
                Opt("layout", "csr"),
            )
        import scipy.sparse  # scipy loads only for this layout

        return scipy.sparse.csr_array(
            (blk.vals.numpy(), blk.cols.numpy(), crow.numpy()), shape=size
        )

    def to_dense(self, dtype: torch.dtype = torch.float64, *, backend=None) -> torch.Tensor:
        """The dense matrix (small layers only: for custom norms and tests), its rows
        filled by ``backend`` (see :meth:`block`)."""
        blk = self.rows(
            _fill_backend(backend, self.device), 0, self.n_rows, dtype=dtype, with_rows=True
        )
        dense = torch.zeros(self.n_rows, self.n_cols, dtype=dtype, device=blk.vals.device)
        dense[blk.rows, blk.cols] = blk.vals
        return dense


def _fill_backend(backend, device: torch.device):
    """``backend``, or the default one for ``device`` where none is given (outside a plan)."""
    return backend if backend is not None else default_backend(device)


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
    block would touch fresh pages each time, and first-touch page faults cost more than
    the fill kernel's writes.
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
