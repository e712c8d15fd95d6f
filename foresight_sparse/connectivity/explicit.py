"""Matrices given outright: :class:`ExplicitMatrix`, what a user's ``create_matrix`` returned."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..exceptions import ShapeMismatchError
from .base import Block, Connectivity

__all__ = ["ExplicitMatrix"]


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

    def _weights(self) -> torch.Tensor:
        return self._csr.values()

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
        # torch slices of the stored CSR matrix, whatever the backend
        device = self._device(device)
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
