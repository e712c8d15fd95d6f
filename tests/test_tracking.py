"""Tracker: the same numbers as report(), and a training run it cannot disturb."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from conftest import quiet
from torch import nn

import foresight_sparse
from foresight_sparse import Tracker
from foresight_sparse.history import NETWORK

TOL = 1e-12


class Noise(nn.Module):
    """Draws from every global generator in its forward pass: the CPU torch one (even when
    the input lives on the meta device), NumPy's and Python's."""

    def forward(self, x):
        scale = 1e-3 * (1.0 + float(np.random.rand()) + random.random())  # noqa: NPY002
        return x + scale * torch.randn(x.shape).to(x.device)


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        Noise(),
        nn.AvgPool2d(2),
        nn.Conv2d(6, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def _train(tracker_every: int | None, steps: int = 8):
    """Seeded SGD on random batches; the data and the model draw from all three generators."""
    torch.manual_seed(1)
    np.random.seed(2)  # noqa: NPY002 - the global generators are what is under test
    random.seed(3)
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = None
    if tracker_every is not None:
        tracker = quiet(Tracker, model, torch.zeros(1, 3, 16, 16), every=tracker_every)
    checks = []
    for step in range(steps):
        x = torch.randn(4, 3, 16, 16)
        y = torch.randint(0, 10, (4,))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if tracker is not None:
            rep = tracker.step(step)
            if rep is not None:  # an independent plan of a copy, for the comparison below;
                # its trace runs Noise, so the generators are put back by hand
                states = torch.get_rng_state(), np.random.get_state(), random.getstate()  # noqa: NPY002
                ref = quiet(
                    foresight_sparse.report, copy.deepcopy(model).eval(), torch.zeros(1, 3, 16, 16)
                )
                torch.set_rng_state(states[0])
                np.random.set_state(states[1])  # noqa: NPY002
                random.setstate(states[2])
                checks.append((step, rep, ref))
    return model, tracker, checks


def _assert_reports_equal(rep, ref):
    for a, b in (
        (rep.ei, ref.ei),
        (rep.determinism, ref.determinism),
        (rep.degeneracy, ref.degeneracy),
    ):
        assert abs(a - b) <= TOL * max(1.0, abs(b))
    assert [lay.name for lay in rep.layers] == [lay.name for lay in ref.layers]
    for la, lb in zip(rep.layers, ref.layers):
        assert abs(la.ei - lb.ei) <= TOL * max(1.0, abs(lb.ei))
        assert abs(la.mean_row_entropy - lb.mean_row_entropy) <= TOL * max(1.0, lb.mean_row_entropy)


def test_training_with_tracker_gives_the_same_weights():
    plain, _, _ = _train(None)
    tracked, tracker, checks = _train(tracker_every=3)
    assert [c[0] for c in checks] == [0, 3, 6]
    a, b = plain.state_dict(), tracked.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # And the global generators are where the untracked run left them.
    _train(None)
    after_plain = (torch.get_rng_state(), np.random.rand(), random.random())  # noqa: NPY002
    _train(3)
    after_tracked = (torch.get_rng_state(), np.random.rand(), random.random())  # noqa: NPY002
    assert torch.equal(after_plain[0], after_tracked[0])
    assert after_plain[1:] == after_tracked[1:]


def test_tracker_records_equal_report_of_the_same_weights():
    _, tracker, checks = _train(tracker_every=2, steps=7)
    hist = tracker.history
    assert hist.labels == ["step=0", "step=2", "step=4", "step=6"]
    assert hist.series()["step"] == [0, 2, 4, 6]
    for step, rep, ref in checks:
        _assert_reports_equal(rep, ref)
        recs = [r for r in hist.records if r.step == step]
        assert recs[0].layer == NETWORK and recs[0].kind == "network"
        assert abs(recs[0].ei - ref.ei) <= TOL * max(1.0, abs(ref.ei))
        for rec, lay in zip(recs[1:], ref.layers):
            assert (rec.kind, rec.layer, rec.type) == ("layer", lay.name, lay.type)
            assert abs(rec.ei - lay.ei) <= TOL * max(1.0, abs(lay.ei))
            assert abs(rec.determinism - lay.mean_row_entropy) <= TOL * max(
                1.0, lay.mean_row_entropy
            )
            assert abs(rec.degeneracy - lay.degeneracy) <= TOL * max(1.0, lay.degeneracy)
    assert tracker.last is checks[-1][1]


def _snapshot(model: nn.Module):
    return {
        "params": {
            k: (p.detach().clone(), p.requires_grad, p.data_ptr())
            for k, p in model.named_parameters()
        },
        "grads": {
            k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()
        },
        "buffers": {k: b.clone() for k, b in model.named_buffers()},
        "modes": {k: m.training for k, m in model.named_modules()},
        "rng": (
            torch.get_rng_state(),
            np.random.get_state()[1].copy(),  # noqa: NPY002
            random.getstate(),
        ),
        "grad_enabled": torch.is_grad_enabled(),
    }


def _assert_same(a, b):
    for k, (t, req, ptr) in a["params"].items():
        t2, req2, ptr2 = b["params"][k]
        assert torch.equal(t, t2) and req == req2 and ptr == ptr2, k
    for k, g in a["grads"].items():
        g2 = b["grads"][k]
        assert (g is None and g2 is None) or torch.equal(g, g2), k
    for k, t in a["buffers"].items():
        assert torch.equal(t, b["buffers"][k]), k
    assert a["modes"] == b["modes"]
    assert torch.equal(a["rng"][0], b["rng"][0])
    assert np.array_equal(a["rng"][1], b["rng"][1])
    assert a["rng"][2] == b["rng"][2]
    assert a["grad_enabled"] == b["grad_enabled"]


def test_step_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = tiny_cnn()
    model.train()
    model[1].eval()  # a mixed mode must survive too
    model(torch.randn(2, 3, 16, 16)).sum().backward()  # gradients present
    model[0].weight.requires_grad_(False)
    before = _snapshot(model)
    tracker = quiet(Tracker, model, torch.zeros(1, 3, 16, 16), every=1)
    _assert_same(before, _snapshot(model))
    assert tracker.step(0) is not None
    assert tracker.step(5) is not None
    _assert_same(before, _snapshot(model))


def test_step_reads_the_current_weights_in_place():
    torch.manual_seed(0)
    model = tiny_cnn().eval()
    tracker = quiet(Tracker, model, torch.zeros(1, 3, 16, 16), every=10)
    first = tracker.step(0)
    assert tracker.step(5) is None and len(tracker.history.labels) == 1
    with torch.no_grad():
        model[0].weight.mul_(torch.rand_like(model[0].weight) * 3)
    second = tracker.step(10, epoch=2)
    assert second.layers[0].ei != first.layers[0].ei
    _assert_reports_equal(second, quiet(foresight_sparse.report, model, torch.zeros(1, 3, 16, 16)))
    assert tracker.history.series()["epoch"] == [None, 2]


def test_tracker_settings():
    model = nn.Sequential(nn.Linear(4, 3))
    tracker = Tracker(model, torch.zeros(1, 4), every=5, norm="soft")
    assert tracker.plan.device == torch.device("cpu")  # the model's device by default
    assert tracker.history.meta["norm"] == "soft"
    rep = tracker.record(7, label="final")
    assert tracker.history.labels == ["final"]
    ref = foresight_sparse.report(model, torch.zeros(1, 4), norm="soft")
    assert abs(rep.ei - ref.ei) <= TOL
    for every in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="every"):
            Tracker(model, torch.zeros(1, 4), every=every)


@pytest.mark.cuda
def test_tracker_on_cuda_reads_weights_on_the_gpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).cuda()
    tracker = Tracker(model, torch.zeros(1, 3, 8, 8), every=1, device="cuda")
    assert tracker.plan.device.type == "cuda"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = tracker.step(0)
    ref = foresight_sparse.report(copy.deepcopy(model).cpu(), torch.zeros(1, 3, 8, 8))
    assert abs(rep.ei - ref.ei) <= 1e-9 * max(1.0, abs(ref.ei))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
