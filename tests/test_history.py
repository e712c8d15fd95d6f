"""History: records, exact CSV/JSON round trips, the appending writer, series and plots."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import foresight_sparse
from foresight_sparse.exceptions import HistoryFileError, UnknownNameError
from foresight_sparse.history import FIELDS, NETWORK, CSVAppender, History, Record


def _history() -> History:
    """Two steps of a two-layer network, then an error, with awkward floats."""
    h = History(meta={"norm": "lin", "input_shape": [1, 3, 8, 8], "legacy": False})
    values = [0.1 + 0.2, 1e-300, 2.0**-1074, 123456789.123456789, -0.0, 1 / 3]
    for i, step in enumerate((0, 50)):
        a, b, c = values[i], values[i + 2], values[i + 3]
        h.append(Record(f"step={step}", "network", NETWORK, "", step, None, b - a, a, b))
        h.append(Record(f"step={step}", "layer", "features.0", "Conv2d", step, 1, c - a, a, c))
        h.append(Record(f"step={step}", "layer", "fc", "Linear", step, 1, -c, c, 0.0))
    h.add_error("epoch=7", "cannot read 'a,b \"c\".pt': truncated", file='a,b "c".pt', epoch=7)
    return h


def test_csv_round_trip_is_exact(tmp_path):
    h = _history()
    h.to_csv(tmp_path / "h.csv")
    back = History.from_csv(tmp_path / "h.csv")
    assert back == h
    assert back.records[1].ei == h.records[1].ei  # floats bit for bit, not approximately
    assert back.errors[0].file == 'a,b "c".pt' and back.errors[0].epoch == 7


def test_json_round_trip_is_exact(tmp_path):
    h = _history()
    h.to_json(tmp_path / "h.json")
    assert History.from_json(tmp_path / "h.json") == h
    data = json.loads((tmp_path / "h.json").read_text())
    assert data["records"][-1]["ei"] is None and data["meta"]["norm"] == "lin"


def test_csv_reads_with_comment_lines_and_header(tmp_path):
    _history().to_csv(tmp_path / "h.csv")
    lines = (tmp_path / "h.csv").read_text().splitlines()
    assert lines[0] == "# norm: lin"
    assert lines[3] == ",".join(FIELDS)
    assert len(lines) == 4 + 7


def test_appender_adds_to_existing_file_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "h.csv"
    h = _history()
    with CSVAppender(path, h.meta, append=False) as out:
        out.write(h.records[:3])
    with CSVAppender(path) as out:  # a second run appends, without a second header
        out.write(h.records[3:6])
    # An interruption in the middle of a write leaves part of a line behind, here inside a
    # quoted field, which would swallow the lines after it if it stayed.
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('epoch=8,error,,,,8,,,,"a,b')
    assert History.from_csv(path).records == h.records[:6]
    with CSVAppender(path) as out:  # the cut line is removed before appending
        out.write(h.records[6:])
    assert History.from_csv(path) == h
    assert '"a,b' not in path.read_text().replace('"a,b ""c"".pt"', "")


def test_appender_refuses_another_format(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("name,value\na,1\n")
    with pytest.raises(HistoryFileError, match="not a history CSV"):
        CSVAppender(path)
    with pytest.raises(HistoryFileError, match="other.csv"):
        History.from_csv(path)


def test_from_json_rejects_non_history(tmp_path):
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(HistoryFileError, match="records"):
        History.from_json(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("{")
    with pytest.raises(HistoryFileError, match="not JSON"):
        History.from_json(tmp_path / "y.json")


def test_series_labels_layers_rows():
    h = _history()
    assert h.labels == ["step=0", "step=50", "epoch=7"]
    assert h.layers == ["features.0", "fc"]
    net = h.series()
    assert net["step"] == [0, 50]
    assert net["ei"] == [h.records[0].ei, h.records[3].ei]
    assert h.series("fc")["determinism"] == [h.records[2].determinism, h.records[5].determinism]
    with pytest.raises(KeyError, match="no layer 'nope'"):
        h.series("nope")
    assert [r["kind"] for r in h.rows("error")] == ["error"]
    assert len(h.rows()) == len(h) == 7


def test_sorted_groups_by_label():
    h = _history()
    s = h.sorted(["epoch=7", "step=50", "step=0"])
    assert s.labels == ["epoch=7", "step=50", "step=0"]
    assert [r.layer for r in s.records[1:4]] == [NETWORK, "features.0", "fc"]


def test_record_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        Record("a", "totals")
    with pytest.raises(TypeError, match="Record"):
        History().append({"label": "a"})


def test_add_report_matches_the_report():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    rep = foresight_sparse.report(model, torch.zeros(1, 2, 6, 6))
    h = History()
    recs = h.add_report(rep, "step=3", step=3)
    assert recs[0] == Record(
        "step=3", "network", NETWORK, "", 3, None, rep.ei, rep.determinism, rep.degeneracy
    )
    assert [(r.layer, r.type, r.ei, r.determinism, r.degeneracy) for r in recs[1:]] == [
        (lay.name, lay.type, lay.ei, lay.mean_row_entropy, lay.degeneracy) for lay in rep.layers
    ]


@pytest.mark.parametrize("kind", ["layers", "plane"])
def test_plot_writes_the_file(tmp_path, kind):
    h = _history()
    fig = h.plot(tmp_path / f"{kind}.png", kind=kind) or None
    assert (tmp_path / f"{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig is None  # History.plot returns nothing; plotting.plot_history the figure
    from foresight_sparse.plotting import plot_history

    figure = plot_history(h, tmp_path / f"{kind}.svg", kind=kind, title="run a")
    ax = figure.axes[0]
    # One line per layer and a thick one for the network, each with its points.
    names = ("features.0 (Conv2d)", "fc (Linear)", "network")
    lines = [ln for ln in ax.get_lines() if ln.get_label() in names]
    assert len(lines) == 3
    network = next(ln for ln in lines if ln.get_label() == "network")
    x, y = network.get_data()
    if kind == "layers":
        assert list(x) == [0.0, 50.0] and list(y) == h.series()["ei"]
    else:
        assert list(x) == h.series()["determinism"] and list(y) == h.series()["degeneracy"]


def test_plot_refuses_bad_kind_and_empty_history(tmp_path):
    with pytest.raises(UnknownNameError, match="kind"):
        _history().plot(tmp_path / "a.png", kind="bars")
    with pytest.raises(ValueError, match="no evaluation"):
        History([Record("a", "error", error="x")]).plot(tmp_path / "a.png")
