"""Bad and odd input: every refusal is a precise error, every odd case a defined behaviour.

Each refusal asserts the exception type (a foresight_sparse exception, or the built-in it
subclasses) and that the message names the layer or the argument at fault. The odd cases
that are accepted (1x1 inputs, unconnected inputs, shared modules, low-precision models,
compiled models, ...) are compared with the dense float64 reference.

Behaviours defined here (and documented where the code lives):

- an integer or boolean ``input`` tensor is cast to the model's floating dtype before
  tracing (only shapes matter); models with an ``nn.Embedding`` keep integer inputs;
- a module called more than once counts once, with the shapes of its last call, and a
  warning says so when the calls saw different shapes;
- layer types are matched exactly: a subclass of Conv2d/Linear is skipped (listed in
  ``report().skipped`` and warned about) until it is registered itself;
- one warning per run names every skipped layer that carries connectivity (MaxPool2d,
  BatchNorm2d, ...); elementwise layers (ReLU, Flatten, ...) are listed but not warned about;
- a bias is ignored, so a NaN bias is accepted.
"""

from __future__ import annotations

import copy
import gc
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_close, quiet, storage_bytes
from torch import nn

import foresight_sparse as fs
from foresight_sparse import connectivity as C
from foresight_sparse import ei
from foresight_sparse import reference as R
from foresight_sparse.exceptions import (
    ForwardError,
    MemoryBudgetError,
    MissingInputError,
    NonFiniteWeightsError,
    NoSupportedLayersError,
    ShapeMismatchError,
    UnknownNameError,
    UnsupportedLayerError,
)

F64 = torch.float64
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

REF_NORMS = {"lin": R.lin_norm, "soft": R.soft_norm, "sig": R.sig_norm}


def small_net(dtype=torch.float32) -> nn.Sequential:
    """Conv2d(1->2, 3x3) on 1x1x4x4, then Flatten and Linear(8->3)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).to(dtype)


X = torch.zeros(1, 1, 4, 4)


def exact_weights_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights k/8 with |k| <= 16: exactly representable in half, bfloat16 and float32."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-16, 17, p.shape, generator=gen).to(F64) / 8)
    return model


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "norm, exc, pattern",
    [
        (3, TypeError, r"norm must be .* not int"),
        (1.5, TypeError, r"norm must be .* not float"),
        ("foo", UnknownNameError, r"unknown norm 'foo'; valid names are lin, none, sig, soft"),
    ],
)
def test_bad_norm_is_refused(norm, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ei.ei(small_net(), X, norm=norm)


def test_unknown_norm_is_a_valueerror():
    with pytest.raises(ValueError, match="norm 'FOO'"):
        ei.ei(small_net(), X, norm="FOO")


def test_unknown_engine_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match=r"engine 'fast'.*auto, implicit, sparse, dense"):
        ei.ei(small_net(), X, engine="fast")


@pytest.mark.parametrize("device", ["tpu", "foo", "meta", "cuda:x"])
def test_unknown_device_is_refused(device):
    with pytest.raises(UnknownNameError, match=rf"device={device!r}"):
        ei.ei(small_net(), X, device=device)


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", 0])
def test_cuda_without_cuda_is_a_clear_error(device):
    with pytest.raises(ValueError, match=r"device=.*asks for CUDA.*use device='cpu'"):
        ei.ei(small_net(), X, device=device)


def test_neither_input_nor_shapes():
    with pytest.raises(MissingInputError, match="pass input .* or shapes"):
        ei.determinism(small_net())


@pytest.mark.parametrize(
    "max_memory, exc, pattern",
    [
        ("junk", ValueError, r"max_memory='junk' is not a byte count"),
        ("2 parsecs", ValueError, r"max_memory='2 parsecs'"),
        (-1, ValueError, r"max_memory must be positive"),
        (0, ValueError, r"max_memory must be positive"),
        (float("nan"), ValueError, r"max_memory must be a finite number"),
        (float("inf"), ValueError, r"max_memory must be a finite number"),
        ([1], TypeError, r"max_memory must be a number of bytes .* not list"),
        (True, TypeError, r"max_memory must be a number of bytes .* not bool"),
    ],
)
def test_bad_max_memory_names_max_memory(max_memory, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ei.ei(small_net(), X, max_memory=max_memory)


@pytest.mark.parametrize("max_memory", ["2GiB", "2 GiB", "1.5GB", 2**31, np.int64(2**31)])
def test_max_memory_strings_and_numbers_are_read(max_memory):
    model = small_net()
    assert quiet(ei.ei, model, X, max_memory=max_memory) == quiet(ei.ei, model, X)


# --------------------------------------------------------------------------- input


def test_input_of_wrong_shape_names_the_layer():
    with pytest.raises(ForwardError, match=r"module '0' \(Conv2d\).*expected input.*channels"):
        ei.ei(small_net(), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ForwardError, match=r"module '3' \(Linear\).*mat1 and mat2"):
        ei.ei(small_net(), torch.zeros(1, 1, 5, 5))


def test_batchnorm_with_wrong_channels_names_the_layer():
    """The meta trace takes a shortcut through stock batch norms; it must still refuse
    what the real layer refuses."""
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ForwardError, match=r"module '1' \(BatchNorm2d\)"):
        ei.ei(model, torch.zeros(1, 1, 4, 4))
    with pytest.raises(ForwardError, match=r"module '1' \(BatchNorm2d\)"):
        ei.ei(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm2d(3)), torch.zeros(2, 4))
    # stock batch norms in a valid model: shapes come through unchanged, modes restored
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))
    model.train()
    shapes = ei.get_shapes(model, torch.zeros(1, 1, 4, 4))
    assert shapes[model[3]] == ((1, 16), (1, 2)) and model[1].training


def test_input_of_wrong_type_names_the_layer():
    with pytest.raises(ForwardError, match=r"module '0' \(Conv2d\)"):
        ei.ei(small_net(), np.zeros((1, 1, 4, 4), dtype=np.float32))


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.float16, torch.float64]
)
def test_input_dtype_is_cast_to_the_models_floating_dtype(dtype):
    model = small_net()
    expected = quiet(fs.report, model, X)
    got = quiet(fs.report, model, torch.zeros(1, 1, 4, 4, dtype=dtype))
    assert got.ei == expected.ei
    assert [lay.in_shape for lay in got.layers] == [lay.in_shape for lay in expected.layers]


def test_integer_input_reaches_an_embedding_uncast():
    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.fc = nn.Linear(12, 2)

        def forward(self, idx):
            return self.fc(self.emb(idx).flatten(1))

    rep = quiet(fs.report, Embed(), torch.tensor([[1, 2, 3]]))
    assert [lay.name for lay in rep.layers] == ["fc"]
    assert ("emb", "Embedding") in rep.skipped


def test_tuple_and_dict_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)
            self.b = nn.Linear(4, 2)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    torch.manual_seed(0)
    model = TwoInputs()
    x, y = torch.zeros(1, 3), torch.zeros(1, 4, dtype=F64)  # float64 is cast as well
    by_tuple = fs.report(model, (x, y))
    by_dict = fs.report(model, {"x": x, "y": y})
    assert [lay.name for lay in by_tuple.layers] == ["a", "b"]
    assert by_tuple.ei == by_dict.ei
    with pytest.raises(ForwardError, match=r"module TwoInputs \(the top-level module\).*missing"):
        fs.report(model, {"x": x})


# --------------------------------------------------------------------------- shapes


def test_shapes_from_another_model():
    other = small_net()
    with pytest.raises(
        ShapeMismatchError,
        match=r"Conv2d that is not part of Sequential.*"
        r"get_shapes",
    ):
        ei.ei(small_net(), shapes=ei.get_shapes(other, X))


@pytest.mark.parametrize(
    "value, pattern",
    [
        ((1, 2, 3), r"shapes\['0'\] must be \(in_shape, out_shape\)"),
        (None, r"shapes\['0'\] must be \(in_shape, out_shape\)"),
        (
            ((1, 1, 4, 4), "ab"),
            r"shapes\['0'\] \(Conv2d\): out_shape must be a tuple of "
            r"non-negative ints",
        ),
        (((1, 1, 4, 4), (1, 2, "a", 2)), r"shapes\['0'\] \(Conv2d\): out_shape"),
        (((1, 1, 4.0, 4), (1, 2, 2, 2)), r"shapes\['0'\] \(Conv2d\): in_shape"),
        ((5, (1, 2, 2, 2)), r"shapes\['0'\] \(Conv2d\): in_shape .* got 5"),
        (((1, 1, 4, 4), (1, 2, -2, 2)), r"shapes\['0'\] \(Conv2d\): out_shape .* -2"),
        (
            ((1, 1, 4, 4), (1, 2, 3, 3)),
            r"0 \(Conv2d\): Conv2d\(1, 2.*maps input \(1, 1, 4, 4\) to "
            r"\(N, 2, 2, 2\)",
        ),
        (((1, 1, 4, 4), (1, 3, 2, 2)), r"0 \(Conv2d\).*shapes say output \(1, 3, 2, 2\)"),
    ],
)
def test_malformed_shapes_name_the_layer(value, pattern):
    model = small_net()
    with pytest.raises(ShapeMismatchError, match=pattern):
        ei.ei(model, shapes={model[0]: value})


def test_shapes_that_are_not_a_dict():
    with pytest.raises(TypeError, match=r"shapes must be a dict .* not list"):
        ei.ei(small_net(), shapes=[((1, 1, 4, 4), (1, 2, 2, 2))])
    with pytest.raises(ShapeMismatchError, match=r"shapes is keyed by modules.*'conv'"):
        ei.ei(small_net(), shapes={"conv": ((1, 1, 4, 4), (1, 2, 2, 2))})


def test_shapes_as_torch_size_and_lists_are_accepted():
    model = small_net()
    traced = ei.get_shapes(model, X)
    as_lists = {m: (list(i), list(o)) for m, (i, o) in traced.items()}
    as_size = {m: (torch.Size(i), torch.Size(o)) for m, (i, o) in traced.items()}
    assert (
        ei.ei(model, shapes=as_lists) == ei.ei(model, shapes=as_size) == ei.ei(model, shapes=traced)
    )


def test_linear_with_mismatched_shapes():
    lin = nn.Linear(4, 3)
    with pytest.raises(ShapeMismatchError, match=r"Linear\(4, 3\) cannot map input \(1, 5\)"):
        ei.linear_create_matrix(lin, (1, 5), (1, 3))
    with pytest.raises(ShapeMismatchError, match=r"Linear: the input shape .* got 4"):
        ei.linear_create_matrix(lin, 4, (1, 3))
    model = nn.Sequential(lin)
    with pytest.raises(
        ShapeMismatchError,
        match=r"0 \(Linear\): Linear\(4, 3\).*output "
        r"\(1, 2\)",
    ):
        ei.ei(model, shapes={lin: ((1, 4), (1, 2))})


def test_conv2d_given_2d_shapes():
    conv = nn.Conv2d(1, 2, 3)
    with pytest.raises(
        ShapeMismatchError,
        match=r"Conv2d needs a 4-d \(N, C, H, W\) or 3-d.*"
        r"input shape, got \(1, 16\)",
    ):
        ei.conv2d_create_matrix(conv, (1, 16), (1, 8))
    with pytest.raises(
        ShapeMismatchError,
        match=r"Conv2d: the input shape of Conv2d must be "
        r"a tuple of ints, got 'abcd'",
    ):
        ei.conv2d_create_matrix(conv, "abcd", (1, 2, 2, 2))


def test_legacy_pool_with_padding_suggests_legacy_false():
    model = nn.Sequential(nn.AvgPool2d(2, padding=1))
    with pytest.raises(
        UnsupportedLayerError,
        match=r"0 \(AvgPool2d\): legacy=True .*padding"
        r".*use legacy=False",
    ):
        ei.ei(model, X, legacy=True)
    assert math.isfinite(ei.ei(model, X))  # legacy=False takes it


def test_unknown_layout_names_the_argument():
    with pytest.raises(UnknownNameError, match=r"unknown layout 'dense'.*sparse_coo"):
        ei.conv2d_create_matrix(nn.Conv2d(1, 1, 1), (1, 1, 2, 2), (1, 1, 2, 2), layout="dense")


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("engine", ["auto", "sparse", "dense"])
def test_non_finite_weights_name_the_layer(value, engine):
    model = small_net()
    with torch.no_grad():
        model[0].weight[1, 0, 2, 2] = value
    with pytest.raises(
        NonFiniteWeightsError,
        match=r"0 \(Conv2d\): 1 of 18 weights are NaN "
        r"or infinite",
    ):
        ei.ei(model, X, engine=engine)
    model = small_net()
    with torch.no_grad():
        model[3].weight[0, 0] = value
    with pytest.raises(ValueError, match=r"3 \(Linear\): 1 of 24 weights"):
        ei.ei(model, X, engine=engine)


def test_nan_bias_is_ignored():
    model = small_net()
    expected = quiet(ei.ei, model, X)
    with torch.no_grad():
        model[0].bias.fill_(float("nan"))
    assert quiet(ei.ei, model, X) == expected


@pytest.mark.parametrize("engine", ["sparse", "implicit", "auto"])
def test_soft_norm_survives_weights_far_apart(engine):
    """The sparse engine shifts each softmax row by its own maximum; the implicit engine
    hands layers whose weights span more than SOFTMAX_SPAN to it."""
    lin = nn.Linear(2, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 1000.0], [0.0, 999.0]], dtype=F64))
    model, x = nn.Sequential(lin), torch.zeros(1, 2, dtype=F64)
    rep = fs.report(model, x, norm="soft", engine=engine)
    assert_close(rep.determinism, R.determinism(model, x, norm=R.soft_norm), 1e-9)
    assert_close(rep.degeneracy, R.degeneracy(model, x, norm=R.soft_norm), 1e-9)
    assert rep.layers[0].engine == "sparse"


def test_soft_norm_conv_with_one_huge_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    with torch.no_grad():
        conv.weight[0, 0, 1, 1] = 900.0
    model, x = nn.Sequential(conv), torch.zeros(1, 2, 5, 5, dtype=F64)
    rep = fs.report(model, x, norm="soft")
    assert rep.layers[0].engine == "sparse"
    assert_close(rep.determinism, R.determinism(model, x, norm=R.soft_norm), 1e-9)
    assert_close(rep.degeneracy, R.degeneracy(model, x, norm=R.soft_norm), 1e-9)


# --------------------------------------------------------------------------- models


def test_empty_sequential():
    with pytest.raises(
        NoSupportedLayersError,
        match=r"Sequential has no layer of a supported "
        r"type \(AvgPool2d, Conv2d, Linear\)",
    ):
        ei.ei(nn.Sequential(), X)


def test_model_with_no_supported_layer_names_what_ran():
    model = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))
    with pytest.raises(
        NoSupportedLayersError,
        match=r"'ReLU': 1, 'MaxPool2d': 1.*"
        r"foresight_sparse.register",
    ):
        ei.ei(model, X)


def test_model_without_parameters():
    model = nn.Sequential(nn.AvgPool2d(2), nn.AvgPool2d(2, stride=1))
    x = torch.zeros(1, 2, 6, 6, dtype=F64)
    for norm, ref_norm in REF_NORMS.items():
        assert_close(ei.ei(model, x, norm=norm), R.ei(model, x, norm=ref_norm), 1e-9, what=norm)
    # an integer input is cast to the default dtype: AvgPool2d has no parameters to copy
    assert ei.ei(model, x.long()) == ei.ei(model, x)


def test_skipped_layers_are_listed_and_warned_about_once():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2, 2, 1),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2, 2),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = fs.report(model, torch.zeros(1, 1, 4, 4))
    assert rep.skipped == [
        ("1", "BatchNorm2d"),
        ("2", "ReLU"),
        ("3", "MaxPool2d"),
        ("5", "MaxPool2d"),
        ("6", "Flatten"),
    ]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "1 BatchNorm2d, 2 MaxPool2d" in messages[0]
    assert "ReLU" not in messages[0] and ".skipped lists them" in messages[0]
    # the drop-in functions warn once per call too
    with pytest.warns(UserWarning, match="2 MaxPool2d") as record:
        ei.determinism(model, torch.zeros(1, 1, 4, 4))
    assert len(record) == 1


def test_elementwise_layers_are_listed_but_not_warned_about():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = fs.report(small_net(), X)
    assert rep.skipped == [("1", "ReLU"), ("2", "Flatten")]


class SubConv(nn.Conv2d):
    pass


class SubLinear(nn.Linear):
    pass


def test_subclasses_are_skipped_until_registered():
    torch.manual_seed(0)
    model = nn.Sequential(SubConv(1, 2, 3), nn.Flatten(), SubLinear(8, 3), nn.Linear(3, 2))
    with pytest.warns(UserWarning, match=r"1 SubConv, 1 SubLinear"):
        rep = fs.report(model, X)
    assert [lay.name for lay in rep.layers] == ["3"]
    assert ("0", "SubConv") in rep.skipped and ("2", "SubLinear") in rep.skipped
    fs.register(SubConv, C.conv2d)
    fs.register(SubLinear, C.linear)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rep = fs.report(model, X)
    finally:
        fs.unregister(SubConv)
        fs.unregister(SubLinear)
    assert [(lay.name, lay.type) for lay in rep.layers] == [
        ("0", "SubConv"),
        ("2", "SubLinear"),
        ("3", "Linear"),
    ]
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3), nn.Linear(3, 2))
    plain.load_state_dict(model.state_dict())
    assert quiet(ei.ei, plain, X) == rep.ei


class Shared(nn.Module):
    """One Conv2d called twice, with a pool (different shapes) or not between the calls."""

    def __init__(self, pool: bool):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.pool = nn.AvgPool2d(2) if pool else nn.Identity()

    def forward(self, x):
        return self.conv(self.pool(self.conv(x)))


def test_shared_module_same_shapes_counts_once_without_warning():
    torch.manual_seed(0)
    model = Shared(pool=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = fs.report(model, torch.zeros(1, 1, 6, 6))
    assert [(lay.name, lay.in_shape) for lay in rep.layers] == [("conv", (1, 1, 6, 6))]
    single = nn.Sequential(model.conv)
    assert rep.ei == quiet(ei.ei, single, torch.zeros(1, 1, 6, 6))


def test_shared_module_different_shapes_uses_last_call_and_warns():
    model = Shared(pool=True)
    with pytest.warns(
        UserWarning,
        match=r"conv \(Conv2d\) was called with several shapes.*"
        r"shapes of its last call",
    ):
        rep = fs.report(model, torch.zeros(1, 1, 6, 6))
    assert [(lay.name, lay.in_shape) for lay in rep.layers] == [
        ("conv", (1, 1, 3, 3)),
        ("pool", (1, 1, 6, 6)),
    ]
    # as in the old module (the reference): first position, last shapes
    ref_shapes = R.get_shapes(model, torch.zeros(1, 1, 6, 6))
    assert list(ref_shapes.values())[0] == ((1, 1, 3, 3), (1, 1, 3, 3))


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


class Block(nn.Module):
    """Calls a child that succeeds, then fails in its own code."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x):
        self.conv(x)
        raise ValueError("inside the block")


@pytest.mark.parametrize(
    "bad, pattern",
    [
        (Boom(), r"failed in module '1' \(Boom\) \(RuntimeError: boom\)"),
        (Block(), r"failed in module '1' \(Block\) \(ValueError: inside the block\)"),
    ],
)
def test_failing_forward_names_the_layer_and_removes_hooks(bad, pattern):
    model = nn.Sequential(nn.Conv2d(1, 1, 1), bad).train()
    with pytest.raises(ForwardError, match=pattern):
        ei.ei(model, X)
    assert no_hooks_left(model)
    assert all(m.training for m in model.modules())
    with pytest.raises(RuntimeError):  # ForwardError is a RuntimeError
        ei.ei(model, X)


def test_one_by_one_inputs():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1), nn.Flatten(), nn.Linear(2, 1)
    ).double()
    exact_weights_(model)
    x = torch.zeros(1, 3, 1, 1, dtype=F64)
    for norm, ref_norm in REF_NORMS.items():
        for engine in ("auto", "sparse"):
            rep = quiet(fs.report, model, x, norm=norm, engine=engine)
            assert_close(rep.determinism, R.determinism(model, x, norm=ref_norm), 1e-9, what=norm)
            assert_close(rep.degeneracy, R.degeneracy(model, x, norm=ref_norm), 1e-9, what=norm)
    assert rep.layers[-1].n_out == 1


@pytest.mark.parametrize(
    "layer",
    [nn.Conv2d(1, 2, 1, stride=3), nn.Conv2d(2, 2, 2, stride=3), nn.AvgPool2d(1, stride=3)],
    ids=["conv1", "conv2", "pool"],
)
@pytest.mark.parametrize("norm", ["lin", "soft", "sig"])
def test_stride_larger_than_kernel_leaves_rows_unconnected(layer, norm):
    c_in = getattr(layer, "in_channels", 2)
    model = nn.Sequential(layer).double()
    if isinstance(layer, nn.Conv2d):
        exact_weights_(model, seed=3)
    x = torch.zeros(1, c_in, 7, 7, dtype=F64)
    rep = fs.report(model, x, norm=norm)
    assert rep.layers[0].n_in == c_in * 49  # every input neuron is a row
    dense = R.VALID_MODULES[type(layer)](layer, tuple(x.shape), rep.layers[0].out_shape)
    assert (dense.abs().sum(1) == 0).any()  # some rows are unconnected
    p = REF_NORMS[norm](dense)
    expected = float(R.H(p, dim=1).sum()) / (c_in * 49)  # empty rows in the denominator
    assert_close(rep.determinism, expected, 1e-9, what="determinism")
    assert_close(rep.determinism, R.determinism(model, x, norm=REF_NORMS[norm]), 1e-9)
    assert_close(rep.degeneracy, R.degeneracy(model, x, norm=REF_NORMS[norm]), 1e-9)


def test_compiled_model_is_traced_without_compiling():
    compiled_calls = []

    def backend(graph_module, example_inputs):  # would run if anything got compiled
        compiled_calls.append(graph_module)
        return graph_module

    model = small_net()
    compiled = torch.compile(model, backend=backend)
    assert hasattr(compiled, "_orig_mod")
    rep = quiet(fs.report, compiled, X)
    assert compiled_calls == []
    assert [lay.name for lay in rep.layers] == ["0", "3"]
    assert rep.ei == quiet(ei.ei, model, X)
    assert ei.get_shapes(compiled, X) == ei.get_shapes(model, X)
    shapes = ei.get_shapes(model, X)
    assert ei.ei(compiled, shapes=shapes) == ei.ei(model, shapes=shapes)
    assert compiled_calls == []


class DataDependent(nn.Module):
    """Conv + BatchNorm whose forward branches on a value: the meta trace cannot run it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        y = self.drop(self.bn(self.conv(x)))
        return y if float(y.sum()) > -1e30 else -y


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Dropout(0.5)),
        DataDependent,
    ],
    ids=["meta-trace", "real-forward"],
)
def test_train_mode_and_batchnorm_stats_are_left_alone(make):
    torch.manual_seed(0)
    model = make().train()  # BatchNorm in train mode would update its running stats
    (model[2] if isinstance(model, nn.Sequential) else model.drop).eval()  # mixed modes
    modes = {name: m.training for name, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    rep = quiet(fs.report, model, x)
    assert [lay.type for lay in rep.layers] == ["Conv2d"]
    assert {name: m.training for name, m in model.named_modules()} == modes
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # running stats, counters


def _is_tensor(obj) -> bool:
    try:
        return isinstance(obj, torch.Tensor)
    except ReferenceError:  # a weakref proxy whose target died while gc listed it
        return False


def test_requires_grad_builds_no_graph_and_leaks_nothing():
    model = small_net()
    assert all(p.requires_grad for p in model.parameters())

    def tensors() -> int:
        gc.collect()
        with warnings.catch_warnings():  # isinstance() wakes deprecated lazy attributes
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if _is_tensor(o))

    with torch.enable_grad():
        for engine in ("auto", "sparse", "dense"):
            quiet(fs.report, model, X, engine=engine)
        before = tensors()
        for _ in range(3):
            for engine in ("auto", "sparse", "dense"):
                rep = quiet(fs.report, model, X, engine=engine)
        assert torch.is_grad_enabled()
    assert tensors() <= before
    values = [rep.determinism, rep.degeneracy, rep.ei] + [
        v for lay in rep.layers for v in (lay.mean_row_entropy, lay.degeneracy, lay.ei)
    ]
    assert all(type(v) is float for v in values)
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        quiet(fs.report, model, X)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("engine", ["auto", "sparse"])
def test_low_and_high_precision_models_match_the_reference(dtype, engine):
    base = exact_weights_(
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, 5),
        ).double()
    )
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    model = copy.deepcopy(base).to(dtype)
    for norm, ref_norm in REF_NORMS.items():
        rep = quiet(fs.report, model, x, norm=norm, engine=engine)
        assert_close(
            rep.determinism, R.determinism(base, x.double(), norm=ref_norm), 1e-6, what=norm
        )
        assert_close(rep.degeneracy, R.degeneracy(base, x.double(), norm=ref_norm), 1e-6, what=norm)
        assert model[0].weight.dtype == dtype


# --------------------------------------------------------------------------- memory


BIG_CONV = dict(in_channels=512, out_channels=512, kernel_size=3, padding=1)
BIG_SHAPE = (1, 512, 224, 224)


def _measured_costs(csr: torch.Tensor) -> tuple[int, int]:
    """(bytes per entry, bytes per row pointer) of a torch CSR tensor, read off its arrays."""
    per_entry = csr.col_indices().element_size() + csr.values().element_size()
    per_row = csr.crow_indices().element_size()
    n_rows, nnz = csr.shape[0], csr._nnz()
    assert storage_bytes(csr) == nnz * per_entry + (n_rows + 1) * per_row
    return per_entry, per_row


def _torch_matrices() -> dict[str, torch.Tensor]:
    """torch's own float32 matrices of 6 entries (no foresight_sparse code): COO, CSR with
    int64 indices, and a CSR copy with int32 indices."""
    small = torch.ones(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        csr64 = small.to_sparse_csr()
        crow, col = csr64.crow_indices().int(), csr64.col_indices().int()
        csr32 = torch.sparse_csr_tensor(crow, col, csr64.values(), (3, 2))
    return {"coo": small.to_sparse(), "csr64": csr64, "csr32": csr32}


def _coo_entry_bytes() -> int:
    coo = _torch_matrices()["coo"]
    return storage_bytes(coo) // coo._nnz()


def test_int64_indices_are_counted_for_layers_over_2_31_entries():
    conv = nn.Conv2d(**BIG_CONV, device="meta")  # no weights are allocated
    conn = C.conv2d(conv, BIG_SHAPE, BIG_SHAPE)
    # per axis: 224 outputs read 3 taps each, less the 2 taps that land on the padding
    nnz = 512 * 512 * (3 * 224 - 2) ** 2
    n_rows = 512 * 224 * 224
    assert conn.nnz == nnz >= 2**31
    per_entry, per_row = _measured_costs(_torch_matrices()["csr64"])
    assert conn.sparse_bytes("csr") == nnz * per_entry + (n_rows + 1) * per_row
    assert conn.sparse_bytes("coo") == nnz * _coo_entry_bytes()
    vgg = C.conv2d(
        nn.Conv2d(64, 64, 3, padding=1, device="meta"), (1, 64, 224, 224), (1, 64, 224, 224)
    )
    vgg_nnz, vgg_rows = 64 * 64 * (3 * 224 - 2) ** 2, 64 * 224 * 224
    assert vgg.nnz == vgg_nnz < 2**31  # int32 indices still fit the largest VGG-16 layer
    per_entry, per_row = _measured_costs(_torch_matrices()["csr32"])
    assert vgg.sparse_bytes("csr") == vgg_nnz * per_entry + (vgg_rows + 1) * per_row


@pytest.mark.parametrize("max_memory", ["64GiB", None])
def test_csr_over_2_31_entries_is_refused_before_allocating(max_memory, no_blocks):
    conv = nn.Conv2d(**BIG_CONV)
    with pytest.raises(
        MemoryBudgetError,
        match=r"Conv2d: the 25690112 x 25690112 "
        r"connectivity matrix .* csr\) needs about "
        r"1\.\d+ TiB",
    ) as info:
        ei.conv2d_create_matrix(
            conv, BIG_SHAPE, BIG_SHAPE, layout=torch.sparse_csr, max_memory=max_memory
        )
    assert info.value.needed > info.value.budget


def test_csr_switches_to_int64_indices_past_int32(monkeypatch):
    conv = exact_weights_(nn.Conv2d(2, 3, 3, padding=1).double())
    shape = (1, 2, 5, 5)
    small = ei.conv2d_create_matrix(conv, shape, (1, 3, 5, 5), layout=torch.sparse_csr)
    assert small.crow_indices().dtype == torch.int32
    monkeypatch.setattr(C.base, "_INT32_MAX", 100)  # pretend nnz is past 2^31 - 1
    big = ei.conv2d_create_matrix(conv, shape, (1, 3, 5, 5), layout=torch.sparse_csr)
    assert big.crow_indices().dtype == big.col_indices().dtype == torch.int64
    assert torch.equal(big.to_dense(), small.to_dense())
    # the size it counts is the size of what it built
    assert C.conv2d(conv, shape, (1, 3, 5, 5)).sparse_bytes("csr") == storage_bytes(big)


def test_a_request_for_terabytes_is_refused_fast(no_blocks):
    conv = nn.Conv2d(64, 64, 3, padding=1)  # a VGG-16 layer, at 10x the resolution
    shape = (1, 64, 2240, 2240)
    with pytest.raises(
        MemoryBudgetError,
        match=r"Conv2d: the 321126400 x 321126400 "
        r"connectivity matrix \(184858722304 entries, "
        r"coo\) needs about 3\.36 TiB",
    ) as info:
        ei.conv2d_create_matrix(conv, shape, shape, max_memory="100GiB")
    # 64 x 64 channel pairs, (3 * 2240 - 2) taps per axis, at the bytes per entry of
    # torch's own float32 COO tensors
    assert info.value.needed == 64 * 64 * (3 * 2240 - 2) ** 2 * _coo_entry_bytes()
    assert info.value.budget == 100 * 2**30


@pytest.mark.parametrize("engine", ["auto", "implicit", "sparse", "dense"])
def test_budget_too_small_names_the_layer_and_the_size(engine):
    with pytest.raises(
        MemoryBudgetError,
        match=r"0 \(Conv2d\): .* needs about [\d.]+ K?i?B "
        r"but max_memory is",
    ) as info:
        quiet(ei.ei, small_net(), X, engine=engine, max_memory=10)
    assert isinstance(info.value, MemoryError)
    assert info.value.needed > info.value.budget


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("engine", ["auto", "sparse"])
def test_model_on_cuda_analysed_on_cpu(engine):
    model = exact_weights_(small_net(F64))
    expected = quiet(fs.report, model, X, engine=engine)
    rep = quiet(fs.report, copy.deepcopy(model).cuda(), X, device="cpu", engine=engine)
    assert rep.device == "cpu"
    assert_close(rep.ei, expected.ei, 1e-9)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("engine", ["auto", "sparse"])
def test_model_on_cpu_analysed_on_cuda(engine):
    model = exact_weights_(small_net(F64))
    expected = quiet(fs.report, model, X, engine=engine)
    rep = quiet(fs.report, model, X.cuda(), device="cuda", engine=engine)  # input moved back
    assert rep.device.startswith("cuda")
    assert_close(rep.ei, expected.ei, 1e-9)
    assert next(model.parameters()).device.type == "cpu"
