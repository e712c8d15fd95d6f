"""The layers beyond the seed's three: 1-d and 3-d convolutions and pools, transposed
convolutions and adaptive pools (and their 2-d forms), drawn by hypothesis with their
options.

Each drawn layer is checked against two independent oracles: the transposed autograd
Jacobian of the bias-free float64 layer, and the dense reference (index formulas, no code
shared with the builders). EI, determinism and degeneracy of the one-layer network must
match the reference for every norm and engine.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import (
    ABS_FLOOR,
    ENGINE_RTOL,
    F64,
    PADDING_MODES,
    LayerCase,
    assert_close,
    examples,
    jacobian_t,
    out_shape_of,
    randomize_,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import foresight_sparse as fs
from foresight_sparse import connectivity as C
from foresight_sparse import reference as R

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
ADAPTIVE = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}

#: Largest spatial extent drawn per axis, by dimension (the reference loops in Python).
MAX_SIZE = {1: 9, 2: 6, 3: 4}


def _weights(draw, module: nn.Module) -> nn.Module:
    module = module.double()
    randomize_(
        module,
        draw(st.integers(0, 2**16)),
        scale=draw(st.sampled_from([0.3, 1.0, 4.0])),
        zero_frac=draw(st.sampled_from([0, 0.3])),
    )
    return module


def _case(module: nn.Module, in_shape) -> LayerCase:
    return LayerCase(module, in_shape, out_shape_of(module, in_shape))


@st.composite
def convnd_cases(draw, nd: int) -> LayerCase:
    """A Conv{nd}d with groups, stride, int/tuple/'same'/'valid' padding, every mode and
    dilation, on an input it accepts."""
    groups = draw(st.sampled_from([1, 1, 2]))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    top = 3 if nd < 3 else 2
    kernel = tuple(draw(st.integers(1, top)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    mode = draw(st.sampled_from(PADDING_MODES))
    kind = draw(st.sampled_from(["tuple", "same", "valid"]))
    if kind == "same":
        stride, padding = (1,) * nd, "same"
        pads = [
            (d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)
        ]
    else:
        stride = tuple(draw(st.integers(1, 2)) for _ in range(nd))
        if kind == "valid":
            padding, pads = "valid", [(0, 0)] * nd
        else:
            padding = tuple(draw(st.integers(0, 2)) for _ in range(nd))
            pads = [(p, p) for p in padding]
    sizes = []
    for k, d, (pb, pa) in zip(kernel, dilation, pads):
        lo = max(1, d * (k - 1) + 1 - pb - pa)
        if mode == "reflect":
            lo = max(lo, max(pb, pa) + 1)
        elif mode == "circular":
            lo = max(lo, max(pb, pa))
        sizes.append(draw(st.integers(lo, max(lo, MAX_SIZE[nd]))))
    module = CONV[nd](
        c_in,
        c_out,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=mode,
        bias=draw(st.booleans()),
    )
    return _case(_weights(draw, module), (1, c_in, *sizes))


@st.composite
def conv_transposend_cases(draw, nd: int) -> LayerCase:
    """A ConvTranspose{nd}d with groups, stride, padding, output_padding and dilation."""
    groups = draw(st.sampled_from([1, 1, 2]))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    top = 3 if nd < 3 else 2
    kernel, stride, dilation, padding, out_pad, sizes = [], [], [], [], [], []
    for _ in range(nd):
        k, s, d = draw(st.integers(1, top)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
        p = draw(st.integers(0, 2))
        op = draw(st.integers(0, max(s, d) - 1))
        # the output (n - 1) s - 2p + d (k - 1) + op + 1 must be positive
        lo = max(1, 1 + -(-(2 * p - d * (k - 1) - op) // s))
        kernel.append(k)
        stride.append(s)
        dilation.append(d)
        padding.append(p)
        out_pad.append(op)
        sizes.append(draw(st.integers(lo, max(lo, MAX_SIZE[nd] - 2))))
    module = CONV_T[nd](
        c_in,
        c_out,
        tuple(kernel),
        stride=tuple(stride),
        padding=tuple(padding),
        output_padding=tuple(out_pad),
        dilation=tuple(dilation),
        groups=groups,
        bias=draw(st.booleans()),
    )
    return _case(_weights(draw, module), (1, c_in, *sizes))


@st.composite
def avgpoolnd_cases(draw, nd: int) -> LayerCase:
    """An AvgPool{nd}d with every option (divisor_override where the type has it)."""
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    stride = draw(st.one_of(st.none(), st.tuples(*[st.integers(1, 2)] * nd)))
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    # avg_pool3d also wants every input axis at least as long as the kernel
    sizes = [
        draw(st.integers(k if nd == 3 else max(1, k - 2 * p), MAX_SIZE[nd]))
        for k, p in zip(kernel, padding)
    ]
    kwargs = dict(
        stride=stride,
        padding=padding,
        ceil_mode=draw(st.booleans()),
        count_include_pad=draw(st.booleans()),
    )
    if nd > 1:
        kwargs["divisor_override"] = draw(st.one_of(st.none(), st.integers(1, 5)))
    module = POOL[nd](kernel, **kwargs)
    return _case(module, (1, draw(st.integers(1, 2)), *sizes))


@st.composite
def adaptive_cases(draw, nd: int) -> LayerCase:
    """An AdaptiveAvgPool{nd}d, output sizes below, equal to and above the input's (None
    keeps an axis)."""
    sizes = [draw(st.integers(1, MAX_SIZE[nd])) for _ in range(nd)]
    out = [draw(st.integers(1, n + 2)) for n in sizes]
    if nd > 1:
        out = [None if draw(st.integers(0, 3)) == 0 else o for o in out]
    module = ADAPTIVE[nd](out[0] if nd == 1 else tuple(out))
    return _case(module, (1, draw(st.integers(1, 2)), *sizes))


#: One strategy per new type and dimension (the 2-d seed types are drawn in test_builders).
NEW_CASES = {
    **{CONV[nd]: convnd_cases(nd) for nd in (1, 3)},
    **{CONV_T[nd]: conv_transposend_cases(nd) for nd in (1, 2, 3)},
    **{POOL[nd]: avgpoolnd_cases(nd) for nd in (1, 3)},
    **{ADAPTIVE[nd]: adaptive_cases(nd) for nd in (1, 2, 3)},
}
NEW_TYPES = pytest.mark.parametrize("kind", list(NEW_CASES), ids=lambda t: t.__name__)


def reference_matrix(case: LayerCase) -> torch.Tensor:
    return R.ALL_MODULES[type(case.module)](case.module, case.in_shape, case.out_shape)


def conn_of(case: LayerCase) -> C.Connectivity:
    return C.connectivity(case.module, case.in_shape, case.out_shape)


def test_every_registered_type_is_drawn():
    from test_builders import CASES

    assert set(C.REGISTRY) == set(CASES) | set(NEW_CASES)
    assert C.EXTENDED == set(NEW_CASES)


@NEW_TYPES
@settings(max_examples=examples(12))
@given(data=st.data())
def test_builder_and_reference_equal_the_jacobian(kind, data):
    case = data.draw(NEW_CASES[kind], label="case")
    expected = jacobian_t(case.module, case.in_shape)
    torch.testing.assert_close(reference_matrix(case), expected, rtol=1e-14, atol=1e-15)
    conn = conn_of(case)
    assert (conn.n_rows, conn.n_cols) == tuple(expected.shape)
    torch.testing.assert_close(conn.to_dense(F64), expected, rtol=1e-14, atol=1e-15)
    # both block paths (numba on the CPU; torch, as on CUDA) give the same entries
    a = conn.block(0, conn.n_rows, with_rows=True)
    b = conn.block_torch(0, conn.n_rows, with_rows=True)
    assert torch.equal(a.rowptr, b.rowptr) and torch.equal(a.cols, b.cols)
    torch.testing.assert_close(a.vals, b.vals, rtol=1e-15, atol=0)


@NEW_TYPES
@settings(max_examples=examples(8))
@given(data=st.data())
def test_structure_is_the_jacobians(kind, data):
    case = data.draw(NEW_CASES[kind], label="case")
    structure = copy.deepcopy(case.module)
    if getattr(structure, "weight", None) is not None:
        with torch.no_grad():
            structure.weight.fill_(1.0)  # no entry can cancel to zero
    counts = (jacobian_t(structure, case.in_shape) != 0).sum(dim=1).numpy()
    conn = C.connectivity(structure, case.in_shape, case.out_shape)
    assert np.array_equal(conn.row_counts(0, conn.n_rows), counts)
    assert conn.nnz == int(counts.sum()) == conn_of(case).nnz


NORMS = {"lin": R.lin_norm, "soft": R.soft_norm, "sig": R.sig_norm, None: None}


@NEW_TYPES
@settings(max_examples=examples(6))
@given(data=st.data())
def test_every_engine_and_norm_matches_the_reference(kind, data):
    case = data.draw(NEW_CASES[kind], label="case")
    model = nn.Sequential(case.module)
    x = torch.zeros(case.in_shape, dtype=F64)
    for norm, ref_norm in NORMS.items():
        det = R.determinism(model, x, norm=ref_norm, layers="all")
        deg = R.degeneracy(model, x, norm=ref_norm, layers="all")
        for engine in ("sparse", "auto", "implicit", "dense"):
            rep = fs.report(model, x, norm=norm, engine=engine, layers="all")
            what = f"{case!r}, norm {norm}, engine {engine}"
            assert_close(rep.determinism, det, ENGINE_RTOL[engine], ABS_FLOOR, what)
            assert_close(rep.degeneracy, deg, ENGINE_RTOL[engine], ABS_FLOOR, what)
            assert_close(rep.ei, deg - det, ENGINE_RTOL[engine], ABS_FLOOR, what)


@pytest.mark.parametrize(
    "module, in_shape",
    [
        (nn.Conv1d(2, 4, 3, padding=1), (1, 2, 9)),
        (nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1, groups=2), (1, 2, 4, 6, 6)),
        (nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), (1, 2, 4, 4)),
        (nn.ConvTranspose3d(2, 2, 2, stride=2, groups=2), (1, 2, 2, 3, 3)),
        (nn.AvgPool3d(2, padding=1), (1, 2, 4, 4, 4)),
        (nn.AvgPool1d(3, stride=2), (1, 2, 9)),
        (nn.AdaptiveAvgPool2d((1, 1)), (1, 3, 5, 5)),
        (nn.AdaptiveAvgPool3d((2, 3, 2)), (1, 2, 5, 5, 3)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_implicit_engine_serves_single_tap_layers(module, in_shape):
    module = randomize_(module.double(), 3)
    model = nn.Sequential(module)
    x = torch.zeros(in_shape, dtype=F64)
    p = fs.plan(model, x, layers="all")
    assert [lay.engine for lay in p.layers] == ["implicit"]
    rep = p.report()
    assert rep.layers[0].engine == "implicit"
    assert_close(rep.ei, R.ei(model, x, layers="all"), 1e-9, what=type(module).__name__)


@pytest.mark.parametrize("cls, nd", [(nn.ConvTranspose2d, 2), (nn.Conv3d, 3)])
def test_plan_rebinds_new_weights(cls, nd):
    torch.manual_seed(0)
    module = cls(4, 6, 3, stride=2, groups=2).double()
    x = torch.zeros((1, 4) + (4,) * nd, dtype=F64)
    model = nn.Sequential(module)
    other = randomize_(copy.deepcopy(model), 9)
    expected = R.ei(other, x, layers="all")
    for engine in ("sparse", "implicit"):
        p = fs.plan(model, x, layers="all", engine=engine)
        assert_close(p.report(other.state_dict()).ei, expected, 1e-9, what=engine)


def test_seed_selection_skips_the_new_types():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(6, 2)).double()
    x = torch.zeros(1, 1, 5, dtype=F64)
    with pytest.warns(UserWarning, match="Conv1d"):
        rep = fs.report(model, x)
    assert [lay.type for lay in rep.layers] == ["Linear"]
    rep_all = fs.report(model, x, layers="all")
    assert [lay.type for lay in rep_all.layers] == ["Conv1d", "Linear"]
    assert_close(rep_all.ei, R.ei(model, x, layers="all"), 1e-9)


@pytest.mark.parametrize(
    "module, in_shape, out_shape, match",
    [
        (nn.Conv3d(2, 3, 3), (2, 5, 5), (1, 3, 3, 3), r"5-d \(N, C, D, H, W\)"),
        (nn.Conv1d(2, 3, 3), (1, 2, 5), (1, 3, 4), r"maps input \(1, 2, 5\) to \(N, 3, 3\)"),
        (nn.ConvTranspose1d(2, 3, 3, stride=2), (1, 2, 5), (1, 3, 4), "output_padding"),
        (nn.AvgPool3d(2), (1, 2, 4, 4, 4), (1, 2, 3, 2, 2), r"\(N, 2, 2, 2, 2\)"),
        (nn.AdaptiveAvgPool2d(3), (1, 2, 5, 5), (1, 2, 2, 2), "output_size=3"),
    ],
    ids=["conv3d-rank", "conv1d-size", "convT-size", "pool3d-size", "adaptive-size"],
)
def test_shape_errors_name_the_layer_and_shapes(module, in_shape, out_shape, match):
    with pytest.raises(fs.ShapeMismatchError, match=match):
        C.connectivity(module, in_shape, out_shape, label="net.0")


@NEW_TYPES
@settings(max_examples=examples(4))
@given(data=st.data())
def test_torch_paths_match_the_reference(kind, data):
    """The engines' torch forms (what CUDA runs; here on CPU tensors, backend='torch'): the
    implicit engine's torch passes and the sparse engine's torch blocks and reduction."""
    case = data.draw(NEW_CASES[kind], label="case")
    model = nn.Sequential(case.module)
    x = torch.zeros(case.in_shape, dtype=F64)
    for norm, ref_norm in (("lin", R.lin_norm), ("soft", R.soft_norm)):
        expected = R.ei(model, x, norm=ref_norm, layers="all")
        for engine in ("sparse", "implicit"):
            rep = fs.report(model, x, norm=norm, engine=engine, layers="all", backend="torch")
            assert [lay.backend for lay in rep.layers] == ["torch"], f"{case!r} {norm} {engine}"
            assert_close(rep.ei, expected, 1e-9, ABS_FLOOR, f"{case!r} {norm} {engine}")
