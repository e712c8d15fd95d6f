"""The engines' numeric forms, in one table: ``(engine, connectivity type, backend name) ->
function``.

Each engine computes a layer's numbers with the form its job's backend names: the numba
kernels (``'numba'``) or torch operations (``'torch'``). :data:`FORMS` lists them all;
:func:`form` finds a job's, for the job's connectivity type or its nearest base class in
the table. The forms of one algorithm share a signature:

- ``'sparse'``, any :class:`~foresight_sparse.connectivity.Connectivity`: the block
  reduction, ``(job, shift, blocks, counts) -> (sum of H, sum of c/Z, column sums)``
  (:mod:`.blocks`);
- ``'implicit'``, :class:`~foresight_sparse.connectivity.Stencil`: a convolution's passes
  on its position classes, ``(job, shift, step) -> (sum of H, sum of c/Z, class column
  sums, class sizes)`` (:mod:`.conv`);
- ``'implicit'``, :class:`~foresight_sparse.connectivity.FullyConnected`: a Linear layer's
  two passes, ``(job, shift, block) -> (Z, T, 1/Z, column sums)`` (:mod:`.linear`).

Fallback: a plan resolved to numba hands a layer the numba forms cannot take (a Linear
weight in float16 or bfloat16, which they cannot read as an array) to the torch forms, for
every engine. :func:`~foresight_sparse.engines.base.serving_backend` decides it once, when
the layer's :class:`~foresight_sparse.engines.LayerJob` is made: the job then carries the
torch backend, this table gives it the torch forms, and its :class:`LayerStats
<foresight_sparse.engines.LayerStats>` record ``backend='torch'``.

Not in the table: the numerics with one form, or below the engines. An average pool is
reduced by torch operations on output-sized maps whatever the backend (:mod:`.pool`); the
dense engine has no forms of its own. Block fills belong to the connectivity they fill:
each built-in class makes its rows in its backend's form
(:meth:`Connectivity.rows <foresight_sparse.connectivity.Connectivity.rows>`), and
:func:`foresight_sparse.entropy.column_terms` computes degeneracy's sufficient statistics
in its backend's form; both choose by the backend's name.
"""

from __future__ import annotations

from collections.abc import Callable

from ..connectivity import Connectivity, FullyConnected, Stencil
from .base import LayerJob
from .blocks import reduce_blocks_numba, reduce_blocks_torch
from .conv import conv_pass_numba, conv_pass_torch
from .linear import linear_passes_numba, linear_passes_torch

__all__ = ["FORMS", "form"]

#: ``(engine, connectivity type, backend name) -> function``: every engine's numeric forms.
FORMS: dict[tuple[str, type, str], Callable] = {
    ("sparse", Connectivity, "numba"): reduce_blocks_numba,
    ("sparse", Connectivity, "torch"): reduce_blocks_torch,
    ("implicit", Stencil, "numba"): conv_pass_numba,
    ("implicit", Stencil, "torch"): conv_pass_torch,
    ("implicit", FullyConnected, "numba"): linear_passes_numba,
    ("implicit", FullyConnected, "torch"): linear_passes_torch,
}


def form(engine: str, job: LayerJob) -> Callable:
    """The form of ``engine`` for ``job``: the entry of :data:`FORMS` for the job's
    backend and its connectivity's type, or the nearest base class that has one.

    The engines check they can serve a layer before they ask: a job the table has no form
    for is a bug (an ``AssertionError``).
    """
    name = job.backend.name
    for cls in type(job.conn).__mro__:
        found = FORMS.get((engine, cls, name))
        if found is not None:
            return found
    raise AssertionError(f"no {engine} form for {type(job.conn).__name__} on the {name} backend")
