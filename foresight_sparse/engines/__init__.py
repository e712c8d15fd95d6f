"""Engines: reduce one layer's connectivity to its row entropies and column sums.

Every engine computes, for one layer under one norm, the sum of its rows' entropies and the
vector of its column sums (float64). :mod:`foresight_sparse.analysis` combines layers into
determinism, degeneracy and EI, so each quantity has one code path whatever the engine.

- ``'sparse'``: streams row blocks of the sparse matrix under a memory budget
  (:mod:`.sparse`);
- ``'implicit'``: never materialises the matrix; convolutions of the kernel with maps of
  ones and of ``1/Z`` (:mod:`.implicit`);
- ``'dense'``: the dense reference, for checks and as the benchmark baseline (:mod:`.dense`);
- ``'auto'``: implicit wherever it is exact, sparse elsewhere.

Whichever the engine, the numeric forms come from the job's backend
(:mod:`foresight_sparse.backends`: numba kernels or torch operations), chosen once per plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..backends import Backend, resolve_backend
from ..connectivity import Connectivity
from ..exceptions import UnknownNameError
from ..norms import Norm

__all__ = [
    "LayerJob",
    "LayerStats",
    "ENGINES",
    "ENGINE_NAMES",
    "check_engine",
    "layer_shift",
    "pick_engine",
    "reduce_layer",
    "working_bytes",
]


@dataclass
class LayerJob:
    """What an engine needs for one layer: its connectivity (made of the weights to
    evaluate), the norm, where to reduce, the working-memory budget in bytes, and the
    :class:`~foresight_sparse.backends.Backend` whose forms compute it.

    The backend is the plan's, as :meth:`Backend.for_layer
    <foresight_sparse.backends.Backend.for_layer>` adapts it to this layer; without one,
    ``'auto'`` resolved for the device and norm.
    """

    conn: Connectivity
    norm: Norm
    device: torch.device
    budget: int
    backend: Backend | None = None

    def __post_init__(self):
        backend = self.backend or resolve_backend("auto", self.device, self.norm)
        self.backend = backend.for_layer(self.conn)


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


Engine = Callable[[LayerJob], LayerStats]


def _engines() -> dict[str, Engine]:
    from . import dense, implicit, sparse

    return {
        "sparse": sparse.layer_stats,
        "implicit": implicit.layer_stats,
        "dense": dense.layer_stats,
    }


#: The engine names ``engine=`` accepts.
ENGINE_NAMES = ("auto", "implicit", "sparse", "dense")


def check_engine(name: str) -> str:
    """``name`` if ``engine=`` accepts it (one of :data:`ENGINE_NAMES`).

    Raises
    ------
    UnknownNameError
        Otherwise, listing the valid names.
    """
    if name not in ENGINE_NAMES:
        raise _unknown_engine(name)
    return name


def _unknown_engine(name) -> UnknownNameError:
    return UnknownNameError(f"unknown engine {name!r}; valid engines are {', '.join(ENGINE_NAMES)}")


class _Registry(dict):
    def __missing__(self, key):
        self.update(_engines())
        if key in self:
            return self[key]
        raise _unknown_engine(key)  # 'auto' included: it picks an engine, it is not one


#: Engine name -> function ``LayerJob -> LayerStats``.
ENGINES: dict[str, Engine] = _Registry()


def layer_shift(norm, conn: Connectivity) -> float:
    """The shift ``norm`` evaluates ``conn``'s entries with: from the layer's largest
    entry for the norms whose shift depends on it, else 0 (no scan of the weights)."""
    return norm.shift(conn.weight_bound()) if norm.shifts else 0.0


def pick_engine(requested: str, job: LayerJob) -> str:
    """The engine that serves ``job``: ``requested``, or for ``'auto'`` implicit where exact.

    An explicit ``'implicit'`` also falls back to sparse for layers it cannot express
    (padding that folds two taps onto one input, custom norms, user builders).
    """
    check_engine(requested)
    if requested in ("auto", "implicit"):
        from .implicit import supports

        return "implicit" if supports(job) else "sparse"
    return requested


def reduce_layer(engine: str, job: LayerJob) -> LayerStats:
    """Reduce ``job`` with the engine named ``engine`` (one already picked by
    :func:`pick_engine`, not ``'auto'``); each engine checks the weights are finite."""
    return ENGINES[engine](job)


def working_bytes(engine: str, conn: Connectivity, budget: int, backend: Backend) -> int:
    """Bytes the engine named ``engine`` holds for one layer under ``budget`` and
    ``backend`` (an estimate, for plans)."""
    if engine == "implicit":
        from .implicit import working_bytes as implicit_bytes

        return implicit_bytes(conn, budget)
    if engine == "dense":
        return conn.n_rows * conn.n_cols * 8 * 3
    from .sparse import working_bytes as sparse_bytes

    return sparse_bytes(conn, budget, backend)
