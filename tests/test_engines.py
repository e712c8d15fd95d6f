"""The engines against the float64 dense reference, and the report around them.

Every engine must give the reference's determinism, degeneracy and EI on random networks of
Linear, Conv2d and AvgPool2d layers, for every norm, legacy pooling or not, streamed in tiny
blocks or not, on the CPU's numba path and on the torch (CUDA) path run on the CPU.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import sys

import numpy as np
import pytest
import torch
from conftest import (
    ABS_FLOOR,
    ENGINE_RTOL,
    ENGINES_UNDER_TEST,
    F64,
    assert_close,
    examples,
    quiet,
    random_nets,
    randomize_,
    smallest_budget,
    structural_row_counts,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import foresight_sparse as fs
from foresight_sparse import connectivity as C
from foresight_sparse import ei
from foresight_sparse import reference as R
from foresight_sparse.backends import TORCH
from foresight_sparse.budget import format_bytes
from foresight_sparse.engines import ENGINES, LayerJob
from foresight_sparse.engines import sparse as sparse_engine
from foresight_sparse.engines.blocks import reduce_block_torch
from foresight_sparse.norms import UNNORMALISED, ElementwiseNorm
from foresight_sparse.tracing import trace

ALL_ENGINES = [*ENGINES_UNDER_TEST, "dense"]

#: Library norm and the reference norm it must reproduce.
NORMS = {
    "lin": (ei.lin_norm, R.lin_norm),
    "soft": (ei.soft_norm, R.soft_norm),
    "sig": (ei.sig_norm, R.sig_norm),
    "none": (None, None),
}


_REF_CACHE: dict = {}


def _fingerprint(model: nn.Module) -> str:
    # repr() omits options such as ceil_mode and divisor_override: hash every attribute
    h = hashlib.sha1()
    for m in model.modules():
        attrs = sorted((k, repr(v)) for k, v in vars(m).items() if not k.startswith("_"))
        h.update(repr((type(m).__name__, attrs)).encode())
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def reference(model, x, norm, legacy=False) -> tuple[float, float]:
    """(determinism, degeneracy) of the dense float64 reference, memoised: hypothesis draws
    the same networks for every engine parameter."""
    key = (_fingerprint(model), tuple(x.shape), getattr(norm, "__name__", repr(norm)), legacy)
    if key not in _REF_CACHE:
        _REF_CACHE[key] = (
            R.determinism(model, x, norm=norm, legacy=legacy),
            R.degeneracy(model, x, norm=norm, legacy=legacy),
        )
    return _REF_CACHE[key]


def check_against_reference(rep, det, deg, rel, what=""):
    assert_close(rep.determinism, det, rel, what=f"{what} determinism")
    assert_close(rep.degeneracy, deg, rel, what=f"{what} degeneracy")
    # ei is a difference: its error is bounded by the errors of its two terms
    bound = max(rel * (abs(det) + abs(deg)), ABS_FLOOR)
    assert abs(rep.ei - (deg - det)) <= bound, f"{what} ei {rep.ei!r} vs {deg - det!r}"


# --------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("engine", ALL_ENGINES)
@settings(max_examples=examples(16))
@given(net=random_nets(big_weights=True))
def test_engine_equals_reference(engine, net):
    for norm, (ours, ref) in NORMS.items():
        for legacy in (False, True) if net.pools_unpadded else (False,):
            det, deg = reference(net.model, net.input, ref, legacy)
            rep = quiet(fs.report, net.model, net.input, norm=ours, engine=engine, legacy=legacy)
            check_against_reference(
                rep, det, deg, ENGINE_RTOL[engine], f"{engine}/{norm}/legacy={legacy}"
            )


@pytest.mark.parametrize("engine", ALL_ENGINES)
def test_legacy_refuses_padded_pool(engine):
    model = nn.Sequential(nn.AvgPool2d(3, padding=1))
    x = torch.zeros(1, 2, 5, 5)
    with pytest.raises(fs.UnsupportedLayerError, match="padding"):
        ei.ei(model, x, engine=engine, legacy=True)


@pytest.mark.parametrize("engine", ALL_ENGINES)
def test_all_negative_and_all_zero_weights(engine):
    # lin_norm: every row all zero -> determinism 0 and a zero column total -> degeneracy 0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Flatten(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(-p.abs() - 0.1)
    x = torch.zeros(1, 1, 3, 3, dtype=F64)
    rep = quiet(fs.report, model, x, engine=engine)
    assert rep.determinism == 0.0 and rep.degeneracy == 0.0 and rep.ei == 0.0
    for norm in ("soft", "sig"):
        det, deg = reference(model, x, NORMS[norm][1])
        check_against_reference(
            quiet(fs.report, model, x, norm=norm, engine=engine),
            det,
            deg,
            ENGINE_RTOL[engine],
            norm,
        )


@pytest.mark.parametrize("norm", ["sig", "soft"])
@pytest.mark.parametrize("engine", ALL_ENGINES)
def test_rows_without_absent_entries_and_very_negative_weights(norm, engine):
    # Linear rows have no absent entry; input 0's out-weights are -30 and -35. Such rows
    # take c = 0: with c/Z added to every column and subtracted again per entry, Z << c
    # cancelled every digit (regression test)
    layer = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-30.0, 1.0], [-35.0, 2.0]], dtype=F64))
    x = torch.zeros(1, 2, dtype=F64)
    det, deg = reference(layer, x, NORMS[norm][1])
    check_against_reference(
        quiet(fs.report, layer, x, norm=norm, engine=engine),
        det,
        deg,
        ENGINE_RTOL[engine],
        f"{norm}/{engine}",
    )


# --------------------------------------------------------------------------- report


@settings(max_examples=examples(10))
@given(
    net=random_nets(),
    norm=st.sampled_from(["lin", "soft", "sig"]),
    engine=st.sampled_from(ALL_ENGINES),
)
def test_report_rows_and_functions_agree(net, norm, engine):
    ours, ref = NORMS[norm]
    rep = quiet(fs.report, net.model, net.input, norm=ours, engine=engine)
    kwargs = dict(norm=ours, engine=engine)
    funcs = (
        quiet(ei.determinism, net.model, net.input, **kwargs),
        quiet(ei.degeneracy, net.model, net.input, **kwargs),
        quiet(ei.ei, net.model, net.input, **kwargs),
    )
    assert all(type(v) is float for v in funcs)
    assert funcs == pytest.approx((rep.determinism, rep.degeneracy, rep.ei), rel=1e-14, abs=1e-14)
    det, deg = reference(net.model, net.input, ref)
    check_against_reference(rep, det, deg, ENGINE_RTOL[engine], f"{engine}/{norm}")

    supported = [m for m in net.model if type(m) in C.REGISTRY]
    assert [layer.type for layer in rep.layers] == [type(m).__name__ for m in supported]
    assert [layer.name for layer in rep.layers] == [
        str(i) for i, m in enumerate(net.model) if type(m) in C.REGISTRY
    ]
    # the shapes the reference's own forward hooks record
    shapes = R.get_shapes(net.model, net.input)
    expected_rows = []  # (layer, H(row), degeneracy, EI, nnz), all from the reference
    for layer, module in zip(rep.layers, supported):
        assert (layer.in_shape, layer.out_shape) == shapes[module]
        # the dense reference matrix: its rows are the inputs, its columns the outputs
        A = R.VALID_MODULES[type(module)](module, *shapes[module])
        assert (layer.n_in, layer.n_out) == tuple(A.shape)
        nnz = int(structural_row_counts(module, shapes[module][0]).sum())
        assert layer.nnz == nnz  # zero weights included: the entries are structural
        assert layer.engine in ("sparse", "implicit", "dense")
        if engine in ("sparse", "dense"):
            assert layer.engine == engine
        # wall time of the layer alone: a finite, non-negative float
        assert type(layer.seconds) is float and math.isfinite(layer.seconds), layer.seconds
        assert layer.seconds >= 0.0, layer.seconds
        # the layer's own numbers, from its dense reference matrix
        P = ref(A)
        h_ref = float(R.H(P, dim=1).mean())
        v = P.sum(0)
        deg_ref = float(R.H(v / v.sum()))
        rtol = ENGINE_RTOL[engine]
        assert_close(layer.mean_row_entropy, h_ref, rtol, what=f"{layer.name} mean row entropy")
        assert_close(layer.degeneracy, deg_ref, rtol, what=f"{layer.name} degeneracy")
        bound = max(rtol * (abs(h_ref) + abs(deg_ref)), ABS_FLOOR)
        assert abs(layer.ei - (deg_ref - h_ref)) <= bound, (layer.name, layer.ei, deg_ref - h_ref)
        expected_rows.append((layer, h_ref, deg_ref, deg_ref - h_ref, nnz))
    total_nnz = sum(row[-1] for row in expected_rows)
    assert rep.nnz == total_nnz
    # Plan.report times the whole loop with perf_counter (monotonic), and each layer's
    # seconds is a perf_counter difference taken inside it, one layer after another: the
    # layers' intervals are disjoint and lie within the report's, so their sum cannot exceed
    # it. The differences of perf_counter's floats are exact multiples of its smallest ulp
    # here, and so is their sum (fsum): no rounding slack is needed.
    assert type(rep.seconds) is float and math.isfinite(rep.seconds), rep.seconds
    assert math.fsum(layer.seconds for layer in rep.layers) <= rep.seconds, (
        rep.seconds,
        [layer.seconds for layer in rep.layers],
    )

    d = rep.to_dict()
    back = json.loads(json.dumps(d))
    assert back["ei"] == rep.ei and back["determinism"] == rep.determinism
    assert back["nnz"] == total_nnz
    assert [lay["nnz"] for lay in back["layers"]] == [row[-1] for row in expected_rows]
    assert [tuple(lay["in_shape"]) for lay in back["layers"]] == [s[0] for s in shapes.values()]
    assert back["engine"] == engine and back["norm"] == norm and back["legacy"] is False
    assert all(set(s) == {"name", "type"} for s in back["skipped"])

    # the printed table: one row per layer with the reference's figures, then the totals
    lines = str(rep).splitlines()
    assert lines[0].split() == [
        "layer", "type", "in", "out", "entries", "H(row)", "degen", "EI", "engine", "s"
    ]  # fmt: skip
    assert len(lines) == len(rep.layers) + 4
    for line, (layer, h_ref, deg_ref, ei_ref, nnz) in zip(lines[2:], expected_rows):
        name, kind, n_in, n_out, entries, h, dg, e, served, secs = line.split()
        assert (name, kind, served) == (layer.name, layer.type, layer.engine)
        assert (int(n_in), int(n_out), int(entries)) == (layer.n_in, layer.n_out, nnz)
        for shown, value in ((h, h_ref), (dg, deg_ref), (e, ei_ref)):
            assert abs(float(shown) - value) <= 0.5e-4 + 1e-9, (line, value)
        assert secs == f"{layer.seconds:.3f}", (line, layer.seconds)  # the layer's own
    totals = re.fullmatch(
        r"network: determinism (\S+)  degeneracy (\S+)  EI (\S+) bits  \((\d+) entries, (\S+) s\)",
        lines[-1],
    )
    assert totals, lines[-1]
    for shown, value in zip(totals.groups()[:3], (det, deg, deg - det)):
        assert abs(float(shown) - value) <= 0.5e-6 + 1e-9, (lines[-1], value)
    assert int(totals[4]) == total_nnz
    assert totals[5] == f"{rep.seconds:.2f}", (lines[-1], rep.seconds)


def test_report_progress_bar_changes_nothing(capsys):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).double()
    x = torch.zeros(1, 1, 4, 4, dtype=F64)
    plain = quiet(fs.report, model, x)
    with_bar = quiet(fs.report, model, x, progress=True)
    assert (with_bar.determinism, with_bar.degeneracy) == (plain.determinism, plain.degeneracy)
    assert capsys.readouterr().out == ""  # the library prints nothing on stdout


def test_report_skipped_and_errors():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2, 3)
    )
    x = torch.zeros(1, 1, 4, 4)
    with pytest.warns(UserWarning, match="MaxPool2d"):
        rep = fs.report(model, x)
    assert ("1", "MaxPool2d") in rep.skipped and ("2", "ReLU") in rep.skipped
    with pytest.raises(fs.UnknownNameError, match="auto, implicit, sparse, dense"):
        fs.report(model, x, engine="fast")
    with pytest.raises(fs.MissingInputError):
        ei.ei(model)
    with pytest.raises(fs.NoSupportedLayersError):
        ei.ei(nn.Sequential(nn.ReLU()), x)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_device_without_cuda_is_refused():
    with pytest.raises(fs.DeviceError, match="CUDA"):
        ei.ei(nn.Linear(2, 2), torch.zeros(1, 2), device="cuda")


def test_non_finite_weights_are_refused():
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight[0, 1] = float("nan")
    with pytest.raises(fs.NonFiniteWeightsError, match="NaN"):
        ei.ei(layer, torch.zeros(1, 3))


# --------------------------------------------------------------------------- streaming


@settings(max_examples=examples(15))
@given(net=random_nets(), norm=st.sampled_from(list(NORMS) + ["custom"]))
def test_streaming_equals_one_block(net, norm):
    ours = R.lin_norm if norm == "custom" else NORMS[norm][0]
    # the smallest budget the engine accepts: blocks of a row or two
    budget = smallest_budget(net.model, net.input, norm=ours, engine="sparse")
    whole = quiet(fs.report, net.model, net.input, norm=ours, engine="sparse")
    streamed = quiet(fs.report, net.model, net.input, norm=ours, engine="sparse", max_memory=budget)
    for name in ("determinism", "degeneracy", "ei"):
        assert_close(getattr(streamed, name), getattr(whole, name), 1e-12, what=name)


class _CountBlocks:
    """Replace the sparse engine's ``row_blocks`` to record how many blocks each layer got."""

    def __init__(self):
        self.counts: list[int] = []

    def __enter__(self):
        self.real = sparse_engine.row_blocks

        def spy(*args, **kwargs):
            blocks = self.real(*args, **kwargs)
            self.counts.append(len(blocks))
            return blocks

        sparse_engine.row_blocks = spy
        return self

    def __exit__(self, *exc):
        sparse_engine.row_blocks = self.real


def test_streaming_small_fixed_budget():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(27, 10)
    ).double()
    x = torch.zeros(1, 2, 6, 6, dtype=F64)
    for norm in (ei.lin_norm, ei.soft_norm, ei.sig_norm, None, R.lin_norm):
        budget = smallest_budget(model, x, norm=norm, engine="sparse")
        whole = quiet(fs.report, model, x, norm=norm, engine="sparse")
        with _CountBlocks() as blocks:
            small = quiet(fs.report, model, x, norm=norm, engine="sparse", max_memory=budget)
        # the conv layer (72 rows) is streamed
        assert len(blocks.counts) == 3 and blocks.counts[0] > 1, blocks.counts
        for name in ("determinism", "degeneracy", "ei"):
            assert_close(getattr(small, name), getattr(whole, name), 1e-12, what=name)


@pytest.mark.parametrize("engine", ["sparse", "dense"])
def test_budget_too_small_for_one_row_names_the_layer(engine):
    model = nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 400))
    x = torch.zeros(1, 10)
    with pytest.raises(fs.MemoryBudgetError, match=r"0 \(Linear\)") as err:
        ei.ei(model, x, engine=engine, max_memory=2_000)
    assert isinstance(err.value, MemoryError)
    assert err.value.needed > err.value.budget


def test_budget_error_reports_the_budget_given():
    # Regression: the column buffers were subtracted from max_memory first, and the error
    # reported the remainder (down to "max_memory is 1 B") instead of the budget given.
    model = nn.Sequential(nn.Linear(10, 400))
    with pytest.raises(fs.MemoryBudgetError) as err:
        ei.ei(model, torch.zeros(1, 10), engine="sparse", max_memory=2_000)
    assert err.value.budget == 2_000
    assert format_bytes(2_000) in str(err.value)


# --------------------------------------------------------------------------- custom norms


@pytest.mark.parametrize("engine", ALL_ENGINES)
@settings(max_examples=examples(8))
@given(net=random_nets(), which=st.sampled_from(["lin", "soft", "sig"]))
def test_custom_rowwise_norm_equals_reference(engine, net, which):
    fn = NORMS[which][1]  # a plain Python function: a row-wise norm for the library
    det, deg = reference(net.model, net.input, fn)
    rep = quiet(fs.report, net.model, net.input, norm=fn, engine=engine)
    check_against_reference(rep, det, deg, ENGINE_RTOL[engine], f"custom {which}")
    for layer in rep.layers:
        assert layer.engine in ("sparse", "dense")


def test_custom_norm_that_is_not_elementwise():
    def top1(W):  # all mass on each row's largest entry: not "map then divide"
        P = torch.zeros_like(W)
        P[torch.arange(W.shape[0]), W.argmax(1)] = 1.0
        return P

    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Flatten(), nn.Linear(18, 4)).double()
    x = torch.zeros(1, 1, 4, 4, dtype=F64)
    det, deg = R.determinism(model, x, norm=top1), R.degeneracy(model, x, norm=top1)
    for engine in ALL_ENGINES:
        rep = quiet(fs.report, model, x, norm=top1, engine=engine)
        check_against_reference(rep, det, deg, 1e-12, engine)
        small = quiet(fs.report, model, x, norm=top1, engine=engine, max_memory=30_000)
        check_against_reference(small, det, deg, 1e-12, f"{engine} streamed")


# --------------------------------------------------------------------------- torch paths


def _layer_jobs(net, norm):
    tr = trace(net.model, net.input)
    for layer in tr.layers:
        conn = C.connectivity(layer.module, layer.in_shape, layer.out_shape, label=layer.label)
        yield LayerJob(conn, norm, torch.device("cpu"), fs.DEFAULT_MAX_MEMORY)


def _col_sums(stats) -> torch.Tensor:
    return stats.col_sums.to(F64) + getattr(stats, "col_offset", 0.0)


@settings(max_examples=examples(12))
@given(net=random_nets(), data=st.data())
def test_torch_reduction_equals_numba(net, data):
    for norm in (ei.lin_norm, ei.soft_norm, ei.sig_norm, UNNORMALISED):
        assert isinstance(norm, ElementwiseNorm)
        for job in _layer_jobs(net, norm):
            conn = job.conn
            numba_stats = ENGINES["sparse"](job)  # CPU: numba blocks, numba reduction
            assert numba_stats.backend == "numba"
            shift = norm.shift(conn.weight_bound())
            cut = data.draw(st.integers(0, conn.n_rows), label="cut")
            col = torch.zeros(conn.n_cols, dtype=F64)
            h_sum = offset = 0.0
            for r0, r1 in ((0, cut), (cut, conn.n_rows)):
                b = conn.block(r0, r1, backend=TORCH)
                # returns (sum of row entropies, sum of c/Z): the latter reaches every column
                h, off = reduce_block_torch(b.rowptr, b.cols, b.vals, norm, shift, conn.n_cols, col)
                h_sum += float(h)
                offset += float(off)
            col += offset
            assert_close(h_sum, numba_stats.h_sum, 1e-12, what=f"{norm.name} H sum")
            torch.testing.assert_close(col, _col_sums(numba_stats), rtol=1e-12, atol=1e-13)


def _assert_served_by_torch(rep, what):
    assert rep.backend == "torch", what
    assert rep.layers and all(lay.backend == "torch" for lay in rep.layers), (
        what,
        [(lay.name, lay.backend) for lay in rep.layers],
    )


@settings(max_examples=examples(8))
@given(
    net=random_nets(max_linear=2),
    norm=st.sampled_from(list(NORMS)),
    engine=st.sampled_from(["sparse", "implicit"]),
)
def test_torch_backend_in_full_pipeline(net, norm, engine):
    """backend='torch': the engines' torch forms (what CUDA runs: torch blocks and block
    reductions, torch kernel terms, class passes and Linear passes, torch column terms),
    here on CPU tensors, against the reference."""
    ours, ref = NORMS[norm]
    det, deg = reference(net.model, net.input, ref)
    rep = quiet(fs.report, net.model, net.input, norm=ours, engine=engine, backend="torch")
    _assert_served_by_torch(rep, f"{engine}/{norm}")
    check_against_reference(rep, det, deg, 1e-9, f"torch {engine}/{norm}")


def _small_cnn() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(4, 3, 3, stride=2, padding=1, groups=1),
        nn.Flatten(),
        nn.Linear(12, 5),
    )
    return randomize_(model, 21).double(), torch.zeros(1, 2, 8, 8, dtype=F64)


def _linear_net() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 6), nn.Linear(6, 3))
    return randomize_(model, 22).double(), torch.zeros(1, 10, dtype=F64)


@pytest.mark.parametrize("net", [_small_cnn, _linear_net], ids=["cnn", "linear"])
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("engine", ["sparse", "implicit"])
def test_torch_backend_equals_reference(engine, norm, net):
    model, x = net()
    ours, ref = NORMS[norm]
    det, deg = reference(model, x, ref)
    rep = quiet(fs.report, model, x, norm=ours, engine=engine, backend="torch")
    _assert_served_by_torch(rep, f"{engine}/{norm}")
    assert {lay.engine for lay in rep.layers} == {engine}
    check_against_reference(rep, det, deg, 1e-9, f"torch {engine}/{norm}")


# --------------------------------------------------------------------------- dtypes


def _half_exact_net(dtype) -> tuple[nn.Module, nn.Module]:
    """A CNN whose float32 weights are exactly representable in ``dtype``, and its copy."""
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(3, 2, 2, stride=2, groups=1),
        nn.Flatten(),
        nn.Linear(2, 4),
    )
    randomize_(model, 11)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    return model, copy.deepcopy(model).to(dtype)


@settings(max_examples=examples(10))
@given(net=random_nets(dtype=torch.float32), norm=st.sampled_from(list(NORMS)))
def test_float32_models_equal_their_float64_copy(net, norm):
    """float32 weights take the engines' float32 fast paths (log2 from the bits, float32
    block values); the result must equal the reference on the exact float64 copy."""
    ours, ref = NORMS[norm]
    det, deg = reference(copy.deepcopy(net.model).double(), net.input.double(), ref)
    for engine in ("sparse", "implicit", "auto"):
        rep = quiet(fs.report, net.model, net.input, norm=ours, engine=engine)
        check_against_reference(rep, det, deg, 1e-9, f"float32/{engine}/{norm}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("engine", ALL_ENGINES)
def test_low_precision_models(dtype, engine):
    model32, low = _half_exact_net(dtype)
    x = torch.zeros(1, 2, 4, 4)
    for norm in ("lin", "soft", "sig", "none"):
        ours, ref = NORMS[norm]
        det, deg = reference(model32, x, ref)
        rep = quiet(fs.report, low, x.to(dtype), norm=ours, engine=engine)
        check_against_reference(rep, det, deg, 1e-6, f"{dtype}/{norm}")
    # the input may stay float32: it is cast to the model's dtype for tracing
    assert quiet(fs.report, low, x, norm=ours, engine=engine).ei == rep.ei


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("engine", ALL_ENGINES)
@settings(max_examples=examples(8))
@given(net=random_nets())
def test_cuda_equals_cpu(engine, norm, net):
    ours, ref = NORMS[norm]
    cpu = quiet(fs.report, net.model, net.input, norm=ours, engine=engine)
    on_gpu = quiet(fs.report, net.model, net.input, norm=ours, engine=engine, device="cuda")
    assert on_gpu.device.startswith("cuda")
    for name in ("determinism", "degeneracy"):
        assert_close(getattr(on_gpu, name), getattr(cpu, name), 1e-9, what=name)
    model_gpu = copy.deepcopy(net.model).cuda()
    moved = quiet(fs.report, model_gpu, net.input.cuda(), norm=ours, engine=engine, device="cuda")
    assert_close(moved.ei, cpu.ei, 1e-9, abs_=1e-9, what="model on cuda")
    det, deg = reference(net.model, net.input, ref)
    check_against_reference(on_gpu, det, deg, ENGINE_RTOL[engine], f"cuda {engine}")


@pytest.mark.cuda
def test_cuda_streaming_and_builders():
    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
            nn.ReLU(),
            nn.AvgPool2d(2, ceil_mode=True),
            nn.Flatten(),
            nn.Linear(27, 5),
        )
        .double()
        .cuda()
    )
    x = torch.zeros(1, 2, 6, 6, dtype=F64, device="cuda")
    whole = quiet(fs.report, model, x, engine="sparse", device="cuda")
    small = quiet(fs.report, model, x, engine="sparse", device="cuda", max_memory=20_000)
    assert_close(small.ei, whole.ei, 1e-12, what="streamed on cuda")
    A = ei.conv2d_create_matrix(model[0], (1, 2, 6, 6), (1, 3, 6, 6))
    assert A.device.type == "cuda" and A.is_coalesced()
    cpu_A = ei.conv2d_create_matrix(copy.deepcopy(model[0]).cpu(), (1, 2, 6, 6), (1, 3, 6, 6))
    assert torch.equal(A.cpu().to_dense(), cpu_A.to_dense())


# --------------------------------------------------------------------------- ImageNet scale


def _axis_pairs(n: int, k: int, s: int, p: int, d: int = 1) -> int:
    """Valid (output, tap) pairs of one zero-padded axis."""
    out = (n + 2 * p - d * (k - 1) - 1) // s + 1
    return sum(1 for o in range(out) for t in range(k) if 0 <= o * s + t * d - p < n)


@pytest.mark.imagenet
def test_alexnet_at_imagenet_scale():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None)
    x = torch.zeros(1, 3, 224, 224)
    rep = quiet(fs.report, model, x, engine="sparse")
    assert len(rep.layers) == 8
    assert [layer.type for layer in rep.layers] == ["Conv2d"] * 5 + ["Linear"] * 3

    expected_nnz = []
    for layer in rep.layers:
        module = dict(model.named_modules())[layer.name]
        if isinstance(module, nn.Conv2d):
            (_, c_in, h, w) = layer.in_shape
            kh, kw = module.kernel_size
            pairs = _axis_pairs(h, kh, module.stride[0], module.padding[0]) * _axis_pairs(
                w, kw, module.stride[1], module.padding[1]
            )
            expected_nnz.append(c_in * module.out_channels // module.groups * pairs)
        else:
            expected_nnz.append(module.in_features * module.out_features)
    assert [layer.nnz for layer in rep.layers] == expected_nnz
    assert rep.nnz == sum(expected_nnz)
    assert 0.6e9 < rep.nnz < 0.7e9  # DESIGN.md: 0.66e9 entries
    assert all(math.isfinite(v) for v in (rep.determinism, rep.degeneracy, rep.ei))
    for layer in rep.layers:
        assert 0.0 <= layer.mean_row_entropy <= math.log2(layer.n_out)
        assert layer.engine == "sparse"
    auto = quiet(fs.report, model, x, engine="auto")
    for name in ("determinism", "degeneracy", "ei"):
        assert_close(getattr(auto, name), getattr(rep, name), 1e-9, what=f"auto {name}")


@pytest.mark.imagenet
def test_resnet50_implicit_equals_sparse_at_imagenet_scale():
    """ResNet-50 at 224 (3.9e9 entries, 53 Conv2d and a Linear): the default engine against
    the sparse one, layer by layer and in total."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.zeros(1, 3, 224, 224)
    sparse = quiet(fs.report, model, x, engine="sparse")
    auto = quiet(fs.report, model, x, engine="auto")
    assert len(auto.layers) == 54 and 3.8e9 < auto.nnz < 4.0e9
    assert {layer.engine for layer in auto.layers} == {"implicit"}
    for a, b in zip(auto.layers, sparse.layers):
        assert_close(a.mean_row_entropy, b.mean_row_entropy, 1e-10, what=f"{a.name} H(row)")
        assert_close(a.degeneracy, b.degeneracy, 1e-9, what=f"{a.name} degeneracy")
    for name in ("determinism", "degeneracy", "ei"):
        assert_close(getattr(auto, name), getattr(sparse, name), 1e-9, what=f"auto {name}")


def test_numba_threads_do_not_change_the_result():
    # per-thread column accumulators must not make the result depend on the thread count
    import numba

    from foresight_sparse import _numba

    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 22 * 22, 9))
    model = model.double()
    x = torch.zeros(1, 8, 24, 24, dtype=F64)
    # both layers are above the size where kernels run on their serial twins
    sizes = [layer.nnz for layer in quiet(fs.report, model, x, engine="sparse").layers]
    assert min(sizes) >= _numba.PARALLEL_MIN_WORK, sizes
    before = numba.get_num_threads()
    results = []
    try:
        for n in sorted({1, before}):
            numba.set_num_threads(n)
            results.append(quiet(fs.report, model, x, norm="soft", engine="sparse"))
    finally:
        numba.set_num_threads(before)
    # the threads' partial sums are added in another order: equal to rounding, and EI, a
    # difference of two sums about 7x its size, to 7x that
    for what, rtol in (("determinism", 1e-13), ("degeneracy", 1e-13), ("ei", 1e-12)):
        values = [getattr(r, what) for r in results]
        assert np.allclose(values, values[0], rtol=rtol, atol=0), (what, values)


_CACHED_KERNELS = """
import sys

import numba
import numpy as np
import torch

from foresight_sparse.entropy import column_terms

{probe}
if not parallel_probe_ready():
    print("no probe")
    sys.exit(0)
if sys.argv[1] != "default":
    numba.set_num_threads(int(sys.argv[1]))  # the forms this process compiles or loads first
small = torch.arange(10.0, dtype=torch.float64) - 4.5  # serial-sized work
large = torch.arange(float(1 << 17), dtype=torch.float64) - 9.5  # parallel-sized
for v in (small, large):
    got = column_terms(v).numpy()
    x = v.numpy()
    p, n = x[x > 0], -x[x < 0]
    want = [p.sum(), (p * np.log2(p)).sum(), -n.sum(), (n * np.log2(n)).sum()]
    assert np.allclose(got, want, rtol=1e-12), (got, want)
print(
    opens_parallel_region(lambda: column_terms(large), 2),
    opens_parallel_region(lambda: column_terms(large), 1),
    opens_parallel_region(lambda: column_terms(small), 2),
)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="observed through os.fork")
def test_serial_twins_do_not_share_the_parallel_kernels_cache(tmp_path):
    """numba's cache ignores compile flags: a serial twin cached under its kernel's name
    was loaded in place of the parallel kernel by every later process, which then ran it
    on one thread (and the other way round). In fresh processes sharing a fresh cache, on
    one thread and on numba's default, cold and then loading what the others cached, the
    column terms are right and each form runs as it should: large work on two threads
    opens a parallel region, on one thread or small work none (seen through the ``omp``
    layer's fork guard, ``conftest.opens_parallel_region``)."""
    from conftest import run_parallel_probe

    for i, threads in enumerate(["1", "default", "1", "default"]):
        seen = run_parallel_probe(_CACHED_KERNELS, threads, env={"NUMBA_CACHE_DIR": str(tmp_path)})
        assert seen == ["True", "False", "False"], (threads, seen)
        if i == 0:  # the later runs find what this one cached
            assert any(p.is_file() for p in tmp_path.rglob("*")), "nothing was cached"


def test_wide_vectors_marks_the_prange_body():
    # _wide_vectors() adds LLVM's prefer-vector-width=512 to the function it is compiled
    # into (in the kernels, the function numba makes of a prange body); an llvmlite that
    # renders attributes another way would silently lose it
    import numba

    from foresight_sparse import _numba

    @numba.njit
    def body(x, out):
        _numba._wide_vectors()
        for i in range(x.shape[0]):
            out[i] = x[i] * 2.0

    x = np.arange(8.0)
    out = np.empty(8)
    body(x, out)
    assert np.array_equal(out, 2.0 * x)
    ir = "\n".join(body.inspect_llvm().values())
    assert '"prefer-vector-width"="512"' in ir
