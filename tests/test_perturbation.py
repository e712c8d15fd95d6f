"""The perturbation measure against independent computations on the same samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from foresight_sparse.exceptions import (
    MeasureSettingsError,
    MemoryBudgetError,
    NonFiniteWeightsError,
    UnsupportedLayerError,
)
from foresight_sparse.perturbation import (
    Perturbation,
    _kernels,
    bin_indices,
    noise,
    pairwise_mi,
    perturb_layer,
    sensitivity,
)
from foresight_sparse.perturbation.estimator import _has_converged
from foresight_sparse.settings import get_measure


def hand_mi(x: np.ndarray, y: np.ndarray, bins, ranges) -> float:
    """Plug-in MI in bits from numpy.histogram2d, written out (the oracle)."""
    h, _, _ = np.histogram2d(x, y, bins=bins, range=ranges)
    n = h.sum()
    if n == 0:
        return 0.0
    p = h / n
    px = p.sum(1)
    py = p.sum(0)
    total = 0.0
    for i in range(p.shape[0]):
        for j in range(p.shape[1]):
            if p[i, j] > 0:
                total += p[i, j] * math.log2(p[i, j] / (px[i] * py[j]))
    return total


def _linear(n_in=5, n_out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out)


def test_pairwise_mi_matches_numpy_histogram2d():
    m = _linear()
    m.bias.data += 0.5  # some outputs leave out_range: dropped, as numpy drops them
    kw = dict(activation=None, in_range=(0.0, 1.0), out_range=(-0.5, 0.8), in_bins=6, out_bins=7)
    rows, cols, mi = pairwise_mi(m, (5,), 2000, **kw)
    x = noise((5,), 0, 2000, in_range=(0.0, 1.0))
    with torch.no_grad():
        y = m(x)
    assert ((y < -0.5) | (y > 0.8)).any()  # the drop is exercised
    ref = [
        hand_mi(x[:, a].numpy(), y[:, b].numpy(), (6, 7), ((0.0, 1.0), (-0.5, 0.8)))
        for a, b in zip(rows, cols)
    ]
    assert len(mi) == 15
    np.testing.assert_allclose(mi, ref, rtol=1e-10, atol=1e-12)


def test_bins_are_numpy_bins_at_the_edges():
    edges = np.linspace(-1.0, 2.0, 8)
    v = np.concatenate([edges, np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf)])
    v = np.concatenate([v, [np.nan, -5.0, 5.0]]).astype(np.float64)
    ours = bin_indices(torch.from_numpy(v), (-1.0, 2.0), 7).numpy()
    idx = np.searchsorted(edges, v, side="right") - 1
    idx[v == edges[-1]] = 6
    idx[(v < -1.0) | (v > 2.0) | np.isnan(v)] = -1
    np.testing.assert_array_equal(ours, idx)
    kern = np.empty((1, len(v)), dtype=np.int16)
    _kernels.bin_values(v[None, :], edges, kern)
    np.testing.assert_array_equal(kern[0], idx)


def test_independent_pair_gives_bias_only():
    # Linear with a zero weight column entry: y_0 does not depend on x_0
    m = nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[0.0, 1.0]]))
        m.bias.zero_()
    _, _, mi = pairwise_mi(
        m, (2,), 20000, in_range=(0.0, 1.0), out_range=(0.0, 1.0), in_bins=8, out_bins=8
    )
    # Miller-Madow: (8 - 1) * (8 - 1) / (2 N ln 2) = 0.00177 bits
    assert mi[0] < 4 * 49 / (2 * 20000 * math.log(2))
    assert mi[1] > 1.0  # y = x_1: about log2(8) = 3 bits


def test_numba_and_torch_forms_count_identically():
    m = _linear(6, 4)
    kw = dict(activation=nn.Tanh(), in_range=(-1.0, 1.0), in_bins=9, out_bins=5, seed=3)
    r1, c1, mi1 = pairwise_mi(m, (6,), 3000, form="numba", **kw)
    r2, c2, mi2 = pairwise_mi(m, (6,), 3000, form="torch", **kw)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_allclose(mi1, mi2, rtol=1e-12, atol=1e-14)
    # the counts themselves: the same tables cell by cell
    from foresight_sparse.perturbation.estimator import NumbaForm, TorchForm

    # a gathered row (0, 2), runs of consecutive outputs (1; 1, 2) and an empty row
    rowptr = np.array([0, 2, 3, 3, 5], dtype=np.int64)
    cols = np.array([0, 2, 1, 1, 2], dtype=np.int64)
    pairs = [(r, c) for r in range(4) for c in cols[rowptr[r] : rowptr[r + 1]]]
    gen = torch.Generator().manual_seed(0)
    xb = torch.randint(-1, 4, (50, 4), generator=gen, dtype=torch.int16)
    yb = torch.randint(-1, 3, (50, 3), generator=gen, dtype=torch.int16)
    tables = []
    for form in (NumbaForm(), TorchForm()):
        h = form.zeros(5, 4, 3, "cpu")
        form.accumulate(h, xb, yb, rowptr, cols, 3)
        tables.append(form.counts(h, 5, 4, 3))
    np.testing.assert_array_equal(tables[0], tables[1])
    brute = np.zeros((5, 4, 3), dtype=np.int64)
    for s in range(50):
        for e, (a, b) in enumerate(pairs):
            if xb[s, a] >= 0 and yb[s, b] >= 0:
                brute[e, xb[s, a], yb[s, b]] += 1
    np.testing.assert_array_equal(tables[0], brute)


def test_chunked_and_batched_runs_see_the_same_samples():
    m = _linear(8, 6)
    kw = dict(in_range=(0.0, 1.0), out_range=(-2.0, 2.0), in_bins=8, out_bins=8, samples=1700)
    whole = perturb_layer(m, (8,), sensitivity_samples=None, **kw)
    # 6 pairs of 8 x 8 int32 cells per input row: a budget of ~2 rows forces 4+ chunks
    chunked = perturb_layer(
        m, (8,), sensitivity_samples=None, max_memory=8000, batch_size=300, **kw
    )
    assert chunked.ei_parts == pytest.approx(whole.ei_parts, rel=1e-12)
    assert noise((3,), 700, 1200, seed=5).equal(noise((3,), 0, 1200, seed=5)[700:])


def test_memory_budget_refuses_a_row_that_cannot_fit():
    with pytest.raises(MemoryBudgetError, match="max_memory"):
        perturb_layer(_linear(4, 50), (4,), in_range=(0.0, 1.0), samples=100, max_memory=1000)


def test_conv_sparse_equals_dense_connected_pairs_and_bias_matches():
    torch.manual_seed(1)
    conv = nn.Conv2d(1, 2, 3, padding=1)
    kw = dict(in_range=(0.0, 1.0), out_range=(-2.0, 2.0), in_bins=6, out_bins=6, seed=2)
    n = 4000
    rs, cs, ms = pairwise_mi(conv, (1, 5, 5), n, **kw)
    rd, cd, md = pairwise_mi(conv, (1, 5, 5), n, pairs="all", **kw)
    dense = np.zeros((25, 50))
    dense[rd, cd] = md
    connected = np.zeros((25, 50), dtype=bool)
    connected[rs, cs] = True
    # (a) same samples, same pairs: the same values exactly
    np.testing.assert_array_equal(dense[rs, cs], ms)
    # (b) the unconnected pairs' mean MI is the stated bias per pair
    result = perturb_layer(conv, (1, 5, 5), samples=n, sensitivity_samples=None, **kw)
    assert result.ei_parts == pytest.approx(ms.sum(), rel=1e-12)
    free = dense[~connected]
    assert result.unconnected == free.size == 25 * 50 - len(ms)
    per_pair = result.unconnected_bias / result.unconnected
    # pairs share samples (correlated) and the bias is the mean over 256 drawn pairs:
    # allow 4 naive standard errors and 5 %
    stderr = free.std() / math.sqrt(free.size)
    assert abs(free.mean() - per_pair) < 4 * stderr + 0.05 * per_pair
    # and it is far from zero: the correction matters
    assert per_pair > 10 * stderr


def test_expected_mi_matches_simulation():
    rng = np.random.default_rng(0)
    n, bx, by = 300, 4, 5
    x = rng.integers(0, bx, n)
    y = rng.integers(0, by, n)
    a = np.bincount(x, minlength=bx).astype(np.int64)
    b = np.bincount(y, minlength=by).astype(np.int64)
    sims = [hand_mi(x, rng.permutation(y), (bx, by), ((0, bx), (0, by))) for _ in range(400)]
    expected = _kernels.expected_mi(a, b, n)
    assert abs(np.mean(sims) - expected) < 4 * np.std(sims) / math.sqrt(len(sims))


@pytest.mark.parametrize(
    "layer, shape, act",
    [
        (nn.Linear(4, 3), (4,), nn.Sigmoid()),
        (nn.Conv2d(2, 2, 3, padding=1), (2, 4, 4), nn.ReLU()),
        (nn.AvgPool2d(2), (1, 4, 4), None),
    ],
)
def test_sensitivity_matches_forward_passes(layer, shape, act):
    torch.manual_seed(0)
    n, in_range, out_range = 500, (0.0, 1.0), (-1.0, 1.0) if act is None else None
    kw = dict(in_range=in_range, out_range=out_range, in_bins=10, out_bins=10, seed=4)
    ours = sensitivity(layer, shape, samples=n, activation=act, **kw)
    u = noise((), 0, n, in_range=in_range, seed=4, stream=1)
    n_in = math.prod(shape)
    o_range = out_range or ((0.0, 1.0) if isinstance(act, nn.Sigmoid) else (0.0, 10.0))
    brute = 0.0
    with torch.no_grad():
        for a in range(n_in):
            x = torch.zeros(n, n_in)
            x[:, a] = u
            y = layer(x.reshape(n, *shape))
            y = (act(y) if act is not None else y).reshape(n, -1)
            for b in range(y.shape[1]):
                brute += hand_mi(u.numpy(), y[:, b].numpy(), (10, 10), (in_range, o_range))
    assert ours == pytest.approx(brute, rel=1e-6, abs=1e-9)


def test_convergence_is_reported():
    m = _linear(3, 2)
    kw = dict(in_range=(0.0, 1.0), out_range=(-2.0, 2.0), in_bins=8, out_bins=8)
    loose = perturb_layer(m, (3,), threshold=10.0, sensitivity_samples=None, **kw)
    assert loose.converged and loose.samples == 20000  # the second estimate converges
    assert [n for n, _ in loose.history] == [10000, 20000]
    # 64 x 64 bins: the plug-in bias falls with every doubling, so a tiny threshold fails
    kw.update(in_bins=64, out_bins=64)
    strict = perturb_layer(
        m, (3,), threshold=1e-9, max_samples=40000, sensitivity_samples=None, **kw
    )
    assert not strict.converged and strict.samples == 40000
    assert [n for n, _ in strict.history] == [10000, 20000, 40000]
    # deep-ei's rule: 2 * (previous - current) / current <= threshold
    assert _has_converged((10000, 1.05), (20000, 1.0), 0.11)
    assert not _has_converged((10000, 1.05), (20000, 1.0), 0.09)
    assert _has_converged((10000, 0.0), (20000, 0.0), 0.05)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"in_bins": 1}, "in_bins"),
        ({"out_bins": 0}, "out_bins"),
        ({"in_range": (1.0, 1.0)}, "in_range"),
        ({"out_range": (2.0, -2.0)}, "out_range"),
        ({"samples": 0}, "samples"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": -1.0}, "threshold"),
        ({"sensitivity_samples": -5}, "sensitivity_samples"),
    ],
)
def test_bad_settings_are_refused(options, match):
    with pytest.raises(MeasureSettingsError, match=match):
        Perturbation(**options)
    with pytest.raises(MeasureSettingsError, match=match):
        perturb_layer(nn.Linear(2, 2), (2,), **{"in_range": (0.0, 1.0), **options})


def test_non_finite_weights_and_unknown_ranges_are_refused():
    m = nn.Linear(3, 2)
    with torch.no_grad():
        m.weight[0, 1] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="weight"):
        perturb_layer(m, (3,), in_range=(0.0, 1.0), samples=100)
    with pytest.raises(UnsupportedLayerError, match="out_range"):
        perturb_layer(nn.Linear(3, 2), (3,), activation=nn.GELU(), samples=100)
    with pytest.raises(UnsupportedLayerError, match="in_range"):
        perturb_layer(nn.Linear(3, 2), (3,), before=nn.SiLU(), samples=100)
    # given ranges make them usable; a batch norm after the layer is no activation
    r = perturb_layer(
        nn.Linear(3, 2),
        (3,),
        activation=nn.GELU(),
        out_range=(-1.0, 5.0),
        in_range=(0.0, 1.0),
        samples=500,
        sensitivity_samples=None,
    )
    assert r.out_range == (-1.0, 5.0)
    r = perturb_layer(
        nn.Linear(3, 2), (3,), activation=nn.BatchNorm1d(2), samples=500, sensitivity_samples=None
    )
    assert r.in_range == r.out_range == (-10.0, 10.0)


def test_measure_protocol_and_registry():
    assert isinstance(get_measure("perturbation"), Perturbation)
    measure = Perturbation(samples=600, sensitivity_samples=200, in_bins=8, out_bins=8)
    assert measure.settings()["samples"] == 600
    from foresight_sparse.connectivity import connectivity
    from foresight_sparse.measures import MeasureLayer

    rows = []
    net = nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2), nn.Tanh())
    for i, (before, after) in enumerate([(None, net[1]), (net[1], net[3])]):
        lin = net[2 * i]
        shape_in, shape_out = (1, lin.in_features), (1, lin.out_features)
        layer = MeasureLayer(
            name=str(2 * i),
            label=f"{2 * i} (Linear)",
            module=lin,
            conn=connectivity(lin, shape_in, shape_out),
            in_shape=shape_in,
            out_shape=shape_out,
            before=before,
            after=after,
            norm=None,
            device=torch.device("cpu"),
            max_memory=1 << 30,
        )
        measure.check(layer)
        rows.append(measure.layer(layer))
    assert set(rows[0]) == {"determinism", "degeneracy", "ei", *Perturbation.columns}
    assert rows[0]["degeneracy"] == pytest.approx(rows[0]["sensitivity"] - rows[0]["ei_parts"])
    total = measure.network(rows)
    assert total["ei"] == pytest.approx(rows[0]["ei"] + rows[1]["ei"])
    assert total["samples"] == 1200 and total["converged"] is True
    assert total["determinism"] is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_torch_form_matches_cpu_torch_form():
    m = _linear(6, 4)
    kw = dict(in_range=(0.0, 1.0), out_range=(-2.0, 2.0), in_bins=8, out_bins=8)
    _, _, cpu = pairwise_mi(m, (6,), 2000, form="torch", **kw)
    _, _, gpu = pairwise_mi(m.cuda(), (6,), 2000, device="cuda", **kw)
    assert gpu.shape == cpu.shape  # another generator: statistically, not exactly, equal
    assert abs(gpu.sum() - cpu.sum()) < 0.2 * cpu.sum()
