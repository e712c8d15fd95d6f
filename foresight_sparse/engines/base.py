"""What every engine takes and returns: :class:`LayerJob` and :class:`LayerStats`, and the
shift a norm evaluates a layer with (:func:`layer_shift`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends import NUMBA_FLOATS, TORCH, Backend, resolve_backend
from ..connectivity import Connectivity, FullyConnected
from ..norms import Norm

__all__ = ["LayerJob", "LayerStats", "layer_shift", "serving_backend"]


@dataclass
class LayerJob:
    """What an engine needs for one layer: its connectivity (made of the weights to
    evaluate), the norm, where to reduce, the working-memory budget in bytes, and the
    :class:`~foresight_sparse.backends.Backend` whose forms compute it.

    The backend is the plan's, as :func:`serving_backend` adapts it to this layer; without
    one, ``'auto'`` resolved for the device and norm.
    """

    conn: Connectivity
    norm: Norm
    device: torch.device
    budget: int
    backend: Backend | None = None

    def __post_init__(self):
        backend = self.backend or resolve_backend("auto", self.device, self.norm)
        self.backend = serving_backend(backend, self.conn)


@dataclass
class LayerStats:
    """One layer reduced: the sum of its row entropies and its column sums (float64).

    The column sums are ``col_sums + col_offset``: the constant every column receives from
    the absent entries is kept apart rather than added in another pass over the columns.
    When ``col_weights`` is given, entry ``j`` of ``col_sums`` stands for
    ``col_weights[j]`` columns with that same sum (the implicit engine's position classes);
    otherwise for one column each. ``engine`` and ``backend`` name what served the layer.
    """

    h_sum: float
    n_rows: int
    col_sums: torch.Tensor
    engine: str
    col_offset: float = 0.0
    col_weights: torch.Tensor | None = None
    backend: str = ""


def serving_backend(backend: Backend, conn: Connectivity) -> Backend:
    """The backend that serves ``conn`` in a plan resolved to ``backend``: the fallback of
    the engines' forms (:mod:`~foresight_sparse.engines.dispatch`).

    The numba forms read a Linear weight as float32 or float64 arrays: a
    :class:`~foresight_sparse.connectivity.FullyConnected` whose weight is another float
    (float16, bfloat16) is handed to the torch forms, for every engine, and its
    :class:`LayerStats` record ``backend='torch'``. Every other layer keeps ``backend``.
    """
    if (
        backend.name == "numba"
        and isinstance(conn, FullyConnected)
        and conn.weight.dtype not in NUMBA_FLOATS
    ):
        return TORCH
    return backend


def layer_shift(norm, conn: Connectivity) -> float:
    """The shift ``norm`` evaluates ``conn``'s entries with: from the layer's largest
    entry for the norms whose shift depends on it, else 0 (no scan of the weights)."""
    return norm.shift(conn.weight_bound()) if norm.shifts else 0.0
