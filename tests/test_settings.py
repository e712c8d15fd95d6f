"""One Settings object: every entry point takes the same options with the same defaults,
checked once; plans carry it; reports are built from a per-layer step and an accumulator."""

from __future__ import annotations

import dataclasses
import inspect
import json
import warnings

import pytest
import torch
from torch import nn

import foresight_sparse as fs
from foresight_sparse.cli import build_parser
from foresight_sparse.exceptions import OptionError
from foresight_sparse.norms import get_norm
from foresight_sparse.plans import Totals
from foresight_sparse.settings import OPTIONS, Settings
from foresight_sparse.tracking import Tracker

DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(Settings.make).parameters.items()
    if p.kind is p.KEYWORD_ONLY
}


def _entry_point(name):
    if name == "EICallback":
        lightning = pytest.importorskip("foresight_sparse.integrations.lightning")
        return lightning.EICallback.__init__
    return {"plan": fs.plan, "report": fs.report, "sweep": fs.sweep, "Tracker": Tracker.__init__}[
        name
    ]


def test_options_are_the_settings_fields():
    assert tuple(DEFAULTS) == OPTIONS


@pytest.mark.parametrize("name", ["plan", "report", "sweep", "Tracker", "EICallback"])
def test_every_entry_point_takes_every_option_with_the_same_default(name):
    params = inspect.signature(_entry_point(name)).parameters
    missing = [o for o in OPTIONS if o not in params]
    assert not missing, f"{name} lacks {missing}"
    differ = {o: params[o].default for o in OPTIONS if params[o].default is not DEFAULTS[o]}
    differ = {o: d for o, d in differ.items() if d != DEFAULTS[o]}
    assert not differ, f"{name}'s defaults differ from Settings.make's: {differ}"


def test_the_command_line_has_a_flag_per_option_with_the_library_default():
    parser = build_parser()
    for command in (["ei", "resnet18"], ["layers", "resnet18"], ["sweep", "resnet18", "x.pt"]):
        args = parser.parse_args(command)
        for option in OPTIONS:
            assert hasattr(args, option), f"{command[0]} has no --{option.replace('_', '-')}"
            if option in ("norm", "device", "measure"):  # flags take the names
                continue
            assert getattr(args, option) == DEFAULTS[option], option
        assert args.norm == "lin" and get_norm(args.norm) is DEFAULTS["norm"]
        assert args.device == DEFAULTS["device"] and args.measure == DEFAULTS["measure"]


def test_settings_are_frozen_and_resolved():
    s = Settings.make(norm="soft", max_memory="64MiB", layers="all")
    assert s.norm is fs.soft_norm and s.max_memory == 64 << 20 and s.layers == "all"
    assert s.device == torch.device("cpu") and s.measure is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.engine = "dense"
    t = s.replace(engine="sparse")
    assert t.engine == "sparse" and s.engine == "auto" and t.norm is fs.soft_norm
    with pytest.raises(OptionError, match="unknown option"):
        s.replace(enigne="sparse")


@pytest.mark.parametrize(
    "options, error, param",
    [
        ({"legacy": "yes"}, OptionError, "legacy"),
        ({"skipped": "quiet"}, OptionError, "skipped"),
        ({"engine": "fast"}, fs.UnknownNameError, None),
        ({"backend": "numba", "norm": lambda x: x}, fs.UnsupportedEngineError, None),
        ({"max_memory": -1}, ValueError, None),
        ({"convention": "graph", "measure": "svd"}, fs.UnknownNameError, "convention"),
    ],
)
def test_settings_refuse_bad_options_and_name_the_option(options, error, param):
    with pytest.raises(error) as info:
        Settings.make(**options)
    if param is not None:
        assert info.value.param == param
        assert param in str(info.value)


def test_plan_carries_its_settings_and_their_metadata():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    p = fs.plan(model, torch.zeros(1, 4), norm="sig", engine="sparse", skipped="ignore")
    assert p.settings.norm is fs.sig_norm and p.norm is fs.sig_norm
    assert p.engine == "sparse" and p.settings.skipped == "ignore"
    meta = p.settings.metadata()
    assert json.loads(json.dumps(meta)) == meta
    assert meta["norm"] == "sig" and meta["layers"] == "seed"
    rep = p.report()
    assert (rep.norm, rep.engine, rep.max_memory) == ("sig", "sparse", p.settings.max_memory)
    tracker = Tracker(model, torch.zeros(1, 4), norm="sig", engine="sparse", skipped="ignore")
    assert {k: tracker.history.meta[k] for k in meta} == meta


def test_skipped_ignore_silences_only_the_skipped_layer_warning():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.BatchNorm1d(3), nn.Linear(3, 2))
    x = torch.zeros(2, 4)
    with pytest.warns(UserWarning, match="skipped layers"):
        fs.plan(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = fs.plan(model, x, skipped="ignore")
    assert [t for _, t in p.skipped] == ["ReLU", "BatchNorm1d"]


def test_report_lets_a_user_builders_warning_through():
    class Diag(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.scale = nn.Parameter(torch.rand(n))

        def forward(self, x):
            return x * self.scale

    def builder(module, in_shape, out_shape, *, legacy=False, label=None):
        warnings.warn("Diag builder: scale read as stored", UserWarning, stacklevel=2)
        return fs.ExplicitMatrix(label or "Diag", torch.diag(module.scale.detach()))

    fs.register(Diag, builder)
    try:
        with pytest.warns(UserWarning, match="Diag builder"):  # planning builds it once
            p = fs.plan(nn.Sequential(Diag(4), nn.Linear(4, 3)), torch.zeros(1, 4))
        with pytest.warns(UserWarning, match="Diag builder"):
            p.report()
    finally:
        fs.unregister(Diag)


@pytest.mark.parametrize("options", [{}, {"convention": "graph"}, {"measure": "svd"}])
def test_report_is_its_layers_evaluated_and_accumulated(options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))
    p = fs.plan(model, torch.zeros(1, 2, 5, 5), **options)
    rep = p.report()
    totals = Totals(p)
    for layer in reversed(p.layers):  # any order: the totals are sums
        totals.add(p.evaluate_layer(layer))
    by_hand = totals.report(0.0)
    assert by_hand.ei == pytest.approx(rep.ei, rel=1e-12, abs=1e-12)
    assert by_hand.determinism == pytest.approx(rep.determinism, rel=1e-12, abs=1e-12)
    assert by_hand.extra.keys() == rep.extra.keys()
    assert sorted(r.name for r in by_hand.layers) == sorted(r.name for r in rep.layers)
    one = p.evaluate_layer(p.layers[0])
    assert one.row.ei == pytest.approx(rep.layers[0].ei, rel=1e-12, abs=1e-12)
