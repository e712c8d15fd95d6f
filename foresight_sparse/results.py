"""What an analysis returns (:class:`Report`): network totals and one row per layer.

A report describes itself: besides the settings it was computed with, it records the library
and torch versions, when it was made, and free-form metadata (``meta``: the command line puts
the model, the input shape, the seed and the weights file there). :meth:`Report.save` writes
it as JSON, :meth:`Report.load` and :meth:`Report.from_dict` read it back, and
:meth:`Report.save_csv` writes one row per layer with the rest as leading ``# key: value``
lines.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from ._version import __version__
from .exceptions import ReportFileError

__all__ = ["LayerReport", "Report"]


def _library_version() -> str:
    return __version__


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _unsigned(x: float, digits: int) -> float:
    """``x`` rounded as it will print, without the sign of a zero: -0.0 and -1e-17 would
    print as ``-0.0000``; rounding, then adding 0.0, turns both into 0.0."""
    return round(x, digits) + 0.0


def _cell(value: Any, width: int, digits: int) -> str:
    """A table cell: floats to ``digits`` places (no signed zero), ints and words as they
    are, None as ``-``; right-aligned in ``width``."""
    if value is None:
        text = "-"
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        text = str(value)
    elif isinstance(value, int):
        text = str(value)
    else:
        text = f"{_unsigned(value, digits):.{digits}f}"
    return f"{text:>{width}}"


def _dims(shape) -> str:
    return "x".join(str(s) for s in shape)


@dataclass
class LayerReport:
    """One layer of a :class:`Report`.

    Attributes
    ----------
    name : str
        Qualified name in the model (``"features.0"``).
    type : str
        Module class name.
    in_shape : tuple of int
        Traced input shape.
    out_shape : tuple of int
        Traced output shape.
    n_in : int
        Input neurons (rows of the connectivity matrix).
    n_out : int
        Output neurons (columns).
    nnz : int
        Stored (structural) entries of the connectivity matrix.
    mean_row_entropy : float or None
        The layer's own determinism: mean entropy of its normalised rows, in bits. Under
        ``convention='graph'``, ``log2 N`` minus the mean entropy of its N non-empty rows
        (:mod:`foresight_sparse.conventions`); None for a measure without a determinism
        (:mod:`foresight_sparse.measures`).
    degeneracy : float or None
        Entropy of the layer's own normalised column sums, in bits (under
        ``convention='graph'``, ``log2 N`` minus it); another measure's degeneracy, or None.
    ei : float or None
        ``degeneracy - mean_row_entropy``: the EI of the layer alone (under
        ``convention='graph'``, ``mean_row_entropy - degeneracy``); another measure's EI,
        or None.
    engine : str
        The engine that served the layer (for a measure other than ``'ei'``, the
        measure's name).
    seconds : float
        Wall time spent on the layer.
    backend : str or None
        The backend that served the layer (``'numba'`` or ``'torch'``; see
        :mod:`foresight_sparse.backends`); None when read from a report that does not say,
        or computed by another measure.
    extra : dict
        The layer's values of :attr:`Report.columns`, the quantities of the measure or
        convention beyond the three above (``effectiveness``, ``sensitivity``,
        ``gamma_alpha``, ...); empty for the seed's connectivity EI.
    """

    name: str
    type: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    n_in: int
    n_out: int
    nnz: int
    mean_row_entropy: float | None
    degeneracy: float | None
    ei: float | None
    engine: str
    seconds: float
    backend: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """Determinism, degeneracy and EI of a network, with a per-layer breakdown.

    Attributes
    ----------
    determinism : float or None
        Mean entropy of every row of every layer, in bits (the graph convention's and other
        measures' values as for :class:`LayerReport`; None where a measure has none).
    degeneracy : float or None
        Entropy of the pooled, normalised column sums, in bits.
    ei : float or None
        ``degeneracy - determinism``, in bits.
    layers : list of LayerReport
        In forward order.
    skipped : list of (str, str)
        ``(name, type)`` of leaf modules the forward pass ran that have no builder (they do
        not count, as in the old module).
    norm : str
        Name of the norm used.
    engine : str
        The engine requested (each layer says which engine served it).
    backend : str
        The backend the plan resolved ``backend=`` to (``'numba'`` or ``'torch'``; each
        layer says which served it), or ``'auto'`` when read from a report that does not
        say.
    device : str
        Where the reductions ran.
    legacy : bool
        Whether the old module's cross-channel pooling was used.
    seconds : float
        Total wall time.
    max_memory : int or None
        The engines' working-memory budget in bytes, where the analysis records it.
    meta : dict
        Free-form, JSON-ready metadata about what was analysed (the command line records
        ``model``, ``input_shape``, ``seed``, ``weights`` and ``weights_key``).
    version : str or None
        The foresight-sparse version that computed the report (None when read from a file
        that does not say).
    torch_version : str or None
        The torch version it ran with.
    created : str or None
        When the report was made: an ISO-8601 time in UTC.
    measure : str
        What was computed: ``'ei'`` (the connectivity EI), ``'perturbation'``, ``'svd'``
        (:data:`foresight_sparse.settings.MEASURES`).
    convention : str
        How the connectivity EI is split: ``'seed'`` (the old module's) or ``'graph'``
        (einet's; see :mod:`foresight_sparse.conventions`).
    settings : dict
        The measure's settings (:meth:`Measure.settings
        <foresight_sparse.measures.Measure.settings>`); empty for ``'ei'``.
    extra : dict
        The network's values of :attr:`columns`.
    """

    determinism: float | None
    degeneracy: float | None
    ei: float | None
    layers: list[LayerReport]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    norm: str = "lin"
    engine: str = "auto"
    backend: str = "auto"
    device: str = "cpu"
    legacy: bool = False
    seconds: float = 0.0
    max_memory: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    version: str | None = field(default_factory=_library_version)
    torch_version: str | None = field(default_factory=_torch_version)
    created: str | None = field(default_factory=_now)
    measure: str = "ei"
    convention: str = "seed"
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> tuple[str, ...]:
        """The names of the quantities in :attr:`extra` and each layer's ``extra``, in
        order (network values first, then any a layer adds)."""
        names = dict.fromkeys(self.extra)
        for layer in self.layers:
            names.update(dict.fromkeys(layer.extra))
        return tuple(names)

    @property
    def nnz(self) -> int:
        """Stored entries over all layers."""
        return sum(layer.nnz for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready data: totals, settings, metadata, ``layers`` and ``skipped``.

        :meth:`from_dict` turns it back into an equal report.
        """
        d = asdict(self)
        for layer in d["layers"]:
            layer["in_shape"] = list(layer["in_shape"])
            layer["out_shape"] = list(layer["out_shape"])
        d["skipped"] = [{"name": n, "type": t} for n, t in self.skipped]
        d["nnz"] = self.nnz
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """The report that :meth:`to_dict` (or ``--json``) wrote.

        Parameters
        ----------
        data : dict
            As written by :meth:`to_dict`. Keys it does not know (such as the derived
            ``nnz``) are ignored; ``version``, ``torch_version`` and ``created`` are None when
            missing, since they cannot be known.

        Raises
        ------
        ReportFileError
            When a total, a setting of a layer or a layer field is missing or malformed.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        layer_names = [f.name for f in dataclasses.fields(LayerReport)]
        needed = [
            f.name for f in dataclasses.fields(LayerReport) if f.default is dataclasses.MISSING
        ]
        try:
            missing = [k for k in ("determinism", "degeneracy", "ei", "layers") if k not in data]
            if missing:
                raise ReportFileError(
                    f"a report needs {', '.join(missing)}; the data has "
                    f"only {', '.join(map(str, data)) or 'no keys'}"
                )
            layers = []
            for i, row in enumerate(data["layers"]):
                absent = [k for k in needed if k not in row]
                if absent:
                    raise ReportFileError(
                        f"layer {i} ({row.get('name', '?')!r}) lacks {', '.join(absent)}"
                    )
                values = {k: row[k] for k in layer_names if k in row}
                values["in_shape"] = tuple(values["in_shape"])
                values["out_shape"] = tuple(values["out_shape"])
                layers.append(LayerReport(**values))
            kwargs = {k: v for k, v in data.items() if k in names}
            kwargs["layers"] = layers
            kwargs["skipped"] = [
                (s["name"], s["type"]) if isinstance(s, dict) else tuple(s)
                for s in data.get("skipped", [])
            ]
            kwargs["meta"] = dict(data.get("meta") or {})
            for k in ("version", "torch_version", "created"):
                kwargs.setdefault(k, None)
            return cls(**kwargs)
        except (TypeError, KeyError, AttributeError) as exc:
            raise ReportFileError(
                f"not a report as Report.to_dict writes it: {type(exc).__name__}: {exc}"
            ) from None

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as JSON (what the command line's ``--json`` writes)."""
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Report:
        """Read a report written by :meth:`save` or ``--json``.

        Raises
        ------
        ReportFileError
            When the file is not JSON or not a report; the message names the file.
        """
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ReportFileError(f"{os.fspath(path)!r} is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ReportFileError(
                f"{os.fspath(path)!r} holds a JSON {type(data).__name__}, not a report"
            )
        try:
            return cls.from_dict(data)
        except ReportFileError as exc:
            raise ReportFileError(f"{os.fspath(path)!r}: ", *exc.parts, param=exc.param) from None

    def csv_header(self) -> dict[str, Any]:
        """What :meth:`save_csv` writes as leading ``# key: value`` lines, in order.

        The network totals, the settings, the versions and time, then the ``meta`` items.
        """
        head = {
            k: getattr(self, k)
            for k in (
                "determinism",
                "degeneracy",
                "ei",
                "measure",
                "convention",
                "norm",
                "engine",
                "backend",
                "device",
                "legacy",
                "max_memory",
                "seconds",
                "version",
                "torch_version",
                "created",
            )
        }
        head["nnz"] = self.nnz
        head.update(self.extra)
        if self.settings:
            head["settings"] = self.settings
        head.update(self.meta)
        return head

    def save_csv(self, path: str | os.PathLike) -> None:
        """Write one row per layer, the fields of :class:`LayerReport` as columns (its
        ``extra`` values as columns of their own, named by :attr:`columns`).

        Shapes are written as ``1x3x224x224``. The rest of the report (:meth:`csv_header`)
        comes first, one ``# key: value`` line each: strings as they are, other values as
        JSON. ``pandas.read_csv(path, comment="#")`` reads the rows.
        """
        names = [f.name for f in dataclasses.fields(LayerReport) if f.name != "extra"]
        names += list(self.columns)
        with open(path, "w", encoding="utf-8", newline="") as fh:
            for key, value in self.csv_header().items():
                text = value if isinstance(value, str) else json.dumps(value)
                fh.write(f"# {key}: {' '.join(str(text).split())}\n")
            writer = csv.DictWriter(fh, fieldnames=names)
            writer.writeheader()
            for layer in self.layers:
                row = asdict(layer)
                row.update(row.pop("extra"))
                row["in_shape"] = _dims(layer.in_shape)
                row["out_shape"] = _dims(layer.out_shape)
                writer.writerow(row)

    def table(self) -> str:
        """A fixed-width text table of the layers and the totals.

        The three core columns are the connectivity EI's (or what a measure puts in their
        place; a column a measure leaves empty is left out), then :attr:`columns`.
        """
        core = [
            (title, attr, net)
            for title, attr, net in (
                (
                    "H(row)" if self.convention == "seed" else "determ",
                    "mean_row_entropy",
                    "determinism",
                ),
                ("degen", "degeneracy", "degeneracy"),
                ("EI", "ei", "ei"),
            )
            if getattr(self, net) is not None
            or any(getattr(lay, attr) is not None for lay in self.layers)
        ]
        extra = list(self.columns)
        widths = [max(12, len(name)) for name in extra]
        ew = max([8, *(len(lay.engine) for lay in self.layers)])
        head = (
            f"{'layer':<24} {'type':<10} {'in':>10} {'out':>10} {'entries':>14} "
            + "".join(f"{title:>9} " for title, _, _ in core)
            + "".join(f"{name:>{w}} " for name, w in zip(extra, widths))
            + f"{'engine':>{ew}} {'s':>7}"
        )
        lines = [head, "-" * len(head)]
        for lay in self.layers:
            lines.append(
                f"{lay.name[:24]:<24} {lay.type[:10]:<10} {lay.n_in:>10} "
                f"{lay.n_out:>10} {lay.nnz:>14} "
                + "".join(f"{_cell(getattr(lay, attr), 9, 4)} " for _, attr, _ in core)
                + "".join(f"{_cell(lay.extra.get(name), w, 4)} " for name, w in zip(extra, widths))
                + f"{lay.engine:>{ew}} {lay.seconds:>7.3f}"
            )
        lines.append("-" * len(head))
        names = {"mean_row_entropy": "determinism", "degeneracy": "degeneracy", "ei": "EI"}
        totals = [f"{names[attr]} {_cell(getattr(self, net), 0, 6)}" for _, attr, net in core] + [
            f"{name} {_cell(self.extra[name], 0, 6)}" for name in extra if name in self.extra
        ]
        what = "" if self.measure == "ei" else f"{self.measure}: "
        if self.convention != "seed":
            what = f"{self.convention} convention: "
        unit = " bits" if self.measure == "ei" and not self.columns else ""
        lines.append(
            f"network: {what}{'  '.join(totals)}{unit}  ({self.nnz} entries, {self.seconds:.2f} s)"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
