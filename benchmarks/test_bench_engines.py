"""Every engine against the dense reference on networks the reference can hold."""

from __future__ import annotations

import math

import pytest
import torch

import foresight_sparse
from foresight_sparse import reference

from .conftest import machine
from .nets import SMALL


@pytest.mark.parametrize("net", sorted(SMALL))
@pytest.mark.parametrize("engine", ["reference", "dense", "sparse", "implicit", "auto"])
def test_small_network(benchmark, smoke, peak_rss, net, engine):
    if smoke and engine in ("reference", "dense") and net != "lenet5":
        pytest.skip("smoke run: the dense baselines run on LeNet-5 only (20 s each here)")
    build, shape = SMALL[net]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.zeros(shape)
    if engine == "reference":

        def run():
            return reference.ei(model, x)
    else:

        def run():
            return foresight_sparse.report(model, x, engine=engine).ei

    value = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    rep = foresight_sparse.report(model, x, engine="sparse")
    # a broken benchmark fails: every engine's value against the dense reference where the
    # run affords it (always outside the smoke run; LeNet-5 in it), else the sparse engine
    oracle = reference.ei(model, x) if net == "lenet5" or not smoke else rep.ei
    assert math.isclose(value, oracle, rel_tol=1e-9, abs_tol=1e-12), (engine, value, oracle)
    benchmark.extra_info.update(
        machine(), net=net, engine=engine, ei=value, nnz=rep.nnz, peak_rss=peak_rss(), device="cpu"
    )
