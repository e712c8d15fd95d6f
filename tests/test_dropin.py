"""``foresight_sparse.ei`` as a drop-in for the old ``foresight.ei``: names, signatures, types,
and the old module's own numbers.

The old module's numbers come from a minimal re-implementation of it written below (the
thing this package replaces; its semantics paraphrased from the seed text), dense and in
float32 as it was, on networks where it was correct: no dilation, groups or padding modes,
and unpadded pools.
"""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import F64, examples, random_nets
from hypothesis import given, settings
from torch import nn

from foresight_sparse import ei
from foresight_sparse import reference as R

EMPTY = inspect.Parameter.empty

#: The old module's twelve names and, for the functions, their positional parameters and
#: defaults (``EMPTY``: no default). ``None`` marks the norm default, checked separately.
OLD_SIGNATURES = {
    "H": [("x", EMPTY), ("dim", 0)],
    "soft_norm": [("W", EMPTY)],
    "lin_norm": [("W", EMPTY)],
    "sig_norm": [("W", EMPTY)],
    "linear_create_matrix": [("module", EMPTY), ("in_shape", EMPTY), ("out_shape", EMPTY)],
    "conv2d_create_matrix": [("module", EMPTY), ("in_shape", EMPTY), ("out_shape", EMPTY)],
    "avgpool2d_create_matrix": [("module", EMPTY), ("in_shape", EMPTY), ("out_shape", EMPTY)],
    "get_shapes": [("model", EMPTY), ("input", EMPTY)],
    **{
        name: [
            ("model", EMPTY),
            ("input", None),
            ("shapes", None),
            ("norm", "lin_norm"),
            ("device", "cpu"),
        ]
        for name in ("determinism", "degeneracy", "ei")
    },
}
POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def test_the_twelve_names():
    assert set(ei.__all__) == set(OLD_SIGNATURES) | {"VALID_MODULES"}
    for name in ei.__all__:
        assert hasattr(ei, name), name


@pytest.mark.parametrize("name", list(OLD_SIGNATURES))
def test_old_signature(name):
    sig = inspect.signature(getattr(ei, name))
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in POSITIONAL]
    assert [p.name for p in positional] == [n for n, _ in OLD_SIGNATURES[name]]
    for p, (_, default) in zip(positional, OLD_SIGNATURES[name]):
        if default == "lin_norm":
            assert p.default is ei.lin_norm
        else:
            assert p.default is default or p.default == default, (p.name, p.default)
    for p in params[len(positional) :]:
        assert p.kind == inspect.Parameter.KEYWORD_ONLY, f"new option {p.name} must be keyword-only"
        assert p.default is not EMPTY, f"new option {p.name} needs a default"


def test_new_options_are_keyword_only():
    model = nn.Linear(3, 2)
    x = torch.zeros(1, 3)
    with pytest.raises(TypeError):
        ei.ei(model, x, None, ei.lin_norm, "cpu", "sparse")
    with pytest.raises(TypeError):
        ei.conv2d_create_matrix(nn.Conv2d(1, 1, 1), (1, 1, 2, 2), (1, 1, 2, 2), torch.sparse_csr)


def test_valid_modules_has_the_old_keys():
    assert set(ei.VALID_MODULES) == {nn.Linear, nn.Conv2d, nn.AvgPool2d}
    assert ei.VALID_MODULES[nn.Conv2d] is ei.conv2d_create_matrix


def test_old_positional_call_style():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    x = torch.zeros(1, 1, 4, 4)
    shapes = ei.get_shapes(model, x)
    for fn in (ei.determinism, ei.degeneracy, ei.ei):
        by_input = fn(model, x)
        assert type(by_input) is float
        assert fn(model, None, shapes) == by_input
        assert fn(model, shapes=shapes) == by_input
        assert fn(model, x, shapes, ei.soft_norm, "cpu") == fn(model, x, norm=ei.soft_norm)
        assert fn(model, x, None, None) == fn(model, x, norm=None)
    assert type(ei.H(torch.tensor([0.5, 0.5]))) is torch.Tensor
    assert ei.H(torch.tensor([0.5, 0.5])).item() == 1.0


@settings(max_examples=examples(15))
@given(net=random_nets())
def test_shapes_argument_equals_input_argument(net):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        shapes = ei.get_shapes(net.model, net.input)
        expected = R.get_shapes(net.model, net.input)
        assert list(shapes.items()) == list(expected.items())
        for fn in (ei.determinism, ei.degeneracy, ei.ei):
            a = fn(net.model, net.input, engine="sparse")
            b = fn(net.model, shapes=shapes, engine="sparse")
            assert type(a) is float and type(b) is float
            assert a == b


# --------------------------------------------------------------------------- the old module


def old_linear_matrix(module, in_shape, out_shape):
    W = module.weight.detach().t()
    assert W.shape == (in_shape[-1], out_shape[-1])
    return W


def old_conv2d_matrix(module, in_shape, out_shape):
    # every output's window is written into a zero-padded copy of the input, padding cut off
    p_h, p_w = module.padding
    _, channels, h, w = in_shape
    W = torch.zeros(tuple(out_shape[1:]) + (channels, h + 2 * p_h, w + 2 * p_w))
    s_h, s_w = module.stride
    k_h, k_w = module.kernel_size
    for c_out in range(out_shape[1]):
        for oh in range(out_shape[2]):
            for ow in range(out_shape[3]):
                W[c_out, oh, ow, :, oh * s_h : oh * s_h + k_h, ow * s_w : ow * s_w + k_w] = (
                    module.weight.detach()[c_out]
                )
    W = W[..., p_h : p_h + h, p_w : p_w + w]
    return W.reshape(math.prod(out_shape[1:]), math.prod(in_shape[1:])).t()


def old_avgpool2d_matrix(module, in_shape, out_shape):
    # every output connects to its window in *all* input channels, 1/(kh*kw), windows clipped
    assert module.padding == 0
    s_h, s_w = module.stride if isinstance(module.stride, tuple) else (module.stride,) * 2
    k_h, k_w = (
        module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,) * 2
    )
    W = torch.zeros(tuple(out_shape[1:]) + tuple(in_shape[1:]))
    for c_out in range(out_shape[1]):
        for oh in range(out_shape[2]):
            for ow in range(out_shape[3]):
                W[c_out, oh, ow, :, oh * s_h : oh * s_h + k_h, ow * s_w : ow * s_w + k_w] = 1 / (
                    k_h * k_w
                )
    return W.reshape(math.prod(out_shape[1:]), math.prod(in_shape[1:])).t()


OLD_BUILDERS = {
    nn.Linear: old_linear_matrix,
    nn.Conv2d: old_conv2d_matrix,
    nn.AvgPool2d: old_avgpool2d_matrix,
}


def old_H(x, dim=0):
    r = x * torch.log2(x)
    r[r != r] = 0
    return -torch.sum(r, dim=dim)


def old_lin_norm(W):
    W = F.relu(W)
    sums = W.sum(dim=1)
    sums[sums == 0] = 1
    return W / sums.reshape(-1, 1)


def old_sig_norm(W):
    W = torch.sigmoid(W)
    return W / W.sum(dim=1).reshape(-1, 1)


OLD_NORMS = {
    "lin": old_lin_norm,
    "soft": lambda W: F.softmax(W, dim=1),
    "sig": old_sig_norm,
    "none": None,
}
NEW_NORMS = {"lin": ei.lin_norm, "soft": ei.soft_norm, "sig": ei.sig_norm, "none": None}


def old_measures(model, input, norm):
    shapes = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, args, out: shapes.__setitem__(mod, (tuple(args[0].shape), tuple(out.shape)))
        )
        for m in model.modules()
        if type(m) in OLD_BUILDERS
    ]
    with torch.no_grad():
        model(input)
    for h in hooks:
        h.remove()
    h_sum, n, in_weights = 0.0, 0, []
    with torch.no_grad():
        for module, (in_shape, out_shape) in shapes.items():
            W = OLD_BUILDERS[type(module)](module, in_shape, out_shape)
            if norm:
                W = norm(W)
            h_sum += torch.sum(old_H(W, dim=1)).item()
            n += W.shape[0]
            in_weights.append(W.sum(dim=0))
    v = torch.cat(in_weights)
    determinism = h_sum / n
    degeneracy = old_H(v / v.sum().item()).item()
    return determinism, degeneracy, degeneracy - determinism


@pytest.mark.parametrize("norm", list(OLD_NORMS))
@settings(max_examples=examples(15))
@given(net=random_nets(seed_compatible=True, dtype=torch.float32))
def test_equals_the_old_module(norm, net):
    det, deg, value = old_measures(net.model, net.input, OLD_NORMS[norm])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rep_value = ei.ei(net.model, net.input, norm=NEW_NORMS[norm], legacy=True)
        rep_det = ei.determinism(net.model, net.input, norm=NEW_NORMS[norm], legacy=True)
    scale = abs(det) + abs(deg)
    assert rep_det == pytest.approx(det, rel=1e-5, abs=1e-6)
    assert abs(rep_value - value) <= 1e-5 * scale + 1e-6, (rep_value, value)


def test_old_module_reimplementation_is_the_reference_legacy():
    # the re-implementation above agrees with the oracle on a network with every layer type
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=(1, 0)),
        nn.ReLU(),
        nn.AvgPool2d(2, ceil_mode=True),
        nn.Flatten(),
        nn.Linear(9, 4),
    )
    x = torch.zeros(1, 2, 4, 5)
    det, deg, _ = old_measures(model, x, old_lin_norm)
    assert R.determinism(model, x, legacy=True) == pytest.approx(det, rel=1e-6)
    assert R.degeneracy(model, x, legacy=True) == pytest.approx(deg, rel=1e-6)
    md = model.to(F64)
    assert ei.ei(md, x.to(F64), legacy=True) == pytest.approx(
        R.ei(md, x.to(F64), legacy=True), rel=1e-12
    )
