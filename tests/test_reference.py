"""Tests of the dense reference itself, against matrices and values worked out by hand.

The reference is the oracle for every other engine, so nothing here compares it with other
code of this package: expected values are written out (or built from their definition with
explicit loops) in the tests, and Conv2d matrices are also compared with autograd's Jacobian.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import jacobian_t

from foresight_sparse import reference as R
from foresight_sparse.exceptions import (
    MissingInputError,
    NoSupportedLayersError,
    ShapeMismatchError,
    UnsupportedLayerError,
)

F64 = torch.float64


def tensor(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def linear(weight: list, bias: bool = True) -> nn.Linear:
    """An nn.Linear whose weight (out_features x in_features) is `weight`."""
    w = torch.tensor(weight, dtype=torch.float32)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias:
            layer.bias.fill_(0.7)  # the bias must never matter
    return layer


def conv(kernel: list, **kwargs) -> nn.Conv2d:
    """A 1->1 channel nn.Conv2d with the given 2-d kernel."""
    k = torch.tensor(kernel, dtype=torch.float32)
    layer = nn.Conv2d(1, 1, tuple(k.shape), **kwargs)
    with torch.no_grad():
        layer.weight.copy_(k.reshape(1, 1, *k.shape))
        if layer.bias is not None:
            layer.bias.fill_(0.7)
    return layer


def entropy(probabilities: list[float]) -> float:
    return -sum(p * math.log2(p) for p in probabilities if p > 0)


# --------------------------------------------------------------------------------------------
# H and the norms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        ([0.5, 0.5], 1.0),
        ([1.0, 0.0], 0.0),
        ([-1.0, 1.0], 0.0),
        ([0.25, 0.25, 0.25, 0.25], 2.0),
        ([0.5, 0.25, 0.25, 0.0], 1.5),
        ([0.0, 0.0], 0.0),
    ],
)
def test_H_vectors(x, expected):
    result = R.H(tensor(x))
    assert isinstance(result, torch.Tensor)
    assert result.item() == pytest.approx(expected, abs=1e-15)


def test_H_dim():
    x = tensor([[0.5, 0.5], [1.0, 0.0]])
    assert torch.equal(R.H(x, dim=1), tensor([1.0, 0.0]))
    # columns: (0.5, 1) -> 0.5 bit; (0.5, 0) -> 0.5 bit
    assert torch.equal(R.H(x, dim=0), tensor([0.5, 0.5]))
    assert torch.equal(R.H(x), R.H(x, dim=0))


def test_lin_norm_by_hand():
    W = tensor([[1.0, 3.0, -2.0], [0.0, 0.0, 0.0], [-1.0, -5.0, 0.0], [2.0, 2.0, 0.0]])
    expected = tensor([[0.25, 0.75, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    assert torch.equal(R.lin_norm(W), expected)


def test_soft_norm_by_hand():
    P = R.soft_norm(torch.eye(4, dtype=F64))
    e = math.e
    row0 = tensor([e, 1, 1, 1]) / (e + 3)
    assert torch.allclose(P[0], row0, rtol=1e-15, atol=0)
    assert torch.allclose(P.sum(dim=1), torch.ones(4, dtype=F64), rtol=1e-15, atol=0)
    # zero entries weigh exp(0) = 1: a zero row is uniform
    assert torch.allclose(
        R.soft_norm(torch.zeros(2, 5, dtype=F64)), torch.full((2, 5), 0.2, dtype=F64)
    )


def test_sig_norm_by_hand():
    W = tensor([[0.0, 0.0], [3.0, -1.0], [2.0, 0.0]])
    P = R.sig_norm(W)
    assert torch.allclose(P.sum(dim=1), torch.ones(3, dtype=F64), rtol=1e-15, atol=0)
    assert torch.equal(P[0], tensor([0.5, 0.5]))
    s = 1 / (1 + math.exp(-2.0))
    assert P[2].tolist() == pytest.approx([s / (s + 0.5), 0.5 / (s + 0.5)], rel=1e-15)


def test_norms_rows_sum_to_one_on_random():
    W = torch.randn(7, 9, dtype=F64, generator=torch.Generator().manual_seed(0))
    for norm in (R.soft_norm, R.sig_norm):
        assert torch.allclose(norm(W).sum(dim=1), torch.ones(7, dtype=F64), rtol=1e-14, atol=0)
    sums = R.lin_norm(W).sum(dim=1)
    assert torch.allclose(sums, torch.ones(7, dtype=F64), rtol=1e-14, atol=0)


# --------------------------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------------------------


def test_linear_matrix_is_transposed_weight():
    layer = linear([[1, 2, 3], [4, 5, 6]])
    A = R.linear_create_matrix(layer, (1, 3), (1, 2))
    assert A.dtype == F64
    assert torch.equal(A, tensor([[1, 4], [2, 5], [3, 6]]))
    # a copy: editing it does not touch the layer
    A[0, 0] = 100
    assert layer.weight[0, 0].item() == 1


def test_linear_all_ones():
    model = nn.Sequential(linear([[1.0] * 4] * 4))
    x = torch.zeros(1, 4)
    assert R.determinism(model, x) == pytest.approx(2.0, abs=1e-15)
    assert R.degeneracy(model, x) == pytest.approx(2.0, abs=1e-15)
    assert R.ei(model, x) == pytest.approx(0.0, abs=1e-15)


def test_linear_identity():
    model = nn.Sequential(linear(torch.eye(4).tolist(), bias=False))
    x = torch.zeros(1, 4)
    assert R.determinism(model, x) == 0.0
    assert R.degeneracy(model, x) == pytest.approx(2.0, abs=1e-15)
    assert R.ei(model, x) == pytest.approx(2.0, abs=1e-15)
    for f in (R.determinism, R.degeneracy, R.ei):
        assert isinstance(f(model, x), float)


def test_linear_identity_soft_norm():
    model = nn.Sequential(linear(torch.eye(4).tolist()))
    x = torch.zeros(1, 4)
    e = math.e
    row_entropy = entropy([e / (e + 3)] + [1 / (e + 3)] * 3)
    assert R.determinism(model, x, norm=R.soft_norm) == pytest.approx(row_entropy, rel=1e-14)
    # every column sums to (e + 3) / (e + 3) = 1: uniform in-weights
    assert R.degeneracy(model, x, norm=R.soft_norm) == pytest.approx(2.0, rel=1e-14)
    assert R.ei(model, x, norm=R.soft_norm) == pytest.approx(2.0 - row_entropy, rel=1e-14)


def test_norm_none_uses_raw_matrix():
    # rows (0.5, 0.5) and (1, 0) are already distributions
    model = nn.Sequential(linear([[0.5, 1.0], [0.5, 0.0]]))
    x = torch.zeros(1, 2)
    assert R.determinism(model, x, norm=None) == pytest.approx(0.5, abs=1e-15)
    # column sums (1.5, 0.5) -> (0.75, 0.25)
    assert R.degeneracy(model, x, norm=None) == pytest.approx(entropy([0.75, 0.25]), rel=1e-15)


def test_all_zero_rows_count_in_determinism():
    # input 0 has out-weights (1, 1); input 1 only negative ones, an all-zero row after lin_norm
    model = nn.Sequential(linear([[1.0, -1.0], [1.0, -2.0]]))
    x = torch.zeros(1, 2)
    assert R.determinism(model, x) == pytest.approx(0.5, abs=1e-15)
    assert R.degeneracy(model, x) == pytest.approx(1.0, abs=1e-15)


def test_all_negative_weights_give_zero_degeneracy():
    model = nn.Sequential(linear([[-1.0, -1.0], [-1.0, -2.0]]))
    assert R.degeneracy(model, torch.zeros(1, 2)) == 0.0
    assert R.determinism(model, torch.zeros(1, 2)) == 0.0


def test_two_layer_network_by_hand():
    # layer 1: A1 = W1^T = [[1, 1], [0, 1]] -> P1 = [[.5, .5], [0, 1]], row entropies 1, 0
    # layer 2: A2 = [[2], [3]] -> P2 = [[1], [1]], row entropies 0, 0
    model = nn.Sequential(linear([[1, 0], [1, 1]]), nn.ReLU(), linear([[2, 3]]))
    x = torch.zeros(1, 2)
    det = (1 + 0 + 0 + 0) / 4
    # column sums: P1 -> (0.5, 1.5), P2 -> (2,); total 4
    deg = entropy([0.5 / 4, 1.5 / 4, 2 / 4])
    assert deg == pytest.approx(2 - 0.375 * math.log2(3), rel=1e-15)
    assert R.determinism(model, x) == pytest.approx(det, abs=1e-15)
    assert R.degeneracy(model, x) == pytest.approx(deg, rel=1e-14)
    assert R.ei(model, x) == pytest.approx(deg - det, rel=1e-14)
    shapes = R.get_shapes(model, x)
    assert R.ei(model, shapes=shapes) == pytest.approx(deg - det, rel=1e-14)


# --------------------------------------------------------------------------------------------
# Conv2d, against hand-written matrices
# --------------------------------------------------------------------------------------------

K = [[1, 2], [3, 4]]


def test_conv_2x2_kernel_on_3x3():
    A = R.conv2d_create_matrix(conv(K), (1, 1, 3, 3), (1, 1, 2, 2))
    # rows: input (i, j) -> 3i + j; columns: output (p, q) -> 2p + q; A = K[i - p, j - q]
    expected = tensor(
        [
            [1, 0, 0, 0],
            [2, 1, 0, 0],
            [0, 2, 0, 0],
            [3, 0, 1, 0],
            [4, 3, 2, 1],
            [0, 4, 0, 2],
            [0, 0, 3, 0],
            [0, 0, 4, 3],
            [0, 0, 0, 4],
        ]
    )
    assert torch.equal(A, expected)
    # unbatched shapes give the same matrix
    assert torch.equal(R.conv2d_create_matrix(conv(K), (1, 3, 3), (1, 2, 2)), expected)


def test_conv_stride_2_padding_1():
    A = R.conv2d_create_matrix(conv(K, stride=2, padding=1), (1, 1, 3, 3), (1, 1, 2, 2))
    # output (p, q) covers input rows 2p-1..2p, columns 2q-1..2q; A = K[i - 2p + 1, j - 2q + 1]
    expected = tensor(
        [
            [4, 0, 0, 0],
            [0, 3, 0, 0],
            [0, 4, 0, 0],
            [0, 0, 2, 0],
            [0, 0, 0, 1],
            [0, 0, 0, 2],
            [0, 0, 4, 0],
            [0, 0, 0, 3],
            [0, 0, 0, 4],
        ]
    )
    assert torch.equal(A, expected)


def test_conv_dilation():
    # a 2x2 kernel with dilation 2 spans 3x3: the corners of the input
    A = R.conv2d_create_matrix(conv(K, dilation=2), (1, 1, 3, 3), (1, 1, 1, 1))
    assert torch.equal(A, tensor([[1], [0], [2], [0], [0], [0], [3], [0], [4]]))
    # 1x4 input, kernel (1, 2) = (5, 7) dilated by 2 along w: outputs see inputs (0, 2), (1, 3)
    A = R.conv2d_create_matrix(conv([[5, 7]], dilation=(1, 2)), (1, 1, 1, 4), (1, 1, 1, 2))
    assert torch.equal(A, tensor([[5, 0], [0, 5], [7, 0], [0, 7]]))


def test_conv_groups_by_hand():
    layer = nn.Conv2d(2, 4, 1, groups=2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(4, 1, 1, 1))
    A = R.conv2d_create_matrix(layer, (1, 2, 1, 1), (1, 4, 1, 1))
    # outputs 0, 1 read input channel 0; outputs 2, 3 read input channel 1
    assert torch.equal(A, tensor([[1, 2, 0, 0], [0, 0, 3, 4]]))


def test_conv_groups_no_cross_group_entries():
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 2, groups=2)
    with torch.no_grad():
        layer.weight.abs_().add_(0.1)  # every weight non-zero
    A = R.conv2d_create_matrix(layer, (1, 4, 3, 3), (1, 6, 2, 2))
    assert A.shape == (4 * 9, 6 * 4)
    blocks = A.reshape(4, 9, 6, 4)
    # group 0: input channels 0, 1 -> output channels 0, 1, 2; group 1: 2, 3 -> 3, 4, 5
    assert torch.count_nonzero(blocks[:2, :, 3:]) == 0
    assert torch.count_nonzero(blocks[2:, :, :3]) == 0
    assert torch.all(blocks[:2, :, :3].sum(dim=(0, 1)) > 0)
    assert torch.all(blocks[2:, :, 3:].sum(dim=(0, 1)) > 0)
    # the in-group entry for input (ci, i, j) and output (co, p, q) is weight[co, ci, i-p, j-q]
    assert blocks[1, 4, 2, 0].item() == pytest.approx(layer.weight[2, 1, 1, 1].item(), rel=1e-7)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        # input (a, b, c), kernel (w0, w1, w2) = (1, 2, 3), one sample of padding on each side
        ("zeros", [[2, 1, 0], [3, 2, 1], [0, 3, 2]]),  # padded (0, a, b, c, 0)
        ("reflect", [[2, 1, 0], [4, 2, 4], [0, 3, 2]]),  # padded (b, a, b, c, b)
        ("replicate", [[3, 1, 0], [3, 2, 1], [0, 3, 5]]),  # padded (a, a, b, c, c)
        ("circular", [[2, 1, 3], [3, 2, 1], [1, 3, 2]]),  # padded (c, a, b, c, a)
    ],
)
def test_conv_padding_modes_by_hand(mode, expected):
    layer = conv([[1, 2, 3]], padding=(0, 1), padding_mode=mode)
    A = R.conv2d_create_matrix(layer, (1, 1, 1, 3), (1, 1, 1, 3))
    assert torch.equal(A, tensor(expected))


def test_conv_same_even_kernel_by_hand():
    # padding='same' with a 2-tap kernel pads 0 before and 1 after: out_j = w0 x_j + w1 x_{j+1}
    A = R.conv2d_create_matrix(conv([[5, 7]], padding="same"), (1, 1, 1, 3), (1, 1, 1, 3))
    assert torch.equal(A, tensor([[5, 0, 0], [7, 5, 0], [0, 7, 5]]))


# --------------------------------------------------------------------------------------------
# Conv2d, against autograd
# --------------------------------------------------------------------------------------------


CONV_CONFIGS = [
    dict(in_channels=2, out_channels=3, kernel_size=3),
    dict(in_channels=2, out_channels=3, kernel_size=(2, 3), stride=(2, 1), padding=(1, 2)),
    dict(in_channels=4, out_channels=2, kernel_size=3, dilation=(2, 1), padding=2, groups=2),
    dict(in_channels=3, out_channels=3, kernel_size=2, stride=3, groups=3),
    dict(in_channels=2, out_channels=2, kernel_size=(2, 4), padding="same"),
    dict(in_channels=2, out_channels=2, kernel_size=2, padding="same", dilation=3),
    dict(in_channels=2, out_channels=3, kernel_size=3, padding="valid"),
    *(
        dict(in_channels=2, out_channels=4, kernel_size=3, padding=2, stride=2, padding_mode=m)
        for m in ("zeros", "reflect", "replicate", "circular")
    ),
    *(
        dict(in_channels=2, out_channels=2, kernel_size=(2, 3), padding="same", padding_mode=m)
        for m in ("reflect", "replicate", "circular")
    ),
    *(
        dict(
            in_channels=4,
            out_channels=2,
            kernel_size=3,
            padding=(1, 2),
            dilation=2,
            groups=2,
            padding_mode=m,
        )
        for m in ("reflect", "replicate", "circular")
    ),
]


@pytest.mark.parametrize("config", CONV_CONFIGS, ids=lambda c: repr(c))
def test_conv_matches_autograd_jacobian(config):
    torch.manual_seed(1)
    layer = nn.Conv2d(**config)
    in_shape = (1, config["in_channels"], 5, 6)
    with torch.no_grad():
        out_shape = tuple(layer(torch.zeros(in_shape)).shape)
    A = R.conv2d_create_matrix(layer, in_shape, out_shape)
    expected = jacobian_t(layer, in_shape)
    assert A.shape == expected.shape == (math.prod(in_shape), math.prod(out_shape))
    assert torch.allclose(A, expected, rtol=1e-12, atol=1e-15)


def test_conv_chunked_basis_matches_autograd(monkeypatch):
    monkeypatch.setattr(R, "_BASIS_CHUNK", 7)
    torch.manual_seed(2)
    layer = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
    A = R.conv2d_create_matrix(layer, (1, 2, 4, 5), (1, 3, 4, 5))
    assert torch.allclose(A, jacobian_t(layer, (1, 2, 4, 5)), rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------
# AvgPool2d
# --------------------------------------------------------------------------------------------


def test_avgpool_true_2x2_per_channel():
    A = R.avgpool2d_create_matrix(nn.AvgPool2d(2), (1, 2, 4, 4), (1, 2, 2, 2))
    expected = torch.zeros(2 * 16, 2 * 4, dtype=F64)
    for c in range(2):
        for i in range(4):
            for j in range(4):
                expected[c * 16 + i * 4 + j, c * 4 + (i // 2) * 2 + j // 2] = 0.25
    assert torch.equal(A, expected)


def test_avgpool_padding_count_include_pad_false():
    layer = nn.AvgPool2d(2, stride=2, padding=1, count_include_pad=False)
    A = R.avgpool2d_create_matrix(layer, (1, 1, 3, 3), (1, 1, 2, 2))
    # output (0,0) sees only input (0,0): divisor 1; edges see 2 inputs; (1,1) sees 4
    expected = tensor(
        [
            [1, 0, 0, 0],
            [0, 0.5, 0, 0],
            [0, 0.5, 0, 0],
            [0, 0, 0.5, 0],
            [0, 0, 0, 0.25],
            [0, 0, 0, 0.25],
            [0, 0, 0.5, 0],
            [0, 0, 0, 0.25],
            [0, 0, 0, 0.25],
        ]
    )
    assert torch.equal(A, expected)
    # counting the padding, every divisor is 4
    layer = nn.AvgPool2d(2, stride=2, padding=1, count_include_pad=True)
    A = R.avgpool2d_create_matrix(layer, (1, 1, 3, 3), (1, 1, 2, 2))
    assert torch.equal(A, torch.where(expected > 0, 0.25, 0.0).to(F64))


def test_avgpool_ceil_mode():
    layer = nn.AvgPool2d(2, ceil_mode=True)
    A = R.avgpool2d_create_matrix(layer, (1, 1, 3, 3), (1, 1, 2, 2))
    # the last row and column of windows hang over the border and divide by what they cover
    expected = tensor(
        [
            [0.25, 0, 0, 0],
            [0.25, 0, 0, 0],
            [0, 0.5, 0, 0],
            [0.25, 0, 0, 0],
            [0.25, 0, 0, 0],
            [0, 0.5, 0, 0],
            [0, 0, 0.5, 0],
            [0, 0, 0.5, 0],
            [0, 0, 0, 1],
        ]
    )
    assert torch.equal(A, expected)


def test_avgpool_divisor_override():
    A = R.avgpool2d_create_matrix(nn.AvgPool2d(2, divisor_override=3), (1, 1, 2, 2), (1, 1, 1, 1))
    assert torch.allclose(A, torch.full((4, 1), 1 / 3, dtype=F64), rtol=1e-15, atol=0)


def test_avgpool_legacy_cross_channel():
    layer = nn.AvgPool2d(2)
    A = R.avgpool2d_create_matrix(layer, (1, 2, 2, 4), (1, 2, 1, 2), legacy=True)
    # rows: (c, i, j) -> 8c + 4i + j; columns: (c, 0, w) -> 2c + w; output w reads j in
    # {2w, 2w + 1} of *both* channels
    expected = torch.zeros(16, 4, dtype=F64)
    for c in range(2):
        for i in range(2):
            for j in range(4):
                for c_out in range(2):
                    expected[8 * c + 4 * i + j, 2 * c_out + j // 2] = 0.25
    assert torch.equal(A, expected)
    true = R.avgpool2d_create_matrix(layer, (1, 2, 2, 4), (1, 2, 1, 2))
    assert torch.count_nonzero(true) == 16  # each input reaches one output
    assert torch.count_nonzero(A) == 32


def test_avgpool_legacy_small_literal():
    # kernel (1, 2), stride defaults to the kernel; 2 channels of 1x2 -> 2 channels of 1x1
    A = R.avgpool2d_create_matrix(nn.AvgPool2d((1, 2)), (1, 2, 1, 2), (1, 2, 1, 1), legacy=True)
    assert torch.equal(A, torch.full((4, 2), 0.5, dtype=F64))
    # explicit stride (1, 1) on one channel of 1x3: windows (0, 1) and (1, 2)
    layer = nn.AvgPool2d((1, 2), stride=1)
    A = R.avgpool2d_create_matrix(layer, (1, 1, 1, 3), (1, 1, 1, 2), legacy=True)
    assert torch.equal(A, tensor([[0.5, 0], [0.5, 0.5], [0, 0.5]]))


def test_avgpool_legacy_refuses_padding():
    layer = nn.AvgPool2d(2, padding=1)
    with pytest.raises(UnsupportedLayerError, match="legacy=False"):
        R.avgpool2d_create_matrix(layer, (1, 1, 3, 3), (1, 1, 2, 2), legacy=True)
    model = nn.Sequential(layer)
    with pytest.raises(UnsupportedLayerError):
        R.ei(model, torch.zeros(1, 1, 3, 3), legacy=True)
    R.ei(model, torch.zeros(1, 1, 3, 3))  # fine without legacy


def test_legacy_changes_only_pooling():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.AvgPool2d(2))
    x = torch.zeros(1, 2, 4, 4)
    shapes = R.get_shapes(model, x)
    pool = model[1]
    det_true = R.determinism(model, shapes=shapes)
    det_legacy = R.determinism(model, shapes=shapes, legacy=True)
    # pool rows: true -> one entry, entropy 0; legacy -> two channels, entropy 1
    n_conv_rows, n_pool_rows = 32, 32
    assert det_legacy - det_true == pytest.approx(n_pool_rows / (n_conv_rows + n_pool_rows))
    assert pool in shapes


# --------------------------------------------------------------------------------------------
# Tracing and errors
# --------------------------------------------------------------------------------------------


def test_get_shapes_order_and_hooks_removed():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2, 3)
    )
    shapes = R.get_shapes(model, torch.zeros(1, 1, 4, 4))
    assert list(shapes) == [model[0], model[2], model[4]]
    assert shapes[model[0]] == ((1, 1, 4, 4), (1, 2, 2, 2))
    assert shapes[model[2]] == ((1, 2, 2, 2), (1, 2, 1, 1))
    assert shapes[model[4]] == ((1, 2), (1, 3))
    assert all(not m._forward_hooks for m in model.modules())


def test_get_shapes_removes_hooks_when_forward_fails():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(4, 1))
    with pytest.raises(RuntimeError):
        R.get_shapes(model, torch.zeros(1, 2))
    assert all(not m._forward_hooks for m in model.modules())


def test_subclass_is_not_supported_layer():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(2, 2), nn.Linear(2, 2))
    assert list(R.get_shapes(model, torch.zeros(1, 2))) == [model[1]]


def test_missing_input_and_shapes():
    model = nn.Sequential(nn.Linear(2, 2))
    for f in (R.determinism, R.degeneracy, R.ei):
        with pytest.raises(MissingInputError):
            f(model)
        with pytest.raises(ValueError):
            f(model)


def test_no_supported_layer():
    model = nn.Sequential(nn.ReLU(), nn.Tanh())
    for f in (R.determinism, R.degeneracy, R.ei):
        with pytest.raises(NoSupportedLayersError):
            f(model, torch.zeros(1, 3))
    with pytest.raises(NoSupportedLayersError):
        R.ei(model, shapes={})


def test_unsupported_module_in_shapes():
    relu = nn.ReLU()
    with pytest.raises(UnsupportedLayerError, match="ReLU"):
        R.ei(nn.Sequential(relu), shapes={relu: ((1, 2), (1, 2))})


def test_linear_shape_mismatch():
    layer = nn.Linear(3, 2)
    with pytest.raises(ShapeMismatchError, match=r"\(1, 4\)"):
        R.linear_create_matrix(layer, (1, 4), (1, 2))
    with pytest.raises(ShapeMismatchError, match="Linear"):
        R.linear_create_matrix(layer, (1, 3), (1, 5))
    with pytest.raises(ShapeMismatchError):
        R.ei(nn.Sequential(layer), shapes={layer: ((1, 4), (1, 2))})


def test_conv_shape_mismatch():
    layer = nn.Conv2d(2, 3, 3)
    with pytest.raises(ShapeMismatchError, match="Conv2d"):
        R.conv2d_create_matrix(layer, (1, 1, 5, 5), (1, 3, 3, 3))  # wrong input channels
    with pytest.raises(ShapeMismatchError):
        R.conv2d_create_matrix(layer, (1, 2, 5, 5), (1, 4, 3, 3))  # wrong output channels
    with pytest.raises(ShapeMismatchError, match=r"\(3, 3, 3\)"):
        R.conv2d_create_matrix(layer, (1, 2, 5, 5), (1, 3, 4, 4))  # wrong output size
    with pytest.raises(ShapeMismatchError):
        R.conv2d_create_matrix(layer, (2, 5, 5, 1, 1), (1, 3, 3, 3))  # not an image shape


def test_avgpool_shape_mismatch():
    layer = nn.AvgPool2d(2)
    with pytest.raises(ShapeMismatchError):
        R.avgpool2d_create_matrix(layer, (1, 2, 4, 4), (1, 3, 2, 2))
    for legacy in (False, True):
        with pytest.raises(ShapeMismatchError, match="AvgPool2d"):
            R.avgpool2d_create_matrix(layer, (1, 2, 4, 4), (1, 2, 3, 3), legacy=legacy)


def test_valid_modules_registry():
    assert R.VALID_MODULES == {
        nn.Linear: R.linear_create_matrix,
        nn.Conv2d: R.conv2d_create_matrix,
        nn.AvgPool2d: R.avgpool2d_create_matrix,
    }
    assert set(R.__all__) == {
        "H",
        "soft_norm",
        "lin_norm",
        "sig_norm",
        "linear_create_matrix",
        "conv2d_create_matrix",
        "avgpool2d_create_matrix",
        "VALID_MODULES",
        # the layers beyond the old module's (layers="all")
        "convnd_create_matrix",
        "conv_transposend_create_matrix",
        "avgpoolnd_create_matrix",
        "adaptive_avgpoolnd_create_matrix",
        "ALL_MODULES",
        "get_shapes",
        "determinism",
        "degeneracy",
        "ei",
    }


def test_cnn_measures_from_their_definitions_and_float32_close():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3)
    )
    x = torch.zeros(1, 1, 4, 4)
    # each layer's matrix is its Jacobian; the measures follow from their definitions
    mats = [
        jacobian_t(model[0], (1, 1, 4, 4)),
        jacobian_t(model[1], (1, 2, 4, 4)),
        jacobian_t(model[3], (1, 8)),
    ]
    for norm in (R.lin_norm, R.soft_norm, R.sig_norm):
        Ps = [norm(A) for A in mats]
        rows = [entropy(row.tolist()) for P in Ps for row in P]
        columns = torch.cat([P.sum(0) for P in Ps])
        det = sum(rows) / len(rows)
        deg = entropy((columns / columns.sum()).tolist())
        assert R.determinism(model, x, norm=norm) == pytest.approx(det, rel=1e-12)
        assert R.degeneracy(model, x, norm=norm) == pytest.approx(deg, rel=1e-12)
        assert R.ei(model, x, norm=norm) == pytest.approx(deg - det, rel=1e-11, abs=1e-14)
        det32 = R.determinism(model, x, norm=norm, dtype=torch.float32)
        assert det32 == pytest.approx(det, rel=1e-5)


def test_conv_matrix_applies_layer():
    # the oracle's conv matrix must be the one F.conv2d applies: A^T x == conv(x) - bias
    torch.manual_seed(5)
    layer = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    x = torch.randn(1, 2, 5, 5, dtype=F64)
    A = R.conv2d_create_matrix(layer, (1, 2, 5, 5), (1, 3, 3, 3))
    w = layer.weight.double()
    y = F.conv2d(x, w, None, 2, 1)
    assert torch.allclose(x.reshape(-1) @ A, y.reshape(-1), rtol=1e-12, atol=1e-12)
