"""Every engine against the dense reference on networks the reference can hold.

The smoke run takes the CIFAR CNN at 16x16 (nets.SMOKE), where the dense baselines take
about a second; every engine's value, the baselines' included, must equal the dense
reference's in both runs, so a broken benchmark fails the test suite.
"""

from __future__ import annotations

import math

import pytest
import torch

import foresight_sparse
from foresight_sparse import reference

from .conftest import machine
from .nets import SMALL, SMOKE


def _model(net: str, smoke: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    build, shape = (SMOKE if smoke else SMALL)[net]
    torch.manual_seed(0)
    return build().eval(), torch.zeros(shape)


#: The dense reference's EI per (network, smoke), from its own benchmark when that ran first.
_REFERENCE_EI: dict[tuple[str, bool], float] = {}


def _reference_ei(net: str, smoke: bool) -> float:
    if (net, smoke) not in _REFERENCE_EI:
        _REFERENCE_EI[net, smoke] = reference.ei(*_model(net, smoke))
    return _REFERENCE_EI[net, smoke]


@pytest.mark.parametrize("net", sorted(SMALL))
@pytest.mark.parametrize("engine", ["reference", "dense", "sparse", "implicit", "auto"])
def test_small_network(benchmark, smoke, peak_rss, net, engine):
    model, x = _model(net, smoke)
    if engine == "reference":

        def run():
            return reference.ei(model, x)
    else:

        def run():
            return foresight_sparse.report(model, x, engine=engine).ei

    value = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    rep = foresight_sparse.report(model, x, engine="sparse")
    # a broken benchmark fails: every engine's value against the dense reference, and the
    # reference's against the sparse engine
    if engine == "reference":
        oracle = rep.ei
        _REFERENCE_EI[net, smoke] = value
    else:
        oracle = _reference_ei(net, smoke)
    assert math.isclose(value, oracle, rel_tol=1e-9, abs_tol=1e-12), (engine, value, oracle)
    benchmark.extra_info.update(
        machine(), net=net, engine=engine, ei=value, nnz=rep.nnz, peak_rss=peak_rss(), device="cpu"
    )
