"""The SVD measure (foresight_sparse.svd): each method on one convolution and one Linear layer.

The smoke run (``--benchmark-disable``) takes layers small enough for a dense SVD in well
under a second; the full run takes a 32x32 VGG-style convolution (64 -> 64 channels: a
65536 x 65536 matrix, SLQ only) and a 4096 x 4096 Linear layer (Gram and SLQ). Every value
is checked, so a broken benchmark fails: exact methods against each other to 1e-9, SLQ
within five of its standard errors of the exact value where that is known.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from foresight_sparse import svd


def _layer(kind: str, smoke: bool):
    torch.manual_seed(0)
    if kind == "conv":
        size, ch = (8, 8) if smoke else (32, 64)
        return nn.Conv2d(ch, ch, 3, padding=1), (1, ch, size, size)
    n = 256 if smoke else 4096
    return nn.Linear(n, n), (1, n)


@pytest.mark.parametrize("method", ["dense", "gram", "slq"])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_layer_spectrum(benchmark, smoke, kind, method):
    module, in_shape = _layer(kind, smoke)
    exact_ok = smoke or (kind == "linear" and method != "dense")
    if not exact_ok and method != "slq":
        pytest.skip("too large for an exact SVD outside the smoke run")

    def run():
        return svd.layer_spectrum(module, "lin", in_shape=in_shape, method=method)

    spec = benchmark.pedantic(run, rounds=1 if smoke else 3, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(
        gamma_alpha=spec.gamma_alpha, stderr=spec.stderr, probes=spec.probes, n=spec.n
    )
    assert spec.method == method
    if smoke or kind == "linear":
        exact = svd.layer_spectrum(
            module, "lin", in_shape=in_shape, method="dense" if smoke else "gram"
        )
        if method == "slq":
            assert abs(spec.gamma_alpha - exact.gamma_alpha) <= 5 * spec.stderr
        else:
            assert spec.gamma_alpha == pytest.approx(exact.gamma_alpha, rel=1e-9)
