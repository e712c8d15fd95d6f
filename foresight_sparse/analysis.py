"""The one-call analysis: :func:`report` plans the model and evaluates its current weights."""

from __future__ import annotations

from torch import nn

from .norms import lin_norm
from .plans import plan, resolve_device
from .results import Report

__all__ = ["report", "resolve_device"]


def report(
    model: nn.Module,
    input=None,
    shapes=None,
    norm=lin_norm,
    device="cpu",
    *,
    engine: str = "auto",
    backend: str = "auto",
    legacy: bool = False,
    max_memory=None,
    layers="seed",
    measure="ei",
    convention: str = "seed",
    skipped: str = "warn",
    progress: bool = False,
) -> Report:
    """Determinism, degeneracy and EI of ``model``, with a per-layer breakdown.

    ``plan(model, input, shapes, norm, device, ...).report()``: see :func:`~foresight_sparse.plan`
    for the parameters. To evaluate several sets of weights of one architecture, keep the
    plan and call :meth:`Plan.report <foresight_sparse.plans.Plan.report>` for each.

    Parameters
    ----------
    model, input, shapes, norm, device, engine, backend, legacy, max_memory
        As for :func:`~foresight_sparse.plan`, with the same defaults.
    layers, measure, convention, skipped
        As for :func:`~foresight_sparse.plan`, with the same defaults.
    progress : bool, default False
        Show a tqdm progress bar over the layers (on stderr).

    Returns
    -------
    Report
        Totals and one :class:`~foresight_sparse.results.LayerReport` per layer.
    """
    return plan(
        model,
        input,
        shapes,
        norm,
        device,
        engine=engine,
        legacy=legacy,
        max_memory=max_memory,
        layers=layers,
        backend=backend,
        measure=measure,
        convention=convention,
        skipped=skipped,
    ).report(progress=progress)
