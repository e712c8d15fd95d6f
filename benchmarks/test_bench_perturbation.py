"""ei_parts of deep-ei's 100-30-30-30-10 Sigmoid MLP: ours against deep-ei's.

In CI (``--benchmark-disable``) each case runs once on 2000 samples. Measure with
``python -m pytest benchmarks/test_bench_perturbation.py --benchmark-enable`` and
``PERTURBATION_SAMPLES=1000000`` (deep-ei takes minutes there; see docs/perturbation.rst).
"""

from __future__ import annotations

import os

import pytest
from torch import nn

from benchmarks._deep_ei_net import mlp, topology
from foresight_sparse.perturbation import ei_parts

SAMPLES = int(os.environ.get("PERTURBATION_SAMPLES", "2000"))
OPTIONS = dict(in_range=(0.0, 1.0), out_range=(0.0, 1.0), in_bins=64, out_bins=64)


def _ours(net):
    total = 0.0
    for i, m in enumerate(net):
        if isinstance(m, nn.Linear):
            r = ei_parts(m, (m.in_features,), activation=net[i + 1], samples=SAMPLES, **OPTIONS)
            total += r.ei_parts
    return total


def _deep_ei(deep_ei, net, graph):
    return sum(
        deep_ei.ei_parts(m, graph, samples=SAMPLES, **OPTIONS)
        for m in net
        if isinstance(m, nn.Linear)
    )


def test_ours(benchmark):
    net = mlp(0)
    _ours(net)  # compile the kernels before timing
    value = benchmark(_ours, net)
    assert value > 0


def test_deep_ei(benchmark):
    deep_ei = pytest.importorskip("deep_ei")
    pytest.importorskip("networkx")
    net = mlp(0)
    value = benchmark(_deep_ei, deep_ei, net, topology(net))
    # the same estimator on other noise: close to ours (deep-ei clamps sums below 0.01)
    assert value == pytest.approx(_ours(net), rel=0.05)
