"""The implicit engine's pieces: numba (CPU) and torch (CUDA) paths agree, and helpers are exact."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
from torch import nn

import foresight_sparse.ei as ei
from foresight_sparse import _kernels, report
from foresight_sparse.connectivity import conv2d, linear
from foresight_sparse.engines import LayerJob, implicit
from foresight_sparse.entropy import H, column_terms, entropy_from_terms
from foresight_sparse.norms import NORMS, get_norm

NORM_NAMES = ["lin", "soft", "sig", "none"]

CONVS = [
    (nn.Conv2d(4, 6, 3, padding=1), (1, 4, 9, 7)),
    (nn.Conv2d(4, 6, (2, 3), stride=2, dilation=(2, 1), groups=2, padding=(1, 2)), (1, 4, 9, 8)),
    (nn.Conv2d(3, 3, 4, padding="same", groups=3), (1, 3, 6, 6)),
    (nn.Conv2d(2, 5, 1, stride=3), (1, 2, 7, 7)),
]


def _conv_case(i):
    torch.manual_seed(i)
    module, in_shape = CONVS[i]
    out_shape = tuple(module(torch.zeros(in_shape)).shape)
    return module, conv2d(module, in_shape, out_shape)


@pytest.mark.parametrize("case", range(len(CONVS)))
@pytest.mark.parametrize("norm_name", NORM_NAMES)
def test_conv_row_pass_numba_equals_torch(case, norm_name):
    module, conn = _conv_case(case)
    norm = NORMS[norm_name]
    shift = norm.shift(conn.weight_bound())
    k = conn.kernel.detach().double()
    c_in = conn.in_chw[0]
    kh, kw = k.shape[-2:]
    grouped = (conn.groups, conn.cout_g, conn.cin_g, kh, kw)
    sf = norm.f(k, shift).reshape(grouped).sum(1).reshape(c_in, kh, kw)
    st = norm.f_log2f(k, shift).reshape(grouped).sum(1).reshape(c_in, kh, kw)
    h_t, inv_sum_t, inv_t = implicit.conv_rows_torch(conn, norm, shift, sf, st)
    inv_n = np.empty(conn.in_chw)
    h_n, inv_sum_n = _kernels.stencil_row_entropy(
        sf.numpy(), st.numpy(), conn.pairs_h.tap_matrix(kh), conn.pairs_w.tap_matrix(kw),
        conn.pairs_h.counts, conn.pairs_w.counts, conn.cout_g, conn.n_cols,
        norm.zero(shift), norm.zero_log2(shift), norm.normalizes, inv_n)
    assert h_n == pytest.approx(h_t, rel=1e-12, abs=1e-12)
    assert inv_sum_n == pytest.approx(inv_sum_t, rel=1e-12)
    torch.testing.assert_close(torch.from_numpy(inv_n), inv_t, rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", range(len(CONVS)))
@pytest.mark.parametrize("norm_name", ["lin", "soft", "sig"])
def test_kernel_sums_match_torch(case, norm_name):
    _, conn = _conv_case(case)
    norm = NORMS[norm_name]
    shift = norm.shift(conn.weight_bound())
    k = conn.kernel.detach()
    kind = implicit._KINDS[type(norm)]
    sf, st, fk = _kernels.kernel_sums(k.numpy(), kind, shift, conn.groups)
    kd = k.double()
    grouped = (conn.groups, conn.cout_g, conn.cin_g, *kd.shape[-2:])
    torch.testing.assert_close(torch.from_numpy(sf),
                               norm.f(kd, shift).reshape(grouped).sum(1).reshape(sf.shape),
                               rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(torch.from_numpy(st),
                               norm.f_log2f(kd, shift).reshape(grouped).sum(1).reshape(st.shape),
                               rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(torch.from_numpy(fk), norm.f(kd, shift))


@pytest.mark.parametrize("case", range(len(CONVS)))
def test_float64_numba_column_pass_equals_conv(case):
    _, conn = _conv_case(case)
    inv = torch.rand(conn.in_chw, dtype=torch.float64)
    g = torch.randn(conn.kernel.shape, dtype=torch.float64)
    got = implicit._column_conv(conn, inv, g, torch.float64)
    ah, aw = conn.axis_h, conn.axis_w
    x = torch.nn.functional.pad(inv[None], (aw.pad_before, aw.pad_after, ah.pad_before,
                                           ah.pad_after))
    want = torch.nn.functional.conv2d(x, g, None, (ah.stride, aw.stride), 0,
                                      (ah.dilation, aw.dilation), conn.groups)[0]
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("norm_name", NORM_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_numba_equals_torch(norm_name, dtype):
    torch.manual_seed(3)
    module = nn.Linear(37, 23).to(dtype)
    with torch.no_grad():
        module.weight[0, :5] = 0.0  # exact zeros take the no-log branch
        module.weight[1, :3] = 1e-41 if dtype == torch.float32 else 1e-310  # subnormals
    conn = linear(module, (1, 37), (1, 23))
    norm = NORMS[norm_name]
    job = LayerJob(None, conn, norm, torch.device("cpu"), 1 << 30)
    numba_stats = implicit.layer_stats(job)
    shift = norm.shift(conn.weight_bound())
    z, t, inv, col = implicit.linear_torch(module.weight.detach(), norm, shift)
    from foresight_sparse.entropy import row_entropy

    assert numba_stats.h_sum == pytest.approx(float(row_entropy(z, t).sum()), rel=1e-12)
    torch.testing.assert_close(numba_stats.col_sums, col, rtol=1e-12, atol=1e-15)


def test_fast_log2_of_float32_bits_is_exact_to_float64_rounding():
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_normal(200_000)).astype(np.float32) * np.float32(10.0) ** \
        rng.integers(-37, 38, 200_000).astype(np.float32)
    x = x[(x > np.finfo(np.float32).tiny) & np.isfinite(x)]
    x = np.concatenate([x, np.float32([1.0, 2.0, 0.5, 1.9999999, 3.4e38])])

    @numba.njit
    def fast(bits, log_hi, inv_hi):
        out = np.empty(bits.shape[0])
        for i in range(bits.shape[0]):
            out[i] = _kernels._log2_f32_bits(bits[i], log_hi, inv_hi)
        return out

    got = fast(x.view(np.int32), _kernels._LOG2_HI, _kernels._INV_HI)
    want = np.log2(x.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=4e-16, atol=4e-15)


@pytest.mark.parametrize("values", [
    [0.5, 0.25, 0.25, 0.0],
    [3.0, -1.0, 2.0, 0.0, 1e-300],
    [-1.0, -3.0, 2.0],
    [0.0, 0.0],
    [1.0],
])
def test_entropy_from_terms_equals_dense_H(values):
    v = torch.tensor(values, dtype=torch.float64)
    want = float(H(v / v.sum()))
    assert entropy_from_terms(column_terms(v)) == pytest.approx(want, rel=1e-13, abs=1e-15)


def test_column_terms_torch_path_equals_numba():
    v = torch.randn(1001, dtype=torch.float64)

    numba_terms = column_terms(v, 0.25)
    x = v + 0.25
    pos, neg = x > 0, x < 0
    want = torch.stack([x[pos].sum(), (x[pos] * torch.log2(x[pos])).sum(), x[neg].sum(),
                        (-x[neg] * torch.log2(-x[neg])).sum()])
    torch.testing.assert_close(numba_terms, want, rtol=1e-12, atol=1e-12)


def test_column_terms_adds_layers():
    a, b = torch.rand(50, dtype=torch.float64), torch.rand(70, dtype=torch.float64)
    joint = entropy_from_terms(column_terms(a) + column_terms(b))
    assert joint == pytest.approx(float(H(torch.cat([a, b]) / (a.sum() + b.sum()))), rel=1e-13)


def test_supports_only_exact_layers():
    def job(module, in_shape, norm=ei.lin_norm):
        out_shape = tuple(module(torch.zeros(in_shape)).shape)
        conn = conv2d(module, in_shape, out_shape)
        return LayerJob(None, conn, get_norm(norm), torch.device("cpu"), 1 << 30)

    assert implicit.supports(job(nn.Conv2d(2, 2, 3, padding=1), (1, 2, 5, 5)))
    assert not implicit.supports(job(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"),
                                     (1, 2, 5, 5)))
    assert not implicit.supports(job(nn.Conv2d(2, 2, 3), (1, 2, 5, 5), norm=lambda w: w))
    # circular padding narrower than the input never folds two taps onto one input
    assert implicit.supports(job(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"),
                                 (1, 2, 5, 5)))
    with pytest.raises(ValueError, match="implicit engine cannot express"):
        implicit.layer_stats(job(nn.Conv2d(2, 2, 3, padding=1, padding_mode="replicate"),
                                 (1, 2, 5, 5)))


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("norm_name", NORM_NAMES)
def test_padding_modes_implicit_equals_sparse(mode, norm_name):
    torch.manual_seed(5)
    # stride 3 and dilation 2 keep some reflect/replicate layers free of folded taps
    for module, size in [(nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode), 6),
                         (nn.Conv2d(2, 3, 3, padding=2, stride=3, dilation=2,
                                    padding_mode=mode), 7),
                         (nn.Conv2d(2, 2, 5, padding=2, padding_mode=mode, groups=2), 5)]:
        net = nn.Sequential(module)
        x = torch.zeros(1, 2, size, size)
        a = report(net, x, norm=NORMS[norm_name], engine="implicit")
        b = report(net, x, norm=NORMS[norm_name], engine="sparse")
        assert a.determinism == pytest.approx(b.determinism, rel=1e-11, abs=1e-12)
        assert a.degeneracy == pytest.approx(b.degeneracy, rel=1e-11)


def test_auto_reports_which_engine_served_each_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
                        nn.Conv2d(3, 3, 3, padding=1), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(12, 4))
    r = report(net, torch.zeros(1, 2, 4, 4))
    assert [layer.engine for layer in r.layers] == ["sparse", "implicit", "implicit",
                                                    "implicit"]
    s = report(net, torch.zeros(1, 2, 4, 4), engine="sparse")
    assert r.ei == pytest.approx(s.ei, rel=1e-10)


def test_large_conv_uses_float32_and_stays_within_1e8_of_sparse():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1))
    conn = conv2d(net[0], (1, 32, 48, 48), (1, 64, 48, 48))
    assert implicit.conv_dtype(conn, get_norm("lin")) == torch.float32
    assert implicit.conv_dtype(conn, get_norm(None)) == torch.float64
    x = torch.zeros(1, 32, 48, 48)
    for norm in (ei.lin_norm, ei.soft_norm, ei.sig_norm):
        a = report(net, x, norm=norm, engine="implicit")
        b = report(net, x, norm=norm, engine="sparse")
        assert a.determinism == pytest.approx(b.determinism, rel=1e-12)
        assert a.degeneracy == pytest.approx(b.degeneracy, rel=1e-8)


@pytest.mark.parametrize("weight", [-30.0, -50.0])
@pytest.mark.parametrize("norm_name", ["sig", "soft"])
def test_conv_rows_without_absent_entries_take_c_zero(weight, norm_name):
    """A 1x1 input under a padded 3x3 kernel: every row is full, and Z << c."""
    from foresight_sparse import reference

    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 1)).double()
    with torch.no_grad():
        net[0].weight.fill_(weight)
        net[0].weight[0, 0, 1, 1] = 1.0
    x = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    ref_norm = getattr(reference, f"{norm_name}_norm")
    r = report(net, x, norm=NORMS[norm_name], engine="implicit")
    assert [layer.engine for layer in r.layers] == ["implicit", "implicit"]
    assert r.degeneracy == pytest.approx(reference.degeneracy(net, x, norm=ref_norm), rel=1e-12)
    assert r.determinism == pytest.approx(reference.determinism(net, x, norm=ref_norm),
                                          rel=1e-12)
