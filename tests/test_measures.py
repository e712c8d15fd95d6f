"""Measures other than the connectivity EI, through plans, reports, histories, the tracker,
sweeps, plots and the command line."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import foresight_sparse as fs
from foresight_sparse.cli import main
from foresight_sparse.exceptions import HistoryFileError, ShapeMismatchError
from foresight_sparse.history import History
from foresight_sparse.measures import Measure, MeasureLayer
from foresight_sparse.perturbation import Perturbation, perturb_layer
from foresight_sparse.settings import get_measure


class WeightSum(Measure):
    """A measure made for the test: each layer's summed weight, its type name and a flag;
    a layer wider than ``refuse_over`` inputs is refused at plan time."""

    name = "weight_sum"
    columns = ("total", "module_type", "wide")

    def __init__(self, refuse_over: int = 10**9):
        self.refuse_over = refuse_over
        self.seen: list[MeasureLayer] = []

    def settings(self):
        return {"refuse_over": self.refuse_over}

    def check(self, layer):
        if layer.conn.n_rows > self.refuse_over:
            raise ShapeMismatchError(f"{layer.label}: too wide")

    def layer(self, layer):
        self.seen.append(layer)
        total = float(sum(t.detach().sum() for t in layer.module.parameters()))
        return {
            "determinism": None,
            "degeneracy": -total,
            "ei": total,
            "total": total,
            "module_type": type(layer.module).__name__,
            "wide": layer.conn.n_rows > 4,
        }

    def network(self, layers):
        total = sum(r["total"] for r in layers)
        return {
            "determinism": None,
            "degeneracy": -total,
            "ei": total,
            "total": total,
            "module_type": "network",
            "wide": any(r["wide"] for r in layers),
        }


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.Sigmoid(), nn.Linear(4, 3), nn.Tanh())


def test_a_measure_sees_the_evaluated_weights_and_the_neighbours():
    model = _mlp()
    measure = WeightSum()
    p = fs.plan(model, torch.zeros(1, 6), measure=measure)
    other = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    rep = p.report(other)
    want = [0.5 * (6 * 4 + 4), 0.5 * (4 * 3 + 3)]
    assert [lay.ei for lay in rep.layers] == pytest.approx(want)
    assert rep.ei == pytest.approx(sum(want)) and rep.determinism is None
    assert rep.extra == {"total": pytest.approx(sum(want)), "module_type": "network", "wide": True}
    assert [lay.extra["module_type"] for lay in rep.layers] == ["Linear", "Linear"]
    assert rep.measure == "weight_sum" and rep.settings == {"refuse_over": 10**9}
    assert [type(s.after) for s in measure.seen] == [nn.Sigmoid, nn.Tanh]
    assert [type(s.before) for s in measure.seen] == [type(None), nn.Sigmoid]
    # the model's own weights are untouched and are what report() reads by default
    assert p.report().ei == pytest.approx(float(sum(t.detach().sum() for t in model.parameters())))


def test_a_measure_refuses_layers_when_the_plan_is_made():
    with pytest.raises(ShapeMismatchError, match="too wide"):
        fs.plan(_mlp(), torch.zeros(1, 6), measure=WeightSum(refuse_over=5))


def test_extra_values_of_every_type_round_trip_through_files(tmp_path):
    p = fs.plan(_mlp(), torch.zeros(1, 6), measure=WeightSum())
    rep = p.report()
    assert fs.Report.from_dict(json.loads(json.dumps(rep.to_dict()))) == rep
    rep.save_csv(tmp_path / "r.csv")
    assert "# measure: weight_sum" in (tmp_path / "r.csv").read_text()
    hist = History(meta=p.settings.metadata())
    hist.add_report(rep, "a", step=1)
    hist.add_error("b", "broken", step=2)
    hist.to_csv(tmp_path / "h.csv")
    back = History.from_csv(tmp_path / "h.csv")
    assert back == hist
    assert back.records[0].extra == {
        "total": rep.extra["total"],
        "module_type": "network",
        "wide": True,
    }
    assert back.errors[0].extra == {}
    hist.to_json(tmp_path / "h.json")
    assert History.from_json(tmp_path / "h.json") == hist
    assert "total" in rep.table() and "weight_sum" in rep.table()


def test_perturbation_through_a_plan_uses_the_activations_around_each_layer():
    model = _mlp()
    measure = Perturbation(samples=3000, in_bins=8, out_bins=8, sensitivity_samples=200)
    rep = fs.report(model, torch.zeros(1, 6), measure=measure)
    options = dict(samples=3000, in_bins=8, out_bins=8, sensitivity_samples=200)
    first = perturb_layer(model[0], (6,), activation=nn.Sigmoid(), in_range=(-10, 10), **options)
    second = perturb_layer(model[2], (4,), activation=nn.Tanh(), in_range=(0, 1), **options)
    for lay, want in zip(rep.layers, (first, second)):
        assert lay.ei == pytest.approx(want.ei_parts, rel=1e-12)
        assert lay.extra["sensitivity"] == pytest.approx(want.sensitivity, rel=1e-12)
        assert lay.degeneracy == pytest.approx(want.sensitivity - want.ei_parts, rel=1e-12)
    assert rep.ei == pytest.approx(first.ei_parts + second.ei_parts, rel=1e-12)
    assert rep.extra["samples"] == 6000 and rep.extra["converged"] is True


def test_columns_that_clash_with_a_row_s_own_fields_are_refused():
    from dataclasses import fields

    from foresight_sparse.measures import RESERVED

    own = {f.name for f in fields(fs.LayerReport)} | {f.name for f in fields(fs.history.Record)}
    assert own <= set(RESERVED)

    class Clash(WeightSum):
        columns = ("total", "kind")

    with pytest.raises(fs.UnknownNameError, match="kind would clash"):
        fs.plan(_mlp(), torch.zeros(1, 6), measure=Clash())


def test_get_measure_builds_each_registered_measure_with_its_defaults():
    assert get_measure("ei") is None and get_measure(None) is None
    assert get_measure("perturbation").name == "perturbation"
    assert get_measure("svd").name == "svd"
    measure = WeightSum()
    assert get_measure(measure) is measure


def test_the_tracker_records_a_measure_and_draws_its_causal_plane(tmp_path):
    pytest.importorskip("matplotlib")
    model = _mlp()
    measure = Perturbation(samples=1000, in_bins=8, out_bins=8, sensitivity_samples=100)
    tracker = fs.Tracker(model, torch.zeros(1, 6), every=1, measure=measure)
    tracker.step(0)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    tracker.step(1)
    hist = tracker.history
    assert hist.meta["measure"] == "perturbation"
    series = hist.series()
    assert len(series["sensitivity"]) == 2 and series["sensitivity"][0] != series["sensitivity"][1]
    assert series["determinism"] == [None, None]
    hist.plot(tmp_path / "plane.png", kind="plane")
    hist.plot(tmp_path / "layers.png")
    assert (tmp_path / "plane.png").stat().st_size > 0


def test_a_sweep_writes_the_measure_columns_and_will_not_resume_another(tmp_path):
    model = _mlp()
    for step in (1, 2):
        torch.save({k: v * step for k, v in model.state_dict().items()}, tmp_path / f"s{step}.pt")
    out = tmp_path / "sweep.csv"
    measure = Perturbation(samples=500, in_bins=4, out_bins=4, sensitivity_samples=50)
    res = fs.sweep(
        model,
        [tmp_path / "s1.pt", tmp_path / "s2.pt"],
        torch.zeros(1, 6),
        measure=measure,
        output=out,
    )
    assert res.history.columns == Perturbation.columns
    back = History.from_csv(out)
    assert back == res.history
    assert [r.extra["samples"] for r in back if r.kind == "network"] == [1000, 1000]
    with pytest.raises(HistoryFileError, match="measure"):
        fs.sweep(model, [tmp_path / "s1.pt"], torch.zeros(1, 6), output=out, resume=True)


def test_the_command_line_computes_a_measure_and_its_settings(tmp_path, capsys):
    path = tmp_path / "r.json"
    code = main(
        [
            "ei",
            "tests._cli_models:tiny_cnn",
            "--input-shape",
            "1,3,8,8",
            "--measure",
            "perturbation",
            "--measure-arg",
            "samples=400",
            "--measure-arg",
            "in_range=[0, 1]",
            "--measure-arg",
            "in_bins=4",
            "--measure-arg",
            "out_bins=4",
            "--json",
            str(path),
            "--no-progress",
        ]
    )
    assert code == 0
    rep = fs.Report.load(path)
    assert rep.measure == "perturbation"
    assert rep.settings["samples"] == 400 and rep.settings["in_range"] == [0.0, 1.0]
    assert "measure perturbation" in capsys.readouterr().out
    for args, message in (
        (["--measure-arg", "samples=4"], "give --measure too"),
        (["--measure", "perturbation", "--measure-arg", "nonsense"], "KEY=VALUE"),
        (["--measure", "perturbation", "--measure-arg", "bins=4"], "no such setting"),
    ):
        code = main(["ei", "tests._cli_models:tiny_cnn", "--input-shape", "1,3,8,8", *args])
        assert code == 2
        assert message in capsys.readouterr().err


def test_svd_through_a_plan_a_history_a_plot_and_the_command_line(tmp_path, capsys):
    from foresight_sparse import svd

    model = _mlp()
    measure = svd.Reversibility(alpha=0.5)
    p = fs.plan(model, torch.zeros(1, 6), measure=measure, norm="soft")
    rep = p.report()
    for lay, layer_module in zip(rep.layers, (model[0], model[2])):
        want = svd.layer_spectrum(layer_module, "soft", alpha=0.5, in_shape=(1, lay.n_in))
        assert lay.extra["gamma_alpha"] == pytest.approx(want.gamma_alpha, rel=1e-12)
        assert lay.extra["method"] == "dense" and isinstance(lay.extra["r_eps"], int)
        assert lay.ei is None and lay.mean_row_entropy is None
    assert rep.extra["n"] == 6 + 4
    assert rep.extra["gamma_alpha"] == pytest.approx(
        sum(lay.extra["gamma_alpha"] for lay in rep.layers)
    )
    table = rep.table()
    assert "gamma_alpha_r" in table and " EI " not in table
    assert fs.Report.from_dict(json.loads(json.dumps(rep.to_dict()))) == rep

    hist = History(meta=p.settings.metadata())
    hist.add_report(rep, "a", step=1)
    hist.to_csv(tmp_path / "h.csv", columns=p.columns)
    back = History.from_csv(tmp_path / "h.csv")
    assert back == hist and back.columns == svd.Reversibility.columns
    assert isinstance(back.records[0].extra["r_eps"], int)
    assert back.records[0].extra["method"] == "dense"
    pytest.importorskip("matplotlib")
    hist.plot(tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 0
    with pytest.raises(ValueError, match="kind='layers'"):
        hist.plot(tmp_path / "plane.png", kind="plane")

    path = tmp_path / "r.json"
    args = ["ei", "tests._cli_models:tiny_cnn", "--input-shape", "1,3,8,8", "--no-progress"]
    code = main([*args, "--measure", "svd", "--measure-arg", "alpha=1.5", "--json", str(path)])
    assert code == 0
    assert "measure svd" in capsys.readouterr().out
    assert fs.Report.load(path).settings["alpha"] == 1.5
    code = main([*args, "--measure", "svd", "--measure-arg", "alpha=3"])
    assert code == 2 and "outside (0, 2)" in capsys.readouterr().err
