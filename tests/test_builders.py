"""The connectivity builders: exact matrices, every layout, both block paths, budgets, registry.

The expected matrix of a layer is computed here from its definition, the transposed
autograd Jacobian of the bias-free float64 layer, not taken from the reference.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse
import torch
from conftest import (
    F64,
    LayerCase,
    avgpool2d_cases,
    conv2d_cases,
    densify,
    examples,
    jacobian_t,
    linear_cases,
    out_shape_of,
    randomize_,
    storage_bytes,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import foresight_sparse as fs
from foresight_sparse import connectivity as C
from foresight_sparse import ei
from foresight_sparse import reference as R
from foresight_sparse.budget import format_bytes

#: One strategy per registered module type: adding a builder without a strategy fails
#: test_every_registered_type_is_drawn.
CASES = {nn.Linear: linear_cases(), nn.Conv2d: conv2d_cases(), nn.AvgPool2d: avgpool2d_cases()}
BUILTIN = {
    nn.Linear: ei.linear_create_matrix,
    nn.Conv2d: ei.conv2d_create_matrix,
    nn.AvgPool2d: ei.avgpool2d_create_matrix,
}
ADAPTERS = {nn.Linear: C.linear, nn.Conv2d: C.conv2d, nn.AvgPool2d: C.avgpool2d}
TYPES = pytest.mark.parametrize("kind", list(CASES), ids=lambda t: t.__name__)


def build(case: LayerCase, **kwargs):
    return BUILTIN[type(case.module)](case.module, case.in_shape, case.out_shape, **kwargs)


def conn_of(case: LayerCase, legacy: bool = False) -> C.Connectivity:
    return C.connectivity(case.module, case.in_shape, case.out_shape, legacy=legacy)


def value_tol(case: LayerCase) -> dict:
    # Pools have no weight: their matrix is built in the default dtype (float32).
    if isinstance(case.module, nn.AvgPool2d):
        return dict(rtol=1e-6, atol=1e-7)
    return dict(rtol=1e-13, atol=1e-14)


def test_every_registered_type_is_drawn():
    assert set(ei.VALID_MODULES) == set(CASES)


# --------------------------------------------------------------------------- exact matrices


@TYPES
@given(data=st.data())
def test_builder_equals_transposed_jacobian(kind, data):
    case = data.draw(CASES[kind], label="case")
    expected = jacobian_t(case.module, case.in_shape)
    A = build(case)
    assert tuple(A.shape) == tuple(expected.shape)
    torch.testing.assert_close(densify(A), expected, **value_tol(case))
    # the float64 path the engines read is exact to rounding, pools included
    torch.testing.assert_close(conn_of(case).to_dense(F64), expected, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("in_hw, kernel, stride", [((7, 7), 2, 3), ((5, 8), (1, 3), (2, 3))])
def test_stride_leaves_inputs_unconnected(in_hw, kernel, stride):
    conv = randomize_(nn.Conv2d(2, 3, kernel, stride=stride).double(), 0)
    in_shape = (1, 2, *in_hw)
    case = LayerCase(conv, in_shape, out_shape_of(conv, in_shape))
    A = densify(build(case))
    J = jacobian_t(conv, in_shape)
    torch.testing.assert_close(A, J, rtol=1e-13, atol=1e-14)
    empty = (J == 0).all(dim=1).numpy()
    assert empty.any()
    counts = conn_of(case).row_counts(0, A.shape[0])
    assert (counts[empty] == 0).all() and (counts[~empty] > 0).all()


def test_linear_builder_is_weight_transposed():
    layer = randomize_(nn.Linear(5, 3), 1)
    A = ei.linear_create_matrix(layer, (1, 5), (1, 3))
    assert torch.equal(densify(A), layer.weight.detach().t().double())
    # extra leading dimensions share the weights and add no neurons, as in the old module
    A2 = ei.linear_create_matrix(layer, (1, 4, 5), (1, 4, 3))
    assert torch.equal(densify(A2), layer.weight.detach().t().double())


@given(case=avgpool2d_cases())
def test_legacy_pool_equals_reference_legacy(case):
    pads = case.module.padding
    if pads not in (0, (0, 0)):
        with pytest.raises(fs.UnsupportedLayerError, match="padding"):
            ei.avgpool2d_create_matrix(case.module, case.in_shape, case.out_shape, legacy=True)
        return
    A = ei.avgpool2d_create_matrix(case.module, case.in_shape, case.out_shape, legacy=True)
    expected = R.avgpool2d_create_matrix(case.module, case.in_shape, case.out_shape, legacy=True)
    torch.testing.assert_close(densify(A), expected, rtol=1e-6, atol=1e-7)


def test_legacy_pool_float64_entries_are_exact():
    # Regression: the legacy kernel 1/(kh*kw) was once built in float32, so the float64
    # entries the engines read were rounded (EI off by ~1e-8 relative with norm=None).
    pool = nn.AvgPool2d(3)
    conn = C.avgpool2d(pool, (1, 2, 6, 6), (1, 2, 2, 2), legacy=True)
    expected = R.avgpool2d_create_matrix(pool, (1, 2, 6, 6), (1, 2, 2, 2), legacy=True)
    assert torch.equal(conn.to_dense(F64), expected)


# --------------------------------------------------------------------------- layouts


@TYPES
@given(data=st.data())
def test_coo_layout(kind, data):
    case = data.draw(CASES[kind], label="case")
    A = build(case, layout=torch.sparse_coo)
    assert A.layout == torch.sparse_coo
    assert A.is_coalesced()
    idx = A.indices()
    assert idx.dtype == torch.int64
    flat = idx[0] * A.shape[1] + idx[1]
    assert bool((flat[1:] > flat[:-1]).all()), "indices not strictly sorted row-major"
    weight = getattr(case.module, "weight", None)
    if weight is not None:
        assert A.dtype == weight.dtype
        assert A.device == weight.device
    # coalesce() of a correctly coalesced tensor changes nothing
    assert torch.equal(A.coalesce().indices(), idx)


@TYPES
@given(data=st.data())
def test_csr_and_scipy_layouts(kind, data):
    case = data.draw(CASES[kind], label="case")
    coo = densify(build(case))
    csr = build(case, layout=torch.sparse_csr)
    assert csr.layout == torch.sparse_csr
    assert csr.crow_indices().dtype == torch.int32
    assert csr.col_indices().dtype == torch.int32
    assert torch.equal(densify(csr), coo)
    sp = build(case, layout="scipy")
    assert isinstance(sp, scipy.sparse.csr_array)
    assert sp.shape == tuple(coo.shape)
    assert sp.has_sorted_indices
    assert torch.equal(densify(sp), coo)
    weight = getattr(case.module, "weight", None)
    if weight is not None:
        assert csr.dtype == weight.dtype
        assert sp.dtype == torch.empty((), dtype=weight.dtype).numpy().dtype


@pytest.mark.parametrize("layout", [torch.sparse_coo, torch.sparse_csr], ids=["coo", "csr"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
def test_conv_layout_dtype_follows_weight(dtype, layout):
    # Regression: float16 and bfloat16 kernels once crashed the numba block kernel.
    torch.manual_seed(0)
    layer = nn.Conv2d(2, 2, 2).to(dtype)
    A = ei.conv2d_create_matrix(layer, (1, 2, 3, 3), (1, 2, 2, 2), layout=layout)
    assert A.dtype == dtype
    expected = jacobian_t(layer.double(), (1, 2, 3, 3))
    assert torch.equal(densify(A), expected)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
def test_linear_layout_dtype_follows_weight(dtype):
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).to(dtype)
    for layout in (torch.sparse_coo, torch.sparse_csr):
        A = ei.linear_create_matrix(layer, (1, 3), (1, 2), layout=layout)
        assert A.dtype == dtype
        assert torch.equal(densify(A), layer.weight.detach().t().double())


def test_unknown_layout_is_refused():
    with pytest.raises(fs.UnknownNameError, match="layout"):
        ei.linear_create_matrix(nn.Linear(2, 2), (1, 2), (1, 2), layout=torch.strided)


# --------------------------------------------------------------------------- block paths


@given(case=st.one_of(conv2d_cases(), avgpool2d_cases()), data=st.data())
def test_block_torch_equals_numba_block(case, data):
    conn = conn_of(case)
    n = conn.n_rows
    r0 = data.draw(st.integers(0, n), label="r0")
    r1 = data.draw(st.integers(r0, n), label="r1")
    for dtype, index_dtype in ((F64, torch.int64), (torch.float32, torch.int32)):
        a = conn.block(r0, r1, dtype=dtype, device="cpu", with_rows=True, index_dtype=index_dtype)
        b = conn.block_torch(
            r0, r1, dtype=dtype, device="cpu", with_rows=True, index_dtype=index_dtype
        )
        assert a.r0 == b.r0 == r0
        assert torch.equal(a.rowptr.to(torch.int64), b.rowptr.to(torch.int64))
        assert a.cols.dtype == b.cols.dtype == index_dtype
        assert torch.equal(a.cols, b.cols)
        assert torch.equal(a.rows.to(torch.int64), b.rows.to(torch.int64))
        assert a.vals.dtype == b.vals.dtype == dtype
        torch.testing.assert_close(a.vals, b.vals, rtol=1e-15, atol=0)
    # a block is the matching slice of the whole matrix
    whole = conn.to_dense(F64)
    blk = conn.block_torch(r0, r1, with_rows=True)
    part = torch.zeros(r1 - r0, conn.n_cols, dtype=F64)
    part[blk.rows - r0, blk.cols] = blk.vals
    assert torch.equal(part, whole[r0:r1])


@TYPES
@given(data=st.data())
def test_blocks_concatenate_to_whole(kind, data):
    case = data.draw(CASES[kind], label="case")
    conn = conn_of(case)
    cut = data.draw(st.integers(0, conn.n_rows), label="cut")
    whole = conn.block(0, conn.n_rows, with_rows=True)
    a, b = conn.block(0, cut, with_rows=True), conn.block(cut, conn.n_rows, with_rows=True)
    assert torch.equal(torch.cat([a.cols, b.cols]), whole.cols)
    assert torch.equal(torch.cat([a.vals, b.vals]), whole.vals)
    assert torch.equal(torch.cat([a.rows, b.rows]), whole.rows)
    assert b.n_rows == conn.n_rows - cut


# --------------------------------------------------------------------------- structure


@TYPES
@given(data=st.data())
def test_nnz_and_row_counts_are_structural(kind, data):
    case = data.draw(CASES[kind], label="case")
    structure = copy.deepcopy(case.module)
    if getattr(structure, "weight", None) is not None:
        with torch.no_grad():
            structure.weight.fill_(1.0)  # positive weights: no entry can cancel to zero
    J = jacobian_t(structure, case.in_shape)
    counts = (J != 0).sum(dim=1).numpy()
    conn = C.connectivity(structure, case.in_shape, case.out_shape)
    assert conn.n_rows == J.shape[0] and conn.n_cols == J.shape[1]
    assert conn.nnz == int(counts.sum())
    assert np.array_equal(conn.row_counts(0, conn.n_rows), counts)
    assert conn.max_row_nnz == int(counts.max(initial=0))
    r0 = data.draw(st.integers(0, conn.n_rows), label="r0")
    r1 = data.draw(st.integers(r0, conn.n_rows), label="r1")
    assert np.array_equal(conn.row_counts(r0, r1), counts[r0:r1])
    # the stored entries are exactly the structural ones, zero weights included
    real = conn_of(case)
    assert real.nnz == conn.nnz
    assert build(case)._nnz() == conn.nnz


# --------------------------------------------------------------------------- budgets


@TYPES
@pytest.mark.parametrize("layout", [torch.sparse_coo, torch.sparse_csr, "scipy"], ids=str)
@settings(max_examples=examples(10))
@given(data=st.data())
def test_sparse_bytes_is_the_storage_of_the_matrix(kind, layout, data):
    case = data.draw(CASES[kind], label="case")
    A = build(case, layout=layout)
    assert conn_of(case).sparse_bytes(layout) == storage_bytes(A)


@pytest.fixture(scope="module")  # module scope: set up before no_blocks
def coo_entry_bytes() -> int:
    """Bytes per entry of a float32 COO matrix, measured on a small one."""
    torch.manual_seed(0)
    small = ei.conv2d_create_matrix(nn.Conv2d(2, 2, 3), (1, 2, 4, 4), (1, 2, 2, 2))
    assert small.dtype == torch.float32 and storage_bytes(small) % small._nnz() == 0
    return storage_bytes(small) // small._nnz()


def test_budget_refuses_huge_layer_before_allocating(coo_entry_bytes, no_blocks):
    layer = nn.Conv2d(512, 512, 3)
    in_shape, out_shape = (1, 512, 224, 224), (1, 512, 222, 222)
    nnz = 512 * 512 * (222 * 3) ** 2  # 222 outputs per axis, 3 taps each, no padding
    needed = nnz * coo_entry_bytes
    with pytest.raises(fs.MemoryBudgetError) as err:
        ei.conv2d_create_matrix(layer, in_shape, out_shape, max_memory=1000)
    assert isinstance(err.value, MemoryError)
    assert err.value.needed == needed
    assert err.value.budget == 1000
    message = str(err.value)
    assert format_bytes(needed) in message
    assert "max_memory" in message


def test_budget_allows_matrix_that_fits():
    torch.manual_seed(0)
    layer = nn.Conv2d(2, 3, 3)
    exact = storage_bytes(ei.conv2d_create_matrix(layer, (1, 2, 5, 5), (1, 3, 3, 3)))
    A = ei.conv2d_create_matrix(layer, (1, 2, 5, 5), (1, 3, 3, 3), max_memory=exact)
    assert A._nnz() == 2 * 3 * 9 * 9  # every input channel reaches every output by 9 taps
    with pytest.raises(fs.MemoryBudgetError):
        ei.conv2d_create_matrix(layer, (1, 2, 5, 5), (1, 3, 3, 3), max_memory=exact - 1)
    # the budget may also be written with a unit
    ei.conv2d_create_matrix(layer, (1, 2, 5, 5), (1, 3, 3, 3), max_memory="1MiB")


# --------------------------------------------------------------------------- registry


class Scale(nn.Module):
    """A custom layer: ``y = x * w`` elementwise, so its connectivity is ``diag(w)``."""

    def __init__(self, n: int):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-0.5, 2.0, n, dtype=F64))
        with torch.no_grad():
            self.w[1] = 0.0

    def forward(self, x):
        return x * self.w


def scale_create_matrix(module, in_shape, out_shape):
    return torch.diag(module.w.detach())


def measures_from_matrices(mats, norm):
    """Determinism and degeneracy from dense matrices, by the definitions."""
    Ps = [norm(m) if norm is not None else m for m in mats]
    h_rows = torch.cat([R.H(P, dim=1) for P in Ps])
    v = torch.cat([P.sum(0) for P in Ps])
    det = float(h_rows.sum()) / h_rows.numel()
    deg = float(R.H(v / v.sum()))
    return det, deg


def test_valid_modules_maps_builtins_to_dropin_functions():
    assert ei.VALID_MODULES[nn.Linear] is ei.linear_create_matrix
    assert ei.VALID_MODULES[nn.Conv2d] is ei.conv2d_create_matrix
    assert ei.VALID_MODULES[nn.AvgPool2d] is ei.avgpool2d_create_matrix
    assert dict(ei.VALID_MODULES) == BUILTIN
    assert len(ei.VALID_MODULES) == 3


@pytest.mark.parametrize("engine", ["sparse", "dense", "auto", "implicit"])
@pytest.mark.parametrize("norm", ["lin", "soft"])
def test_custom_create_matrix_is_used(engine, norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Linear(5, 3)).double()
    x = torch.zeros(1, 4, dtype=F64)
    ref_norm = {"lin": R.lin_norm, "soft": R.soft_norm}[norm]
    lib_norm = {"lin": ei.lin_norm, "soft": ei.soft_norm}[norm]
    mats = [
        model[0].weight.detach().t(),
        torch.diag(model[1].w.detach()),
        model[2].weight.detach().t(),
    ]
    det, deg = measures_from_matrices(mats, ref_norm)
    assert Scale not in ei.VALID_MODULES
    ei.VALID_MODULES[Scale] = scale_create_matrix
    try:
        assert ei.VALID_MODULES[Scale] is scale_create_matrix
        assert Scale in C.REGISTRY
        rep = fs.report(model, x, norm=lib_norm, engine=engine)
        assert [layer.type for layer in rep.layers] == ["Linear", "Scale", "Linear"]
        assert rep.layers[1].nnz == 4  # the diagonal's zero entry is not stored
        assert rep.determinism == pytest.approx(det, rel=1e-12)
        assert rep.degeneracy == pytest.approx(deg, rel=1e-12)
        assert ei.ei(model, x, norm=lib_norm, engine=engine) == pytest.approx(deg - det, rel=1e-12)
    finally:
        del ei.VALID_MODULES[Scale]
    assert Scale not in ei.VALID_MODULES and Scale not in C.REGISTRY
    det2, deg2 = measures_from_matrices([mats[0], mats[2]], ref_norm)
    with pytest.warns(UserWarning, match="Scale"):
        value = ei.ei(model, x, norm=lib_norm, engine=engine)
    assert value == pytest.approx(deg2 - det2, rel=1e-12)


def test_assigning_a_dropin_builder_reuses_the_sparse_adapter():
    class MyConv(nn.Conv2d):
        pass

    ei.VALID_MODULES[MyConv] = ei.conv2d_create_matrix
    try:
        assert C.REGISTRY[MyConv] is C.conv2d
        assert ei.VALID_MODULES[MyConv] is ei.conv2d_create_matrix
        torch.manual_seed(0)
        model = nn.Sequential(MyConv(1, 2, 3)).double()
        x = torch.zeros(1, 1, 5, 5, dtype=F64)
        plain = nn.Sequential(nn.Conv2d(1, 2, 3)).double()
        plain.load_state_dict(model.state_dict())
        assert ei.ei(model, x) == pytest.approx(R.ei(plain, x), rel=1e-12)
    finally:
        del ei.VALID_MODULES[MyConv]
    assert MyConv not in ei.VALID_MODULES


def test_deleting_unknown_type_raises_keyerror():
    with pytest.raises(KeyError):
        del ei.VALID_MODULES[Scale]


def test_unregistered_layer_in_connectivity_names_registered_types():
    with pytest.raises(fs.UnsupportedLayerError, match="Registered types: ") as err:
        C.connectivity(Scale(3), (1, 3), (1, 3))
    listed = str(err.value).split("Registered types: ")[1].split(". ")[0].split(", ")
    assert listed == sorted(t.__name__ for t in C.REGISTRY)
    assert {"AvgPool2d", "Conv2d", "Linear", "Conv3d"} <= set(listed)
