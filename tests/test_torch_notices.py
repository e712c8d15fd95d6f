"""No warning of torch's reaches the user from inside the library.

torch issues some notices (such as "Sparse CSR tensor support is in beta state") once per
process from C++, so each case runs in a fresh interpreter: in this one, an earlier test may
already have used up the notice and the check would pass without checking anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import json, warnings
warnings.simplefilter("always")
import torch
from torch import nn
import foresight_sparse
import foresight_sparse.ei as ei

class Scale(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n))

    def forward(self, x):
        return x * self.weight

def scale_builder(module, in_shape, out_shape, *, legacy=False, label=None):
    n = module.weight.numel()
    i = torch.arange(n)
    matrix = torch.sparse_coo_tensor(torch.stack([i, i]), module.weight.detach(), (n, n),
                                     check_invariants=True)
    return foresight_sparse.ExplicitMatrix(label or "Scale", matrix)

torch.manual_seed(0)
net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), Scale(32), nn.Linear(32, 4))
x = torch.zeros(1, 16)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
"""

CASES = {
    # The quickstart's two ways of adding a layer type.
    "register": "foresight_sparse.register(Scale, scale_builder)\nforesight_sparse.report(net, x)",
    "valid_modules": "ei.VALID_MODULES[Scale] = lambda m, i, o: torch.diag(m.weight.detach())\n"
    "ei.ei(net, x)",
    # The drop-in create_matrix of a register()-ed type, in every layout.
    "create_matrix_coo": "foresight_sparse.register(Scale, scale_builder)\n"
    "ei.VALID_MODULES[Scale](Scale(4), (1, 4), (1, 4))",
    "create_matrix_csr": "foresight_sparse.register(Scale, scale_builder)\n"
    "ei.VALID_MODULES[Scale](Scale(4), (1, 4), (1, 4), "
    "layout=torch.sparse_csr)",
    "create_matrix_scipy": "foresight_sparse.register(Scale, scale_builder)\n"
    "ei.VALID_MODULES[Scale](Scale(4), (1, 4), (1, 4), layout='scipy')",
    # The torch forms that CUDA runs (here on CPU tensors): the implicit engine's class
    # passes and the sparse engine's block builder, over geometry arrays kept read-only.
    "torch_paths": "cnn = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.AvgPool2d(2))\n"
    "rep = foresight_sparse.report(cnn, torch.zeros(1, 2, 4, 4), norm='soft', backend='torch')\n"
    "assert [lay.backend for lay in rep.layers] == ['torch', 'torch']\n"
    "plan = foresight_sparse.plan(cnn, torch.zeros(1, 2, 4, 4))\n"
    "plan.layers[0].conn.block_torch(0, 8)",
}


def caught_in_fresh_process(case: str) -> list[dict]:
    code = (
        PRELUDE
        + textwrap.indent(CASES[case], "    ")
        + """
print(json.dumps([{"category": w.category.__name__, "message": str(w.message),
                   "where": f"{w.filename}:{w.lineno}"} for w in caught]))
"""
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_check_sees_torch_notices():
    # Without the library, converting to CSR does warn in a fresh process: the cases below
    # would see the notice if the library let it through.
    code = (
        PRELUDE
        + "    torch.eye(3).to_sparse_csr()\n"
        + "print(json.dumps([str(w.message) for w in caught]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert any("beta" in m for m in json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_custom_layers_emit_no_torch_warning(case):
    assert caught_in_fresh_process(case) == []
