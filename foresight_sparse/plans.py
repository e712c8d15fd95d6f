"""Plans: what depends on the architecture alone, worked out once; then EI of any weights.

:func:`plan` traces the model, builds every layer's connectivity (geometry, position
classes, tap tables), picks each layer's engine and estimates its working memory.
:meth:`Plan.report` then only reads weights: the model's current ones, or a state dict of
the same architecture, so EI across training or across checkpoints costs the weight passes
alone. :func:`foresight_sparse.report` and the drop-in functions are ``plan(...).report()``.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .backends import Backend, resolve_backend
from .budget import format_bytes, resolve_budget
from .connectivity import Connectivity, LayerSelection, connectivity
from .connectivity.base import SHARED_MEMO
from .conventions import GRAPH_COLUMNS, check_convention, graph_values
from .engines import LayerJob, check_engine, pick_engine, reduce_layer, working_bytes
from .entropy import entropy_from_terms
from .exceptions import DeviceError, NonFiniteWeightsError, UnknownNameError, WeightsError
from .measures import Measure, MeasureLayer, get_measure
from .norms import Norm, get_norm, lin_norm
from .results import LayerReport, Report
from .tracing import TracedLayer, resolve_layers, warn_skipped

__all__ = ["Plan", "PlannedLayer", "plan", "resolve_device"]

log = logging.getLogger("foresight_sparse")


def resolve_device(device) -> torch.device:
    """Check and normalise a ``device`` argument.

    Raises
    ------
    DeviceError
        For a CUDA device when CUDA is not available.
    UnknownNameError
        For anything that is not a CPU or CUDA device.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UnknownNameError(f"device={device!r} is not a device; use 'cpu' or 'cuda'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device={device!r} asks for CUDA, but this torch has no CUDA "
            "device available; use device='cpu'"
        )
    if dev.type not in ("cpu", "cuda"):
        raise UnknownNameError(f"device={device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


@dataclass
class PlannedLayer:
    """One counted layer of a :class:`Plan`.

    Attributes
    ----------
    name : str
        Qualified name in the model (``"features.0"``).
    type : str
        Module class name.
    in_shape, out_shape : tuple of int
        Traced input and output shapes.
    n_rows, n_cols : int
        Input and output neurons (rows and columns of the connectivity matrix).
    nnz : int
        Stored (structural) entries of the connectivity matrix.
    engine : str
        The engine planned for the layer. A softmax layer whose weights span more than
        :data:`~foresight_sparse.engines.implicit.SOFTMAX_SPAN` nats is served by the
        sparse engine instead; each :class:`LayerReport` says which engine served it.
    working_bytes : int
        Estimated working memory of that engine for the layer.
    backend : str
        The backend planned for the layer (``'numba'`` or ``'torch'``; see
        :mod:`foresight_sparse.backends`); each :class:`LayerReport` says which served it.
    keys : tuple of str
        The state-dict keys the layer's connectivity is made of (``("features.0.weight",)``;
        empty for pools).
    """

    name: str
    type: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    n_rows: int
    n_cols: int
    nnz: int
    engine: str
    working_bytes: int
    backend: str
    keys: tuple[str, ...]
    module: nn.Module = field(repr=False, compare=False)
    conn: Connectivity = field(repr=False, compare=False)
    #: The leaf modules that ran just before and just after the layer
    #: (:class:`~foresight_sparse.tracing.TracedLayer`); None where unknown.
    before: nn.Module | None = field(default=None, repr=False, compare=False)
    after: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def label(self) -> str:
        """How messages name the layer: ``"features.0 (Conv2d)"``."""
        return f"{self.name} ({self.type})" if self.name else self.type


class Plan:
    """A network's EI computation, planned once for its architecture and input shape.

    Build it with :func:`plan`. :meth:`report` computes determinism, degeneracy and EI of the
    model's current weights, or of a state dict for the same architecture, touching only
    the weights. A plan pickles (model included), so it can be sent once to worker
    processes.

    Attributes
    ----------
    model : torch.nn.Module
        The planned model (never modified).
    layers : list of PlannedLayer
        The counted layers in forward order.
    skipped : list of (str, str)
        ``(name, type)`` of leaf modules that ran but do not count.
    norm : Norm
        The row normalisation.
    device : torch.device
        Where the reductions run.
    engine : str
        The engine requested.
    backend : Backend
        The backend the reductions run with, resolved from ``backend=`` once
        (:func:`~foresight_sparse.backends.resolve_backend`).
    legacy : bool
        Whether the old module's cross-channel AvgPool2d connectivity is used.
    max_memory : int
        The working-memory budget in bytes.
    layer_set : str or tuple of type
        The ``layers=`` option the plan was made with (``'seed'``, ``'all'`` or types).
    measure : Measure or None
        What :meth:`report` computes: None for the connectivity EI, else a
        :class:`~foresight_sparse.measures.Measure` object.
    convention : str
        How the connectivity EI is split (``'seed'`` or ``'graph'``;
        :mod:`foresight_sparse.conventions`).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[PlannedLayer],
        skipped: list[tuple[str, str]],
        norm: Norm,
        device: torch.device,
        engine: str,
        legacy: bool,
        max_memory: int,
        layer_set="seed",
        backend: Backend | str = "auto",
        measure: Measure | None = None,
        convention: str = "seed",
    ):
        self.model = model
        self.layers = layers
        self.skipped = skipped
        self.norm = norm
        self.device = device
        self.engine = engine
        self.legacy = legacy
        self.max_memory = max_memory
        self.layer_set = layer_set
        self.backend = resolve_backend(backend, device, norm)
        self.measure = measure
        self.convention = convention

    @property
    def measure_name(self) -> str:
        """``'ei'`` for the connectivity EI, else the measure's name."""
        return "ei" if self.measure is None else self.measure.name

    @property
    def columns(self) -> tuple[str, ...]:
        """The quantities a report of this plan carries beyond determinism, degeneracy and
        EI (each :class:`LayerReport`'s ``extra`` keys, in order)."""
        if self.measure is not None:
            return tuple(self.measure.columns)
        return GRAPH_COLUMNS if self.convention == "graph" else ()

    def settings(self) -> dict:
        """The settings a report of this plan was computed with, JSON-ready: what a
        history records once and a resumed sweep must match."""
        out = {
            "measure": self.measure_name,
            "convention": self.convention,
            "norm": self.norm.name,
            "legacy": self.legacy,
            "layers": self._layers_label,
            "max_memory": self.max_memory,
        }
        if self.measure is not None:
            out["settings"] = self.measure.settings()
        return out

    # ------------------------------------------------------------------ evaluation

    def report(
        self, weights: Mapping[str, torch.Tensor] | None = None, *, progress: bool = False
    ) -> Report:
        """Determinism, degeneracy and EI, with a per-layer breakdown.

        Parameters
        ----------
        weights : dict of str to torch.Tensor, optional
            A state dict of the planned architecture (CPU or CUDA tensors), as
            ``model.state_dict()`` returns; keys of layers that do not count are ignored.
            By default, the model's current weights. The model is never modified.
        progress : bool, default False
            Show a tqdm progress bar over the layers (on stderr).

        Raises
        ------
        WeightsError
            When ``weights`` lacks a key a counted layer needs, or holds a tensor of
            another shape or a non-tensor there.
        NonFiniteWeightsError
            When a counted layer's weights hold NaN or Inf.
        """
        start = time.perf_counter()
        if weights is not None and not isinstance(weights, Mapping):
            raise WeightsError(
                f"weights must be a state dict {{key: tensor}} as "
                f"model.state_dict() returns, not {type(weights).__name__}"
            )
        layers = self.layers
        if progress:
            from tqdm.auto import tqdm

            layers = tqdm(layers, desc=self.measure_name, unit="layer")
        if self.measure is not None:
            return self._measure_report(layers, weights, start)
        graph = self.convention == "graph"
        h_total = 0.0
        n_total = 0
        terms = [0.0, 0.0, 0.0, 0.0]
        rows: list[LayerReport] = []
        # torch's "beta" notices (sparse layouts) would repeat for every layer; one filter
        # for the whole loop, which costs less than one per layer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for layer in layers:
                t0 = time.perf_counter()
                conn = self._bind(layer, weights)
                job = LayerJob(conn, self.norm, self.device, self.max_memory, self.backend)
                try:
                    name = pick_engine(self.engine, job)
                    stats = reduce_layer(name, job)
                except NonFiniteWeightsError as exc:
                    if weights is None:
                        raise
                    raise NonFiniteWeightsError(
                        f"{exc} (state dict keys {', '.join(layer.keys)})"
                    ) from None
                layer_terms = job.backend.column_terms(
                    stats.col_sums, stats.col_offset, stats.col_weights
                ).tolist()
                h_total += stats.h_sum
                n_total += stats.n_rows
                terms = [a + b for a, b in zip(terms, layer_terms)]
                mean_h = stats.h_sum / stats.n_rows if stats.n_rows else 0.0
                deg = entropy_from_terms(layer_terms)
                extra = {}
                if graph:
                    g = graph_values(stats.h_sum, layer_terms[0] + layer_terms[2], deg)
                    mean_h, deg = g.pop("determinism"), g.pop("degeneracy")
                    g.pop("ei")
                    extra = g
                seconds = time.perf_counter() - t0
                rows.append(
                    LayerReport(
                        layer.name,
                        layer.type,
                        layer.in_shape,
                        layer.out_shape,
                        layer.n_rows,
                        layer.n_cols,
                        layer.nnz,
                        mean_h,
                        deg,
                        mean_h - deg if graph else deg - mean_h,
                        stats.engine,
                        seconds,
                        stats.backend,
                        extra,
                    )
                )
                log.debug(
                    "%s: %s engine, %s backend, %.3f s",
                    layer.label,
                    stats.engine,
                    stats.backend,
                    seconds,
                )
                del stats  # free the column sums before the next layer allocates its own
        determinism = h_total / n_total if n_total else 0.0
        degeneracy = entropy_from_terms(terms)
        ei = degeneracy - determinism
        extra = {}
        if graph:
            extra = graph_values(h_total, terms[0] + terms[2], degeneracy)
            determinism, degeneracy, ei = (
                extra.pop(k) for k in ("determinism", "degeneracy", "ei")
            )
        return Report(
            determinism,
            degeneracy,
            ei,
            rows,
            list(self.skipped),
            norm=self.norm.name,
            engine=self.engine,
            backend=self.backend.name,
            device=str(self.device),
            legacy=self.legacy,
            seconds=time.perf_counter() - start,
            max_memory=self.max_memory,
            convention=self.convention,
            extra=extra,
        )

    def _measure_report(self, layers, weights, start: float) -> Report:
        """:meth:`report` for a measure other than the connectivity EI: the measure
        evaluates each layer, bound to the weights, and combines them."""
        measure = self.measure
        values: list[dict] = []
        rows: list[LayerReport] = []
        for layer in layers:
            t0 = time.perf_counter()
            vals = measure.layer(self._measure_layer(layer, weights))
            values.append(vals)
            rows.append(
                LayerReport(
                    layer.name,
                    layer.type,
                    layer.in_shape,
                    layer.out_shape,
                    layer.n_rows,
                    layer.n_cols,
                    layer.nnz,
                    vals["determinism"],
                    vals["degeneracy"],
                    vals["ei"],
                    measure.name,
                    time.perf_counter() - t0,
                    None,
                    {k: vals[k] for k in measure.columns},
                )
            )
            log.debug("%s: %s, %.3f s", layer.label, measure.name, rows[-1].seconds)
        net = measure.network(values)
        return Report(
            net["determinism"],
            net["degeneracy"],
            net["ei"],
            rows,
            list(self.skipped),
            norm=self.norm.name,
            engine=self.engine,
            backend=self.backend.name,
            device=str(self.device),
            legacy=self.legacy,
            seconds=time.perf_counter() - start,
            max_memory=self.max_memory,
            measure=measure.name,
            convention=self.convention,
            settings=measure.settings(),
            extra={k: net[k] for k in measure.columns},
        )

    def _measure_layer(self, layer: PlannedLayer, weights) -> MeasureLayer:
        """What a measure reads of ``layer``: its module and connectivity made of the
        given (or the model's current) weights, with its shapes and neighbours."""
        module = layer.module
        if weights is not None:
            names = _own_tensor_names(module)
            if names:
                module = _module_with(module, self._tensors(layer, names, weights))
        return MeasureLayer(
            layer.name,
            layer.label,
            module,
            self._bind(layer, weights),
            layer.in_shape,
            layer.out_shape,
            layer.before,
            layer.after,
            self.norm,
            self.device,
            self.max_memory,
        )

    def _bind(self, layer: PlannedLayer, weights) -> Connectivity:
        """The layer's connectivity made of the given (or the model's current) weights."""
        conn = layer.conn
        if conn.weight_names is None:  # a user builder: rebuild it from the tensors
            module = (
                layer.module
                if weights is None
                else _module_with(
                    layer.module, self._tensors(layer, _own_tensor_names(layer.module), weights)
                )
            )
            conn = connectivity(
                module, layer.in_shape, layer.out_shape, legacy=self.legacy, label=layer.label
            )
        elif conn.weight_names:
            conn = conn.bind(self._tensors(layer, conn.weight_names, weights))
        return conn

    @staticmethod
    def _tensors(layer: PlannedLayer, names, weights) -> dict[str, torch.Tensor]:
        if weights is None:
            return {n: getattr(layer.module, n) for n in names}
        out = {}
        for n in names:
            key = f"{layer.name}.{n}" if layer.name else n
            own = getattr(layer.module, n)
            if key not in weights:
                raise WeightsError(
                    f"{layer.label}: the weights have no key {key!r} (a tensor of shape "
                    f"{tuple(own.shape)}). Pass a state dict of this architecture, as "
                    "model.state_dict() returns"
                )
            t = weights[key]
            if not isinstance(t, torch.Tensor):
                raise WeightsError(
                    f"{layer.label}: weights[{key!r}] is a {type(t).__name__}, not a tensor"
                )
            if t.shape != own.shape:
                raise WeightsError(
                    f"{layer.label}: weights[{key!r}] has shape {tuple(t.shape)}, but the "
                    f"planned layer's is {tuple(own.shape)}. Were the weights saved from "
                    "another architecture?"
                )
            out[n] = t.detach()
        return out

    # ------------------------------------------------------------------ description

    @property
    def nnz(self) -> int:
        """Stored entries over all layers."""
        return sum(layer.nnz for layer in self.layers)

    def table(self) -> str:
        """A fixed-width table of the planned layers (shapes, matrix sizes, engines and
        working memory), the skipped leaf modules by type, and the settings."""
        head = (
            f"{'layer':<24} {'type':<12} {'in':>16} {'out':>16} {'rows':>10} "
            f"{'cols':>10} {'entries':>14} {'engine':>8} {'memory':>11}"
        )
        lines = [head, "-" * len(head)]
        for lay in self.layers:
            lines.append(
                f"{lay.name[:24]:<24} {lay.type[:12]:<12} {_dims(lay.in_shape):>16} "
                f"{_dims(lay.out_shape):>16} {lay.n_rows:>10} {lay.n_cols:>10} "
                f"{lay.nnz:>14} {lay.engine:>8} "
                f"{format_bytes(lay.working_bytes):>11}"
            )
        lines.append("-" * len(head))
        if self.skipped:
            counts = Counter(t for _, t in self.skipped)
            lines.append(
                "skipped (no connectivity builder): "
                + ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
            )
        lines.append(
            f"{len(self.layers)} layers, {self.nnz} entries; "
            f"{'' if self.measure is None else 'measure ' + self.measure.name + ', '}"
            f"{'' if self.convention == 'seed' else 'convention ' + self.convention + ', '}"
            f"norm {self.norm.name}, "
            f"engine {self.engine}, device {self.device}"
            f"{', legacy' if self.legacy else ''}"
            f"{'' if self.layer_set == 'seed' else ', layers ' + self._layers_label}"
            f", max_memory "
            f"{format_bytes(self.max_memory)}"
        )
        return "\n".join(lines)

    @property
    def _layers_label(self) -> str:
        return LayerSelection(self.layer_set).label

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (
            f"<Plan of {type(self.model).__name__}: {len(self.layers)} layers, "
            f"{self.nnz} entries, norm {self.norm.name}, engine {self.engine}>"
        )


def _dims(shape) -> str:
    return "x".join(str(s) for s in shape)


def _own_tensor_names(module: nn.Module) -> tuple[str, ...]:
    return tuple(
        n for n, t in (*module._parameters.items(), *module._buffers.items()) if t is not None
    )


def _module_with(module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A shallow copy of ``module`` whose own parameters and buffers are ``tensors``."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    for n, t in tensors.items():
        (clone._parameters if n in clone._parameters else clone._buffers)[n] = t
    return clone


def plan(
    model: nn.Module,
    input=None,
    shapes=None,
    norm=lin_norm,
    device="cpu",
    *,
    engine: str = "auto",
    legacy: bool = False,
    max_memory=None,
    layers="seed",
    backend: str = "auto",
    measure: str | Measure | None = "ei",
    convention: str = "seed",
) -> Plan:
    """Plan the EI computation of ``model`` for one input shape.

    Traces the model once (on a meta-device copy where that works), builds each counted
    layer's connectivity geometry, picks its engine and estimates its working memory.
    Nothing here depends on the weights' values except the check that they are finite.

    Parameters
    ----------
    model : torch.nn.Module
        A feed-forward network. Its Linear, Conv2d and AvgPool2d layers (and any type
        registered with :func:`foresight_sparse.register`) count, or those ``layers``
        selects; others are skipped.
    input : torch.Tensor, tuple or dict, optional
        An example input, used for one forward pass to find the layers' shapes. A tensor
        is moved to the model's device and cast to its floating dtype first, integer and
        boolean tensors included (unless the model has an ``nn.Embedding``); a tuple is
        unpacked into positional and a dict into keyword arguments.
    shapes : dict, optional
        ``{module: (in_shape, out_shape)}`` from :func:`foresight_sparse.ei.get_shapes`;
        when given, ``input`` is not used.
    norm : Norm, str, callable or None, default lin_norm
        Row normalisation: ``lin_norm``, ``soft_norm``, ``sig_norm`` (or ``'lin'``,
        ``'soft'``, ``'sig'``), ``None`` for raw weights, or any row-wise callable.
    device : str or torch.device, default 'cpu'
        Where the reductions run. The weights may live elsewhere; they are read there.
    engine : {'auto', 'implicit', 'sparse', 'dense'}, default 'auto'
        ``'auto'`` uses the implicit engine wherever it is exact, the sparse one elsewhere.
    legacy : bool, default False
        Use the old module's cross-channel AvgPool2d connectivity.
    max_memory : int or str, optional
        Working-memory budget of the engines (default 2 GiB).
    layers : {'seed', 'all'} or sequence of module types, default 'seed'
        Which layers count. ``'seed'``: the old module's Linear, Conv2d and AvgPool2d, by
        exact type. ``'all'``: every built-in layer type (1-d, 2-d and 3-d convolutions,
        transposed convolutions, average and adaptive average pools) and their subclasses
        that inherit the forward pass; a subclass with its own ``forward`` is skipped with
        a warning (register a builder for it). Or a sequence of module types. Types
        registered with :func:`foresight_sparse.register` always count.
    backend : {'auto', 'numba', 'torch'}, default 'auto'
        The numeric forms every engine uses (:mod:`foresight_sparse.backends`), chosen
        here once. ``'auto'``: the numba kernels on a CPU device for the built-in norms,
        torch otherwise (CUDA, custom norms). ``'torch'``: torch operations on any device
        (what CUDA runs, also on CPU tensors). ``'numba'``: the numba kernels, CPU and
        built-in norms only. Under ``'auto'`` and ``'numba'`` a Linear layer with float16 or
        bfloat16 weights takes the torch forms; each layer's report names its backend.
    measure : {'ei', 'perturbation', 'svd'} or Measure, default 'ei'
        What :meth:`Plan.report` computes (:mod:`foresight_sparse.measures`): the
        connectivity EI, the perturbation EI of the Entropy 2020 paper
        (:class:`~foresight_sparse.perturbation.Perturbation`), or the SVD reversibility
        and causal emergence (:class:`~foresight_sparse.svd.Reversibility`). A name takes
        the measure's default settings; pass an object to set them.
    convention : {'seed', 'graph'}, default 'seed'
        How the connectivity EI is split into determinism and degeneracy: the old
        module's, or einet's graph convention with effectiveness
        (:mod:`foresight_sparse.conventions`). Only for ``measure='ei'``.

    Returns
    -------
    Plan

    Raises
    ------
    DeviceError
        For ``backend='numba'`` on a CUDA device.
    UnsupportedEngineError
        For ``backend='numba'`` with a custom norm (the kernels know only the built-in ones),
        and for ``convention='graph'`` with a norm that does not normalise rows.
    UnknownNameError
        For an unknown ``measure`` or ``convention``, or a convention other than
        ``'seed'`` with another measure than ``'ei'``.
    """
    norm_obj = get_norm(norm)
    measure_obj = get_measure(measure)
    check_convention(convention, norm_obj)
    if measure_obj is not None and convention != "seed":
        raise UnknownNameError(
            f"convention={convention!r} splits the connectivity EI; measure="
            f"{measure_obj.name!r} has its own quantities. Use convention='seed' with it"
        )
    dev = resolve_device(device)
    budget = resolve_budget(max_memory, dev)
    check_engine(engine)
    backend_obj = resolve_backend(backend, dev, norm_obj)
    selection = LayerSelection(layers)
    trace = resolve_layers(model, input, shapes, layers=selection)
    warn_skipped(trace, selection.refused)
    shared: dict = {}  # what layers of equal geometry share (Connectivity.shared_memo)
    result = Plan(
        model,
        [
            _plan_layer(t, norm_obj, dev, engine, legacy, budget, selection, backend_obj, shared)
            for t in trace.layers
        ],
        trace.skipped,
        norm_obj,
        dev,
        engine,
        legacy,
        budget,
        selection.layers,
        backend_obj,
        measure_obj,
        convention,
    )
    if measure_obj is not None:
        for layer in result.layers:  # refuse what the measure cannot do before any work
            measure_obj.check(result._measure_layer(layer, None))
    return result


def _plan_layer(
    t: TracedLayer,
    norm: Norm,
    dev: torch.device,
    engine: str,
    legacy: bool,
    budget: int,
    selection: LayerSelection,
    backend: Backend,
    shared: dict,
) -> PlannedLayer:
    conn = connectivity(
        t.module,
        t.in_shape,
        t.out_shape,
        legacy=legacy,
        label=t.label,
        adapter=selection.get(type(t.module)),
    )
    conn.memo[SHARED_MEMO] = shared
    job = LayerJob(conn, norm, dev, budget, backend)
    name = pick_engine(engine, job)
    names = conn.weight_names if conn.weight_names is not None else _own_tensor_names(t.module)
    keys = tuple(f"{t.name}.{n}" if t.name else n for n in names)
    return PlannedLayer(
        t.name,
        type(t.module).__name__,
        t.in_shape,
        t.out_shape,
        conn.n_rows,
        conn.n_cols,
        conn.nnz,
        name,
        working_bytes(name, conn, budget, job.backend),
        job.backend.name,
        keys,
        t.module,
        conn,
        t.before,
        t.after,
    )
