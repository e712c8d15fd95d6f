"""``layers="all"``: the torchvision video models, and classifiers with every layer counted.

The full run (``--benchmark-enable``) takes ``r3d_18``, ``mc3_18`` and ``r2plus1d_18`` at
1x3x16x112x112 and records ``report(layers="all")`` (trace included) against one forward
pass, best of several runs, with the peak RSS (target: at most 3x and 3 GiB each). The
smoke run, part of the test suite, takes them at 1x3x2x16x16 and checks the value against
the sparse engine's, and runs a few small classifiers with ``layers="all"`` at 64x64.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torchvision

import foresight_sparse

from .conftest import best_time, machine

VIDEO = ["r3d_18", "mc3_18", "r2plus1d_18"]

#: Classifiers of the smoke run with every layer counted: the global pool
#: (AdaptiveAvgPool2d) and zoo subclasses among their layers.
ZOO_SMOKE = ["mobilenet_v3_small", "squeezenet1_1", "resnet18", "googlenet"]


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


@pytest.mark.parametrize("name", VIDEO)
def test_video(benchmark, smoke, peak_rss, name):
    shape = (1, 3, 2, 16, 16) if smoke else (1, 3, 16, 112, 112)
    model = build(name)
    x = torch.zeros(shape)

    def forward():
        with torch.no_grad():
            model(x)

    fwd = best_time(forward, repeat=1 if smoke else 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # BatchNorm3d and friends are skipped

        def report():
            return foresight_sparse.report(model, x, layers="all")

        rep = benchmark.pedantic(report, rounds=1 if smoke else 3, iterations=1, warmup_rounds=1)
        report_s = benchmark.stats.stats.min if benchmark.stats else float("nan")
        seed = foresight_sparse.report(model, x)
        if smoke:  # a broken benchmark fails: the value against the sparse engine's
            sparse = foresight_sparse.report(model, x, layers="all", engine="sparse")
            assert math.isclose(rep.ei, sparse.ei, rel_tol=1e-9, abs_tol=1e-12)
    counted = {lay.type for lay in rep.layers}
    assert {"AdaptiveAvgPool3d", "Linear"} <= counted
    assert any("Conv3" in t for t in counted)
    assert [lay.type for lay in seed.layers] == ["Linear"]  # the old module's view
    assert math.isfinite(rep.ei) and rep.ei != seed.ei
    benchmark.extra_info.update(
        machine(),
        video=name,
        input=list(shape),
        forward_s=fwd,
        report_s=report_s,
        report_ratio=report_s / fwd,
        layers=len(rep.layers),
        peak_rss=peak_rss(),
        nnz=rep.nnz,
        ei=rep.ei,
        engines=sorted({lay.engine for lay in rep.layers}),
    )


@pytest.mark.parametrize("name", ZOO_SMOKE)
def test_zoo_all_layers_smoke(name):
    model = build(name)
    x = torch.zeros(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        seed = foresight_sparse.report(model, x)
        rep = foresight_sparse.report(model, x, layers="all")
    assert len(rep.layers) > len(seed.layers)
    assert "AdaptiveAvgPool2d" in {lay.type for lay in rep.layers}
    assert math.isfinite(rep.ei)
