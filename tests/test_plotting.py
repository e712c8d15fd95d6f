"""plot_report: the file it writes, what the chart shows, and the formats it refuses."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from _cli_models import SHAPE, tiny_cnn

import foresight_sparse
from foresight_sparse.exceptions import MissingDependencyError, UnknownNameError
from foresight_sparse.plotting import check_plot_path, plot_formats, plot_report

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF", "svg": b"<?xml"}


@pytest.fixture(scope="module")
def rep():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return foresight_sparse.report(tiny_cnn(), torch.zeros(SHAPE))


@pytest.mark.parametrize("ext", sorted(MAGIC))
def test_writes_exactly_the_named_file(tmp_path, rep, ext):
    path = tmp_path / f"chart.{ext}"
    plot_report(rep, path, title="tiny")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert path.read_bytes().startswith(MAGIC[ext])


def test_chart_shows_each_layer_and_the_network_ei(tmp_path, rep):
    fig = plot_report(rep, tmp_path / "c.png")
    (ax,) = fig.axes
    bars = {c.get_label(): [b.get_height() for b in c] for c in ax.containers}
    assert bars["EI"] == [lay.ei for lay in rep.layers]
    assert bars["mean row entropy (determinism)"] == [lay.mean_row_entropy for lay in rep.layers]
    assert bars["degeneracy"] == [lay.degeneracy for lay in rep.layers]
    lines = [ln for ln in ax.get_lines() if ln.get_label().startswith("network EI")]
    assert len(lines) == 1 and list(lines[0].get_ydata()) == [rep.ei, rep.ei]
    assert [t.get_text() for t in ax.get_xticklabels()] == [lay.name for lay in rep.layers]


@pytest.mark.parametrize(
    "name, match", [("chart", "has no extension"), ("chart.docx", "cannot write .docx")]
)
def test_refuses_what_matplotlib_cannot_write(tmp_path, rep, name, match):
    with pytest.raises(UnknownNameError, match=match) as info:
        plot_report(rep, tmp_path / name)
    assert ".png" in str(info.value) and ".svg" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_formats_come_from_matplotlib():
    from matplotlib.backend_bases import FigureCanvasBase

    assert set(plot_formats()) == set(FigureCanvasBase.get_supported_filetypes())
    assert check_plot_path("a/b.PDF") == "pdf"


def test_missing_matplotlib_names_the_install(monkeypatch, tmp_path, rep):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'foresight-sparse\[plot\]'"):
        plot_report(rep, tmp_path / "c.png")
