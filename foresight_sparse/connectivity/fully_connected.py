"""Fully connected layers: :class:`FullyConnected`, the weight transposed, every entry stored."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .base import Connectivity

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
        return backend.dense_block(
            self, r0, r1, dtype, self._device(device), with_rows, index_dtype
        )
