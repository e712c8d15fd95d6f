"""Every torchvision classification model: ``report()`` and ``Plan.report()`` against one
forward pass in the same process, each the best of several runs (3; 2 where the forward
pass takes over 2 s), since the machine may be shared.

The full run (``--benchmark-enable``) takes every model of
``torchvision.models.list_models(module=torchvision.models)`` at 1x3x224x224 (inception_v3 at
299); the smoke run, part of the test suite, takes a few small models at 64x64. Each case
records the forward pass, the trace, ``report()`` (trace included), ``Plan.report()`` of
another set of weights, the ratios, the number of layers and the peak RSS; it checks that the
meta-device and real traces agree and that the plan's result for the new weights equals
``report()`` of a model holding them.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import torch
import torchvision

import foresight_sparse
from foresight_sparse.tracing import trace

from .conftest import best_time, machine

#: Models of the smoke run: small, and covering depthwise, squeeze-excitation, grouped and
#: FC-heavy layers.
SMOKE = ["mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5", "resnet18", "alexnet"]

#: Inputs other than 224x224.
SIZES = {"inception_v3": 299}


def pytest_generate_tests(metafunc):  # pragma: no cover - collection hook
    if "zoo_model" in metafunc.fixturenames:
        opt = metafunc.config.getoption
        smoke = bool(opt("benchmark_disable")) and not bool(opt("benchmark_enable"))
        names = SMOKE if smoke else torchvision.models.list_models(module=torchvision.models)
        metafunc.parametrize("zoo_model", names)


def build(name: str) -> torch.nn.Module:
    """The model with random weights (seed 0), in eval mode."""
    torch.manual_seed(0)
    kwargs = (
        {"aux_logits": False, "init_weights": False}
        if name in ("inception_v3", "googlenet")
        else {}
    )
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def other_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict of the same architecture with every floating tensor perturbed (its
    ``_metadata`` kept: some models check their state-dict version when loading)."""
    gen = torch.Generator().manual_seed(1)
    sd = model.state_dict()
    out = OrderedDict(
        (
            k,
            v + 0.01 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
            if v.is_floating_point()
            else v,
        )
        for k, v in sd.items()
    )
    out._metadata = getattr(sd, "_metadata", None)
    return out


def _trace_key(tr):
    return [(la.name, la.in_shape, la.out_shape) for la in tr.layers], tr.skipped


def test_zoo(benchmark, smoke, peak_rss, zoo_model):
    name = zoo_model
    size = 64 if smoke else SIZES.get(name, 224)
    model = build(name)
    x = torch.zeros(1, 3, size, size)

    def forward():
        with torch.no_grad():
            model(x)

    fwd = best_time(forward, repeat=1 if smoke else 3)
    repeat = 1 if smoke else 2 if fwd > 2.0 else 3
    meta, real = (trace(model, x, method=m) for m in ("meta", "real"))
    assert _trace_key(meta) == _trace_key(real)
    trace_s = best_time(lambda: trace(model, x), repeat=repeat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the skipped-layers notice

        def report():
            return foresight_sparse.report(model, x)

        rep = benchmark.pedantic(report, rounds=repeat, iterations=1, warmup_rounds=1)
        report_s = benchmark.stats.stats.min if benchmark.stats else float("nan")
        plan = foresight_sparse.plan(model, x)
        sd = other_weights(model)
        new = plan.report(sd)
        plan_s = best_time(lambda: plan.report(sd), repeat=repeat)
    assert rep.ei == plan.report().ei
    # the plan's EI of new weights is that of a model holding them
    twin = build(name)
    twin.load_state_dict(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loaded = foresight_sparse.report(twin, x)
    assert math.isclose(new.ei, loaded.ei, rel_tol=1e-12, abs_tol=1e-12)
    if smoke:  # a broken benchmark fails: the value against the sparse engine's
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            sparse = foresight_sparse.report(model, x, engine="sparse")
        for what in ("determinism", "degeneracy", "ei"):
            got, want = getattr(rep, what), getattr(sparse, what)
            assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12), (what, got, want)
    benchmark.extra_info.update(
        machine(),
        zoo=name,
        input=[1, 3, size, size],
        forward_s=fwd,
        trace_s=trace_s,
        trace_ratio=trace_s / fwd,
        report_s=report_s,
        plan_report_s=plan_s,
        report_ratio=report_s / fwd,
        plan_ratio=plan_s / fwd,
        layers=len(rep.layers),
        peak_rss=peak_rss(),
        nnz=rep.nnz,
        ei=rep.ei,
        engines=sorted({lay.engine for lay in rep.layers}),
    )
