"""The implicit engine's pieces: numba (CPU) and torch (CUDA) paths agree, and helpers are exact."""

from __future__ import annotations

import copy

import numba
import numpy as np
import pytest
import torch
from conftest import conv2d_cases, examples, jacobian_t, randomize_
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import foresight_sparse.ei as ei
from foresight_sparse import _entropy_kernels, _numba, report
from foresight_sparse.backends import TORCH, resolve_backend
from foresight_sparse.connectivity import conv2d, linear
from foresight_sparse.engines import LayerJob, _conv_kernels, conv, implicit
from foresight_sparse.engines.linear import linear_passes_torch
from foresight_sparse.entropy import H, column_terms, entropy_from_terms
from foresight_sparse.exceptions import UnsupportedEngineError
from foresight_sparse.norms import NORMS, get_norm

NORM_NAMES = ["lin", "soft", "sig", "none"]

#: Convolutions with seeded weights (drawn here, not from the global generator at import).
CONVS = [
    (randomize_(module, seed, scale=0.2), in_shape)
    for seed, (module, in_shape) in enumerate(
        [
            (nn.Conv2d(4, 6, 3, padding=1), (1, 4, 9, 7)),
            (
                nn.Conv2d(4, 6, (2, 3), stride=2, dilation=(2, 1), groups=2, padding=(1, 2)),
                (1, 4, 9, 8),
            ),
            (nn.Conv2d(3, 3, 4, padding="same", groups=3), (1, 3, 6, 6)),
            (nn.Conv2d(2, 5, 1, stride=3), (1, 2, 7, 7)),
        ]
    )
]


def _index(classes):
    """An axis's class of every output, as a tensor (the geometry's arrays are read-only)."""
    return torch.from_numpy(classes.out_index.copy())


def _conv_case(i):
    module, in_shape = CONVS[i]
    out_shape = tuple(module(torch.zeros(in_shape)).shape)
    return module, conv2d(module, in_shape, out_shape)


@pytest.mark.parametrize("column_pass", ["default", "gathered-sliced", "direct"])
@pytest.mark.parametrize("case", range(len(CONVS)))
@pytest.mark.parametrize("norm_name", NORM_NAMES)
def test_conv_columns_and_rows_equal_the_dense_matrix(case, norm_name, column_pass, monkeypatch):
    """Expanded from the position classes, Z per row and every column sum equal the dense
    matrix's, so the classes lose nothing; for both forms of the column pass, whatever the
    output channels per group: from a gathered copy of ``1/Z`` cut into slices of one
    output class each (a one-byte gather budget), and reading ``1/Z`` through the index."""
    from foresight_sparse import reference

    if column_pass == "gathered-sliced":
        monkeypatch.setattr(conv, "GATHER_BYTES", 1)
        monkeypatch.setattr(_conv_kernels, "DIRECT_MAX_OUT", 0)
    elif column_pass == "direct":
        monkeypatch.setattr(_conv_kernels, "DIRECT_MAX_OUT", 1 << 30)
    module, conn = _conv_case(case)
    norm = NORMS[norm_name]
    stats = implicit.layer_stats(LayerJob(conn, norm, torch.device("cpu"), 1 << 30))
    ch, cw = conn.axis_h.classes(), conn.axis_w.classes()
    c_out, oh, ow = conn.out_chw
    col = stats.col_sums.reshape(c_out, len(ch.out_mult), len(cw.out_mult))
    col = col[:, _index(ch)[:, None], _index(cw)[None, :]].reshape(-1) + stats.col_offset
    dense = conn.to_dense(torch.float64)
    p = dense if norm_name == "none" else getattr(reference, f"{norm_name}_norm")(dense)
    torch.testing.assert_close(col, p.sum(0), rtol=1e-12, atol=1e-14)
    assert stats.h_sum == pytest.approx(float(H(p, dim=1).sum()), rel=1e-12)
    weights = stats.col_weights.reshape(c_out, len(ch.out_mult), len(cw.out_mult))
    assert float(weights.sum()) == conn.n_cols


@settings(max_examples=examples(40))
@given(case=conv2d_cases(max_extra=14), norm_name=st.sampled_from(NORM_NAMES))
def test_drawn_conv_columns_equal_the_dense_matrix(case, norm_name):
    """Any drawn Conv2d the implicit engine accepts (every padding kind and mode, stride,
    dilation, groups), on maps large enough to have an interior: the class columns,
    expanded, are the dense matrix's column sums, and the class row entropies sum to its."""
    from foresight_sparse import reference

    conn = conv2d(case.module, case.in_shape, case.out_shape)
    norm = NORMS[norm_name]
    job = LayerJob(conn, norm, torch.device("cpu"), 1 << 30)
    assume(implicit.supports(job))
    stats = implicit.layer_stats(job)
    ch, cw = conn.axis_h.classes(), conn.axis_w.classes()
    c_out = conn.out_chw[0]
    col = stats.col_sums.reshape(c_out, len(ch.out_mult), len(cw.out_mult))
    col = col[:, _index(ch)[:, None], _index(cw)[None, :]].reshape(-1) + stats.col_offset
    dense = conn.to_dense(torch.float64)
    p = dense if norm_name == "none" else getattr(reference, f"{norm_name}_norm")(dense)
    scale = float(p.abs().sum(0).max()) or 1.0
    torch.testing.assert_close(col, p.sum(0), rtol=1e-11, atol=1e-12 * scale)
    assert stats.h_sum == pytest.approx(float(H(p, dim=1).sum()), rel=1e-11, abs=1e-11)


def test_classes_collapse_the_interior():
    """A 3x3 'same' convolution on 224x224 has 5 output classes per axis whatever the size;
    a 1x1 stride-2 one has a single class."""
    from foresight_sparse.geometry import Axis, AxisClasses

    cls = AxisClasses.from_axis(Axis(224, 224, 3, 1, 1, 1, 1))
    assert cls.out_mult.sum() == 224
    assert len(cls.out_mult) == 5 and len(cls.in_mult) == 3 and 220 in cls.out_mult
    cls = AxisClasses.from_axis(Axis(56, 28, 1, 2))
    assert len(cls.out_mult) == 1 and len(cls.in_mult) == 2  # odd inputs feed nothing


@pytest.mark.parametrize(
    "axis",
    [
        (9, 9, 3, 1, 1, 1, 1),
        (9, 4, 2, 2, 2, 1, 2),
        (17, 5, 5, 3, 1, 2, 0),
        (8, 8, 4, 1, 1, 1, 2),
        (6, 6, 3, 1, 1, 1, 1, "circular"),
    ],
)
def test_axis_classes_are_consistent(axis):
    """Inputs of one class share their tap-matrix row; outputs of one class read inputs of
    the same classes through every tap."""
    from foresight_sparse.geometry import Axis, AxisClasses

    ax = Axis(*axis)
    pairs = ax.pairs()
    cls = AxisClasses.from_axis(ax)
    assert ax.classes() is ax.classes()  # cached per axis
    profile = pairs.tap_matrix(ax.kernel)
    taps = ax.taps()
    # recover each input's class from its profile and check the output tables
    in_class = np.array(
        [
            np.flatnonzero((cls.in_profile == row).all(1) & (cls.in_counts == n))[0]
            for row, n in zip(profile, pairs.counts)
        ]
    )
    assert np.bincount(in_class, minlength=len(cls.in_mult)).tolist() == cls.in_mult.tolist()
    want = np.where(taps >= 0, in_class[np.maximum(taps, 0)], -1)
    np.testing.assert_array_equal(cls.out_taps[cls.out_index], want)
    assert np.bincount(cls.out_index).tolist() == cls.out_mult.tolist()


@pytest.mark.parametrize("case", range(len(CONVS)))
@pytest.mark.parametrize("norm_name", NORM_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_terms_numba_equals_torch(case, norm_name, dtype):
    """The numba and torch (what CUDA runs, here on CPU tensors) kernel passes agree."""
    module = copy.deepcopy(CONVS[case][0]).to(dtype)
    with torch.no_grad():  # exact zeros and subnormals take the no-log branches
        module.weight.view(-1)[:3] = 0.0
        module.weight.view(-1)[3:5] = 1e-41 if dtype == torch.float32 else 1e-310
    in_shape = (1, module.in_channels, 9, 8)
    conn = conv2d(module, in_shape, tuple(module(torch.zeros(in_shape, dtype=dtype)).shape))
    norm = NORMS[norm_name]
    shift = norm.shift(conn.weight_bound())
    cpu = torch.device("cpu")
    kind = resolve_backend("numba", cpu, norm).kind
    numba_terms = conv.kernel_terms_numba(conn, kind, shift)
    torch_terms = conv.kernel_terms_torch(conn, norm, shift, cpu)
    for a, b in zip(numba_terms, torch_terms):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


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
    cpu = torch.device("cpu")
    job = LayerJob(conn, norm, cpu, 1 << 30)
    numba_stats = implicit.layer_stats(job)
    assert numba_stats.backend == "numba"
    shift = norm.shift(conn.weight_bound())
    from foresight_sparse.entropy import row_entropy

    for block in (1 << 21, 80):  # one block; blocks of two rows
        z, t, inv, col = linear_passes_torch(
            LayerJob(conn, norm, cpu, 1 << 30, TORCH), shift, block
        )
        assert numba_stats.h_sum == pytest.approx(float(row_entropy(z, t).sum()), rel=1e-12)
        torch.testing.assert_close(numba_stats.col_sums, col, rtol=1e-12, atol=1e-15)


@numba.njit
def _each(fn, a):
    """``fn`` (a jitted scalar function) of every entry of ``a``, as float64."""
    out = np.empty(a.shape[0])
    for i in range(a.shape[0]):
        out[i] = fn(a[i])
    return out


def test_fast_log2_of_float32_bits_is_exact_to_float64_rounding():
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_normal(200_000)).astype(np.float32) * np.float32(10.0) ** rng.integers(
        -37, 38, 200_000
    ).astype(np.float32)
    x = x[(x > np.finfo(np.float32).tiny) & np.isfinite(x)]
    x = np.concatenate([x, np.float32([1.0, 2.0, 0.5, 1.9999999, 3.4e38])])

    def fast(bits):
        return _each(_numba._log2_f32_bits, bits)

    got = fast(x.view(np.int32))
    want = np.log2(x.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-14)
    # near 1 the error is relative: log2 of 1 + 2**-23 is 1.7e-7
    near_one = np.float32(1.0) + np.arange(1, 2000, dtype=np.float32) * np.float32(2.0**-23)
    np.testing.assert_allclose(
        fast(near_one.view(np.int32)), np.log2(near_one.astype(np.float64)), rtol=1e-13, atol=0
    )


def test_fast_log2_of_float64_is_exact_to_float64_rounding():
    rng = np.random.default_rng(1)
    x = np.ldexp(rng.random(300_000) + 0.5, rng.integers(-1021, 1023, 300_000))
    root = np.sqrt(0.5)
    edges = [1.0, 2.0, 0.5, np.finfo(np.float64).tiny, np.finfo(np.float64).max]
    edges += [np.nextafter(root, 0.0), root, np.nextafter(root, 1.0), 2 * root]
    x = np.concatenate([x, edges])

    def fast(a):
        return _each(_numba._log2_f64, a)

    np.testing.assert_allclose(fast(x), np.log2(x), rtol=0, atol=2.5e-13)  # 1 ulp at 1023
    near_one = 1.0 + np.arange(-1000, 1000) * 2.0**-40
    near_one = near_one[near_one != 1.0]
    np.testing.assert_allclose(fast(near_one), np.log2(near_one), rtol=1e-13, atol=0)


@pytest.mark.parametrize("n", [50, 300_000])  # serial and parallel
def test_column_terms_skip_nan_entries_and_take_subnormal_ones(n):
    rng = np.random.default_rng(n)
    v = rng.standard_normal(n) * 10.0 ** rng.integers(-5, 5, n)
    v[::7] = 0.0
    v[1], v[2], v[3] = np.nan, 1e-310, -1e-310
    w = rng.random(n) * 3.0
    got = _entropy_kernels.column_terms(v, 0.0, w)
    x = v[np.isfinite(v)]
    wx = w[np.isfinite(v)]
    pos, neg = x > 0, x < 0
    normal = np.abs(x) >= np.finfo(np.float64).tiny
    want = [
        (wx * x)[pos].sum(),
        (wx * x * np.log2(np.where(normal & pos, x, 1.0)))[pos].sum(),
        (wx * x)[neg].sum(),
        (-wx * x * np.log2(np.where(normal & neg, -x, 1.0)))[neg].sum(),
    ]
    np.testing.assert_allclose(got, want, rtol=1e-11)


@pytest.mark.parametrize(
    "values",
    [
        [0.5, 0.25, 0.25, 0.0],
        [3.0, -1.0, 2.0, 0.0, 1e-300],
        [-1.0, -3.0, 2.0],
        [0.0, 0.0],
        [1.0],
    ],
)
def test_entropy_from_terms_equals_dense_H(values):
    v = torch.tensor(values, dtype=torch.float64)
    want = float(H(v / v.sum()))
    assert entropy_from_terms(column_terms(v)) == pytest.approx(want, rel=1e-13, abs=1e-15)


def test_column_terms_torch_path_equals_numba():
    v = torch.randn(1001, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    numba_terms = column_terms(v, 0.25)
    x = v + 0.25
    pos, neg = x > 0, x < 0
    want = torch.stack(
        [
            x[pos].sum(),
            (x[pos] * torch.log2(x[pos])).sum(),
            x[neg].sum(),
            (-x[neg] * torch.log2(-x[neg])).sum(),
        ]
    )
    torch.testing.assert_close(numba_terms, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(column_terms(v, 0.25, backend=TORCH), want, rtol=1e-12, atol=1e-12)


def test_weighted_column_terms_count_each_entry_weight_times():
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(300, dtype=torch.float64, generator=gen)
    w = torch.randint(1, 5, (300,), generator=gen).to(torch.float64)
    repeated = torch.repeat_interleave(v, w.long())
    want = column_terms(repeated, -0.1)
    torch.testing.assert_close(column_terms(v, -0.1, w), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        column_terms(v, -0.1, w, backend=TORCH), want, rtol=1e-12, atol=1e-12
    )


def test_column_terms_adds_layers():
    gen = torch.Generator().manual_seed(2)
    a = torch.rand(50, dtype=torch.float64, generator=gen)
    b = torch.rand(70, dtype=torch.float64, generator=gen)
    joint = entropy_from_terms(column_terms(a) + column_terms(b))
    assert joint == pytest.approx(float(H(torch.cat([a, b]) / (a.sum() + b.sum()))), rel=1e-13)


def test_supports_only_exact_layers():
    def job(module, in_shape, norm=ei.lin_norm):
        out_shape = tuple(module(torch.zeros(in_shape)).shape)
        conn = conv2d(module, in_shape, out_shape)
        return LayerJob(conn, get_norm(norm), torch.device("cpu"), 1 << 30)

    assert implicit.supports(job(nn.Conv2d(2, 2, 3, padding=1), (1, 2, 5, 5)))
    assert not implicit.supports(
        job(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), (1, 2, 5, 5))
    )
    assert not implicit.supports(job(nn.Conv2d(2, 2, 3), (1, 2, 5, 5), norm=lambda w: w))
    # circular padding narrower than the input never folds two taps onto one input
    assert implicit.supports(
        job(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), (1, 2, 5, 5))
    )
    with pytest.raises(UnsupportedEngineError, match="implicit engine cannot express"):
        implicit.layer_stats(
            job(nn.Conv2d(2, 2, 3, padding=1, padding_mode="replicate"), (1, 2, 5, 5))
        )


#: Convolutions of the padding-mode test, with their input size and the padding modes under
#: which some output reads one input through two taps (reflect or replicate padding folds
#: them): the implicit engine hands those layers to the sparse engine.
PADDED = [
    (dict(kernel_size=3, padding=1), 6, {"reflect", "replicate"}),
    (dict(kernel_size=3, padding=2, stride=3, dilation=2), 7, {"reflect", "replicate"}),
    (dict(kernel_size=5, padding=2, groups=2), 5, {"reflect", "replicate"}),
    # a 2-tap kernel reflected at -1 reads input 1, not input 0 again: nothing folds
    (dict(kernel_size=2, padding=1), 6, {"replicate"}),
    # taps 2 apart, replicated at -1, read inputs 0 and 1: nothing folds
    (dict(kernel_size=(2, 3), padding=(1, 0), dilation=(2, 1), groups=2), 5, {"reflect"}),
]


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("norm_name", NORM_NAMES)
def test_padding_modes_implicit_equals_reference(mode, norm_name):
    from foresight_sparse import reference

    ref_norm = None if norm_name == "none" else getattr(reference, f"{norm_name}_norm")
    served = []
    for i, (options, size, folding) in enumerate(PADDED):
        torch.manual_seed(i)
        module = nn.Conv2d(2, 2 + i % 2, padding_mode=mode, **options).double()
        net = nn.Sequential(module)
        x = torch.zeros(1, 2, size, size, dtype=torch.float64)
        # the fold, seen independently: an entry of the all-ones layer's Jacobian above 1
        ones = copy.deepcopy(module)
        with torch.no_grad():
            ones.weight.fill_(1.0)
        assert (float(jacobian_t(ones, tuple(x.shape)).max()) > 1) == (mode in folding), i
        a = report(net, x, norm=NORMS[norm_name], engine="implicit")
        # which engine served the layer: the fold falls back to 'sparse', all else is implicit
        assert a.layers[0].engine == ("sparse" if mode in folding else "implicit"), (i, options)
        served.append(a.layers[0].engine)
        det = reference.determinism(net, x, norm=ref_norm)
        deg = reference.degeneracy(net, x, norm=ref_norm)
        assert a.determinism == pytest.approx(det, rel=1e-11, abs=1e-12), i
        assert a.degeneracy == pytest.approx(deg, rel=1e-11, abs=1e-12), i
    assert "implicit" in served  # every padding mode has layers the implicit engine runs


def test_auto_reports_which_engine_served_each_layer():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(3, 3, 3, padding=1),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(12, 4),
    )
    r = report(net, torch.zeros(1, 2, 4, 4))
    assert [layer.engine for layer in r.layers] == ["sparse", "implicit", "implicit", "implicit"]
    s = report(net, torch.zeros(1, 2, 4, 4), engine="sparse")
    assert r.ei == pytest.approx(s.ei, rel=1e-10)


def test_large_conv_equals_sparse_to_float64_rounding():
    """Everything is float64 on the classes, so a large layer matches to 1e-11, not 1e-8."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.Conv2d(64, 16, 5, stride=2))
    x = torch.zeros(1, 32, 48, 48)
    for norm in (ei.lin_norm, ei.soft_norm, ei.sig_norm, None):
        a = report(net, x, norm=norm, engine="implicit")
        b = report(net, x, norm=norm, engine="sparse")
        assert [layer.engine for layer in a.layers] == ["implicit", "implicit"]
        assert a.determinism == pytest.approx(b.determinism, rel=1e-12)
        assert a.degeneracy == pytest.approx(b.degeneracy, rel=1e-11)


@pytest.mark.parametrize("weight", [-30.0, -50.0])
@pytest.mark.parametrize("norm_name", ["sig", "soft"])
def test_conv_rows_without_absent_entries_take_c_zero(weight, norm_name):
    """A 1x1 input under a padded 3x3 kernel: every row is full, and Z << c."""
    from foresight_sparse import reference

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 1)).double()
    with torch.no_grad():
        net[0].weight.fill_(weight)
        net[0].weight[0, 0, 1, 1] = 1.0
    x = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    ref_norm = getattr(reference, f"{norm_name}_norm")
    r = report(net, x, norm=NORMS[norm_name], engine="implicit")
    assert [layer.engine for layer in r.layers] == ["implicit", "implicit"]
    assert r.degeneracy == pytest.approx(reference.degeneracy(net, x, norm=ref_norm), rel=1e-12)
    assert r.determinism == pytest.approx(reference.determinism(net, x, norm=ref_norm), rel=1e-12)
