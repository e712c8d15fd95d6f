"""The SVD measure (foresight_sparse.svd) against numpy's SVD of the dense reference ``P``.

The reference ``P`` is built by :mod:`foresight_sparse.reference` (which shares no code with
the connectivity builders or the operators) and normalised by the reference norms; the
singular values come from ``numpy.linalg.svd``. Hand-computed cases (permutations, rank one)
check the formulas themselves.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from foresight_sparse import reference as ref
from foresight_sparse import svd
from foresight_sparse.connectivity import connectivity
from foresight_sparse.exceptions import (
    MemoryBudgetError,
    NonFiniteWeightsError,
    UnknownNameError,
)
from foresight_sparse.measures import MeasureLayer
from foresight_sparse.norms import get_norm
from foresight_sparse.settings import get_measure

F64 = torch.float64
REF_NORMS = {"lin": ref.lin_norm, "soft": ref.soft_norm, "sig": ref.sig_norm, None: lambda a: a}


def out_shape(module, in_shape):
    dtype = next((q.dtype for q in module.parameters()), torch.float32)
    with torch.no_grad():
        return tuple(module(torch.zeros(in_shape, dtype=dtype)).shape)


def reference_p(module, in_shape, norm) -> np.ndarray:
    """The dense ``P`` from the reference matrix builders and norms (no code under test)."""
    outs = out_shape(module, in_shape)
    if isinstance(module, nn.Linear):
        a = ref.linear_create_matrix(module, in_shape, outs)
    elif isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        a = ref.avgpoolnd_create_matrix(module, in_shape, outs)
    else:
        a = ref.convnd_create_matrix(module, in_shape, outs)
    return REF_NORMS[norm](a.to(F64)).numpy()


def conn_of(module, in_shape):
    return connectivity(module, in_shape, out_shape(module, in_shape))


def numpy_gamma(p, alpha=1.0, eps=svd.DEFAULT_EPS):
    s = np.linalg.svd(p, compute_uv=False)
    n = p.shape[0]
    g = float(np.sum(s**alpha))
    top = s[s > eps]
    g_r = float(np.sum(top**alpha))
    dg = (g_r / top.size if top.size else 0.0) - g / n
    return g, g_r, int(top.size), dg, s


def seeded(module, seed=0):
    torch.manual_seed(seed)
    for p in module.parameters():
        nn.init.normal_(p, std=0.5)
    return module


# --------------------------------------------------------------------------- hand cases


def permutation_linear(n=6, seed=0):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    lin = nn.Linear(n, n, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[perm, torch.arange(n)] = 1.0
    return lin


@pytest.mark.parametrize("method", ["dense", "gram", "slq"])
@pytest.mark.parametrize("alpha", [0.3, 1.0, 1.7])
def test_permutation_is_perfectly_reversible(method, alpha):
    n = 6
    lin = permutation_linear(n)
    spec = svd.layer_spectrum(
        lin, "lin", in_shape=(1, n), alpha=alpha, method=method, slq_dtype=F64, deflate=0
    )
    assert spec.method == method
    assert spec.gamma_alpha == pytest.approx(n, rel=1e-12)
    assert spec.gamma == pytest.approx(1.0, rel=1e-12)
    assert spec.r_eps == pytest.approx(n)
    assert abs(spec.delta_gamma) < 1e-12
    # without deflation every probe's Krylov space is invariant (M = I): SLQ is exact here
    assert spec.stderr <= 1e-9 * n


@pytest.mark.parametrize("method", ["dense", "gram", "slq"])
def test_identity_1x1_conv(method):
    conv = nn.Conv2d(3, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3)[:, :, None, None])
    in_shape = (1, 3, 5, 4)
    spec = svd.layer_spectrum(
        conv, "lin", in_shape=in_shape, alpha=0.5, method=method, slq_dtype=F64, deflate=0
    )
    assert spec.n == 60
    assert spec.gamma_alpha == pytest.approx(60, rel=1e-12)
    assert spec.gamma == pytest.approx(1.0, rel=1e-12)
    assert abs(spec.delta_gamma) < 1e-12


@pytest.mark.parametrize("method", ["dense", "gram"])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.5])
def test_rank_one_by_hand(method, alpha):
    # every column of the weight equal: every row of P is the same distribution p, so
    # P = 1 p^T has one singular value sqrt(N) |p| and Delta Gamma = Gamma (1 - 1/N)
    n_in, w = 5, torch.tensor([1.0, 3.0, -2.0, 4.0])
    lin = nn.Linear(n_in, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w[:, None].expand(4, n_in))
    p = torch.relu(w.double()) / torch.relu(w.double()).sum()
    sigma = math.sqrt(n_in) * float(p.norm())
    spec = svd.layer_spectrum(lin, "lin", in_shape=(1, n_in), alpha=alpha, method=method)
    assert spec.r_eps == 1
    assert spec.gamma_alpha == pytest.approx(sigma**alpha, rel=1e-10)
    assert spec.gamma_alpha_r == pytest.approx(sigma**alpha, rel=1e-10)
    assert spec.delta_gamma == pytest.approx(sigma**alpha * (1 - 1 / n_in), rel=1e-10)
    assert spec.sigma_max == pytest.approx(sigma, rel=1e-10)


def test_zero_rank_has_no_emergence():
    lin = nn.Linear(4, 3, bias=False)
    nn.init.constant_(lin.weight, -1.0)  # lin norm: every row is zero
    spec = svd.layer_spectrum(lin, "lin", in_shape=(1, 4), method="dense")
    assert (spec.r_eps, spec.gamma_alpha, spec.delta_gamma) == (0, 0.0, 0.0)


def test_helpers_by_hand():
    s = [3.0, 1.0, 1e-9, 0.0]
    assert svd.gamma_alpha(s, 1.0) == pytest.approx(4.0 + 1e-9)
    assert svd.gamma_alpha(s, 0.5) == pytest.approx(math.sqrt(3) + 1 + math.sqrt(1e-9))
    # r_eps = 2 (eps = 1e-6): 4/2 - (4 + 1e-9)/5
    assert svd.delta_gamma(s, 1.0, n=5) == pytest.approx(2.0 - (4.0 + 1e-9) / 5)
    assert svd.delta_gamma(s, 1.0) == pytest.approx(2.0 - (4.0 + 1e-9) / 4)
    assert svd.delta_gamma([0.0, 0.0], 1.0) == 0.0


# --------------------------------------------------------------------------- exact methods


EXACT_CASES = [
    (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (1, 4, 7, 6)),
    (nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(1, 2), dilation=(2, 1)), (1, 2, 6, 7)),
    (nn.Conv1d(2, 4, 3, padding="same"), (1, 2, 9)),
    (nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), (1, 2, 4, 5)),
    (nn.Linear(9, 5), (1, 9)),
    (nn.Linear(5, 8), (1, 5)),
]


@pytest.mark.parametrize("norm", ["lin", "soft", "sig", None])
@pytest.mark.parametrize("case", range(len(EXACT_CASES)))
def test_dense_and_gram_match_numpy(case, norm):
    module, in_shape = EXACT_CASES[case]
    module = seeded(module, case)
    p = reference_p(module, in_shape, norm)
    g, g_r, r, dg, s = numpy_gamma(p, alpha=1.3)
    conn = conn_of(module, in_shape)
    k = s.size
    # the Gram method's stated resolution: squared singular values within ~u sqrt(k) s_max^2
    # the Gram method's resolution: squared singular values within ~u sqrt(k) s_max^2
    floor = svd.resolution("gram", *p.shape, s[0])
    for method in ("dense", "gram"):
        spec = svd.layer_spectrum(conn, norm, alpha=1.3, method=method)
        assert spec.method == method
        assert spec.n == p.shape[0] and spec.n_cols == p.shape[1]
        assert spec.r_eps == r
        if method == "dense" or s[-1] > 1e3 * floor:  # exact to float64 rounding
            atol_g, atol_s = 1e-12 * g, 1e-12 * s[0]
        else:  # near rank deficient: each singular value within the resolution
            atol_g, atol_s = k * floor**1.3, 2 * floor
        assert spec.gamma_alpha == pytest.approx(g, rel=1e-9, abs=atol_g)
        assert spec.gamma_alpha_r == pytest.approx(g_r, rel=1e-9, abs=atol_g)
        assert spec.delta_gamma == pytest.approx(dg, rel=1e-9, abs=atol_g / p.shape[0] + 1e-12)
        np.testing.assert_allclose(spec.singular_values, s, rtol=1e-7, atol=atol_s)


def test_gram_accuracy_for_small_singular_values():
    # norm=None, a weight with singular values from 1 down to 1e-12: the Gram method's
    # squared singular values are within ~u sqrt(k) sigma_max^2 (the stated resolution),
    # the dense method's singular values within ~u sigma_max
    k = 24
    gen = torch.Generator().manual_seed(3)
    u_, _ = torch.linalg.qr(torch.randn(k, k, dtype=F64, generator=gen))
    v_, _ = torch.linalg.qr(torch.randn(40, k, dtype=F64, generator=gen))
    s = torch.logspace(0, -12, k, dtype=F64)
    lin = nn.Linear(40, k, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_((u_ * s) @ v_.T)  # weight (k x 40): A = weight.T
    conn = conn_of(lin, (1, 40))
    gram = svd.layer_spectrum(conn, None, method="gram", eps=0.0).singular_values
    dense = svd.layer_spectrum(conn, None, method="dense", eps=0.0).singular_values
    u = np.finfo(np.float64).eps
    assert np.max(np.abs(gram**2 - s.numpy() ** 2)) <= 10 * u * math.sqrt(k)
    assert np.max(np.abs(dense - s.numpy())) <= 10 * u * 40
    # below each method's resolution the singular values are set to 0, not left as noise
    assert np.all(gram[s.numpy() < 1e-9] == 0) and np.all(dense[s.numpy() < 1e-14] == 0)
    assert svd.resolution("gram", 40, k, 1.0) == pytest.approx(math.sqrt(math.sqrt(k) * u))
    big = s.numpy() > 1e-5  # well above the resolution: relative accuracy
    np.testing.assert_allclose(gram[big], s.numpy()[big], rtol=1e-6)


# --------------------------------------------------------------------------- the operator


OPERATOR_CASES = [
    (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (1, 4, 7, 6)),
    (nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(2, 0), dilation=2), (1, 3, 8, 7)),
    (nn.Conv2d(2, 2, 4, padding="same"), (1, 2, 5, 5)),  # asymmetric 'same' padding
    (nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2), (1, 2, 11)),
    (nn.Conv3d(2, 4, 2, stride=(1, 2, 1), padding=1, groups=2), (1, 2, 3, 4, 3)),
    (nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), (1, 2, 7, 7)),
    (nn.AvgPool2d(2, divisor_override=3), (1, 1, 4, 6)),
    (nn.AvgPool1d(3, 2, 1, ceil_mode=True), (1, 2, 8)),
    (nn.AvgPool3d(2, 1, 1), (1, 1, 3, 3, 2)),
    (nn.Linear(6, 4), (1, 6)),
]


def check_operator(module, in_shape, norm, device):
    p = torch.from_numpy(reference_p(module, in_shape, norm))
    conn = conn_of(module, in_shape)
    op = svd.transition_operator(
        conn, norm, module=module.to(device), in_shape=in_shape, dtype=F64, device=device
    )
    assert op.kind in ("conv", "pool", "linear")
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(3, p.shape[1], dtype=F64, generator=gen)
    u = torch.randn(3, p.shape[0], dtype=F64, generator=gen)
    pv = op.matvec(v.to(device)).cpu()
    ptu = op.rmatvec(u.to(device)).cpu()
    torch.testing.assert_close(pv, v @ p.T, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ptu, u @ p, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("norm", ["lin", "soft", "sig", None])
@pytest.mark.parametrize("case", range(len(OPERATOR_CASES)))
def test_matrix_free_operator_matches_dense(case, norm):
    module, in_shape = OPERATOR_CASES[case]
    check_operator(seeded(module, case), in_shape, norm, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", [0, 3, 5, 9])
def test_matrix_free_operator_on_cuda(case):
    module, in_shape = OPERATOR_CASES[case]
    check_operator(seeded(module, case), in_shape, "soft", "cuda")


def test_operator_falls_back_to_sparse_for_folded_padding():
    conv = seeded(nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"))
    conn = conn_of(conv, (1, 2, 4, 4))
    op = svd.transition_operator(conn, "lin", module=conv, in_shape=(1, 2, 4, 4))
    assert op.kind == "sparse"
    p = torch.from_numpy(reference_p(conv, (1, 2, 4, 4), "lin"))
    v = torch.randn(2, p.shape[1], dtype=F64)
    torch.testing.assert_close(op.matvec(v), v @ p.T, rtol=1e-12, atol=1e-13)


# --------------------------------------------------------------------------- SLQ


SLQ_CASES = [
    (nn.Conv2d(3, 4, 3, stride=1, padding=1), (1, 3, 6, 6)),
    (nn.Linear(30, 20), (1, 30)),
]


@pytest.mark.parametrize("deflate", [0, 1, 3])
@pytest.mark.parametrize("norm", ["lin", "soft", "sig"])
@pytest.mark.parametrize("case", range(len(SLQ_CASES)))
def test_slq_within_its_error(case, norm, deflate):
    module, in_shape = SLQ_CASES[case]
    module = seeded(module, 10 + case)
    g, g_r, r, _, _ = numpy_gamma(reference_p(module, in_shape, norm), alpha=1.0)
    spec = svd.layer_spectrum(
        module,
        norm,
        in_shape=in_shape,
        method="slq",
        tol=1e-3,
        max_probes=48,
        lanczos_steps=30,
        deflate=deflate,
    )
    assert spec.method == "slq" and spec.probes >= 2 and spec.singular_values is None
    assert 0 < spec.stderr < 0.25 * g
    assert abs(spec.gamma_alpha - g) <= 4 * spec.stderr
    assert abs(spec.r_eps - r) <= 4 * spec.r_eps_stderr + 1e-6 * r
    assert abs(spec.gamma_alpha_r - g_r) <= 4 * spec.gamma_alpha_r_stderr + 1e-5 * g_r


def test_slq_is_reproducible_and_seeded():
    module, in_shape = SLQ_CASES[1]
    module = seeded(module, 4)
    kw = dict(in_shape=in_shape, method="slq", max_probes=6, tol=1e-9)
    a = svd.layer_spectrum(module, "lin", seed=1, **kw)
    b = svd.layer_spectrum(module, "lin", seed=1, **kw)
    c = svd.layer_spectrum(module, "lin", seed=2, **kw)
    assert a.gamma_alpha == b.gamma_alpha and a.probes == 6
    assert a.gamma_alpha != c.gamma_alpha


# --------------------------------------------------------------------------- network, measure


def measure_layer(module, in_shape, norm="lin", name="layer", max_memory=2**31):
    conn = conn_of(module, in_shape)
    return MeasureLayer(
        name=name,
        label=f"{name} ({type(module).__name__})",
        module=module,
        conn=conn,
        in_shape=in_shape,
        out_shape=out_shape(module, in_shape),
        before=None,
        after=None,
        norm=get_norm(norm),
        device=torch.device("cpu"),
        max_memory=max_memory,
    )


def test_network_is_the_block_diagonal_matrix():
    conv = seeded(nn.Conv2d(2, 3, 3, padding=1), 5)
    lin = seeded(nn.Linear(7, 4), 6)
    rank1 = nn.Linear(5, 4, bias=False)
    nn.init.constant_(rank1.weight, 0.5)  # rank one: makes r_eps < N
    layers = [(conv, (1, 2, 4, 4)), (lin, (1, 7)), (rank1, (1, 5))]
    blocks = [reference_p(m, s, "soft") for m, s in layers]
    n_rows = sum(b.shape[0] for b in blocks)
    n_cols = sum(b.shape[1] for b in blocks)
    big = np.zeros((n_rows, n_cols))
    r0 = c0 = 0
    for b in blocks:
        big[r0 : r0 + b.shape[0], c0 : c0 + b.shape[1]] = b
        r0, c0 = r0 + b.shape[0], c0 + b.shape[1]
    g, g_r, r, dg, _ = numpy_gamma(big, alpha=0.7, eps=1e-6)

    measure = svd.Reversibility(alpha=0.7, method="dense")
    rows = [measure.layer(measure_layer(m, s, "soft")) for m, s in layers]
    net = measure.network(rows)
    assert net["gamma_alpha"] == pytest.approx(g, rel=1e-10)
    assert net["gamma_alpha_r"] == pytest.approx(g_r, rel=1e-10)
    assert net["r_eps"] == r
    assert net["n"] == n_rows
    assert net["gamma"] == pytest.approx(g / n_rows, rel=1e-10)
    assert net["delta_gamma"] == pytest.approx(dg, rel=1e-10)
    assert r < n_rows  # the rank-one layer makes the emergence term non-trivial
    for row in [*rows, net]:
        assert row["determinism"] is None and row["degeneracy"] is None and row["ei"] is None
        assert set(svd.Reversibility.columns) <= set(row)


def test_combine_adds_errors_in_quadrature():
    mk = dict(gamma=0.0, delta_gamma=0.0, n_cols=1, alpha=1.0, eps=1e-6, sigma_max=1.0)
    a = svd.Spectrum(3.0, r_eps=2.0, gamma_alpha_r=3.0, n=4, method="slq", **mk)
    b = svd.Spectrum(1.0, r_eps=1, gamma_alpha_r=1.0, n=2, method="dense", **mk)
    a.gamma_alpha_stderr = 0.3
    b.gamma_alpha_stderr = 0.4
    net = svd.combine([a, b])
    assert net.gamma_alpha == 4.0 and net.n == 6 and net.r_eps == 3.0
    assert net.stderr == pytest.approx(0.5)
    assert net.delta_gamma == pytest.approx(4.0 / 3.0 - 4.0 / 6.0)
    assert net.method == "slq+dense"


def test_get_measure_builds_defaults():
    m = get_measure("svd")
    assert isinstance(m, svd.Reversibility)
    assert m.name == "svd"
    assert m.settings()["alpha"] == 1.0 and m.settings()["eps"] == svd.DEFAULT_EPS
    assert m.settings()["method"] == "auto"


def test_auto_picks_by_size():
    small = conn_of(seeded(nn.Linear(6, 4)), (1, 6))
    assert svd.choose_method(small, "lin", "auto", 2**31, "x") == "dense"
    mid = conn_of(seeded(nn.Linear(3000, 2500)), (1, 3000))
    assert svd.choose_method(mid, "lin", "auto", 2**31, "x") == "gram"
    assert svd.choose_method(mid, "lin", "auto", 2**20, "x") == "slq"
    big = conn_of(nn.Conv2d(8, 8, 3, padding=1), (1, 8, 64, 64))
    assert svd.choose_method(big, "lin", "auto", 2**31, "x") == "slq"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("alpha", [0.0, 2.0, -1.0, 2.5, float("nan")])
def test_alpha_outside_the_interval(alpha):
    with pytest.raises(ValueError, match="alpha"):
        svd.layer_spectrum(permutation_linear(), "lin", in_shape=(1, 6), alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        svd.Reversibility(alpha=alpha)


@pytest.mark.parametrize("eps", [-1e-3, float("inf"), float("nan")])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        svd.layer_spectrum(permutation_linear(), "lin", in_shape=(1, 6), eps=eps)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="dense, gram, slq"):
        svd.layer_spectrum(permutation_linear(), "lin", in_shape=(1, 6), method="lanczos")
    with pytest.raises(UnknownNameError):
        svd.Reversibility(method="exact")


def test_non_finite_weights():
    lin = permutation_linear()
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    for method in ("dense", "slq"):
        with pytest.raises(NonFiniteWeightsError, match="NaN"):
            svd.layer_spectrum(lin, "lin", in_shape=(1, 6), method=method)


def test_over_budget_names_the_layer_and_the_fix():
    conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")  # no matrix-free form
    layer = measure_layer(conv, (1, 2, 16, 16), name="features.3", max_memory=10_000)
    with pytest.raises(MemoryBudgetError, match=r"features\.3.*max_memory"):
        svd.layer_spectrum(layer, layer.norm, method="dense", max_memory=10_000)
    with pytest.raises(MemoryBudgetError, match=r"features\.3"):
        svd.Reversibility(method="slq").check(layer)


def test_custom_norm_needs_dense():
    lin = seeded(nn.Linear(4, 3))
    norm = lambda a: torch.softmax(2 * a, dim=1)  # noqa: E731
    spec = svd.layer_spectrum(lin, norm, in_shape=(1, 4))
    assert spec.method == "dense"
    a = ref.linear_create_matrix(lin, (1, 4), (1, 3))
    g = np.linalg.svd(torch.softmax(2 * a, dim=1).numpy(), compute_uv=False).sum()
    assert spec.gamma_alpha == pytest.approx(g, rel=1e-12)
    with pytest.raises(TypeError, match="dense"):
        svd.layer_spectrum(lin, norm, in_shape=(1, 4), method="slq")
