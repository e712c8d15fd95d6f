"""A chart of a :class:`~foresight_sparse.results.Report`, layer by layer (needs matplotlib).

matplotlib is imported only when a chart is drawn, and never through pyplot: a
:class:`matplotlib.figure.Figure` has no GUI backend and no global state.
:func:`plot_history` draws a :class:`~foresight_sparse.history.History` over training steps
or checkpoints.
"""

from __future__ import annotations

import os

from .exceptions import (
    EmptyHistoryError,
    MissingDependencyError,
    Opt,
    OptionError,
    UnknownNameError,
)
from .results import Report

__all__ = ["PLOT_HINT", "plot_formats", "check_plot_path", "plot_report", "plot_history"]

#: How to install what plotting needs.
PLOT_HINT = "pip install 'foresight-sparse[plot]'"


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError(f"plotting needs matplotlib: {PLOT_HINT}") from None
    return matplotlib


def plot_formats() -> dict[str, str]:
    """The file extensions matplotlib can write, each with its description.

    Raises
    ------
    MissingDependencyError
        When matplotlib is not installed.
    """
    _matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    return dict(sorted(FigureCanvasBase.get_supported_filetypes().items()))


def check_plot_path(path: str | os.PathLike) -> str:
    """The format a chart written to ``path`` will have: its extension, checked.

    The file is written under exactly this name, so the extension is required (matplotlib
    would otherwise add ``.png`` to the name).

    Parameters
    ----------
    path : str or os.PathLike
        Where the chart goes, such as ``ei.png``, ``ei.pdf`` or ``ei.svg``.

    Returns
    -------
    str
        The format, lower case, such as ``"png"``.

    Raises
    ------
    UnknownNameError
        When ``path`` has no extension or one matplotlib cannot write; the message lists
        the ones it can.
    MissingDependencyError
        When matplotlib is not installed.
    """
    formats = plot_formats()
    ext = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    choices = ", ".join(f".{e}" for e in formats)
    if not ext:
        raise UnknownNameError(
            f"{os.fspath(path)!r} has no extension, which names the "
            f"chart's format; use one of {choices}"
        )
    if ext not in formats:
        raise UnknownNameError(
            f"{os.fspath(path)!r}: matplotlib cannot write .{ext} files; use one of {choices}"
        )
    return ext


def plot_report(report: Report, path: str | os.PathLike, title: str | None = None):
    """Draw each layer's EI, mean row entropy and degeneracy, and write the chart to ``path``.

    Three bars per layer, in forward order, and a dashed line at the network's EI. The
    legend sits above the bars, and the margins are cut to the drawing at any width.

    Parameters
    ----------
    report : Report
        What to draw.
    path : str or os.PathLike
        The file, written under exactly this name; its extension picks the format
        (:func:`check_plot_path`).
    title : str, optional
        A first title line, such as the model's name; the network totals follow it.

    Returns
    -------
    matplotlib.figure.Figure
        The chart, already written; change it and call its ``savefig`` for another version.

    Raises
    ------
    UnknownNameError
        When the extension is missing or not one matplotlib writes.
    MissingDependencyError
        When matplotlib is not installed (``pip install 'foresight-sparse[plot]'``).
    """
    fmt = check_plot_path(path)
    from matplotlib.figure import Figure

    names = [layer.name or layer.type for layer in report.layers]
    x = list(range(len(names)))
    series = _report_series(report)
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(6.0, 0.5 * len(names) + 2.0), 4.8), layout="constrained")
    ax = fig.subplots()
    for i, (label, values) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar(
            [j + offset for j in x],
            [float("nan") if v is None else v for v in values],
            width,
            label=label,
        )
    if report.ei is not None:
        ax.axhline(
            report.ei,
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"network EI ({report.ei:.4f} bits)",
        )
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize="small")
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylabel("bits" if report.ei is not None else report.measure)
    if report.ei is not None and report.determinism is not None:
        totals = (
            f"EI {report.ei:.4f} bits (determinism {report.determinism:.4f}, degeneracy "
            f"{report.degeneracy:.4f})"
        )
    else:
        values = {"EI": report.ei, "degeneracy": report.degeneracy, **report.extra}
        totals = f"{report.measure}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float)
        )
    ax.set_title(f"{title}\n{totals}" if title else totals, fontsize="medium")
    # Above the axes: a legend at the right would leave an empty band on a wide chart.
    fig.legend(loc="outside upper center", ncols=4, fontsize="small", frameon=False)
    fig.savefig(path, format=fmt, dpi=120, bbox_inches="tight")
    return fig


def _report_series(report: Report) -> list[tuple[str, list]]:
    """The bars of :func:`plot_report`: EI, determinism and degeneracy where the measure
    has them, then a perturbation's sensitivity; a measure with none of them (the SVD's)
    shows its first three numeric quantities."""
    layers = report.layers
    core = [
        ("EI", [lay.ei for lay in layers]),
        (
            "determinism" if report.convention != "seed" else "mean row entropy (determinism)",
            [lay.mean_row_entropy for lay in layers],
        ),
        ("degeneracy", [lay.degeneracy for lay in layers]),
    ]
    series = [(label, values) for label, values in core if any(v is not None for v in values)]
    numeric = [
        name
        for name in report.columns
        if name != "unconnected_bias"
        and all(isinstance(lay.extra.get(name), float) for lay in layers)
    ]
    if "sensitivity" in numeric:
        series.append(("sensitivity", [lay.extra["sensitivity"] for lay in layers]))
    if not series:
        series = [(name, [lay.extra[name] for lay in layers]) for name in numeric[:3]]
    return series or [("EI", [None for _ in layers])]


def _plane_x(records: list) -> tuple[str, list]:
    """The x axis of the causal plane: determinism, or a perturbation's sensitivity (its
    EI is sensitivity minus degeneracy, so lines of equal EI are parallel to the
    diagonal either way)."""
    if records and all(r.determinism is not None for r in records):
        return "determinism", [r.determinism for r in records]
    if records and all(isinstance(r.extra.get("sensitivity"), float) for r in records):
        return "sensitivity", [r.extra["sensitivity"] for r in records]
    raise OptionError(
        "the causal plane needs each record's determinism (or sensitivity) and "
        "degeneracy; this history's measure has neither. Use ",
        Opt("kind", "layers"),
    )


def _history_y(records: list) -> tuple[str, list]:
    """What the ``'layers'`` chart draws: EI, or the first numeric quantity of a measure
    without one (the SVD's ``gamma_alpha``)."""
    if all(r.ei is not None for r in records):
        return "EI (bits)", [r.ei for r in records]
    for name in dict.fromkeys(k for r in records for k in r.extra):
        if all(isinstance(r.extra.get(name), float) for r in records):
            return name, [r.extra[name] for r in records]
    raise EmptyHistoryError("the history's records hold no EI nor any numeric quantity to draw")


def _history_x(network: list) -> tuple[str, list[float], list[str] | None]:
    """The x axis of a history chart: steps where every evaluation has one, else epochs,
    else the evaluations in order (labelled)."""
    if network and all(r.step is not None for r in network):
        return "step", [float(r.step) for r in network], None
    if network and all(r.epoch is not None for r in network):
        return "epoch", [float(r.epoch) for r in network], None
    return "checkpoint", [float(i) for i in range(len(network))], [r.label for r in network]


def plot_history(history, path: str | os.PathLike, kind: str = "layers", title: str | None = None):
    """Draw a :class:`~foresight_sparse.history.History` and write the chart to ``path``.

    Parameters
    ----------
    history : History
        What a tracker or a sweep recorded; error records are left out.
    path : str or os.PathLike
        The file, written under exactly this name; its extension picks the format
        (:func:`check_plot_path`).
    kind : {'layers', 'plane'}, default 'layers'
        ``'layers'``: EI of every layer (thin lines) and of the network (thick black) over
        the steps, or the epochs, or the checkpoints in order when some have neither.
        ``'plane'``: each layer's path in the plane of its determinism (mean row entropy,
        x) and degeneracy (y), from a circle at the first evaluation to a square at the
        last; lines of equal EI are parallel to the dotted diagonal, where EI is 0.
    title : str, optional
        A title line.

    Returns
    -------
    matplotlib.figure.Figure
        The chart, already written.

    Raises
    ------
    UnknownNameError
        For another ``kind``, or an extension matplotlib does not write.
    EmptyHistoryError
        When the history holds no evaluation to draw, or no quantity to plot.
    OptionError
        For ``kind='plane'`` when the records hold neither determinism nor sensitivity.
    MissingDependencyError
        When matplotlib is not installed (``pip install 'foresight-sparse[plot]'``).
    """
    if kind not in ("layers", "plane"):
        raise UnknownNameError(
            f"unknown history plot kind {kind!r}; use ", Opt("kind", "layers", "plane")
        )
    fmt = check_plot_path(path)
    from matplotlib.figure import Figure

    network = [r for r in history.records if r.kind == "network"]
    if not network:
        raise EmptyHistoryError("the history holds no evaluation to draw (only errors, or nothing)")
    names = history.layers
    types = {r.layer: r.type for r in history.records if r.kind == "layer"}
    legend = {name: f"{name} ({types[name]})" if types.get(name) else name for name in names}
    fig = Figure(figsize=(9.0, 5.2), layout="constrained")
    ax = fig.subplots()
    colors = [f"C{i % 10}" for i in range(len(names))]
    if kind == "layers":
        axis, xs, ticks = _history_x(network)
        pos = {r.label: x for r, x in zip(network, xs)}
        for name, color in zip(names, colors):
            recs = [r for r in history.records if r.kind == "layer" and r.layer == name]
            ax.plot(
                [pos[r.label] for r in recs],
                _history_y(recs)[1],
                color=color,
                linewidth=1,
                marker="." if len(recs) < 30 else None,
                label=legend[name],
            )
        ylabel, ys = _history_y(network)
        ax.plot(
            xs,
            ys,
            color="black",
            linewidth=2.5,
            marker="o" if len(network) < 30 else None,
            label="network",
        )
        if ticks is not None:
            ax.set_xticks(xs, ticks, rotation=60, ha="right", fontsize="small")
        ax.set_xlabel(axis)
        ax.set_ylabel(ylabel)
    else:
        # the layers, then the network's totals (None): the records the other chart draws
        for name, color in zip([*names, None], [*colors, "black"]):
            if name is None:
                recs = network
            else:
                recs = [r for r in history.records if r.kind == "layer" and r.layer == name]
            xlabel, x = _plane_x(recs)
            y = [r.degeneracy for r in recs]
            ax.plot(
                x,
                y,
                color=color,
                linewidth=2.5 if name is None else 1,
                label="network" if name is None else legend[name],
            )
            ax.plot(x[:1], y[:1], "o", color=color, markersize=4)
            ax.plot(x[-1:], y[-1:], "s", color=color, markersize=5)
        lo, hi = ax.get_xlim()
        ax.axline((lo, lo), slope=1, color="grey", linestyle=":", linewidth=1, label="EI = 0")
        ax.set_xlim(lo, hi)
        ax.set_xlabel(
            "determinism: mean row entropy (bits)"
            if xlabel == "determinism"
            else "sensitivity (bits)"
        )
        ax.set_ylabel("degeneracy (bits)")
    if title:
        ax.set_title(title, fontsize="medium")
    ax.grid(True, linewidth=0.3)
    ncols = 1 if len(names) <= 24 else 2
    fig.legend(loc="outside right upper", ncols=ncols, fontsize="x-small", frameon=False)
    fig.savefig(path, format=fmt, dpi=120, bbox_inches="tight")
    return fig
