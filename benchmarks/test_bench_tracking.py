"""Tracking during training and checkpoint sweeps (DESIGN.md section 6, issue 12).

Full sizes (``--benchmark-enable``): a CIFAR-shaped ResNet-18 (10 classes, 3x32x32, batch
64) trained for 100 steps with and without a tracker every 50 steps; 24 ResNet-18
checkpoints at 1x3x224x224 swept serially, with 2 worker processes and on a local 2-CPU
Ray. The smoke run (the default) trains two batches of 2 and sweeps 2 checkpoints at 32x32.
Figures go to ``extra_info`` under ``tracking`` for ``benchmarks/make_table.py``; nothing
here asserts a time.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from foresight_sparse import Tracker, sweep
from foresight_sparse.checkpoints import fit_state_dict, load_state_dict
from foresight_sparse.plans import plan

from .conftest import machine

torchvision = pytest.importorskip("torchvision")


def _resnet18(num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=num_classes)


def _train(steps: int, batch: int, every: int | None) -> tuple[float, float]:
    """Seconds of ``steps`` SGD steps, and the seconds spent in the tracker."""
    model = _resnet18(10).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(batch, 3, 32, 32, generator=gen),
            torch.randint(0, 10, (batch,), generator=gen),
        )
        for _ in range(4)
    ]
    tracker = Tracker(model, torch.zeros(1, 3, 32, 32), every=every) if every else None
    in_tracker = 0.0
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = data[step % len(data)]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if tracker is not None:
            t1 = time.perf_counter()
            tracker.step(step)
            in_tracker += time.perf_counter() - t1
    return time.perf_counter() - t0, in_tracker


@pytest.mark.filterwarnings("ignore:skipped layers")
def test_tracking_overhead(benchmark, smoke):
    # 100 steps hold two evaluations (steps 0 and 50), the rate of a long run; a step takes
    # about 2.5 s on the 2-core machine, so one pair of runs is 8 minutes already.
    steps, batch, every = (2, 2, 1) if smoke else (100, 64, 50)
    pairs = 1
    if not smoke:
        _train(2, batch, None)  # warm the allocator and the kernels

    def run():
        # Interleaved pairs: the machine's load drifts, and both runs see the same drift.
        plain, tracked, inside = [], [], []
        for _ in range(pairs):
            plain.append(_train(steps, batch, None)[0])
            t, i = _train(steps, batch, every)
            tracked.append(t)
            inside.append(i)
        return min(plain), min(tracked), min(inside)

    plain, tracked, inside = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(
        machine(),
        tracking="train",
        steps=steps,
        batch=batch,
        every=every,
        plain_s=plain,
        tracked_s=tracked,
        tracker_s=inside,
        added=(tracked - plain) / plain,
        tracker_share=inside / plain,
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, request):
    opt = request.config.getoption
    smoke = bool(opt("benchmark_disable")) and not bool(opt("benchmark_enable"))
    n, size, classes = (2, 32, 10) if smoke else (24, 224, 1000)
    folder = tmp_path_factory.mktemp("resnet18_ckpts")
    model = _resnet18(classes).eval()
    gen = torch.Generator().manual_seed(1)
    paths = []
    for i in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        path = folder / f"epoch={i}.pt"
        torch.save(model.state_dict(), path)
        paths.append(str(path))
    return model, paths, torch.zeros(1, 3, size, size)


@pytest.mark.filterwarnings("ignore:skipped layers")
def test_sweep_serial_vs_processes(benchmark, checkpoints):
    model, paths, x = checkpoints
    t0 = time.perf_counter()
    serial = sweep(model, paths, x)
    serial_s = time.perf_counter() - t0

    def run():
        return sweep(model, paths, x, workers=2, backend="process")

    res = benchmark.pedantic(run, rounds=1, iterations=1)
    assert res.ok and serial.ok
    assert res.history.labels == serial.history.labels
    process_s = res.seconds
    benchmark.extra_info.update(
        machine(),
        tracking="sweep",
        n=len(paths),
        size=x.shape[-1],
        serial_s=serial_s,
        process_s=process_s,
        speedup=serial_s / process_s,
    )


@pytest.mark.filterwarnings("ignore:skipped layers")
def test_sweep_serial_per_checkpoint(benchmark, checkpoints):
    """A serial sweep's time per checkpoint against loading it and Plan.report alone."""
    model, paths, x = checkpoints
    p = plan(model, x)
    p.report()  # warm
    load_s = report_s = 0.0
    for path in paths:
        t0 = time.perf_counter()
        state = fit_state_dict(load_state_dict(path), model, source=path)
        t1 = time.perf_counter()
        p.report(state)
        t2 = time.perf_counter()
        load_s += t1 - t0
        report_s += t2 - t1

    def run():
        return sweep(model, paths, x)

    res = benchmark.pedantic(run, rounds=1, iterations=1)
    n = len(paths)
    benchmark.extra_info.update(
        machine(),
        tracking="per_checkpoint",
        n=n,
        size=x.shape[-1],
        sweep_s=res.seconds / n,
        load_s=load_s / n,
        report_s=report_s / n,
        over_parts=res.seconds / (load_s + report_s),
    )


@pytest.mark.filterwarnings("ignore:skipped layers")
def test_sweep_ray_vs_processes(benchmark, smoke, checkpoints):
    if smoke:
        pytest.skip(
            "smoke run: starting Ray alone takes 10 s here; tests/test_sweeps.py runs "
            "the Ray backend"
        )
    ray = pytest.importorskip("ray")
    model, paths, x = checkpoints
    t0 = time.perf_counter()
    proc = sweep(model, paths, x, workers=2, backend="process")
    process_s = time.perf_counter() - t0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:

        def run():
            return sweep(model, paths, x, backend="ray")

        res = benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        ray.shutdown()
    assert res.ok
    worst = max(abs(a.ei - b.ei) for a, b in zip(res.history.records, proc.history.records))
    benchmark.extra_info.update(
        machine(),
        tracking="ray",
        n=len(paths),
        size=x.shape[-1],
        ray_s=res.seconds,
        process_s=process_s,
        ray_over_process=res.seconds / process_s,
        max_ei_difference=worst,
    )
