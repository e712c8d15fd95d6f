"""The backend option: chosen once per plan, recorded per layer, refused where it cannot run."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import F64, assert_close, quiet, randomize_
from torch import nn

import foresight_sparse as fs
from foresight_sparse import reference as R
from foresight_sparse.backends import BACKENDS, TORCH, default_backend, resolve_backend
from foresight_sparse.connectivity import Block
from foresight_sparse.engines import LayerJob
from foresight_sparse.engines import linear as linear_forms
from foresight_sparse.engines.base import serving_backend
from foresight_sparse.engines.dispatch import FORMS, form
from foresight_sparse.norms import NORMS, RowwiseNorm

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _top1(W):
    return (W == W.max(dim=1, keepdim=True).values).to(W.dtype)


CUSTOM = RowwiseNorm(_top1)


def _cnn():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.AvgPool2d(2), nn.Flatten())
    model.append(nn.Linear(12, 4))
    return randomize_(model, 5).double(), torch.zeros(1, 2, 4, 4, dtype=F64)


@pytest.mark.parametrize("norm", list(NORMS))
def test_auto_is_numba_on_the_cpu_and_torch_on_cuda_for_the_builtin_norms(norm):
    numba = resolve_backend("auto", CPU, NORMS[norm])
    assert numba.name == "numba" and numba.kind is not None
    assert resolve_backend("auto", CUDA, NORMS[norm]) is TORCH
    assert resolve_backend("torch", CPU, NORMS[norm]) is TORCH


def test_auto_is_torch_for_a_custom_norm():
    assert resolve_backend("auto", CPU, CUSTOM) is TORCH


def test_default_backend_outside_a_plan_follows_the_device():
    assert default_backend("cpu").name == "numba"
    assert default_backend("cuda").name == "torch"


def test_numba_on_cuda_is_a_device_error_naming_the_fix():
    # resolve_backend does not need a CUDA device to refuse one
    with pytest.raises(fs.DeviceError, match=r"backend='numba' runs on the CPU.*'torch'"):
        resolve_backend("numba", CUDA, NORMS["lin"])


def test_numba_with_a_custom_norm_is_refused_with_the_alternatives():
    model, x = _cnn()
    with pytest.raises(fs.UnsupportedEngineError, match=r"no kernel for the norm '_top1'"):
        fs.plan(model, x, norm=_top1, backend="numba")


def test_unknown_backend_lists_the_valid_names():
    model, x = _cnn()
    with pytest.raises(fs.UnknownNameError, match="auto, numba, torch"):
        fs.plan(model, x, backend="gpu")
    assert BACKENDS == ("auto", "numba", "torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_layer_records_its_backend_and_the_value_is_the_references(backend):
    model, x = _cnn()
    want = "torch" if backend == "torch" else "numba"
    plan = fs.plan(model, x, norm="soft", backend=backend)
    assert [lay.backend for lay in plan.layers] == [want] * 3
    rep = plan.report()
    assert rep.backend == want
    assert [lay.backend for lay in rep.layers] == [want] * 3
    assert_close(rep.ei, R.ei(model, x, norm=R.soft_norm), 1e-9)


def test_custom_norm_runs_on_the_torch_backend_under_auto():
    model, x = _cnn()
    rep = quiet(fs.report, model, x, norm=_top1)
    assert rep.backend == "torch" and {lay.backend for lay in rep.layers} == {"torch"}
    assert_close(rep.ei, R.ei(model, x, norm=_top1), 1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_linear_layer_the_kernels_cannot_read_falls_back_to_torch(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Flatten(), nn.Linear(8, 3)).to(dtype)
    x = torch.zeros(1, 1, 3, 3, dtype=dtype)
    rep = quiet(fs.report, model, x, backend="numba")
    assert rep.backend == "numba"
    assert [lay.backend for lay in rep.layers] == ["numba", "torch"]
    exact = quiet(fs.report, model.double(), x.double())
    assert_close(rep.ei, exact.ei, 1e-9)


def test_a_plan_pickles_with_its_backend():
    model, x = _cnn()
    plan = fs.plan(model, x, backend="torch")
    back = pickle.loads(pickle.dumps(plan))
    assert back.backend.name == "torch"
    assert back.report().ei == plan.report().ei


def test_reports_keep_the_backend_and_read_older_files_without_it():
    model, x = _cnn()
    rep = quiet(fs.report, model, x, backend="torch")
    assert fs.Report.from_dict(rep.to_dict()) == rep
    old = rep.to_dict()
    del old["backend"]
    for layer in old["layers"]:
        del layer["backend"]
    back = fs.Report.from_dict(old)
    assert back.backend == "auto" and all(lay.backend is None for lay in back.layers)


class _Scale(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-0.5, 2.0, n, dtype=F64))

    def forward(self, x):
        return x * self.weight


class _Diagonal(fs.Connectivity):
    """A user's connectivity written to the documented contract: rows on demand through its
    own ``block`` (which knows nothing of backends)."""

    weight_names = None

    def __init__(self, label, weight):
        self.label, self.weight = label, weight.detach()
        self.n_rows = self.n_cols = len(weight)
        self.device, self.dtype = weight.device, weight.dtype

    def row_counts(self, r0, r1):
        return np.ones(r1 - r0, dtype=np.int64)

    def block(
        self,
        r0,
        r1,
        *,
        dtype=torch.float64,
        device=None,
        with_rows=False,
        index_dtype=torch.int64,
        workspace=None,
    ):
        rows = torch.arange(r0, r1)
        return Block(
            r0,
            torch.arange(r1 - r0 + 1),
            rows.to(index_dtype),
            self.weight[r0:r1].to(dtype),
            rows if with_rows else None,
        )

    def weight_bound(self):
        return max(float(self.weight.max()), 0.0)

    def check_finite(self):
        assert torch.isfinite(self.weight).all()


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("engine", ["auto", "sparse", "dense"])
def test_a_users_connectivity_makes_its_own_rows_under_any_backend(engine, backend):
    net = nn.Sequential(randomize_(nn.Linear(5, 6), 8).double(), _Scale(6))
    x = torch.zeros(1, 5, dtype=F64)

    def explicit(module, in_shape, out_shape, *, legacy=False, label=None):
        return fs.ExplicitMatrix(label, torch.diag(module.weight.detach()))

    def diagonal(module, in_shape, out_shape, *, legacy=False, label=None):
        return _Diagonal(label, module.weight)

    try:
        fs.register(_Scale, explicit)
        want = quiet(fs.report, net, x, norm="soft")
        fs.register(_Scale, diagonal)
        got = quiet(fs.report, net, x, norm="soft", engine=engine, backend=backend)
    finally:
        fs.unregister(_Scale)
    assert got.layers[1].engine == ("dense" if engine == "dense" else "sparse")
    assert_close(got.ei, want.ei, 1e-12)


def test_every_engine_form_has_a_numba_and_a_torch_form():
    keys = set(FORMS)
    assert keys, "the dispatch table is empty"
    for engine, cls, name in keys:
        assert name in ("numba", "torch")
        twin = "torch" if name == "numba" else "numba"
        assert (engine, cls, twin) in keys, (engine, cls.__name__, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_fallback_hands_only_a_linear_weight_numba_cannot_read_to_torch(dtype):
    numba = resolve_backend("numba", CPU, NORMS["lin"])
    linear = fs.connectivity.linear(nn.Linear(4, 3).to(dtype), (1, 4), (1, 3))
    conv = nn.Conv2d(1, 2, 2).to(dtype)
    stencil = fs.connectivity.conv2d(conv, (1, 1, 3, 3), (1, 2, 2, 2))
    readable = dtype == torch.float32
    assert serving_backend(numba, linear) is (numba if readable else TORCH)
    assert serving_backend(numba, stencil) is numba  # the kernel is widened, never copied
    assert serving_backend(TORCH, linear) is TORCH
    job = LayerJob(linear, NORMS["lin"], CPU, 1 << 20, numba)
    assert job.backend is serving_backend(numba, linear)
    want = "linear_passes_numba" if readable else "linear_passes_torch"
    assert form("implicit", job) is getattr(linear_forms, want)


def test_numba_loads_on_first_use_not_on_import():
    script = (
        "import sys, torch, foresight_sparse as fs\n"
        "assert 'numba' not in sys.modules\n"
        "fs.report(torch.nn.Linear(3, 2), torch.zeros(1, 3))\n"
        "assert 'numba' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
