"""The graph convention (einet's) against hand computations, and how its values travel
through reports, CSV/JSON and histories."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import foresight_sparse as fs
from foresight_sparse.exceptions import UnknownNameError, UnsupportedEngineError
from foresight_sparse.history import History, HistoryFileError


def _einet(a: np.ndarray) -> dict[str, float]:
    """einet's formulas on a non-negative matrix (rows: nodes with out-weights or not),
    written out directly: N counts the rows with out-weights."""
    sums = a.sum(1)
    w = a[sums > 0] / sums[sums > 0, None]
    n = w.shape[0]

    def h(p):
        p = p[p > 0]
        return float(-(p * np.log2(p)).sum())

    mean_h = sum(h(row) for row in w) / n
    h_avg = h(w.mean(0))
    ei = h_avg - mean_h
    return {
        "determinism": math.log2(n) - mean_h,
        "degeneracy": math.log2(n) - h_avg,
        "ei": ei,
        "effectiveness": ei / math.log2(n),
        "nodes": n,
    }


def _linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight.data = weight.clone()
    return lin


@pytest.mark.parametrize("n", [2, 5, 16])
def test_a_permutation_has_log2_n_bits_of_ei_and_determinism(n):
    perm = torch.eye(n)[torch.randperm(n, generator=torch.Generator().manual_seed(n))]
    rep = fs.report(_linear(perm), torch.zeros(1, n), convention="graph")
    assert rep.ei == pytest.approx(math.log2(n), rel=1e-12)
    assert rep.determinism == pytest.approx(math.log2(n), rel=1e-12)
    assert rep.degeneracy == pytest.approx(0.0, abs=1e-12)
    assert rep.extra == {"effectiveness": pytest.approx(1.0), "nodes": n}
    assert rep.layers[0].extra["nodes"] == n


def test_rows_without_out_weights_leave_n_and_the_seed_counts_them():
    g = torch.Generator().manual_seed(3)
    weight = torch.rand(6, 9, generator=g)  # out x in: rows of A are the 9 inputs
    weight[:, [1, 4]] = -torch.rand(6, 2, generator=g)  # two inputs without out-weights
    rep = fs.report(_linear(weight), torch.zeros(1, 9), convention="graph")
    want = _einet(weight.T.double().clamp(min=0).numpy())
    assert want["nodes"] == 7
    layer = rep.layers[0]
    got = {
        "determinism": layer.mean_row_entropy,
        "degeneracy": layer.degeneracy,
        "ei": layer.ei,
        **layer.extra,
    }
    assert got == {k: pytest.approx(v, rel=1e-10, abs=1e-12) for k, v in want.items()}
    seed = fs.report(_linear(weight), torch.zeros(1, 9))
    # the seed divides the same row entropies by all 9 rows: the two EIs differ
    assert seed.ei != pytest.approx(rep.ei, rel=1e-6)


def test_layers_pool_as_one_block_diagonal_graph():
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Linear(6, 3, bias=False))
    model[0].weight.data = torch.randn(6, 4, generator=g)
    model[1].weight.data = torch.randn(3, 6, generator=g)
    rep = fs.report(model, torch.zeros(1, 4), convention="graph")
    a1 = model[0].weight.data.T.double().clamp(min=0).numpy()
    a2 = model[1].weight.data.T.double().clamp(min=0).numpy()
    block = np.zeros((10, 9))
    block[:4, :6] = a1
    block[4:, 6:] = a2
    want = _einet(block)
    got = {"determinism": rep.determinism, "degeneracy": rep.degeneracy, "ei": rep.ei}
    got.update(rep.extra)
    assert got == {k: pytest.approx(v, rel=1e-10, abs=1e-12) for k, v in want.items()}


@pytest.mark.parametrize("norm", ["soft", "sig"])
def test_without_empty_rows_the_two_eis_agree(norm):
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.zeros(1, 2, 5, 5)
    graph = fs.report(conv, x, norm=norm, convention="graph")
    seed = fs.report(conv, x, norm=norm)
    assert graph.ei == pytest.approx(seed.ei, rel=1e-9)
    assert graph.extra["nodes"] == seed.layers[0].n_in
    n = graph.extra["nodes"]
    assert graph.determinism == pytest.approx(math.log2(n) - seed.determinism, rel=1e-9)
    assert graph.degeneracy == pytest.approx(math.log2(n) - seed.degeneracy, rel=1e-9)


def test_bad_conventions_are_refused():
    lin = nn.Linear(3, 2)
    x = torch.zeros(1, 3)
    with pytest.raises(UnknownNameError, match="valid conventions are seed, graph"):
        fs.report(lin, x, convention="einet")
    with pytest.raises(UnsupportedEngineError, match="norm='lin', 'soft' or 'sig'"):
        fs.report(lin, x, norm=None, convention="graph")
    with pytest.raises(UnknownNameError, match="Use convention='seed'"):
        fs.plan(lin, x, measure="svd", convention="graph")
    with pytest.raises(UnknownNameError, match="valid measures are ei, perturbation, svd"):
        fs.plan(lin, x, measure="phi")


def test_graph_values_travel_through_json_csv_and_histories(tmp_path):
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    p = fs.plan(model, torch.zeros(1, 4), convention="graph")
    rep = p.report()
    assert p.columns == ("effectiveness", "nodes") == rep.columns
    again = fs.Report.from_dict(rep.to_dict())
    assert again == rep
    rep.save_csv(tmp_path / "r.csv")
    text = (tmp_path / "r.csv").read_text()
    assert "# convention: graph" in text
    assert ",effectiveness,nodes" in text.splitlines()[text.count("\n# ") + 1]
    hist = History(meta=p.settings.metadata())
    hist.add_report(rep, "a", step=0)
    hist.add_report(p.report(model.state_dict()), "b", step=1)
    hist.to_csv(tmp_path / "h.csv")
    back = History.from_csv(tmp_path / "h.csv")
    assert back == hist
    assert back.series()["effectiveness"] == [rep.extra["effectiveness"]] * 2
    assert back.records[1].extra["nodes"] == rep.layers[0].extra["nodes"]
    hist.to_json(tmp_path / "h.json")
    assert History.from_json(tmp_path / "h.json") == hist
    # a file of another measure's columns is not appended to
    with pytest.raises(HistoryFileError, match="another measure's records"):
        fs.history.CSVAppender(tmp_path / "h.csv", columns=())
