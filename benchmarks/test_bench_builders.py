"""Connectivity builders: entries per second, against the dense reference.

Each built matrix is checked, outside the timing, against a closed-form entry count and
against PyTorch's own transposed convolution (``A v`` for a seeded ``v``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import foresight_sparse.ei as ei
from foresight_sparse import reference
from foresight_sparse.connectivity import conv2d

from .conftest import machine


def _entries(channels: int, size: int) -> int:
    """Entries of a channels->channels 3x3 'same' convolution on size x size: 3 taps per
    axis and output, less the 2 that land on the padding."""
    return channels * channels * (3 * size - 2) ** 2


def _assert_is_the_conv(A, module: nn.Conv2d, size: int) -> None:
    """``A`` (inputs x outputs) is the layer's matrix: ``A v`` equals conv_transpose2d(v)."""
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(1, module.out_channels, size, size, generator=gen, dtype=A.dtype)
    expected = F.conv_transpose2d(v, module.weight.detach().to(A.dtype), padding=1).reshape(-1)
    torch.testing.assert_close((A @ v.reshape(-1, 1)).reshape(-1), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_conv_builder(benchmark, smoke, peak_rss, layout):
    """Conv2d 64->64 3x3 at 56x56 (112.9M entries) as a sparse tensor."""
    size = 14 if smoke else 56
    torch.manual_seed(0)
    module = nn.Conv2d(64, 64, 3, padding=1)
    shapes = ((1, 64, size, size), (1, 64, size, size))
    torch_layout = torch.sparse_coo if layout == "coo" else torch.sparse_csr
    ei.conv2d_create_matrix(module, *shapes, layout=torch_layout, max_memory="16GiB")  # compile
    result = benchmark.pedantic(
        ei.conv2d_create_matrix,
        args=(module, *shapes),
        kwargs={"layout": torch_layout, "max_memory": "16GiB"},
        rounds=1 if smoke else 5,
        iterations=1,
    )
    nnz = result._nnz()
    assert nnz == _entries(64, size)
    _assert_is_the_conv(result, module, size)
    seconds = benchmark.stats.stats.median if benchmark.stats else float("nan")
    benchmark.extra_info.update(
        machine(), nnz=nnz, layout=layout, entries_per_s=nnz / seconds, peak_rss=peak_rss()
    )


def test_conv_kernel_only(benchmark, smoke):
    """The numba fill kernel alone, writing into reused buffers (no page faults)."""
    import numpy as np

    from foresight_sparse.connectivity import _fill_kernels as _kernels
    from foresight_sparse.connectivity.base import _rowptr

    size = 14 if smoke else 56
    torch.manual_seed(0)
    module = nn.Conv2d(64, 64, 3, padding=1)
    conn = conv2d(module, (1, 64, size, size), (1, 64, size, size))
    rowptr = _rowptr(conn.row_counts(0, conn.n_rows))
    nnz = int(rowptr[-1])
    cols, rows = np.empty(nnz, np.int64), np.empty(nnz, np.int64)
    vals = np.empty(nnz, np.float32)

    def fill():
        _kernels.fill_stencil_rows(0, conn.n_rows, conn, rowptr, cols, vals, rows)

    benchmark.pedantic(fill, rounds=1 if smoke else 5, iterations=1, warmup_rounds=1)
    assert nnz == _entries(64, size)
    arrays = map(torch.from_numpy, (rowptr, cols, vals))
    shape = (conn.n_rows, conn.n_cols)
    filled = torch.sparse_csr_tensor(*arrays, shape, check_invariants=True)  # sorted, in range
    _assert_is_the_conv(filled, module, size)
    seconds = benchmark.stats.stats.median if benchmark.stats else float("nan")
    benchmark.extra_info.update(machine(), nnz=nnz, entries_per_s=nnz / seconds)


def test_conv_dense_reference(benchmark, smoke):
    """The dense reference builder on a layer it can hold (16->16 at 14x14)."""
    size = 7 if smoke else 14
    torch.manual_seed(0)
    module = nn.Conv2d(16, 16, 3, padding=1)
    shapes = ((1, 16, size, size), (1, 16, size, size))
    dense = benchmark.pedantic(
        reference.conv2d_create_matrix,
        args=(module, *shapes),
        rounds=1 if smoke else 3,
        iterations=1,
    )
    nnz = int((dense != 0).sum())
    assert nnz == _entries(16, size)  # random weights: no entry is exactly zero
    _assert_is_the_conv(dense, module, size)
    seconds = benchmark.stats.stats.median if benchmark.stats else float("nan")
    benchmark.extra_info.update(
        machine(), nnz=nnz, dense_entries=dense.numel(), entries_per_s=nnz / seconds
    )
