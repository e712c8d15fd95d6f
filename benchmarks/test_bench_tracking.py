"""Tracking during training and checkpoint sweeps (DESIGN.md section 6, issue 12).

Full sizes (``--benchmark-enable``): a CIFAR-shaped ResNet-18 (10 classes, 3x32x32, batch
64) trained for 100 steps with and without a tracker every 50 steps; 24 ResNet-18
checkpoints at 1x3x224x224 swept serially, with 2 worker processes and on a local 2-CPU
Ray, each sweep comparing backends in a fresh interpreter (``_ONE_SWEEP`` says what each
figure holds). The smoke run (the default) trains two batches of 2 and sweeps 2 checkpoints
at 32x32.
Figures go to ``extra_info`` under ``tracking`` for ``benchmarks/make_table.py``; nothing
here asserts a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from foresight_sparse import Tracker, sweep
from foresight_sparse.checkpoints import fit_state_dict, load_state_dict
from foresight_sparse.history import History
from foresight_sparse.plans import plan

from .conftest import machine

torchvision = pytest.importorskip("torchvision")


def _resnet18(num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=num_classes)


def _train(steps: int, batch: int, every: int | None) -> tuple[float, list[float]]:
    """Seconds of ``steps`` SGD steps (with the tracker's construction, when tracked), and
    the seconds of each evaluation the tracker made."""
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
    evaluations = []
    t0 = time.perf_counter()
    tracker = Tracker(model, torch.zeros(1, 3, 32, 32), every=every) if every else None
    for step in range(steps):
        x, y = data[step % len(data)]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if tracker is not None:
            t1 = time.perf_counter()
            tracker.step(step)
            if step % every == 0:
                evaluations.append(time.perf_counter() - t1)
    return time.perf_counter() - t0, evaluations


@pytest.mark.filterwarnings("ignore:skipped layers")
def test_tracking_overhead(benchmark, smoke):
    """Training with a tracker every 50 steps against training without, 100 steps (two
    evaluations, at steps 0 and 50), in interleaved pairs (the load drifts), best of 3.

    The first evaluation in a process also pays what any first use of the library pays
    once (numba loading its cached kernels, the engines' imports: about a second), so the
    evaluations are recorded one by one: the later ones are the cost of a long run."""
    steps, batch, every = (2, 2, 1) if smoke else (100, 64, 50)
    pairs = 1 if smoke else 3
    if not smoke:
        _train(2, batch, None)  # warm the allocator and torch's kernels

    def run():
        plain, tracked, evaluations = [], [], []
        for _ in range(pairs):
            plain.append(_train(steps, batch, None)[0])
            t, e = _train(steps, batch, every)
            tracked.append(t)
            evaluations.append(e)
        return min(plain), min(tracked), evaluations

    plain, tracked, evaluations = benchmark.pedantic(run, rounds=1, iterations=1)
    later = sorted(e for run in evaluations for e in run[1:])
    eval_s = later[len(later) // 2] if later else None
    benchmark.extra_info.update(
        machine(),
        tracking="train",
        steps=steps,
        batch=batch,
        every=every,
        plain_s=plain,
        tracked_s=tracked,
        added=(tracked - plain) / plain,
        evaluations=evaluations,
        first_eval_s=evaluations[0][0],
        eval_s=eval_s,
        # A long run: one evaluation (not the first) every `every` steps of plain training.
        steady_added=eval_s / (plain / steps * every) if eval_s is not None else None,
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
    return model, paths, torch.zeros(1, 3, size, size), classes


# One sweep() in a fresh interpreter, as the command line runs one. Outside the timed call:
# building the model; with "warm", a report() first (numba's threads start and its kernels
# load before the workers are forked); with "pin", the process pinned to those cores
# (indices into the cores it may use) and torch and numba set to as many threads, and with
# "part" = [i, n] it sweeps every n-th checkpoint from the i-th, keeping freed memory as a
# worker does; with Ray, ray.init() (a cluster already running). The figure "s" is the
# whole sweep() call: planning, starting the workers (their imports, and numba loading its
# cached kernels), every checkpoint, the records and the CSV. "cpu_s" is the user + system
# time of this process and of the children it waited for (a serial sweep, or forked
# workers; not a forkserver's workers nor Ray's). With "again", the same sweep runs a
# second time and "again_s" is its time (Ray: its workers have imported everything and
# kept the kernels).
_ONE_SWEEP = """
import json, os, resource, sys, time, warnings
warnings.filterwarnings("ignore", "skipped layers")
import numba, torch, torchvision
import foresight_sparse
from foresight_sparse import sweep

cfg = json.loads(sys.argv[1])
model = torchvision.models.resnet18(num_classes=cfg["classes"]).eval()
x = torch.zeros(1, 3, cfg["size"], cfg["size"])
if cfg["warm"]:
    foresight_sparse.report(model, x)
if cfg["pin"]:
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, [allowed[i] for i in cfg["pin"]])
    numba.set_num_threads(len(cfg["pin"]))
    torch.set_num_threads(len(cfg["pin"]))
if cfg["part"]:
    cfg["paths"] = cfg["paths"][cfg["part"][0] :: cfg["part"][1]]
    foresight_sparse.sweeps._keep_freed_memory()  # as a worker does
if cfg["backend"] == "ray":
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)


def cpu():
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run():
    t0 = time.perf_counter()
    res = sweep(model, cfg["paths"], x, executor=cfg["backend"], workers=cfg["workers"],
                output=cfg["csv"])
    assert res.ok, res.errors
    return time.perf_counter() - t0


c0 = cpu()
out = {"s": run(), "cpu_s": cpu() - c0, "load": os.getloadavg()[0]}
if cfg["again"]:
    out["again_s"] = run()
print(json.dumps(out))
"""


def _sweep_command(checkpoints, csv, backend, workers, warm, pin, part, again) -> list[str]:
    _, paths, x, classes = checkpoints
    cfg = dict(
        paths=paths,
        size=x.shape[-1],
        classes=classes,
        backend=backend,
        workers=workers,
        warm=warm,
        pin=pin,
        part=part,
        again=again,
        csv=str(csv),
    )
    return [sys.executable, "-c", _ONE_SWEEP, json.dumps(cfg)]


def _sweep_figures(stdout: str, csv) -> dict:
    out = json.loads(stdout.strip().splitlines()[-1])
    out["history"] = History.from_csv(csv)
    return out


def _one_sweep(
    checkpoints, csv, backend="serial", workers=None, warm=False, pin=None, again=False
) -> dict:
    """Run _ONE_SWEEP in a fresh interpreter; its figures and its records."""
    cmd = _sweep_command(checkpoints, csv, backend, workers, warm, pin, None, again)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return _sweep_figures(proc.stdout, csv)


def _independent_workers(checkpoints, tmp_path, r: int) -> dict:
    """What workers that never wait for each other give: one interpreter per core, each
    pinned to its core, one thread, kernels loaded (a report() first, untimed), freed
    memory kept as in a worker, each sweeping its share of the checkpoints serially, all
    at once. "s" is the slowest one's sweep() time. Cores that share a physical core's
    units (SMT siblings, as the two vCPUs of the benchmark VM behave) slow each other down
    here as they would slow the workers, which a single one-core run halved would not
    show."""
    cores = machine()["cores"]
    procs = []
    for i in range(cores):
        csv = tmp_path / f"independent-{r}-{i}.csv"
        cmd = _sweep_command(checkpoints, csv, "serial", None, True, [i], [i, cores], False)
        procs.append(
            (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), csv)
        )
    parts = []
    for proc, csv in procs:
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr
        parts.append(_sweep_figures(stdout, csv))
    return {
        "s": max(p["s"] for p in parts),
        "cpu_s": sum(p["cpu_s"] for p in parts),
        "load": max(p["load"] for p in parts),
        "history": History([r for p in parts for r in p["history"].records]),
    }


def _max_difference(a: History, b: History) -> float:
    """The largest difference of EI, determinism or degeneracy between two sweeps' records."""
    a = a.sorted(b.labels)  # the independent workers' records come in two parts
    assert [(r.label, r.layer) for r in a.records] == [(r.label, r.layer) for r in b.records]
    return max(
        abs(getattr(x, k) - getattr(y, k))
        for x, y in zip(a.records, b.records)
        for k in ("ei", "determinism", "degeneracy")
    )


def _best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["s"])


def test_sweep_serial_vs_processes(benchmark, smoke, checkpoints, tmp_path):
    """Serial against 2 worker processes, each sweep() in a fresh interpreter: as the
    command line runs, and after a report() in the same process (numba's threads have
    started and its kernels are loaded; the workers are forked in both), full size only;
    and one pinned serial sweep per core at once, each over its share of the checkpoints
    after a report(), for what workers could give at best on this machine
    (_independent_workers). Best of 3 rounds, the runs of a round one after another (the
    load drifts)."""
    runs_of = [("serial", None, False), ("process", 2, False)]
    if not smoke:
        runs_of += [("serial", None, True), ("process", 2, True)]
    rounds = 1 if smoke else 3

    def run():
        runs: dict = {}
        for r in range(rounds):
            for backend, workers, warm in runs_of:
                csv = tmp_path / f"{backend}-{warm}-{r}.csv"
                one = _one_sweep(checkpoints, csv, backend, workers, warm)
                runs.setdefault((backend, warm), []).append(one)
            if not smoke:
                runs.setdefault("independent", []).append(
                    _independent_workers(checkpoints, tmp_path, r)
                )
        return runs

    runs = benchmark.pedantic(run, rounds=1, iterations=1)
    serial, process = _best(runs["serial", False]), _best(runs["process", False])
    worst = max(_max_difference(r["history"], serial["history"]) for v in runs.values() for r in v)
    assert worst <= 1e-12
    cores = machine()["cores"]
    info = dict(
        tracking="sweep",
        n=len(checkpoints[1]),
        size=checkpoints[2].shape[-1],
        serial_s=serial["s"],
        process_s=process["s"],
        speedup=serial["s"] / process["s"],
        serial_cpu_s=serial["cpu_s"],
        serial_util=serial["cpu_s"] / serial["s"],
        process_cpu_s=process["cpu_s"],
        # The process run's CPU time spread perfectly over the cores: the least wall time
        # that run could have taken, and so the most speedup its work allowed.
        cpu_bound_speedup=serial["s"] / (process["cpu_s"] / cores),
        loads=[r["load"] for v in runs.values() for r in v],
        max_difference=worst,
    )
    if not smoke:
        warm_serial = _best(runs["serial", True])
        warm_process = _best(runs["process", True])
        independent = _best(runs["independent"])
        info.update(
            warm_serial_s=warm_serial["s"],
            warm_process_s=warm_process["s"],
            warm_speedup=warm_serial["s"] / warm_process["s"],
            independent_s=independent["s"],
            # One pinned one-thread sweep per core at once, with no start-up and nothing
            # shared but the machine: the most workers can give against the serial sweep
            # on all cores (both with their kernels loaded).
            ideal_speedup=warm_serial["s"] / independent["s"],
        )
    benchmark.extra_info.update(machine(), **info)


@pytest.mark.filterwarnings("ignore:skipped layers")
def test_sweep_serial_per_checkpoint(benchmark, smoke, checkpoints):
    """A serial sweep's time per checkpoint against loading it and Plan.report alone, in
    this process (warm). Best of 3 rounds of each, interleaved (the load drifts)."""
    model, paths, x, _ = checkpoints
    p = plan(model, x)
    p.report()  # warm
    rounds = 1 if smoke else 3

    def parts() -> tuple[float, float]:
        load_s = report_s = 0.0
        for path in paths:
            t0 = time.perf_counter()
            state = fit_state_dict(load_state_dict(path), model, source=path)
            t1 = time.perf_counter()
            p.report(state)
            load_s += t1 - t0
            report_s += time.perf_counter() - t1
        return load_s, report_s

    def run():
        loads, reports, sweeps = [], [], []
        for _ in range(rounds):
            load_s, report_s = parts()
            loads.append(load_s)
            reports.append(report_s)
            sweeps.append(sweep(model, paths, x).seconds)
        return min(loads), min(reports), min(sweeps)

    load_s, report_s, sweep_s = benchmark.pedantic(run, rounds=1, iterations=1)
    n = len(paths)
    benchmark.extra_info.update(
        machine(),
        tracking="per_checkpoint",
        n=n,
        size=x.shape[-1],
        sweep_s=sweep_s / n,
        load_s=load_s / n,
        report_s=report_s / n,
        over_parts=sweep_s / (load_s + report_s),
    )


@pytest.mark.filterwarnings("ignore:skipped layers")
def test_sweep_ray_vs_processes(benchmark, smoke, checkpoints, tmp_path):
    """A local 2-CPU Ray against 2 worker processes, each sweep() in a fresh interpreter.
    Ray is initialised before the timed call, as a cluster would already be running; the
    figure holds Ray starting this job's workers and their imports (as the process figure
    holds starting the pool), and a second sweep in the same session shows Ray with its
    workers ready. The records must equal a serial sweep's. Best of 3 rounds; the smoke
    run checks Ray's numbers only (it still starts Ray: about 10 s)."""
    pytest.importorskip("ray")
    model, paths, x, _ = checkpoints
    serial = sweep(model, paths, x)
    rounds = 1 if smoke else 3

    def run():
        ray_runs, process_runs = [], []
        for r in range(rounds):
            if not smoke:
                process_runs.append(_one_sweep(checkpoints, tmp_path / f"p{r}.csv", "process", 2))
            ray_runs.append(_one_sweep(checkpoints, tmp_path / f"r{r}.csv", "ray", again=not smoke))
        return ray_runs, process_runs

    ray_runs, process_runs = benchmark.pedantic(run, rounds=1, iterations=1)
    worst = max(_max_difference(r["history"], serial.history) for r in ray_runs)
    assert worst <= 1e-12
    ray_s = _best(ray_runs)["s"]
    info = dict(
        tracking="ray",
        n=len(paths),
        size=x.shape[-1],
        ray_s=ray_s,
        loads=[r["load"] for r in ray_runs + process_runs],
        max_ei_difference=worst,
    )
    if process_runs:
        process_s = _best(process_runs)["s"]
        again_s = min(r["again_s"] for r in ray_runs)
        info.update(
            process_s=process_s,
            ray_over_process=ray_s / process_s,
            ray_again_s=again_s,
            ray_again_over_process=again_s / process_s,
        )
    benchmark.extra_info.update(machine(), **info)
