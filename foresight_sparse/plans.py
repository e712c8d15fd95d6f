"""Plans: what depends on the architecture alone, worked out once; then EI of any weights.

:func:`plan` traces the model, builds every layer's connectivity (geometry, position
classes, tap tables), picks each layer's engine and estimates its working memory.
:meth:`Plan.report` then only reads weights: the model's current ones, or a state dict of
the same architecture, so EI across training or across checkpoints costs the weight passes
alone. :func:`foresight_sparse.report` and the drop-in functions are ``plan(...).report()``.
"""

from __future__ import annotations

import contextlib
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
from .budget import format_bytes
from .connectivity import Connectivity, connectivity
from .connectivity.base import SHARED_MEMO
from .conventions import GRAPH_COLUMNS, graph_values
from .engines import LayerJob, pick_engine, reduce_layer, working_bytes
from .entropy import column_terms, entropy_from_terms
from .exceptions import NonFiniteWeightsError, WeightsError
from .measures import Measure, MeasureLayer
from .norms import Norm, lin_norm
from .results import LayerReport, Report
from .settings import Settings, resolve_device
from .tracing import TracedLayer, resolve_layers, warn_skipped

__all__ = ["Plan", "PlannedLayer", "LayerResult", "Totals", "plan", "resolve_device"]

log = logging.getLogger("foresight_sparse")


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
    settings : Settings
        Every option the plan was made with, checked and resolved
        (:class:`~foresight_sparse.settings.Settings`); ``norm``, ``device``, ``engine``,
        ``legacy``, ``max_memory``, ``measure`` and ``convention`` read from it.
    backend : Backend
        The backend the reductions run with, resolved from ``settings.backend`` once
        (:func:`~foresight_sparse.backends.resolve_backend`).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[PlannedLayer],
        skipped: list[tuple[str, str]],
        settings: Settings,
    ):
        self.model = model
        self.layers = layers
        self.skipped = skipped
        self.settings = settings
        self.backend = resolve_backend(settings.backend, settings.device, settings.norm)

    @classmethod
    def build(cls, model: nn.Module, settings: Settings, input=None, shapes=None) -> Plan:
        """Plan ``model`` under ``settings`` (what :func:`plan` does once it has checked its
        options): trace it with ``input`` (or take ``shapes``), build each counted layer's
        connectivity, pick its engine and estimate its memory; then let a measure other
        than the connectivity EI refuse what it cannot do, before any work."""
        selection = settings.selection
        trace = resolve_layers(model, input, shapes, layers=selection)
        if settings.skipped == "warn":
            warn_skipped(trace, selection.refused)
        backend = resolve_backend(settings.backend, settings.device, settings.norm)
        shared: dict = {}  # what layers of equal geometry share (Connectivity.shared_memo)
        layers = [_plan_layer(t, settings, backend, shared) for t in trace.layers]
        result = cls(model, layers, trace.skipped, settings)
        if settings.measure is not None:
            for layer in layers:
                settings.measure.check(result._measure_layer(layer, None))
        return result

    @property
    def norm(self) -> Norm:
        """The row normalisation."""
        return self.settings.norm

    @property
    def device(self) -> torch.device:
        """Where the reductions run."""
        return self.settings.device

    @property
    def engine(self) -> str:
        """The engine requested (``'auto'``, ``'implicit'``, ``'sparse'`` or ``'dense'``)."""
        return self.settings.engine

    @property
    def legacy(self) -> bool:
        """Whether the old module's cross-channel AvgPool2d connectivity is used."""
        return self.settings.legacy

    @property
    def max_memory(self) -> int:
        """The working-memory budget in bytes."""
        return self.settings.max_memory

    @property
    def layer_set(self):
        """The ``layers=`` option (``'seed'``, ``'all'`` or a tuple of types)."""
        return self.settings.layers

    @property
    def measure(self) -> Measure | None:
        """What :meth:`report` computes: None for the connectivity EI, else a
        :class:`~foresight_sparse.measures.Measure`."""
        return self.settings.measure

    @property
    def convention(self) -> str:
        """How the connectivity EI is split (``'seed'`` or ``'graph'``;
        :mod:`foresight_sparse.conventions`)."""
        return self.settings.convention

    @property
    def measure_name(self) -> str:
        """``'ei'`` for the connectivity EI, else the measure's name."""
        return self.settings.measure_name

    @property
    def columns(self) -> tuple[str, ...]:
        """The quantities a report of this plan carries beyond determinism, degeneracy and
        EI (each :class:`LayerReport`'s ``extra`` keys, in order)."""
        if self.measure is not None:
            return tuple(self.measure.columns)
        return GRAPH_COLUMNS if self.convention == "graph" else ()

    # ------------------------------------------------------------------ evaluation

    def report(
        self, weights: Mapping[str, torch.Tensor] | None = None, *, progress: bool = False
    ) -> Report:
        """Determinism, degeneracy and EI, with a per-layer breakdown.

        Each layer is evaluated by :meth:`evaluate_layer` and added to the network's totals
        (:class:`Totals`) as it finishes.

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
                "weights must be a state dict {key: tensor} as model.state_dict() "
                f"returns, not {type(weights).__name__}",
                param="weights",
            )
        layers = self.layers
        if progress:
            from tqdm.auto import tqdm  # an optional display: loaded only when asked for

            layers = tqdm(layers, desc=self.measure_name, unit="layer")
        totals = Totals(self)
        with _torch_notices_silenced():
            for layer in layers:
                totals.add(self.evaluate_layer(layer, weights))
        return totals.report(time.perf_counter() - start)

    def evaluate_layer(
        self, layer: PlannedLayer, weights: Mapping[str, torch.Tensor] | None = None
    ) -> LayerResult:
        """One planned layer of this plan evaluated on ``weights`` (as for :meth:`report`):
        its report row and what the network's totals need of it."""
        t0 = time.perf_counter()
        if self.measure is not None:
            values = self.measure.layer(self._measure_layer(layer, weights))
            row = _row(
                layer,
                (values["determinism"], values["degeneracy"], values["ei"]),
                self.measure.name,
                None,
                {k: values[k] for k in self.measure.columns},
                time.perf_counter() - t0,
            )
            log.debug("%s: %s, %.3f s", layer.label, self.measure.name, row.seconds)
            return LayerResult(row, values=values)
        conn = self._bind(layer, weights)
        job = LayerJob(conn, self.norm, self.device, self.max_memory, self.backend)
        try:
            stats = reduce_layer(pick_engine(self.engine, job), job)
        except NonFiniteWeightsError as exc:
            if weights is None:
                raise
            raise NonFiniteWeightsError(
                *exc.parts, f" (state dict keys {', '.join(layer.keys)})", param=exc.param
            ) from None
        terms = tuple(
            column_terms(
                stats.col_sums, stats.col_offset, stats.col_weights, backend=job.backend
            ).tolist()
        )
        mean_h = stats.h_sum / stats.n_rows if stats.n_rows else 0.0
        deg = entropy_from_terms(terms)
        extra: dict = {}
        if self.convention == "graph":
            extra = graph_values(stats.h_sum, terms[0] + terms[2], deg)
            mean_h, deg = extra.pop("determinism"), extra.pop("degeneracy")
            extra.pop("ei")
            values3 = (mean_h, deg, mean_h - deg)
        else:
            values3 = (mean_h, deg, deg - mean_h)
        row = _row(layer, values3, stats.engine, stats.backend, extra, time.perf_counter() - t0)
        log.debug(
            "%s: %s engine, %s backend, %.3f s",
            layer.label,
            stats.engine,
            stats.backend,
            row.seconds,
        )
        return LayerResult(row, stats.h_sum, stats.n_rows, terms)

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
        return self.settings.layers_label

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (
            f"<Plan of {type(self.model).__name__}: {len(self.layers)} layers, "
            f"{self.nnz} entries, norm {self.norm.name}, engine {self.engine}>"
        )


@dataclass
class LayerResult:
    """One layer evaluated (:meth:`Plan.evaluate_layer`): its report row and what the
    network's totals need of it.

    Attributes
    ----------
    row : LayerReport
        The layer's line of the report.
    h_sum : float
        The sum of its rows' entropies (the connectivity EI; 0 for another measure).
    n_rows : int
        Its rows (input neurons) counted by determinism.
    terms : tuple of float
        Its column terms (:func:`~foresight_sparse.entropy.column_terms`), which add up
        across layers into the network's degeneracy.
    values : dict or None
        Another measure's values for the layer, which its
        :meth:`~foresight_sparse.measures.Measure.network` combines; None for the
        connectivity EI.
    """

    row: LayerReport
    h_sum: float = 0.0
    n_rows: int = 0
    terms: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
    values: dict | None = None


class Totals:
    """The network's totals, accumulated one :class:`LayerResult` at a time, and the
    :class:`Report` they make (what :meth:`Plan.report` returns).

    Parameters
    ----------
    plan : Plan
        The plan whose layers are added; its settings go into the report.
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        self.rows: list[LayerReport] = []
        self.h_sum = 0.0
        self.n_rows = 0
        self.terms = [0.0, 0.0, 0.0, 0.0]
        self.values: list[dict] = []

    def add(self, result: LayerResult) -> None:
        """Add one layer's result."""
        self.rows.append(result.row)
        if result.values is not None:
            self.values.append(result.values)
            return
        self.h_sum += result.h_sum
        self.n_rows += result.n_rows
        self.terms = [a + b for a, b in zip(self.terms, result.terms)]

    def report(self, seconds: float) -> Report:
        """The report of the layers added so far, which took ``seconds``."""
        plan, s = self.plan, self.plan.settings
        common = dict(
            norm=s.norm.name,
            engine=s.engine,
            backend=plan.backend.name,
            device=str(s.device),
            legacy=s.legacy,
            seconds=seconds,
            max_memory=s.max_memory,
            convention=s.convention,
        )
        skipped = list(plan.skipped)
        if s.measure is not None:
            net = s.measure.network(self.values)
            return Report(
                net["determinism"],
                net["degeneracy"],
                net["ei"],
                self.rows,
                skipped,
                measure=s.measure.name,
                settings=s.measure.settings(),
                extra={k: net[k] for k in s.measure.columns},
                **common,
            )
        determinism = self.h_sum / self.n_rows if self.n_rows else 0.0
        degeneracy = entropy_from_terms(self.terms)
        ei = degeneracy - determinism
        extra: dict = {}
        if s.convention == "graph":
            extra = graph_values(self.h_sum, self.terms[0] + self.terms[2], degeneracy)
            determinism, degeneracy, ei = (
                extra.pop(k) for k in ("determinism", "degeneracy", "ei")
            )
        return Report(determinism, degeneracy, ei, self.rows, skipped, extra=extra, **common)


def _row(layer: PlannedLayer, values, engine: str, backend, extra: dict, seconds: float):
    """A layer's report row: its planned shapes and sizes, ``values`` (determinism,
    degeneracy, EI) and what served it."""
    det, deg, ei = values
    return LayerReport(
        layer.name,
        layer.type,
        layer.in_shape,
        layer.out_shape,
        layer.n_rows,
        layer.n_cols,
        layer.nnz,
        det,
        deg,
        ei,
        engine,
        seconds,
        backend,
        extra,
    )


@contextlib.contextmanager
def _torch_notices_silenced():
    """Silence torch's "Sparse ... tensor support is in beta" notices (one filter for a
    whole report, cheaper than one per layer); every other warning, a user builder's
    included, reaches the caller."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"Sparse \w+ tensor support is in beta", category=UserWarning
        )
        yield


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
    skipped: str = "warn",
) -> Plan:
    """Plan the EI computation of ``model`` for one input shape.

    Traces the model once (on a meta-device copy where that works), builds each counted
    layer's connectivity geometry, picks its engine and estimates its working memory.
    Nothing here depends on the weights' values except the check that they are finite.

    The options are checked and resolved once into a
    :class:`~foresight_sparse.settings.Settings` that the plan carries; every other entry
    point (:func:`~foresight_sparse.report`, :func:`~foresight_sparse.sweep`, the tracker,
    the Lightning callback, the command line) takes the same options with the same
    defaults.

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
    skipped : {'warn', 'ignore'}, default 'warn'
        Whether one warning names the layers that ran but do not count (and the subclasses
        ``layers='all'`` refused); :attr:`Plan.skipped` lists them either way.

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
    settings = Settings.make(
        norm=norm,
        device=device,
        engine=engine,
        backend=backend,
        legacy=legacy,
        max_memory=max_memory,
        layers=layers,
        measure=measure,
        convention=convention,
        skipped=skipped,
    )
    return Plan.build(model, settings, input, shapes)


def _plan_layer(t: TracedLayer, settings: Settings, backend: Backend, shared: dict) -> PlannedLayer:
    conn = connectivity(
        t.module,
        t.in_shape,
        t.out_shape,
        legacy=settings.legacy,
        label=t.label,
        adapter=settings.selection.get(type(t.module)),
    )
    conn.memo[SHARED_MEMO] = shared
    job = LayerJob(conn, settings.norm, settings.device, settings.max_memory, backend)
    name = pick_engine(settings.engine, job)
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
        working_bytes(name, conn, settings.max_memory, job.backend),
        job.backend.name,
        keys,
        t.module,
        conn,
        t.before,
        t.after,
    )
