"""Plans: one trace and geometry per architecture, EI of any weights.

- ``Plan.report(sd)`` equals ``report()`` of a model that loaded ``sd`` (1e-12), on drawn
  networks and torchvision ResNet-18 and MobileNet-V3;
- ``plan()`` and ``Plan.report(sd)`` leave the model bit-for-bit as it was (parameters,
  buffers, modes, grads, hooks);
- the meta and real traces give identical plans;
- bad weights name the key and the layer; keys of layers that do not count are ignored;
- a plan pickles;
- a Conv2d that covers its whole input (an FC layer written as a convolution) runs under
  the default budget and matches the sparse engine.
"""

from __future__ import annotations

import copy
import math
import pickle
import warnings

import pytest
import torch
import torchvision
from conftest import assert_close, examples, quiet, random_nets, smallest_budget
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import foresight_sparse as fs
from foresight_sparse.tracing import trace

F64 = torch.float64


def _perturbed(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        k: v + torch.randn(v.shape, generator=gen, dtype=v.dtype) * v.abs().mean()
        if v.is_floating_point()
        else v.clone()
        for k, v in model.state_dict().items()
    }


def _loaded(model: nn.Module, sd) -> nn.Module:
    twin = copy.deepcopy(model)
    twin.load_state_dict(sd)
    return twin


def _same_report(a: fs.Report, b: fs.Report, rel: float = 1e-12) -> None:
    for what in ("ei", "determinism", "degeneracy"):
        assert_close(getattr(a, what), getattr(b, what), rel, what=what)
    assert [la.name for la in a.layers] == [lb.name for lb in b.layers]
    for la, lb in zip(a.layers, b.layers):
        assert_close(la.ei, lb.ei, rel, what=f"{la.name} ei")
        assert la.engine == lb.engine


def _snapshot(model: nn.Module):
    """Everything about a model that a read-only analysis must not change."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ptrs": {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {
            k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()
        },
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "modes": [m.training for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
    }


def _assert_unchanged(before, after) -> None:
    assert before["ptrs"] == after["ptrs"]
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k
        assert v.dtype == after["state"][k].dtype
    for k, g in before["grads"].items():
        other = after["grads"][k]
        assert (g is None) == (other is None) and (g is None or torch.equal(g, other)), k
    for k in ("requires_grad", "modes", "hooks"):
        assert before[k] == after[k], k


# --------------------------------------------------------------------------- equality


@settings(max_examples=examples(25), deadline=None)
@given(net=random_nets(max_linear=2), norm=st.sampled_from(["lin", "soft", "sig", "none"]))
def test_plan_report_of_new_weights_equals_report_of_loaded_model(net, norm):
    p = quiet(fs.plan, net.model, net.input, norm=norm)
    sd = _perturbed(net.model, seed=7)
    _same_report(p.report(sd), quiet(fs.report, _loaded(net.model, sd), net.input, norm=norm))
    # and the model's own weights, again through the same plan
    _same_report(p.report(), quiet(fs.report, net.model, net.input, norm=norm))


@pytest.mark.parametrize("name, size", [("resnet18", 64), ("mobilenet_v3_small", 64)])
def test_plan_report_on_torchvision_models(name, size):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.zeros(1, 3, size, size)
    p = quiet(fs.plan, model, x)
    sd = _perturbed(model, seed=3)
    before = _snapshot(model)
    new = p.report(sd)
    _assert_unchanged(before, _snapshot(model))
    _same_report(new, quiet(fs.report, _loaded(model, sd), x))
    assert not math.isclose(new.ei, p.report().ei, rel_tol=1e-6)  # the weights mattered


def test_plan_reads_current_weights_each_time():
    """A plan made before training sees the weights as they are when report() runs."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))
    x = torch.zeros(1, 2, 4, 4)
    p = quiet(fs.plan, model, x)
    first = p.report().ei
    with torch.no_grad():
        model[0].weight.mul_(torch.rand_like(model[0].weight))
        model[3].weight.add_(1.0)
    assert not math.isclose(first, p.report().ei, rel_tol=1e-9)
    _same_report(p.report(), quiet(fs.report, model, x))


# --------------------------------------------------------------------------- the model


def test_plan_and_report_leave_the_model_unchanged():
    torch.manual_seed(2)
    model = torchvision.models.resnet18(num_classes=10)
    model.train()
    model.layer1.eval()  # mixed modes survive
    model.fc.weight.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()  # grads present
    before = _snapshot(model)
    p = quiet(fs.plan, model, x)
    _assert_unchanged(before, _snapshot(model))
    p.report(_perturbed(model, seed=5))
    p.report()
    _assert_unchanged(before, _snapshot(model))


# --------------------------------------------------------------------------- traces


def _trace_key(tr):
    return (
        [(la.name, type(la.module).__name__, la.in_shape, la.out_shape) for la in tr.layers],
        tr.skipped,
    )


#: torchvision models whose forward passes use what the meta pass's shape rules answer
#: (convolutions, Linear, elementwise arithmetic, layer and batch norms, concatenation,
#: adaptive pooling, roll, masked_fill, attention), with the input size each needs.
ARCHITECTURES = {
    "resnet18": 64,
    "mobilenet_v3_small": 64,
    "efficientnet_b0": 64,
    "convnext_tiny": 64,
    "squeezenet1_1": 64,
    "alexnet": 64,
    "densenet121": 64,
    "shufflenet_v2_x0_5": 64,
    "regnet_y_400mf": 64,
    "googlenet": 64,
    "inception_v3": 75,
    "swin_t": 64,
    "swin_v2_t": 64,
    "maxvit_t": 224,
    "vit_b_16": 224,
}


def _architecture(name):
    if name == "shared":
        conv = nn.Conv2d(2, 2, 3, padding=1)
        model = nn.Sequential(conv, conv, nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3))
        return model, torch.zeros(1, 2, 4, 4)
    torch.manual_seed(0)
    size = ARCHITECTURES[name]
    kw = {}
    if name in ("googlenet", "inception_v3"):
        kw = {"aux_logits": False, "init_weights": False}
    return torchvision.models.get_model(name, **kw), torch.zeros(1, 3, size, size)


@pytest.mark.parametrize("name", [*ARCHITECTURES, "shared"])
def test_meta_and_real_traces_give_identical_plans(name):
    model, x = _architecture(name)
    meta, real, auto = (quiet(trace, model, x, method=m) for m in ("meta", "real", "auto"))
    assert _trace_key(meta) == _trace_key(real) == _trace_key(auto)
    assert all(a.module is b.module for a, b in zip(meta.layers, real.layers))


@settings(max_examples=examples(20), deadline=None)
@given(net=random_nets(max_linear=2))
def test_meta_and_real_traces_agree_on_drawn_networks(net):
    meta = quiet(trace, net.model, net.input, method="meta")
    real = quiet(trace, net.model, net.input, method="real")
    assert _trace_key(meta) == _trace_key(real)


def test_unknown_trace_method_is_refused():
    with pytest.raises(fs.UnknownNameError, match="valid methods are auto, meta, real"):
        trace(nn.Linear(2, 2), torch.zeros(1, 2), method="fast")


# --------------------------------------------------------------------------- bad weights


def _small():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    return model, torch.zeros(1, 1, 4, 4)


def test_missing_key_names_the_key_and_the_layer():
    model, x = _small()
    p = quiet(fs.plan, model, x)
    sd = model.state_dict()
    del sd["3.weight"]
    with pytest.raises(fs.WeightsError, match=r"3 \(Linear\).*no key '3.weight'.*\(3, 8\)"):
        p.report(sd)


def test_wrong_shape_names_the_key_both_shapes_and_the_layer():
    model, x = _small()
    p = quiet(fs.plan, model, x)
    sd = model.state_dict()
    sd["0.weight"] = torch.zeros(2, 1, 2, 2)
    with pytest.raises(
        fs.WeightsError,
        match=r"0 \(Conv2d\).*'0.weight'.*\(2, 1, 2, 2\).*"
        r"\(2, 1, 3, 3\)",
    ):
        p.report(sd)


def test_non_tensor_and_non_mapping_weights_are_refused():
    model, x = _small()
    p = quiet(fs.plan, model, x)
    sd = model.state_dict()
    sd["0.weight"] = [[1.0]]
    with pytest.raises(fs.WeightsError, match="'0.weight'.* list, not a tensor"):
        p.report(sd)
    with pytest.raises(fs.WeightsError, match="state dict"):
        p.report([1, 2])


def test_non_finite_weight_names_the_key():
    model, x = _small()
    p = quiet(fs.plan, model, x)
    sd = model.state_dict()
    sd["3.weight"] = sd["3.weight"].clone()
    sd["3.weight"][0, 0] = float("nan")
    with pytest.raises(fs.NonFiniteWeightsError, match=r"3 \(Linear\).*3.weight"):
        p.report(sd)


def test_keys_of_layers_that_do_not_count_are_ignored():
    model, x = _small()
    p = quiet(fs.plan, model, x)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("1.")}  # no BN
    sd["extra.weight"] = torch.ones(3)
    _same_report(p.report(sd), p.report())
    assert [layer.keys for layer in p.layers] == [("0.weight",), ("3.weight",)]


def test_weights_in_another_dtype():
    model, x = _small()
    p = quiet(fs.plan, model, x)
    sd = {k: v.double() for k, v in model.state_dict().items()}
    _same_report(p.report(sd), p.report(), rel=1e-6)


# --------------------------------------------------------------------------- pickling


def test_plan_pickles_with_its_model():
    model, x = _small()
    p = quiet(fs.plan, model, x, norm="soft")
    q = pickle.loads(pickle.dumps(p))
    sd = _perturbed(model, seed=9)
    _same_report(q.report(sd), p.report(sd))
    _same_report(q.report(), p.report())
    assert q.norm.name == "soft" and q.max_memory == p.max_memory
    # the copy's layers read the copy's model
    with torch.no_grad():
        q.model[0].weight.add_(1.0)
    assert not math.isclose(q.report().ei, p.report().ei, rel_tol=1e-9)


def test_plan_of_a_registered_custom_layer_rebinds_its_weights():
    class Diag(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.scale = nn.Parameter(torch.rand(n))

        def forward(self, x):
            return x * self.scale

    def builder(module, in_shape, out_shape, *, legacy=False, label=None):
        return fs.ExplicitMatrix(label or "Diag", torch.diag(module.scale.detach()))

    fs.register(Diag, builder)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(Diag(4), nn.Linear(4, 3))
        x = torch.zeros(1, 4)
        p = quiet(fs.plan, model, x)
        sd = {"0.scale": torch.tensor([1.0, 2.0, 0.5, 3.0]), "1.weight": model[1].weight}
        _same_report(
            p.report(sd), quiet(fs.report, _loaded(model, {**model.state_dict(), **sd}), x)
        )
        with pytest.raises(fs.WeightsError, match="'0.scale'"):
            p.report({"1.weight": model[1].weight})
    finally:
        fs.unregister(Diag)


# --------------------------------------------------------------------------- table


def test_plan_table_lists_layers_with_counted_sizes():
    model, x = _small()
    p = quiet(fs.plan, model, x)
    text = str(p)
    assert "0" in text and "Conv2d" in text and "Linear" in text
    # sizes counted by hand: Conv2d(1, 2, 3) on 4x4 -> 2x2x2 outputs, 9 taps each: 72
    # entries; Linear(8, 3): 24
    assert [layer.nnz for layer in p.layers] == [72, 24]
    assert [(layer.n_rows, layer.n_cols) for layer in p.layers] == [(16, 8), (8, 3)]
    assert "2 layers, 96 entries" in text


# --------------------------------------------------------------------------- budget


def _status_bytes(key: str) -> int:
    """A size from /proc/self/status (Linux), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/self/status")


@pytest.mark.imagenet
def test_fc_written_as_a_conv_runs_under_the_default_budget():
    """Conv2d(512, 4096, 7) on a 7x7 map (VGG's first FC layer as a convolution): 103M
    weights, whose float64 copies exceed the 2 GiB default; the column pass streams."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(512, 4096, 7))
    x = torch.zeros(1, 512, 7, 7)
    p = fs.plan(model, x)
    assert p.layers[0].engine == "implicit"
    assert p.layers[0].working_bytes <= fs.DEFAULT_MAX_MEMORY
    # measured, not estimated: the peak resident set the report adds (three float64 copies
    # of the weights at once would take 2.4 GiB)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current resident set
    before = _status_bytes("VmRSS")
    rep = p.report()
    assert _status_bytes("VmHWM") - before <= fs.DEFAULT_MAX_MEMORY
    assert rep.layers[0].engine == "implicit"
    sparse = fs.report(model, x, engine="sparse")
    for what in ("ei", "determinism", "degeneracy"):
        assert_close(getattr(rep, what), getattr(sparse, what), 1e-9, what=what)


def test_conv_column_pass_in_blocks_equals_one_block():
    """The smallest budget the implicit engine accepts (one output channel per block) gives
    the same numbers."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2))
    x = torch.zeros(1, 4, 5, 5)
    whole = fs.report(model, x, norm="soft")
    from foresight_sparse.engines import implicit

    # found from the engine's refusals, not from its formula
    tight = smallest_budget(model, x, norm="soft", engine="implicit")
    conn = fs.plan(model, x).layers[0].conn
    assert implicit._cout_step(conn, tight, implicit._conv_fixed_bytes(conn)) == 1
    blocked = fs.report(model, x, norm="soft", max_memory=tight)
    assert blocked.layers[0].engine == "implicit"
    _same_report(blocked, whole, rel=1e-13)


# --------------------------------------------------------------------------- warnings


def _skipping_model():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3))


@pytest.mark.parametrize("entry", ["ei.ei", "ei.determinism", "ei.degeneracy", "report", "plan"])
def test_skipped_layers_warning_points_at_the_callers_line(entry):
    """Whichever public entry point the user calls, the warning names this file and the
    line of the call, not a line inside the package."""
    import inspect

    from foresight_sparse import ei

    model, x = _skipping_model(), torch.zeros(1, 1, 6, 6)
    calls = {
        "ei.ei": lambda: ei.ei(model, x),
        "ei.determinism": lambda: ei.determinism(model, x),
        "ei.degeneracy": lambda: ei.degeneracy(model, x),
        "report": lambda: fs.report(model, x),
        "plan": lambda: fs.plan(model, x),
    }
    line = inspect.getsourcelines(calls[entry])[1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calls[entry]()
    skipped = [w for w in caught if "skipped layers" in str(w.message)]
    assert skipped, [str(w.message) for w in caught]
    for w in skipped:
        assert w.filename == __file__, w.filename
        assert w.lineno == line
        assert "MaxPool2d" in str(w.message) and ".skipped lists them" in str(w.message)


@pytest.mark.parametrize("norm", ["lin", "none"])
@pytest.mark.parametrize("value", [float("nan"), -float("nan"), float("inf"), -float("inf")])
def test_conv_row_pass_catches_every_non_finite_weight(norm, value):
    """Likewise a float32 convolution: its kernel's row pass is its finiteness check, on
    the parallel kernel and on its serial twin (a kernel below the parallel threshold)."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(64, 128, 3), nn.Conv2d(128, 4, 1))
    x = torch.zeros(1, 64, 8, 8)
    p = quiet(fs.plan, model, x, norm=norm)
    assert [layer.engine for layer in p.layers] == ["implicit", "implicit"]
    for key, where in [
        ("0.weight", (0, 0, 0, 0)),
        ("0.weight", (127, 63, 2, 2)),
        ("1.weight", (3, 127, 0, 0)),
        ("1.weight", (2, 5, 0, 0)),
    ]:
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        sd[key][where] = value
        n = sd[key].numel()
        with pytest.raises(fs.NonFiniteWeightsError, match=rf"1 of {n} weights.*{key}"):
            p.report(sd)


@pytest.mark.parametrize("norm", ["lin", "none"])
@pytest.mark.parametrize("value", [float("nan"), -float("nan"), float("inf"), -float("inf")])
def test_linear_row_pass_catches_every_non_finite_weight(norm, value):
    """Under relu or no norm a float32 Linear is checked by its row pass (no separate scan):
    NaN of either sign and infinities of either sign are all refused, in any position, the
    rows past the last sweep of four included."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(600, 302))  # large enough for the parallel kernel
    x = torch.zeros(1, 600)
    p = quiet(fs.plan, model, x, norm=norm)
    for row, col in [(0, 0), (301, 599), (150, 301)]:
        sd = {"0.weight": model[0].weight.detach().clone()}
        sd["0.weight"][row, col] = value
        with pytest.raises(fs.NonFiniteWeightsError, match=r"1 of 181200 weights.*0.weight"):
            p.report(sd)


def test_layers_of_equal_geometry_share_their_position_classes():
    """A plan makes a convolution's position classes once for all its layers of the same
    window geometry and channel counts; a layer that differs in any of them gets its own,
    and every layer's EI matches the sparse engine's."""
    torch.manual_seed(13)
    model = nn.Sequential(
        nn.Conv2d(16, 16, 3, padding=1),
        nn.Conv2d(16, 16, 3, padding=1),  # the same key as layer 0
        nn.Conv2d(16, 16, 3, padding=1, groups=4),
        nn.Conv2d(16, 8, 3, padding=1),
        nn.Conv2d(8, 16, 3, padding=1),  # differs from layer 0 in input channels only
        nn.Conv2d(16, 32, 3, padding=1, groups=2),  # from layer 4 in output channels only
        nn.Conv2d(32, 16, 3, padding=1, groups=2),  # from layer 0 in channels per group only
        nn.Conv2d(16, 16, 3, padding=(1, 0)),  # from layer 0 in its W window only
        nn.Conv2d(16, 16, 3, padding=(0, 1)),  # from layer 7 in its H and W windows
        nn.Conv2d(16, 16, 3, padding=(0, 1)),  # from layer 8 in its H window only
    )
    x = torch.zeros(1, 16, 8, 8)
    p = quiet(fs.plan, model, x)
    got = p.report()
    arrays = [layer.conn.memo["class_arrays"] for layer in p.layers]
    assert arrays[1] is arrays[0]
    for i in range(2, len(arrays)):
        assert all(arrays[i] is not arrays[j] for j in range(i)), i
    want = quiet(fs.report, model, x, engine="sparse")
    for g, w in zip(got.layers, want.layers, strict=True):
        assert_close(g.ei, w.ei, rel=1e-9)


def test_geometry_memo_is_shared_by_bound_weights():
    """What depends on the geometry alone (position classes, memory estimates) is made once
    per plan: every connectivity bound to new weights shares the planned layer's memo, and
    the memoised values give the same EI as a fresh report of a model holding the weights."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.zeros(1, 3, 9, 9)
    p = quiet(fs.plan, model, x)
    conn = p.layers[0].conn
    gen = torch.Generator().manual_seed(12)
    states = [
        {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
        for _ in range(2)
    ]
    bound = conn.bind({"weight": states[0]["0.weight"]})
    assert bound.memo is conn.memo and bound.kernel is not conn.kernel
    for sd in states:
        got = p.report(sd)
        fresh = copy.deepcopy(model)
        fresh.load_state_dict(sd)
        want = quiet(fs.report, fresh, x)
        assert_close(got.ei, want.ei, rel=1e-12)
    assert "class_arrays" in conn.memo
