"""EI over time: the records a :class:`~foresight_sparse.tracking.Tracker` or a
:func:`~foresight_sparse.sweeps.sweep` collects, with exports and plots.

A :class:`History` is a flat list of :class:`Record` objects. Each evaluated set of weights
(a training step, a checkpoint) gives one ``kind="network"`` record with the network totals,
named :data:`NETWORK` (``"<network>"``) in the ``layer`` column, followed by one
``kind="layer"`` record per counted layer in forward order. A checkpoint that could not be
evaluated gives one ``kind="error"`` record naming the file and the reason instead.

Files:

- :meth:`History.to_csv` writes one record a row (``pandas.read_csv(path, comment="#")``
  reads it); settings such as the norm come first as ``# key: value`` lines. Floats are
  written with :func:`repr`, so :meth:`History.from_csv` reads back the very same numbers.
- :meth:`History.to_json` writes ``{"meta": {...}, "records": [...]}``.
- :class:`CSVAppender` is the one writer of the CSV format: it appends the records of each
  result as it arrives, so an interrupted sweep loses nothing (:meth:`History.to_csv` uses
  it too).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .exceptions import HistoryFileError, OptionError, UnknownLayerError, UnknownNameError
from .plotting import plot_history
from .results import Report

__all__ = ["NETWORK", "KINDS", "FIELDS", "Record", "History", "CSVAppender", "records_from_report"]

#: The ``layer`` value of the records that hold network totals.
NETWORK = "<network>"

#: The values of :attr:`Record.kind`.
KINDS = ("network", "layer", "error")


@dataclass(frozen=True)
class Record:
    """One row of a :class:`History` (its fields are the constructor's parameters).

    Parameters
    ----------
    label : str
        What was evaluated: ``"step=100"`` for a tracker, the checkpoint's name for a sweep.
    kind : {'network', 'layer', 'error'}
        Network totals, one layer, or a checkpoint that could not be evaluated.
    layer : str
        The layer's qualified name; :data:`NETWORK` for network totals, ``""`` for errors.
    type : str
        The layer's module class name; ``""`` for network and error records.
    step, epoch : int or None
        The training step and epoch, where known.
    ei : float or None
        EI in bits (``degeneracy - determinism``); None for errors.
    determinism : float or None
        Mean row entropy in bits: the network's determinism, or the layer's own
        (:attr:`LayerReport.mean_row_entropy <foresight_sparse.results.LayerReport>`).
    degeneracy : float or None
        Entropy of the pooled (network) or the layer's own normalised column sums, in bits.
    file : str or None
        The checkpoint file (sweeps); None for a tracker.
    error : str or None
        Why the checkpoint could not be evaluated (error records only).
    extra : dict
        The measure's or convention's further values (``effectiveness``, ``sensitivity``,
        ``gamma_alpha``, ...: :attr:`Report.columns
        <foresight_sparse.results.Report.columns>`) that are not None; empty for the seed's
        connectivity EI and for errors. In a CSV file each is a column of its own, after
        the fixed ones.
    """

    label: str
    kind: str
    layer: str = ""
    type: str = ""
    step: int | None = None
    epoch: int | None = None
    ei: float | None = None
    determinism: float | None = None
    degeneracy: float | None = None
    file: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UnknownNameError(
                f"Record kind={self.kind!r} is not one of {', '.join(KINDS)}", param="kind"
            )

    def to_dict(self) -> dict[str, Any]:
        """The record as a plain dict, the fields in order."""
        return asdict(self)


#: The fixed CSV columns, in order: the fields of :class:`Record` but ``extra``, whose
#: values follow as columns of their own.
FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Record) if f.name != "extra")
_INTS = ("step", "epoch")
_FLOATS = ("ei", "determinism", "degeneracy")
_OPTIONAL_STR = ("file", "error")


def records_from_report(
    report: Report,
    label: str,
    *,
    step: int | None = None,
    epoch: int | None = None,
    file: str | None = None,
) -> list[Record]:
    """The network record and one record per layer of ``report``.

    Parameters
    ----------
    report : Report
        What was computed.
    label : str
        Names the evaluated weights.
    step, epoch : int, optional
        Where in training the weights come from.
    file : str, optional
        The checkpoint the weights were read from.

    Returns
    -------
    list of Record
        The network totals first, then the layers in forward order.
    """
    out = [
        Record(
            label,
            "network",
            NETWORK,
            "",
            step,
            epoch,
            report.ei,
            report.determinism,
            report.degeneracy,
            file,
            extra=_known(report.extra),
        )
    ]
    out += [
        Record(
            label,
            "layer",
            lay.name,
            lay.type,
            step,
            epoch,
            lay.ei,
            lay.mean_row_entropy,
            lay.degeneracy,
            file,
            extra=_known(lay.extra),
        )
        for lay in report.layers
    ]
    return out


def _known(values: dict[str, Any]) -> dict[str, Any]:
    """A record's ``extra``: the values that are not None (an empty CSV cell reads back as
    no value, so a record and its file agree)."""
    return {k: v for k, v in values.items() if v is not None}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):  # written as JSON writes it, and read back as a bool
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # repr round-trips every float exactly
    return str(value)


def _meta_lines(meta: dict[str, Any]) -> str:
    out = []
    for key, value in meta.items():
        text = value if isinstance(value, str) else json.dumps(value)
        out.append(f"# {key}: {' '.join(str(text).split())}\n")
    return "".join(out)


def _parse_meta(line: str) -> tuple[str, Any]:
    key, _, text = line[1:].strip().partition(":")
    text = text.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    return key.strip(), value


def _extra_value(raw: Any) -> Any:
    """A measure's value as read from a CSV cell (or a JSON record): empty is None,
    ``true``/``false`` a bool, then an int, a float, or the text as it is."""
    if not isinstance(raw, str):
        return raw
    if raw == "":
        return None
    if raw in ("true", "false"):
        return raw == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def _record_from_row(row: dict[str, Any], where: str) -> Record:
    missing = [k for k in ("label", "kind") if row.get(k) in (None, "")]
    if missing:
        raise HistoryFileError(f"{where}: a record lacks {', '.join(missing)}")
    values: dict[str, Any] = {}
    try:
        for name in FIELDS:
            raw = row.get(name)
            if name in _INTS:
                values[name] = None if raw in (None, "") else int(raw)
            elif name in _FLOATS:
                values[name] = None if raw in (None, "") else float(raw)
            elif name in _OPTIONAL_STR:
                values[name] = None if raw in (None, "") else str(raw)
            else:
                values[name] = "" if raw is None else str(raw)
        extra = row.get("extra")
        if extra is None:  # a CSV row: the columns after the fixed ones
            extra = {k: v for k, v in row.items() if k not in FIELDS}
        if not isinstance(extra, dict):
            raise TypeError(f"extra must be an object, not {type(extra).__name__}")
        values["extra"] = _known({k: _extra_value(v) for k, v in extra.items()})
        return Record(**values)
    except (TypeError, ValueError) as exc:
        raise HistoryFileError(f"{where}: record {dict(row)!r} is malformed: {exc}") from None


class CSVAppender:
    """Append records to a CSV file as they arrive: the one writer of the CSV format.

    A new (or empty) file gets the ``# key: value`` lines of ``meta`` and the header row
    first. Each :meth:`write` adds its records as one block and flushes it, so a process
    killed between two results leaves every finished result in the file.

    Parameters
    ----------
    path : str or os.PathLike
        The CSV file.
    meta : dict, optional
        Written as leading ``# key: value`` lines when the file is new.
    append : bool, default True
        Keep an existing file and add to it (its header must be this format's, with the
        same ``columns``); with False, start the file anew.
    columns : sequence of str, optional
        The records' ``extra`` values written, as columns after the fixed ones
        (:attr:`Plan.columns <foresight_sparse.plans.Plan.columns>`).

    Raises
    ------
    HistoryFileError
        When ``append`` is True and the existing file's header row is not this format's
        with these columns.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        meta: dict[str, Any] | None = None,
        *,
        append: bool = True,
        columns: Sequence[str] = (),
    ):
        self.path = os.fspath(path)
        self.columns = tuple(columns)
        fresh = not append or not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        if not fresh:
            # refuses a file of another format before adding to it
            _, _, old = _read_csv(self.path)
            if old != self.columns:
                raise HistoryFileError(
                    f"{self.path!r} has the columns {', '.join(old) or 'of no measure'} "
                    f"after the fixed ones, not {', '.join(self.columns) or 'none'}: it "
                    "holds another measure's records; write to a new file"
                )
            _drop_cut_line(self.path)
            self._fh = open(self.path, "a", encoding="utf-8", newline="")
        else:
            self._fh = open(self.path, "w", encoding="utf-8", newline="")
            self._fh.write(_meta_lines(meta or {}))
            self._fh.write(",".join((*FIELDS, *self.columns)) + "\r\n")
            self._fh.flush()

    def write(self, records: Iterable[Record]) -> None:
        """Append ``records`` as one block and flush it to the file."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        for rec in records:
            writer.writerow(
                [_cell(getattr(rec, name)) for name in FIELDS]
                + [_cell(rec.extra.get(name)) for name in self.columns]
            )
        self._fh.write(buf.getvalue())
        self._fh.flush()

    def close(self) -> None:
        """Close the file."""
        self._fh.close()

    def __enter__(self) -> CSVAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_cut_line(path: str) -> None:
    """Truncate a file after its last newline: a write cut off mid-line leaves part of a
    line (perhaps an open quote) that must not run into what is appended next."""
    with open(path, "r+b") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)


def _read_csv(path: str) -> tuple[dict[str, Any], list[Record], tuple[str, ...]]:
    """Meta, records and extra columns of a CSV file as :class:`CSVAppender` writes it.

    A last line without its newline (a write cut off by an interruption) is dropped, and so
    is any line that does not have every column.
    """
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise HistoryFileError(f"{path!r} is not a text file: {exc}") from None
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    meta: dict[str, Any] = {}
    i = 0
    while i < len(lines) and lines[i].startswith("#"):
        key, value = _parse_meta(lines[i])
        meta[key] = value
        i += 1
    if i == len(lines):
        raise HistoryFileError(f"{path!r} has no header row; it is not a history CSV file")
    reader = csv.reader(lines[i:])
    header = next(reader)
    if tuple(header[: len(FIELDS)]) != FIELDS or len(set(header)) != len(header):
        raise HistoryFileError(
            f"{path!r} is not a history CSV file: its columns are "
            f"{', '.join(header)}; a history has {', '.join(FIELDS)}, then the measure's"
        )
    records = []
    for n, cells in enumerate(reader, start=i + 2):
        if len(cells) != len(header):
            continue  # a line cut short by an interruption
        records.append(_record_from_row(dict(zip(header, cells)), f"{path!r} line {n}"))
    return meta, records, tuple(header[len(FIELDS) :])


def _write_atomically(path: str, write) -> None:
    """Write a file through a temporary one beside it, then rename: never half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class History:
    """EI, determinism and degeneracy of a network over training steps or checkpoints.

    Parameters
    ----------
    records : iterable of Record, optional
        The initial records.
    meta : dict, optional
        JSON-ready settings the records were computed with (norm, engine, ...); written
        with the records and read back.

    Examples
    --------
    >>> hist = tracker.history                              # doctest: +SKIP
    >>> hist.series()["ei"]           # network EI at each step # doctest: +SKIP
    >>> hist.to_csv("ei.csv"); hist.plot("ei.png")           # doctest: +SKIP
    """

    def __init__(self, records: Iterable[Record] = (), meta: dict[str, Any] | None = None):
        self.records: list[Record] = list(records)
        self.meta: dict[str, Any] = dict(meta or {})

    # ------------------------------------------------------------------ building

    def append(self, record: Record) -> None:
        """Add one record at the end."""
        if not isinstance(record, Record):
            raise OptionError(
                f"History.append takes a Record, not {type(record).__name__}", param="record"
            )
        self.records.append(record)

    def extend(self, records: Iterable[Record]) -> None:
        """Add records at the end, in order."""
        for rec in records:
            self.append(rec)

    def add_report(
        self,
        report: Report,
        label: str,
        *,
        step: int | None = None,
        epoch: int | None = None,
        file: str | None = None,
    ) -> list[Record]:
        """Add the network and layer records of ``report`` and return them.

        See :func:`records_from_report` for the parameters.
        """
        recs = records_from_report(report, label, step=step, epoch=epoch, file=file)
        self.extend(recs)
        return recs

    def add_error(
        self,
        label: str,
        reason: str,
        *,
        file: str | None = None,
        step: int | None = None,
        epoch: int | None = None,
    ) -> Record:
        """Add an error record: ``label`` (from ``file``) could not be evaluated."""
        rec = Record(label, "error", step=step, epoch=epoch, file=file, error=reason)
        self.append(rec)
        return rec

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __getitem__(self, i: int) -> Record:
        return self.records[i]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, History):
            return NotImplemented
        return self.records == other.records and self.meta == other.meta

    def __repr__(self) -> str:
        return (
            f"<History: {len(self.labels)} labels, {len(self.layers)} layers, "
            f"{len(self.errors)} errors>"
        )

    @property
    def labels(self) -> list[str]:
        """Every label, in order of first appearance (errors included)."""
        return list(dict.fromkeys(r.label for r in self.records))

    @property
    def layers(self) -> list[str]:
        """The layer names, in order of first appearance (without :data:`NETWORK`)."""
        return list(dict.fromkeys(r.layer for r in self.records if r.kind == "layer"))

    @property
    def columns(self) -> tuple[str, ...]:
        """The names of the records' ``extra`` values, in order of first appearance."""
        names: dict[str, None] = {}
        for r in self.records:
            names.update(dict.fromkeys(r.extra))
        return tuple(names)

    @property
    def errors(self) -> list[Record]:
        """The error records."""
        return [r for r in self.records if r.kind == "error"]

    def rows(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The records as dicts (one per record, the :class:`Record` fields as keys).

        Parameters
        ----------
        kind : {'network', 'layer', 'error'}, optional
            Only records of this kind.
        """
        return [r.to_dict() for r in self.records if kind is None or r.kind == kind]

    def series(self, layer: str = NETWORK) -> dict[str, list]:
        """One layer's (or the network's) values over the evaluated labels.

        Parameters
        ----------
        layer : str, default NETWORK
            A layer name, or :data:`NETWORK` for the totals.

        Returns
        -------
        dict of str to list
            ``label``, ``step``, ``epoch``, ``ei``, ``determinism`` and ``degeneracy``, then
            each of :attr:`columns` (``effectiveness``, ``sensitivity``, ...), one entry
            per label at which the layer was evaluated, in record order.

        Raises
        ------
        UnknownLayerError
            When no record names ``layer`` (a ``KeyError``); the message lists the layers.
        """
        recs = [r for r in self.records if r.kind != "error" and r.layer == layer]
        if not recs:
            names = ", ".join([NETWORK, *self.layers][:12])
            raise UnknownLayerError(
                f"the history has no layer {layer!r}; it has {names}", param="layer"
            )
        out = {
            name: [getattr(r, name) for r in recs]
            for name in ("label", "step", "epoch", "ei", "determinism", "degeneracy")
        }
        for name in self.columns:
            out[name] = [r.extra.get(name) for r in recs]
        return out

    def sorted(self, labels: Sequence[str]) -> History:
        """A copy with the records grouped by label in the order of ``labels``.

        Records of labels not listed follow, in their order; within a label the order is
        kept (network totals, then the layers).
        """
        rank = {lab: i for i, lab in enumerate(labels)}
        order = sorted(
            range(len(self.records)), key=lambda i: (rank.get(self.records[i].label, len(rank)), i)
        )
        return History([self.records[i] for i in order], self.meta)

    # ------------------------------------------------------------------ files

    def to_csv(self, path: str | os.PathLike, *, columns: Sequence[str] | None = None) -> None:
        """Write every record as a CSV row, after ``# key: value`` lines of :attr:`meta`.

        The file is replaced as a whole (written beside it, then renamed). ``columns``
        names the ``extra`` values written as columns (default :attr:`columns`; a sweep
        passes its plan's, so that a file started before any result has them).
        """
        columns = self.columns if columns is None else tuple(columns)

        def write(tmp: str) -> None:
            with CSVAppender(tmp, self.meta, append=False, columns=columns) as out:
                out.write(self.records)

        _write_atomically(os.fspath(path), write)

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> History:
        """Read a file written by :meth:`to_csv` or :class:`CSVAppender`.

        A last line cut off by an interruption is dropped.

        Raises
        ------
        HistoryFileError
            When the file is not a history CSV file; the message names it.
        """
        meta, records, _ = _read_csv(os.fspath(path))
        return cls(records, meta)

    def to_json(self, path: str | os.PathLike) -> None:
        """Write ``{"meta": ..., "records": [...]}`` as JSON (floats exactly, None as null)."""
        data = {"meta": self.meta, "records": self.rows()}

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=1)
                fh.write("\n")

        _write_atomically(os.fspath(path), write)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> History:
        """Read a file written by :meth:`to_json`.

        Raises
        ------
        HistoryFileError
            When the file is not JSON or not a history.
        """
        where = repr(os.fspath(path))
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HistoryFileError(f"{where} is not JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            raise HistoryFileError(f"{where} is not a history: it needs a 'records' list")
        return cls(
            [
                _record_from_row(row, where) if isinstance(row, dict) else _not_a_row(row, where)
                for row in data["records"]
            ],
            data.get("meta") or {},
        )

    def plot(self, path: str | os.PathLike, kind: str = "layers", title: str | None = None) -> None:
        """Draw the history and write the chart to ``path`` (needs matplotlib).

        :func:`foresight_sparse.plotting.plot_history` draws it.

        Parameters
        ----------
        path : str or os.PathLike
            The file; its extension picks the format.
        kind : {'layers', 'plane'}, default 'layers'
            ``'layers'``: EI of every layer and of the network over the steps (or
            checkpoints). ``'plane'``: each layer's path in the plane of its determinism
            (x) and degeneracy (y).
        title : str, optional
            A title line.
        """
        plot_history(self, path, kind=kind, title=title)


def _not_a_row(row: Any, where: str) -> Record:
    raise HistoryFileError(f"{where}: a record is a {type(row).__name__}, not an object")
