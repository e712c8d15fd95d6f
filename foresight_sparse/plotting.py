"""A chart of a :class:`~foresight_sparse.results.Report`, layer by layer (needs matplotlib).

matplotlib is imported only when a chart is drawn, and never through pyplot: a
:class:`matplotlib.figure.Figure` has no GUI backend and no global state.
"""

from __future__ import annotations

import os

from .exceptions import MissingDependencyError, UnknownNameError
from .results import Report

__all__ = ["PLOT_HINT", "plot_formats", "check_plot_path", "plot_report"]

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
        raise UnknownNameError(f"{os.fspath(path)!r} has no extension, which names the "
                               f"chart's format; use one of {choices}")
    if ext not in formats:
        raise UnknownNameError(f"{os.fspath(path)!r}: matplotlib cannot write .{ext} files; use "
                               f"one of {choices}")
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
    width = 0.27
    fig = Figure(figsize=(max(6.0, 0.5 * len(names) + 2.0), 4.8), layout="constrained")
    ax = fig.subplots()
    series = [("EI", [lay.ei for lay in report.layers]),
              ("mean row entropy (determinism)", [lay.mean_row_entropy for lay in report.layers]),
              ("degeneracy", [lay.degeneracy for lay in report.layers])]
    for i, (label, values) in enumerate(series):
        ax.bar([j + (i - 1) * width for j in x], values, width, label=label)
    ax.axhline(report.ei, color="black", linestyle="--", linewidth=1,
               label=f"network EI ({report.ei:.4f} bits)")
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize="small")
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylabel("bits")
    totals = (f"EI {report.ei:.4f} bits (determinism {report.determinism:.4f}, degeneracy "
              f"{report.degeneracy:.4f})")
    ax.set_title(f"{title}\n{totals}" if title else totals, fontsize="medium")
    # Above the axes: a legend at the right would leave an empty band on a wide chart.
    fig.legend(loc="outside upper center", ncols=4, fontsize="small", frameon=False)
    fig.savefig(path, format=fmt, dpi=120, bbox_inches="tight")
    return fig
