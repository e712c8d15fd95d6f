"""H and the norms: the drop-in's dense behaviour equals the reference's, and the pieces the
sparse engines use (f, f log2 f, the value at 0, the shift) are consistent with it."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ENGINE_RTOL, ENGINES_UNDER_TEST, F64, assert_close
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import foresight_sparse as fs
from foresight_sparse import ei
from foresight_sparse import reference as R
from foresight_sparse.norms import NORMS, UNNORMALISED, ElementwiseNorm, RowwiseNorm, get_norm

#: Each drop-in norm and the reference function it must equal (None: no normalisation).
PAIRS = {
    "lin": (ei.lin_norm, R.lin_norm),
    "soft": (ei.soft_norm, R.soft_norm),
    "sig": (ei.sig_norm, R.sig_norm),
    "none": (UNNORMALISED, None),
}
SHIFTS = [0.0, 0.7, 3.5, 40.0, 500.0]
EDGE_VALUES = [
    0.0,
    -0.0,
    1e-300,
    1e-12,
    0.3,
    1.0,
    2.5,
    40.0,
    500.0,
    700.0,
    -1e-12,
    -0.3,
    -1.0,
    -40.0,
    -500.0,
    -800.0,
]


def edge_matrix() -> torch.Tensor:
    """Zeros, negatives, an all-zero row, an all-negative row and large weights."""
    return torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],
            [1.0, -2.0, 0.0, 3.0],
            [-1.0, -5.0, -0.5, -2.0],
            [500.0, 0.0, 499.0, -3.0],
            [1e-300, 2.0, 0.0, 0.0],
            [-500.0, 500.0, 0.0, 0.0],
        ],
        dtype=F64,
    )


def matrices():
    finite = st.floats(-60.0, 60.0, allow_nan=False, allow_infinity=False)
    entry = st.one_of(finite, st.just(0.0), st.sampled_from([-500.0, 500.0]))
    return (
        st.integers(1, 5)
        .flatmap(
            lambda n: st.lists(st.lists(entry, min_size=n, max_size=n), min_size=1, max_size=5)
        )
        .map(lambda rows: torch.tensor(rows, dtype=F64))
    )


def test_registry_is_covered():
    assert set(NORMS) == set(PAIRS)
    for name, norm in NORMS.items():
        assert PAIRS[name][0] is norm


# --------------------------------------------------------------------------- H


@given(x=matrices())
def test_H_equals_reference(x):
    for dim in (0, 1, -1):
        assert torch.allclose(ei.H(x, dim=dim), R.H(x, dim=dim), rtol=1e-15, atol=0)
    assert torch.equal(ei.H(x), R.H(x, dim=0))


def test_H_edge_cases():
    x = torch.tensor([[0.5, 0.5, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    assert torch.equal(ei.H(x, dim=1), R.H(x, dim=1))
    assert ei.H(x, dim=1).tolist() == [1.0, 0.0, 0.0]
    assert ei.H(torch.tensor([0.25] * 4, dtype=F64)).item() == 2.0
    assert ei.H(torch.tensor([0.25] * 4, dtype=F64)).dim() == 0


# --------------------------------------------------------------------------- dense calls


@pytest.mark.parametrize("name", list(PAIRS))
def test_dense_norm_equals_reference_on_edges(name):
    ours, ref = PAIRS[name]
    W = edge_matrix()
    P = ours(W)
    expected = ref(W) if ref is not None else W
    assert P.shape == W.shape and P.dtype == W.dtype
    assert torch.allclose(P, expected, rtol=1e-15, atol=0, equal_nan=True)
    assert bool(torch.isfinite(P).all())


@pytest.mark.parametrize("name", list(PAIRS))
@given(W=matrices())
def test_dense_norm_equals_reference(name, W):
    ours, ref = PAIRS[name]
    expected = ref(W) if ref is not None else W
    torch.testing.assert_close(ours(W), expected, rtol=1e-15, atol=0)


def test_lin_norm_keeps_zero_rows_zero():
    P = ei.lin_norm(edge_matrix())
    assert torch.equal(P[0], torch.zeros(4, dtype=F64))
    assert torch.equal(P[2], torch.zeros(4, dtype=F64))
    assert torch.allclose(P[[1, 3, 4, 5]].sum(1), torch.ones(4, dtype=F64), rtol=1e-15)


@pytest.mark.parametrize("name", ["soft", "sig"])
def test_soft_and_sig_rows_are_distributions(name):
    P = PAIRS[name][0](edge_matrix())
    assert torch.allclose(P.sum(1), torch.ones(P.shape[0], dtype=F64), rtol=1e-14)


# --------------------------------------------------------------------------- elementwise parts


ELEMENTWISE = [n for n in PAIRS if isinstance(PAIRS[n][0], ElementwiseNorm)]


@pytest.mark.parametrize("name", ELEMENTWISE)
@pytest.mark.parametrize("shift", SHIFTS)
def test_elementwise_parts_are_consistent(name, shift):
    norm = PAIRS[name][0]
    shift = norm.shift(shift)  # the shift the engines would use for this bound
    a = torch.tensor(EDGE_VALUES, dtype=F64)
    f = norm.f(a, shift)
    flf = norm.f_log2f(a, shift)
    c = norm.zero(shift)
    assert isinstance(c, float) and isinstance(norm.zero_log2(shift), float)
    assert norm.f(torch.zeros(1, dtype=F64), shift).item() == pytest.approx(c, rel=1e-15)
    expected_clogc = c * math.log2(c) if c > 0 else 0.0
    assert norm.zero_log2(shift) == pytest.approx(expected_clogc, rel=1e-13, abs=1e-300)
    assert bool(torch.isfinite(f).all()) and bool(torch.isfinite(flf).all())
    pos = f > 0
    expected = torch.where(pos, f * torch.log2(torch.where(pos, f, 1.0)), 0.0)
    # atol: where f rounds to 1, f_log2f is (correctly) a few 1e-18, the naive product 0
    torch.testing.assert_close(flf, expected, rtol=1e-12, atol=1e-15)
    assert bool((flf[f == 0] == 0).all())


@pytest.mark.parametrize("name", ["lin", "soft", "sig"])
@pytest.mark.parametrize("shift", SHIFTS)
def test_elementwise_map_reproduces_dense_norm(name, shift):
    # f / row sum of f, with absent entries (zeros) worth f(0), is the dense norm
    norm = PAIRS[name][0]
    W = edge_matrix()
    s = norm.shift(max(float(W.max()), shift))
    f = norm.f(W, s)
    sums = f.sum(1, keepdim=True)
    P = f / torch.where(sums > 0, sums, 1.0)
    torch.testing.assert_close(P, norm(W), rtol=1e-12, atol=1e-300)


def test_shift_values():
    assert ei.soft_norm.shift(-3.0) == 0.0
    assert ei.soft_norm.shift(12.5) == 12.5
    for norm in (ei.lin_norm, ei.sig_norm, UNNORMALISED):
        assert norm.shift(12.5) == 0.0
    assert ei.lin_norm.zero() == 0.0 and ei.sig_norm.zero() == 0.5 and ei.soft_norm.zero() == 1.0
    assert UNNORMALISED.normalizes is False
    assert all(n.normalizes for n in (ei.lin_norm, ei.soft_norm, ei.sig_norm))


# --------------------------------------------------------------------------- engine path


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("engine", [*ENGINES_UNDER_TEST, "dense"])
def test_large_weights_do_not_overflow_in_engines(name, engine):
    ours, ref = PAIRS[name]
    layer = nn.Linear(6, 4, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(edge_matrix().t())
    x = torch.zeros(1, 6, dtype=F64)
    rep = fs.report(layer, x, norm=ours, engine=engine)
    assert math.isfinite(rep.determinism) and math.isfinite(rep.degeneracy)
    rel = ENGINE_RTOL[engine]
    assert_close(rep.determinism, R.determinism(layer, x, norm=ref), rel, what="determinism")
    assert_close(rep.degeneracy, R.degeneracy(layer, x, norm=ref), rel, what="degeneracy")


def test_soft_norm_wide_weight_range_in_sparse_engine():
    # Regression: one exp shift per layer (the largest weight) underflowed rows whose weights
    # all lie ~745 below it to Z = 0, i.e. entropy 0 instead of their softmax entropy.
    layer = nn.Linear(3, 2, bias=False).double()
    with torch.no_grad():
        # row 0 (input 0) holds 1000; rows 1 and 2 only small weights
        layer.weight.copy_(torch.tensor([[1000.0, 0.1, 0.2], [0.0, -0.3, 0.4]], dtype=F64))
    x = torch.zeros(1, 3, dtype=F64)
    expected = R.determinism(layer, x, norm=R.soft_norm)
    assert_close(
        ei.determinism(layer, x, norm=ei.soft_norm, engine="sparse"),
        expected,
        1e-9,
        what="determinism",
    )


# --------------------------------------------------------------------------- get_norm


@pytest.mark.parametrize("name", ["lin", "soft", "sig", "none", "LIN", "Soft"])
def test_get_norm_by_name(name):
    assert get_norm(name) is NORMS[name.lower()]


def test_get_norm_objects_none_and_callables():
    assert get_norm(None) is UNNORMALISED
    for norm in (ei.lin_norm, ei.soft_norm, ei.sig_norm, UNNORMALISED):
        assert get_norm(norm) is norm
    custom = get_norm(R.lin_norm)
    assert isinstance(custom, RowwiseNorm) and not custom.elementwise
    assert custom.name == "lin_norm"
    # the wrapper applies the function: lin_norm of the edge matrix, by hand
    by_hand = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],
            [0.25, 0.0, 0.0, 0.75],
            [0.0, 0.0, 0.0, 0.0],
            [500 / 999, 0.0, 499 / 999, 0.0],
            [5e-301, 1.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
        ],
        dtype=F64,
    )
    torch.testing.assert_close(custom(edge_matrix()), by_hand, rtol=1e-15, atol=0)
    custom2 = get_norm(lambda W: W.abs())
    assert isinstance(custom2, RowwiseNorm)


def test_get_norm_rejects_junk():
    with pytest.raises(fs.UnknownNameError, match="lin, none, sig, soft"):
        get_norm("softmax")
    with pytest.raises(ValueError):  # UnknownNameError is a ValueError
        get_norm("")
    for junk in (42, 1.5, [ei.lin_norm], object()):
        with pytest.raises(TypeError, match="norm must be"):
            get_norm(junk)


def test_norm_names_accepted_by_the_measures():
    torch.manual_seed(0)
    layer = nn.Linear(3, 4).double()
    x = torch.zeros(1, 3, dtype=F64)
    for name, (_, ref) in PAIRS.items():
        assert_close(ei.ei(layer, x, norm=name), R.ei(layer, x, norm=ref), 1e-12, what=name)
    with pytest.raises(fs.UnknownNameError):
        ei.ei(layer, x, norm="nope")
