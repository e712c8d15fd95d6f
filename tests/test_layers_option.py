"""``layers=``: which module types count ('seed', 'all', a sequence), one registry for all.

The expected numbers come from the dense reference on an equivalent model made of the
built-in types alone (a subclass that inherits ``forward`` has the connectivity of its base).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import ENGINE_RTOL, F64, assert_close, examples, quiet, random_nets, randomize_
from hypothesis import given, settings
from torch import nn

import foresight_sparse as fs
from foresight_sparse import connectivity as C
from foresight_sparse import ei
from foresight_sparse import reference as R
from foresight_sparse.cli import main


class MyLinear(nn.Linear):
    """A zoo-style subclass that inherits forward: its weight is its connectivity."""


class ScaledConv(nn.Conv2d):
    """A subclass whose forward rescales its weight: .weight is not its connectivity."""

    def forward(self, x):
        return self._conv_forward(x, self.weight * 2.0, self.bias)


class StandardisedConv(nn.Conv2d):
    """Overrides only _conv_forward (as weight-standardised convolutions may)."""

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight - weight.mean(), bias)


def sub_model() -> nn.Sequential:
    """Conv2d, a ScaledConv, a MyLinear and a Linear (also used by the CLI test)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        ScaledConv(2, 2, 3),
        nn.Flatten(),
        MyLinear(18, 4),
        nn.ReLU(),
        nn.Linear(4, 3),
    ).double()


def plain_twin(model: nn.Sequential, keep) -> nn.Sequential:
    """``model`` with each MyLinear replaced by an nn.Linear holding the same weights and
    every layer not in ``keep`` (indices) replaced by an identity-shaped placeholder that
    the reference skips."""
    layers = []
    for i, m in enumerate(model):
        if isinstance(m, MyLinear) and i in keep:
            lin = nn.Linear(m.in_features, m.out_features).double()
            lin.load_state_dict(m.state_dict())
            layers.append(lin)
        elif i in keep or not isinstance(m, (nn.Linear, nn.Conv2d)):
            layers.append(m)
        else:
            layers.append(_Opaque(m))
    return nn.Sequential(*layers)


class _Opaque(nn.Module):
    """Runs a module under a type the reference does not count."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


X = torch.zeros(1, 1, 5, 5, dtype=F64)


@pytest.mark.parametrize("norm", ["lin", "soft", "sig", None])
def test_linear_subclass_counts_under_all_and_not_by_default(norm):
    model = sub_model()
    ref_norm = {"lin": R.lin_norm, "soft": R.soft_norm, "sig": R.sig_norm, None: None}[norm]
    default = quiet(fs.report, model, X, norm=norm)
    assert [lay.type for lay in default.layers] == ["Conv2d", "Linear"]
    assert ("4", "MyLinear") in default.skipped
    expected = R.ei(plain_twin(model, keep={0, 6}), X, norm=ref_norm)
    assert_close(default.ei, expected, ENGINE_RTOL["auto"], what="seed")
    everything = quiet(fs.report, model, X, norm=norm, layers="all")
    assert [lay.type for lay in everything.layers] == ["Conv2d", "MyLinear", "Linear"]
    expected_all = R.ei(plain_twin(model, keep={0, 4, 6}), X, norm=ref_norm)
    assert_close(everything.ei, expected_all, ENGINE_RTOL["auto"], what="all")
    assert abs(everything.ei - default.ei) > 1e-6  # the subclass makes a difference


def test_subclass_with_own_forward_is_skipped_with_one_warning_naming_it():
    model = sub_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = fs.report(model, X, layers="all")
    named = [w for w in caught if "ScaledConv" in str(w.message)]
    assert len(named) == 1, [str(w.message) for w in caught]
    message = str(named[0].message)
    assert "foresight_sparse.register(ScaledConv" in message and "forward" in message
    assert named[0].filename == __file__  # points at the caller's line
    assert "ScaledConv" not in [lay.type for lay in rep.layers]
    assert ("2", "ScaledConv") in rep.skipped


def test_overriding_conv_forward_also_counts_as_own_forward():
    torch.manual_seed(1)
    model = nn.Sequential(StandardisedConv(1, 2, 3), nn.Flatten(), nn.Linear(18, 2)).double()
    with pytest.warns(UserWarning, match="StandardisedConv"):
        rep = fs.report(model, X, layers="all")
    assert [lay.type for lay in rep.layers] == ["Linear"]


def test_registered_type_counts_whatever_layers_says():
    model = sub_model()
    fs.register(ScaledConv, C.conv2d)
    try:
        for layers in ("seed", "all", [nn.Linear]):
            rep = quiet(fs.report, model, X, layers=layers)
            assert "ScaledConv" in [lay.type for lay in rep.layers], layers
    finally:
        fs.unregister(ScaledConv)
    assert ScaledConv not in C.REGISTRY


def test_sequence_of_types_counts_exactly_those():
    model = sub_model()
    rep = quiet(fs.report, model, X, layers=[MyLinear, nn.Conv2d])
    assert [lay.type for lay in rep.layers] == ["Conv2d", "MyLinear"]
    p = quiet(fs.plan, model, X, layers=(nn.Linear,))
    assert [lay.type for lay in p.layers] == ["Linear"]
    assert p.layer_set == (nn.Linear,)


def test_bad_layers_values_are_refused_with_the_choices():
    with pytest.raises(fs.UnknownNameError, match="'seed'.*'all'"):
        fs.plan(sub_model(), X, layers="everything")
    with pytest.raises(fs.UnsupportedLayerError, match=r"ScaledConv.*register"):
        fs.plan(sub_model(), X, layers=[ScaledConv])
    with pytest.raises(fs.UnsupportedLayerError, match="ReLU"):
        fs.plan(sub_model(), X, layers=[nn.ReLU])
    with pytest.raises(fs.UnknownNameError):
        fs.plan(sub_model(), X, layers=3)


def test_dropin_keeps_the_seed_types():
    model = sub_model()
    value = quiet(ei.ei, model, X)
    shapes = quiet(ei.get_shapes, model, X)
    assert [type(m) for m in shapes] == [nn.Conv2d, nn.Linear]
    assert value == quiet(fs.report, model, X, layers="seed").ei
    assert set(ei.VALID_MODULES) == {nn.Linear, nn.Conv2d, nn.AvgPool2d}
    for t in C.EXTENDED:
        assert t not in ei.VALID_MODULES
        with pytest.raises(KeyError):
            ei.VALID_MODULES[t]


@settings(max_examples=examples(10))
@given(net=random_nets())
def test_seed_results_are_todays(net):
    # 'seed' is the default, and both equal the reference (which knows only the seed types)
    a = quiet(fs.report, net.model, net.input)
    b = quiet(fs.report, net.model, net.input, layers="seed")
    assert (a.determinism, a.degeneracy, a.ei) == (b.determinism, b.degeneracy, b.ei)
    assert_close(b.ei, R.ei(net.model, net.input), ENGINE_RTOL["auto"], what="seed")
    # on networks of built-in seed types alone, 'all' counts the same layers
    c = quiet(fs.report, net.model, net.input, layers="all")
    assert [lay.name for lay in c.layers] == [lay.name for lay in b.layers]
    assert c.ei == b.ei


def test_cli_layers_option(capsys):
    argv = ["layers", "test_layers_option:sub_model", "--input-shape", "1,1,5,5"]
    assert quiet(main, argv) == 0
    seed_out = capsys.readouterr().out
    assert quiet(main, argv + ["--layers", "all"]) == 0
    all_out = capsys.readouterr().out
    assert quiet(main, ["ei", *argv[1:], "--layers", "all", "--quiet"]) == 0
    ei_out = capsys.readouterr().out
    assert "MyLinear" not in seed_out.split("skipped")[0]
    assert "MyLinear" in all_out.split("skipped")[0]
    model = sub_model()
    rep = quiet(fs.report, model, torch.zeros(1, 1, 5, 5), layers="all")
    assert f"{rep.ei:.6f}"[:6] in ei_out


def test_layer_selection_is_picklable():
    import pickle

    p = fs.plan(randomize_(nn.Sequential(MyLinear(3, 2)), 0), torch.zeros(1, 3), layers="all")
    q = pickle.loads(pickle.dumps(p))
    assert q.layer_set == "all"
    assert q.report().ei == p.report().ei


# --------------------------------------------------------------------------- tracker, sweeps


def test_tracker_counts_what_layers_selects():
    model = sub_model()
    tracker = quiet(fs.Tracker, model, X, every=1, layers="all")
    default = quiet(fs.Tracker, model, X, every=1)
    rep = tracker.step(0)
    assert [lay.type for lay in rep.layers] == ["Conv2d", "MyLinear", "Linear"]
    assert rep.ei == quiet(fs.report, model, X, layers="all").ei
    assert tracker.history.meta["layers"] == "all"
    assert [lay.type for lay in default.step(0).layers] == ["Conv2d", "Linear"]
    assert default.history.meta["layers"] == "seed"


def test_sweep_counts_what_layers_selects_and_resume_checks_it(tmp_path):
    paths = []
    for i in range(2):
        m = randomize_(sub_model(), 10 + i)
        path = tmp_path / f"step={i}.pt"
        torch.save(m.state_dict(), path)
        paths.append((path, m))
    out = tmp_path / "ei.csv"
    res = quiet(fs.sweep, sub_model(), [p for p, _ in paths], X, layers="all", output=out)
    assert res.ok
    nets = [r for r in res.history.records if r.kind == "network"]
    for rec, (_, m) in zip(nets, paths):
        expected = quiet(fs.report, m, X, layers="all").ei
        assert abs(rec.ei - expected) <= 1e-12 * max(1.0, abs(expected))
    assert {r.type for r in res.history.records if r.kind == "layer"} == {
        "Conv2d",
        "MyLinear",
        "Linear",
    }
    with pytest.raises(fs.exceptions.HistoryFileError, match="layers"):
        quiet(fs.sweep, sub_model(), [p for p, _ in paths], X, output=out, resume=True)


def test_cli_sweep_layers_option(tmp_path, capsys):
    m = randomize_(sub_model(), 5)
    torch.save(m.state_dict(), tmp_path / "step=1.pt")
    assert (
        quiet(
            main,
            [
                "sweep",
                "test_layers_option:sub_model",
                str(tmp_path / "step=1.pt"),
                "--input-shape",
                "1,1,5,5",
                "--layers",
                "all",
                "--no-progress",
                "--csv",
                str(tmp_path / "ei.csv"),
            ],
        )
        == 0
    )
    out = capsys.readouterr().out
    expected = quiet(fs.report, m, X, layers="all").ei
    assert f"{expected:.4f}"[:5] in out
    assert "layers: all" in (tmp_path / "ei.csv").read_text()
