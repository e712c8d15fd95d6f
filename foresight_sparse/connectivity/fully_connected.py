"""Fully connected layers: :class:`FullyConnected`, the weight transposed, every entry stored."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .base import Block, Connectivity, _check_finite_tensor

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
            from .. import _kernels

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
