"""Fully connected layers: :class:`FullyConnected`, the weight transposed, every entry stored;
and its block fill in both forms (numba index kernels in ``_fill_kernels``; torch)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..backends import numba_kernels
from .base import Block, Connectivity

__all__ = ["FullyConnected"]


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

    def _weights(self) -> torch.Tensor:
        return self.weight

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
        workspace=None,
    ):
        # the values are the weight's columns in both forms; the backend's form makes the
        # indices
        device = self._device(device)
        n = r1 - r0
        vals = self.weight.detach()[:, r0:r1].to(device=device, dtype=dtype).t().reshape(-1)
        rowptr = torch.arange(n + 1, device=device, dtype=torch.int64) * self.n_cols
        if backend.name == "numba":
            cols, rows = _numba_indices(r0, n, self.n_cols, with_rows, index_dtype)
        else:
            cols, rows = _torch_indices(r0, n, self.n_cols, with_rows, index_dtype, device)
        return Block(r0, rowptr, cols, vals, rows)


def _numba_indices(r0: int, n: int, n_cols: int, with_rows: bool, index_dtype: torch.dtype):
    """The numba form of a block's column (and row) indices: a kernel fills CPU arrays."""
    np_idx = np.int32 if index_dtype == torch.int32 else np.int64
    cols = np.empty(n * n_cols, dtype=np_idx)
    rows = np.empty(n * n_cols if with_rows else 0, dtype=np.int64)
    numba_kernels("connectivity._fill_kernels").fill_dense_rows(r0, n, n_cols, cols, rows)
    return torch.from_numpy(cols), torch.from_numpy(rows) if with_rows else None


def _torch_indices(r0: int, n: int, n_cols: int, with_rows: bool, index_dtype: torch.dtype, device):
    """The torch form of a block's column (and row) indices, on ``device``."""
    cols = torch.arange(n_cols, device=device, dtype=index_dtype).repeat(n)
    rows = None
    if with_rows:
        rows = torch.arange(r0, r0 + n, device=device).repeat_interleave(n_cols)
    return cols, rows
