"""Engines: reduce one layer's connectivity to its row entropies and column sums.

Every engine computes, for one layer under one norm, the sum of its rows' entropies and the
vector of its column sums (float64). A plan combines the layers into determinism,
degeneracy and EI (:meth:`Plan.evaluate_layer <foresight_sparse.plans.Plan.evaluate_layer>`
and :class:`~foresight_sparse.plans.Totals`), so each quantity has one code path whatever
the engine.

- ``'sparse'``: streams row blocks of the sparse matrix under a memory budget
  (:mod:`.sparse`);
- ``'implicit'``: never materialises the matrix; convolutions of the kernel with maps of
  ones and of ``1/Z`` (:mod:`.implicit`);
- ``'dense'``: the dense reference, for checks and as the benchmark baseline (:mod:`.dense`);
- ``'auto'``: implicit wherever it is exact, sparse elsewhere.

Whichever the engine, its numeric forms are those of the job's backend
(:mod:`foresight_sparse.backends`: numba kernels or torch operations, chosen once per plan),
found in one table (:mod:`.dispatch`). The modules:

- :mod:`.base`: :class:`LayerJob`, :class:`LayerStats` and :func:`layer_shift`;
- :mod:`.dispatch`: the table of forms and the fallback of a layer numba cannot take;
- the engines: :mod:`.sparse`, :mod:`.implicit`, :mod:`.dense`;
- their numerics, each in both forms beside its kernels: :mod:`.blocks` (the sparse
  engine's block reduction), :mod:`.conv`, :mod:`.linear` and :mod:`.pool` (the implicit
  engine's passes).
"""

from __future__ import annotations

from collections.abc import Callable

from ..backends import Backend
from ..connectivity import Connectivity
from ..exceptions import UnknownNameError
from . import dense, implicit, sparse
from .base import LayerJob, LayerStats, layer_shift

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

Engine = Callable[[LayerJob], LayerStats]

#: Engine name -> function ``LayerJob -> LayerStats``.
ENGINES: dict[str, Engine] = {
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


def pick_engine(requested: str, job: LayerJob) -> str:
    """The engine that serves ``job``: ``requested``, or for ``'auto'`` implicit where exact.

    An explicit ``'implicit'`` also falls back to sparse for layers it cannot express
    (padding that folds two taps onto one input, custom norms, user builders).
    """
    check_engine(requested)
    if requested in ("auto", "implicit"):
        return "implicit" if implicit.supports(job) else "sparse"
    return requested


def reduce_layer(engine: str, job: LayerJob) -> LayerStats:
    """Reduce ``job`` with the engine named ``engine`` (one already picked by
    :func:`pick_engine`, not ``'auto'``); each engine checks the weights are finite."""
    engine_of = ENGINES.get(engine)
    if engine_of is None:
        raise _unknown_engine(engine)  # 'auto' included: it picks an engine, it is not one
    return engine_of(job)


def working_bytes(engine: str, conn: Connectivity, budget: int, backend: Backend) -> int:
    """Bytes the engine named ``engine`` holds for one layer under ``budget`` and
    ``backend`` (an estimate, for plans)."""
    if engine == "implicit":
        return implicit.working_bytes(conn, budget)
    if engine == "dense":
        return conn.n_rows * conn.n_cols * 8 * 3
    return sparse.working_bytes(conn, budget, backend)
