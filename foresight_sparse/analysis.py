"""The one pass that computes determinism, degeneracy and EI, layer by layer."""

from __future__ import annotations

import logging
import time
import warnings

import torch
from torch import nn

from .budget import resolve_budget
from .connectivity import connectivity
from .engines import ENGINE_NAMES, ENGINES, LayerJob, pick_engine
from .entropy import column_terms, entropy_from_terms
from .exceptions import UnknownNameError
from .norms import get_norm, lin_norm
from .results import LayerReport, Report
from .tracing import resolve_layers, warn_skipped

__all__ = ["report", "resolve_device"]

log = logging.getLogger("foresight_sparse")


def resolve_device(device) -> torch.device:
    """Check and normalise a ``device`` argument.

    Raises
    ------
    ValueError
        For a CUDA device when CUDA is not available, or an unknown device string.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UnknownNameError(f"device={device!r} is not a device; use 'cpu' or 'cuda'") \
            from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnknownNameError(f"device={device!r} asks for CUDA, but this torch has no CUDA "
                               "device available; use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise UnknownNameError(f"device={device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


def report(model: nn.Module, input=None, shapes=None, norm=lin_norm, device="cpu", *,
           engine: str = "auto", legacy: bool = False, max_memory=None,
           progress: bool = False) -> Report:
    """Determinism, degeneracy and EI of ``model``, with a per-layer breakdown.

    Parameters
    ----------
    model : torch.nn.Module
        A feed-forward network. Its Linear, Conv2d and AvgPool2d layers (and any type
        registered with :func:`foresight_sparse.register`) count; others are skipped.
    input : torch.Tensor, tuple or dict, optional
        An example input, used for one forward pass to find the layers' shapes. A tensor
        is moved to the model's device and cast to its floating dtype first, integer and
        boolean tensors included (unless the model has an ``nn.Embedding``); a tuple is
        unpacked into positional and a dict into keyword arguments.
    shapes : dict, optional
        ``{module: (in_shape, out_shape)}`` from :func:`foresight_sparse.ei.get_shapes`;
        when given, ``input`` is not used. Every shape must be a sequence of non-negative
        ints, and every module part of ``model``.
    norm : Norm, str, callable or None, default lin_norm
        Row normalisation: ``lin_norm``, ``soft_norm``, ``sig_norm`` (or ``'lin'``,
        ``'soft'``, ``'sig'``), ``None`` for raw weights, or any row-wise callable.
    device : str or torch.device, default 'cpu'
        Where the reductions run. The model may live elsewhere; its weights are copied.
    engine : {'auto', 'implicit', 'sparse', 'dense'}, default 'auto'
        ``'auto'`` uses the implicit engine wherever it is exact, the sparse one elsewhere.
    legacy : bool, default False
        Use the old module's cross-channel AvgPool2d connectivity.
    max_memory : int or str, optional
        Working-memory budget of the engines (default 2 GiB); rows are streamed in blocks
        that fit, and a layer that cannot fit even one row is refused.
    progress : bool, default False
        Show a tqdm progress bar over the layers (on stderr).

    Returns
    -------
    Report
        Totals and one :class:`~foresight_sparse.report.LayerReport` per layer.
    """
    start = time.perf_counter()
    norm_obj = get_norm(norm)
    dev = resolve_device(device)
    budget = resolve_budget(max_memory, dev)
    if engine not in ENGINE_NAMES:
        raise UnknownNameError(f"unknown engine {engine!r}; valid engines are "
                               f"{', '.join(ENGINE_NAMES)}")
    trace = resolve_layers(model, input, shapes)
    warn_skipped(trace)

    layers_iter = trace.layers
    if progress:
        from tqdm.auto import tqdm

        layers_iter = tqdm(trace.layers, desc="EI", unit="layer")

    h_total = 0.0
    n_total = 0
    terms = torch.zeros(4, dtype=torch.float64)
    rows: list[LayerReport] = []
    for layer in layers_iter:
        t0 = time.perf_counter()
        conn = connectivity(layer.module, layer.in_shape, layer.out_shape, legacy=legacy,
                            label=layer.label)
        conn.check_finite()
        job = LayerJob(layer, conn, norm_obj, dev, budget, legacy)
        name = pick_engine(engine, job)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's "beta" notices on sparse ops
            stats = ENGINES[name](job)
        layer_terms = column_terms(stats.col_sums, stats.col_offset, stats.col_weights)
        h_total += stats.h_sum
        n_total += stats.n_rows
        terms += layer_terms
        mean_h = stats.h_sum / stats.n_rows if stats.n_rows else 0.0
        deg = entropy_from_terms(layer_terms)
        seconds = time.perf_counter() - t0
        rows.append(LayerReport(layer.name, type(layer.module).__name__, layer.in_shape,
                                layer.out_shape, conn.n_rows, conn.n_cols, conn.nnz, mean_h,
                                deg, deg - mean_h, stats.engine, seconds))
        log.debug("%s: %s engine, %.3f s", layer.label, stats.engine, seconds)
        del stats  # free the column sums before the next layer allocates its own

    determinism = h_total / n_total if n_total else 0.0
    degeneracy = entropy_from_terms(terms)
    return Report(determinism, degeneracy, degeneracy - determinism, rows, trace.skipped,
                  norm=norm_obj.name, engine=engine, device=str(dev), legacy=legacy,
                  seconds=time.perf_counter() - start)
