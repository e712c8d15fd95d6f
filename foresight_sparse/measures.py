"""Measures of a network's causal structure beyond the connectivity EI, behind one protocol.

A plan computes the connectivity EI of :mod:`foresight_sparse.ei` (the measure ``"ei"``)
with its own engines. Every other measure is a :class:`Measure` object: a plan hands it
each counted layer (a :class:`MeasureLayer`: the module bound to the weights being
evaluated, its connectivity, shapes and neighbours), the measure returns that layer's
values as a flat dict, and :meth:`Measure.network` combines the layers' values into the
network's. :meth:`Plan.report <foresight_sparse.plans.Plan.report>` turns both into a
:class:`~foresight_sparse.results.Report`, so tables, JSON, CSV, the tracker, sweeps and
plots serve every measure alike.

The built-in measures (:data:`foresight_sparse.settings.MEASURES`, which resolves a
``measure=`` name; this module knows none of them, so each imports it freely):

- ``"ei"``: the connectivity EI (the default; no object, the plan's engines compute it);
- ``"perturbation"``: :class:`foresight_sparse.perturbation.Perturbation`, the
  perturbation EI of Mattsson, Michaud and Hoel (Entropy 2020);
- ``"svd"``: :class:`foresight_sparse.svd.Reversibility`, the SVD-based dynamical
  reversibility and causal emergence of Zhang et al. (npj Complexity 2025).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .connectivity import Connectivity

__all__ = [
    "CORE",
    "RESERVED",
    "Measure",
    "MeasureLayer",
    "measure_name",
]

#: The keys every layer's and the network's values carry: they fill the
#: ``determinism``, ``degeneracy`` and ``ei`` slots of reports and history records
#: (None where the measure has no such quantity).
CORE = ("determinism", "degeneracy", "ei")

#: Names a measure's :attr:`~Measure.columns` may not take: the fields of a layer report
#: and of a history record, which share a row (and a CSV header) with them.
RESERVED = (
    "label",
    "kind",
    "layer",
    "type",
    "step",
    "epoch",
    "ei",
    "determinism",
    "degeneracy",
    "file",
    "error",
    "extra",
    "name",
    "in_shape",
    "out_shape",
    "n_in",
    "n_out",
    "nnz",
    "mean_row_entropy",
    "engine",
    "seconds",
    "backend",
)


@dataclass
class MeasureLayer:
    """One counted layer, as a :class:`Measure` reads it.

    Attributes
    ----------
    name : str
        Qualified name in the model (``"features.0"``).
    label : str
        How messages name the layer: ``"features.0 (Conv2d)"``.
    module : torch.nn.Module
        The layer with the weights being evaluated (a shallow copy of the model's module
        when a state dict is evaluated; never modify it).
    conn : Connectivity
        Its connectivity, made of those weights.
    in_shape, out_shape : tuple of int
        Traced input and output shapes (batch dimension first).
    before, after : torch.nn.Module or None
        The leaf modules that ran just before and just after the layer in the traced
        forward pass (an activation, a batch norm, ...); None where unknown or absent.
    norm : Norm
        The plan's row normalisation.
    device : torch.device
        Where the plan's reductions run.
    max_memory : int
        The plan's working-memory budget in bytes.

    What depends on the layer's geometry alone can be kept in ``conn.memo``, which every
    set of weights evaluated through the same plan shares.
    """

    name: str
    label: str
    module: nn.Module
    conn: Connectivity
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    before: nn.Module | None
    after: nn.Module | None
    norm: Any
    device: torch.device
    max_memory: int


class Measure:
    """The protocol of a measure other than the connectivity EI.

    A subclass sets :attr:`name` and :attr:`columns` and implements :meth:`layer` and
    :meth:`network`; it is a small, picklable settings object (plans travel to worker
    processes with it).
    """

    #: The measure's name (a key of :data:`~foresight_sparse.settings.MEASURES` for the
    #: built-in ones).
    name: ClassVar[str] = ""
    #: The measure's own quantities, beyond :data:`CORE`, in column order: the keys of
    #: every dict :meth:`layer` and :meth:`network` return (besides the core ones).
    columns: ClassVar[tuple[str, ...]] = ()

    def settings(self) -> dict[str, Any]:
        """The measure's settings as JSON-ready data (recorded with each report)."""
        raise NotImplementedError

    def check(self, layer: MeasureLayer) -> None:
        """Refuse, at plan time, a layer the measure cannot evaluate (a clear error naming
        the layer, the shapes and the fix). By default every layer is accepted."""

    def layer(self, layer: MeasureLayer) -> dict[str, Any]:
        """The layer's values: each key of :data:`CORE` and of :attr:`columns`."""
        raise NotImplementedError

    def network(self, layers: list[dict[str, Any]]) -> dict[str, Any]:
        """The network's values from the layers' (in forward order): the same keys."""
        raise NotImplementedError


def measure_name(measure: str | Measure | None) -> str:
    """The name of a ``measure=`` argument: ``'ei'`` for None."""
    if measure is None:
        return "ei"
    if isinstance(measure, Measure):
        return measure.name
    return str(measure)
