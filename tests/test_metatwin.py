"""The meta-device twin and its shape rules (foresight_sparse.metatwin).

Every rule is checked against PyTorch's own meta implementation: under ``ShapeRules`` a call
returns what PyTorch returns (shape and dtype), a call PyTorch refuses is still refused with
PyTorch's exception, and the rule itself answers the calls it is meant for (so a rule that
silently handed everything to PyTorch would fail here).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from foresight_sparse.metatwin import _RULES, ShapeRules, meta_twin


def meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


X = meta(2, 8, 10, 12)
S = meta(1, 8, 1, 1)
T = meta(2, 10, 12, 8)

Q = meta(5, 2, 8)  # (L, N, E) for attention, E = 8 over 2 heads
MHA = (meta(24, 8), meta(24), None, None, False, 0.0, meta(8, 8), meta(8))

#: (function, args, kwargs) that a rule answers.
ANSWERED = [
    (F.multi_head_attention_forward, (Q, Q, Q, 8, 2, *MHA), {"need_weights": False}),
    (F.multi_head_attention_forward, (Q, meta(7, 2, 8), meta(7, 2, 8), 8, 2, *MHA), {}),
    (
        F.multi_head_attention_forward,
        (Q, Q, Q, 8, 4, *MHA),
        {"average_attn_weights": False, "training": False},
    ),
    (torch.conv2d, (X, meta(16, 8, 3, 3), meta(16)), {"stride": 2, "padding": 1}),
    (torch.conv2d, (X, meta(16, 2, 3, 3)), {"padding": "same", "dilation": 2, "groups": 4}),
    (torch.conv2d, (X, meta(4, 8, 5, 1)), {"padding": "valid", "stride": (1, 3)}),
    (torch.conv1d, (meta(1, 3, 9), meta(5, 3, 2)), {"dilation": 3}),
    (torch.conv3d, (meta(1, 2, 4, 5, 6), meta(3, 2, 1, 2, 3)), {"padding": (0, 1, 2)}),
    (F.linear, (T, meta(5, 8), meta(5)), {}),
    (F.linear, (meta(8), meta(5, 8)), {}),
    (F.layer_norm, (T, (8,), meta(8), meta(8)), {}),
    (F.layer_norm, (T, [12, 8]), {}),
    (F.batch_norm, (X, meta(8), meta(8), meta(8), meta(8)), {}),
    (F.group_norm, (X, 4, meta(8), meta(8)), {}),
    (F.adaptive_avg_pool2d, (X, 1), {}),
    (F.adaptive_avg_pool2d, (X, (None, 3)), {}),
    (F.adaptive_avg_pool2d, (meta(8, 10, 12), (4, 5)), {}),
    (torch.cat, ([X, X[:, :3]], 1), {}),
    (torch.cat, ((X, X), -1), {}),
    (torch.Tensor.add, (X, S), {}),
    (torch.Tensor.add, (S, X), {"alpha": 2}),
    (torch.Tensor.mul, (X, 2.0), {}),
    (torch.Tensor.mul, (meta(3, 1), meta(1, 4)), {}),
    (torch.Tensor.sub, (X, meta(12)), {}),
    (torch.Tensor.div, (X, 3), {}),
    (torch.mul, (X, S), {}),
    (torch.Tensor.add, (X, meta(2, 8, 10, 12, dtype=torch.float64)), {}),
    (torch.Tensor.add_, (X, S), {}),
    (torch.Tensor.mul_, (X, 0.5), {}),
    (F.relu, (X,), {}),
    (F.relu, (X,), {"inplace": True}),
    (F.hardswish, (X,), {}),
    (F.gelu, (X,), {"approximate": "tanh"}),
    (F.silu, (X,), {}),
    (F.dropout, (X, 0.2, False), {}),
    (F.softmax, (X, -1), {}),
    (F.normalize, (X,), {"dim": 1}),
    (torch.roll, (X, 3, 2), {}),
    (torch.Tensor.clamp, (X,), {"min": 0.0}),
    (torch.Tensor.masked_fill, (X, meta(10, 12, dtype=torch.bool), 0.0), {}),
    (torch.sigmoid, (X,), {}),
    (torch.Tensor.exp, (X,), {}),
]

#: Calls that PyTorch refuses: the rule must hand them on, so the error is PyTorch's.
REFUSED = [
    (F.multi_head_attention_forward, (Q, Q, Q, 6, 2, *MHA), {}),  # embed_dim_to_check
    (F.multi_head_attention_forward, (Q, Q, Q, 8, 3, *MHA), {}),  # 8 is not 3 heads
    (F.multi_head_attention_forward, (Q, meta(7, 2, 8), Q, 8, 2, *MHA), {}),
    (torch.conv2d, (X, meta(16, 3, 3, 3)), {}),  # 8 channels, weight wants 3
    (torch.conv2d, (X, meta(16, 8, 11, 3)), {}),  # kernel larger than the input
    (torch.conv2d, (X, meta(16, 2, 3, 3)), {"groups": 3}),
    (F.linear, (T, meta(5, 7)), {}),
    (F.layer_norm, (T, (12,)), {}),
    (F.layer_norm, (T, 8), {}),  # the functional form takes no int
    (F.layer_norm, (T, (8,), meta(7)), {}),
    (F.group_norm, (X, 3), {}),
    (F.batch_norm, (X, None, None), {}),  # no running statistics in evaluation mode
    (torch.cat, ([X, meta(2, 7, 10, 11)], 1), {}),
    (torch.Tensor.add, (X, meta(3, 12)), {}),
    (torch.Tensor.add_, (S, X), {}),  # the result would not fit in S
    (torch.Tensor.masked_fill, (S, meta(3, 1, 1, dtype=torch.bool), 0.0), {}),
]


def _pytorch(func, args, kwargs):
    return func(*args, **kwargs)


def _ruled(func, args, kwargs):
    with ShapeRules():
        return func(*args, **kwargs)


def _ids(cases):
    return [f"{getattr(f, '__name__', f)}-{i}" for i, (f, _, _) in enumerate(cases)]


@pytest.mark.parametrize("func, args, kwargs", ANSWERED, ids=_ids(ANSWERED))
def test_rule_answers_as_pytorch_does(func, args, kwargs):
    expected = _described(_pytorch(func, args, kwargs))
    assert _described(_ruled(func, args, kwargs)) == expected
    answer = _RULES[func](*args, **kwargs)
    assert answer is not NotImplemented, "the rule handed a call it is meant for to PyTorch"
    assert _described(answer) == expected


def _described(out):
    """Shape, dtype and device of a result (a tensor, None or a tuple of them)."""
    if isinstance(out, tuple):
        return tuple(_described(o) for o in out)
    return None if out is None else (tuple(out.shape), out.dtype, out.device.type)


@pytest.mark.parametrize("func, args, kwargs", REFUSED, ids=_ids(REFUSED))
def test_rule_hands_refused_calls_to_pytorch(func, args, kwargs):
    assert _RULES[func](*args, **kwargs) is NotImplemented
    with pytest.raises(Exception) as pytorch_error:
        _pytorch(func, args, kwargs)
    with pytest.raises(type(pytorch_error.value)):
        _ruled(func, args, kwargs)


def test_in_place_and_elementwise_rules_alias_their_input():
    """In-place calls return their input, as PyTorch does; meta tensors hold no data, so an
    out-of-place elementwise result may alias it too."""
    with ShapeRules():
        assert X.add_(S) is X
        assert F.relu(X, inplace=True) is X


def test_unknown_calls_and_unusual_arguments_reach_pytorch():
    x = meta(2, 3, 4)
    with ShapeRules():
        assert torch.matmul(x, meta(4, 5)).shape == (2, 3, 5)  # no rule
        assert F.softmax(x, -1, dtype=torch.float64).dtype == torch.float64
        assert torch.Tensor.add(meta(3, dtype=torch.int64), 2).dtype == torch.int64
        assert torch.conv2d(meta(3, 5, 5), meta(2, 3, 3, 3)).shape == (2, 3, 3)  # unbatched


conv_case = st.fixed_dictionaries(
    {
        "n": st.integers(1, 3),
        "groups": st.integers(1, 3),
        "cin_group": st.integers(1, 2),
        "cout_group": st.integers(1, 2),
        "size": st.integers(1, 9),
        "kernel": st.integers(1, 4),
        "stride": st.integers(1, 3),
        "dilation": st.integers(1, 2),
        "padding": st.one_of(st.integers(0, 3), st.sampled_from(["same", "valid"])),
        "bias": st.booleans(),
    }
)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@settings(max_examples=examples(200), deadline=None)
@given(case=conv_case)
def test_convolution_rule_matches_pytorch(case):
    n, g = case["n"], case["groups"]
    x = meta(2, case["cin_group"] * g, *(case["size"] + i for i in range(n)))
    w = meta(case["cout_group"] * g, case["cin_group"], *(case["kernel"],) * n)
    b = meta(w.shape[0]) if case["bias"] else None
    func = (torch.conv1d, torch.conv2d, torch.conv3d)[n - 1]
    args = (x, w, b, case["stride"], case["padding"], case["dilation"], g)
    try:
        expected = _pytorch(func, args, {})
    except RuntimeError as exc:
        with pytest.raises(type(exc)):
            _ruled(func, args, {})
        return
    assert _ruled(func, args, {}).shape == expected.shape


shape = st.lists(st.integers(0, 3), max_size=4)


@settings(max_examples=examples(200), deadline=None)
@given(a=shape, b=shape)
def test_broadcasting_rule_matches_pytorch(a, b):
    x, y = meta(*a), meta(*b)
    try:
        expected = _pytorch(torch.Tensor.mul, (x, y), {})
    except RuntimeError:
        assert _RULES[torch.Tensor.mul](x, y) is NotImplemented
        return
    assert _ruled(torch.Tensor.mul, (x, y), {}).shape == expected.shape


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3)
        self.seq = nn.Sequential(self.conv, nn.BatchNorm2d(2), nn.ReLU())
        self.cache = {"k": 1}

    def forward(self, x):
        return self.seq(self.conv(x))


def test_twin_shares_nothing_the_pass_could_change():
    model = Holder()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    twin, originals = meta_twin(model)
    assert all(p.device.type == "meta" for p in twin.parameters())
    assert all(b.device.type == "meta" for b in twin.buffers())
    assert twin.conv is twin.seq[0]  # a shared submodule has one twin
    assert originals[twin.seq[0]] is model.conv and originals[twin] is model
    assert len(originals) == len(list(model.modules()))
    assert twin.cache == model.cache and twin.cache is not model.cache
    assert twin._forward_hooks is not model._forward_hooks
    assert twin(meta(1, 2, 9, 9)).shape == (1, 2, 5, 5)
    twin.cache["k"] = 2
    twin.seq[1].register_forward_hook(lambda *a: None)
    assert model.cache == {"k": 1} and not model.seq[1]._forward_hooks
    assert "forward" not in model.seq[1].__dict__
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_meta_twin_is_none_for_a_model_that_cannot_be_copied():
    class Unreadable(nn.Module):
        @property
        def __dict__(self):
            raise RuntimeError("no")

    assert meta_twin(Unreadable()) is None


def test_scripted_model_traces_through_the_real_pass_or_says_why():
    """A scripted module has no meta twin: 'auto' runs the real pass (which refuses hooks
    on scripted modules, with a ForwardError naming it), 'meta' says it cannot copy it."""
    import warnings

    from foresight_sparse.exceptions import ForwardError
    from foresight_sparse.tracing import trace

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(model)
    assert meta_twin(scripted) is None
    with pytest.raises(ForwardError, match="not supported on ScriptModules"):
        trace(scripted, torch.zeros(1, 3, 8, 8))
    with pytest.raises(ForwardError, match="cannot be copied to the meta device"):
        trace(scripted, torch.zeros(1, 3, 8, 8), method="meta")
