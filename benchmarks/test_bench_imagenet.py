"""ImageNet CNNs at 1x3x224x224: EI time against one forward pass, peak memory, values."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import foresight_sparse

from .conftest import machine, median_time
from .nets import imagenet

NETS = ["vgg16", "resnet50", "alexnet"]


#: Smallest inputs each network accepts, for the smoke run.
SMOKE_SIZE = {"vgg16": 32, "resnet50": 32, "alexnet": 64}


#: (determinism, degeneracy, EI) per (network, size, engine, device): a benchmark's own
#: result or a check's, so that no engine runs twice on one network for the checks.
_VALUES: dict[tuple[str, int, str, str], tuple[float, float, float]] = {}


def _quiet_report(*args, **kwargs) -> foresight_sparse.Report:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # BatchNorm2d, MaxPool2d are skipped
        return foresight_sparse.report(*args, **kwargs)


def _values(rep) -> tuple[float, float, float]:
    return rep.determinism, rep.degeneracy, rep.ei


def _run(benchmark, smoke, peak_rss, name, engine, device, rounds):
    size = SMOKE_SIZE[name] if smoke else 224
    model = imagenet(name).to(device)
    x = torch.zeros(1, 3, size, size, device=device)

    def forward():
        with torch.no_grad():
            model(x)
        if device == "cuda":
            torch.cuda.synchronize()

    def ei():
        r = _quiet_report(model, x, engine=engine, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        return r

    fwd = median_time(forward, repeat=1 if smoke else 5)
    rep = benchmark.pedantic(ei, rounds=1 if smoke else rounds, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.median if benchmark.stats else float("nan")
    # a broken benchmark fails: its value against another engine, each of them held to the
    # dense reference in tests/ (the networks are too large for it): the sparse benchmark
    # against the implicit engine, and the others, at the smoke size, against the sparse one
    # (which takes minutes at 224)
    _VALUES[name, size, engine, device] = _values(rep)
    if smoke or engine == "sparse":
        other = (name, size, "implicit" if engine == "sparse" else "sparse", device)
        if other not in _VALUES:
            _VALUES[other] = _values(_quiet_report(model, x, engine=other[2], device=device))
        for what, got, want in zip(
            ("determinism", "degeneracy", "ei"), _values(rep), _VALUES[other]
        ):
            assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12), (what, got, want)
    benchmark.extra_info.update(
        machine(),
        net=name,
        engine=engine,
        device=device,
        input=[1, 3, size, size],
        forward_s=fwd,
        ei_s=seconds,
        ratio=seconds / fwd,
        peak_rss=peak_rss(),
        nnz=rep.nnz,
        ei=rep.ei,
        determinism=rep.determinism,
        degeneracy=rep.degeneracy,
        layers=[
            {
                "name": lay.name,
                "type": lay.type,
                "engine": lay.engine,
                "seconds": lay.seconds,
                "nnz": lay.nnz,
            }
            for lay in rep.layers
        ],
    )


def test_vgg16_sparse_cpu(benchmark, smoke, peak_rss):
    """The sparse engine streams all 15e9 entries of VGG-16 (minutes on 2 cores). First in
    the file: at the smoke size its value is the check of the default engine's."""
    _run(benchmark, smoke, peak_rss, "vgg16", "sparse", "cpu", rounds=1)


@pytest.mark.parametrize("name", NETS)
def test_imagenet_auto_cpu(benchmark, smoke, peak_rss, name):
    """The default engine on the CPU, against one forward pass in the same process."""
    _run(benchmark, smoke, peak_rss, name, "auto", "cpu", rounds=5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NETS)
def test_imagenet_auto_cuda(benchmark, smoke, peak_rss, name):
    _run(benchmark, smoke, peak_rss, name, "auto", "cuda", rounds=20)
