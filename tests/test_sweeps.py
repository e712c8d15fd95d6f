"""sweep(): every executor gives report()'s numbers; bad checkpoints become error rows; resume."""

from __future__ import annotations

import copy
import os
import platform
import sys
import warnings

import pytest
import torch
from torch import nn

import foresight_sparse
from foresight_sparse import sweep
from foresight_sparse.exceptions import (
    HistoryFileError,
    MissingDependencyError,
    OptionError,
    UnknownNameError,
)
from foresight_sparse.history import NETWORK, History
from foresight_sparse.plans import Plan
from foresight_sparse.sweeps import (
    Checkpoint,
    Executor,
    ProcessExecutor,
    RayExecutor,
    SerialExecutor,
    checkpoint_entries,
    natural_key,
)

pytestmark = pytest.mark.filterwarnings("ignore:skipped layers")

TOL = 1e-12
INPUT = torch.zeros(1, 3, 16, 16)


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(6, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def other_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 10))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Four good checkpoints, as a bare state dict, a training checkpoint, a Lightning-style
    ``.ckpt`` and safetensors; the expected report of each from an independent plan."""
    folder = tmp_path_factory.mktemp("ckpts")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = tiny_cnn().eval()
    expected = {}
    names = [
        "epoch=2-step=20.pt",
        "epoch=10-step=100.pth",
        "epoch=9-step=90.ckpt",
        "epoch=0-step=0.safetensors",
    ]
    for name in names:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            model[1].running_var.copy_(torch.rand(6, generator=gen) + 0.5)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        path = folder / name
        if name.endswith(".pt"):
            torch.save(state, path)
        elif name.endswith(".pth"):
            torch.save({"epoch": 10, "model_state_dict": state, "optimizer": {}}, path)
        elif name.endswith(".ckpt"):
            torch.save(
                {
                    "state_dict": {f"model.{k}": v for k, v in state.items()},
                    "epoch": 9,
                    "global_step": 90,
                },
                path,
            )
        else:
            pytest.importorskip("safetensors")
            from safetensors.torch import save_file

            save_file(state, str(path))
        expected[os.path.splitext(name)[0]] = foresight_sparse.report(copy.deepcopy(model), INPUT)
    return folder, [str(folder / n) for n in names], expected


@pytest.fixture(scope="module")
def bad(tmp_path_factory, ckpts):
    """A truncated file, another architecture's state dict, NaN weights and a pickled module."""
    folder = tmp_path_factory.mktemp("bad")
    good = ckpts[1][0]
    data = open(good, "rb").read()
    (folder / "step=5.pt").write_bytes(data[: len(data) // 2])
    torch.manual_seed(1)
    torch.save(other_cnn().state_dict(), folder / "step=6.pt")
    state = torch.load(good, weights_only=True)
    state["4.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, folder / "step=7.pt")
    torch.manual_seed(2)
    module = tiny_cnn().eval()
    torch.save(module, folder / "step=8.pt")
    return {
        "step=5": str(folder / "step=5.pt"),
        "step=6": str(folder / "step=6.pt"),
        "step=7": str(folder / "step=7.pt"),
        "step=8": str(folder / "step=8.pt"),
        "module": module,
    }


def assert_matches(history: History, expected: dict) -> None:
    """Every evaluated label's records equal the independent report to 1e-12."""
    for label, ref in expected.items():
        recs = [r for r in history.records if r.label == label]
        assert recs, f"{label} missing"
        net, layers = recs[0], recs[1:]
        assert (net.kind, net.layer) == ("network", NETWORK)
        for a, b in (
            (net.ei, ref.ei),
            (net.determinism, ref.determinism),
            (net.degeneracy, ref.degeneracy),
        ):
            assert abs(a - b) <= TOL * max(1.0, abs(b)), label
        assert [r.layer for r in layers] == [lay.name for lay in ref.layers]
        for rec, lay in zip(layers, ref.layers):
            assert abs(rec.ei - lay.ei) <= TOL * max(1.0, abs(lay.ei)), (label, lay.name)
            assert abs(rec.determinism - lay.mean_row_entropy) <= TOL * max(
                1.0, lay.mean_row_entropy
            )
            assert abs(rec.degeneracy - lay.degeneracy) <= TOL * max(1.0, lay.degeneracy)


ORDER = ["epoch=0-step=0", "epoch=2-step=20", "epoch=9-step=90", "epoch=10-step=100"]


# --------------------------------------------------------------------------- names


def test_labels_sort_naturally_and_parse_steps(tmp_path):
    names = [
        "epoch=10.pt",
        "epoch=9.pt",
        "epoch_3.pt",
        "ckpt-500.pt",
        "1200.pt",
        "model-epoch3-global_step=77.ckpt",
        "final.safetensors",
        "iter_40.pth",
    ]
    entries = checkpoint_entries([tmp_path / n for n in names])
    got = {e.label: (e.step, e.epoch) for e in entries}
    assert got == {
        "epoch=10": (None, 10),
        "epoch=9": (None, 9),
        "epoch_3": (None, 3),
        "ckpt-500": (500, None),
        "1200": (1200, None),
        "model-epoch3-global_step=77": (77, 3),
        "final": (None, None),
        "iter_40": (40, None),
    }
    labels = [e.label for e in entries]
    assert labels.index("epoch=9") < labels.index("epoch=10")
    assert sorted(["a10", "a9", "a100"], key=natural_key) == ["a9", "a10", "a100"]


def test_same_names_in_two_folders_keep_the_folder(tmp_path):
    for run in ("run_a", "run_b"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "epoch=1.pt").write_bytes(b"")
    entries = checkpoint_entries(
        [tmp_path / "run_b" / "epoch=1.pt", tmp_path / "run_a" / "epoch=1.pt"]
    )
    assert [e.label for e in entries] == ["run_a/epoch=1", "run_b/epoch=1"]
    assert entries[0] == Checkpoint(
        str(tmp_path / "run_a" / "epoch=1.pt"), "run_a/epoch=1", None, 1
    )
    with pytest.raises(ValueError, match="twice"):
        checkpoint_entries([tmp_path / "run_a" / "epoch=1.pt"] * 2)


# --------------------------------------------------------------------------- executors


def test_serial_sweep_equals_report(ckpts):
    folder, paths, expected = ckpts
    res = sweep(tiny_cnn(), folder, INPUT)  # a folder stands for its checkpoints
    assert res.ok and res.errors == []
    assert res.history.labels == ORDER
    assert_matches(res.history, expected)
    steps = {r.label: (r.step, r.epoch) for r in res.history.records if r.kind == "network"}
    assert steps["epoch=9-step=90"] == (90, 9)
    assert res.history.meta["input_shape"] == [1, 3, 16, 16]


@pytest.mark.parametrize(
    "method, parent_helps", [("auto", True), ("forkserver", False), ("forkserver", True)]
)
def test_process_sweep_equals_report_and_reports_errors(
    ckpts, bad, tmp_path, monkeypatch, method, parent_helps
):
    import foresight_sparse.sweeps as sweeps

    if method == "forkserver":  # else fork or forkserver, as is safe in this process
        monkeypatch.setattr(sweeps, "_start_method", lambda threads: "forkserver")
    # False: every checkpoint goes through the worker processes.
    monkeypatch.setattr(sweeps, "_HELP_WHILE_STARTING", parent_helps)
    _, paths, expected = ckpts
    files = [*paths, bad["step=5"], bad["step=6"], bad["step=7"], bad["step=8"]]
    res = sweep(tiny_cnn(), files, INPUT, workers=2, executor="process", output=tmp_path / "ei.csv")
    assert_matches(res.history, expected)
    _assert_errors(res)
    assert History.from_csv(tmp_path / "ei.csv") == res.history


_FRESH_PROCESS = """
import json, logging, sys
import numba, numpy as np
import torch
from torch import nn
from foresight_sparse import sweep, sweeps

logging.basicConfig(level=logging.DEBUG, format="%(message)s")
sweeps._cores = lambda: 2  # one thread per worker, wherever this runs
{model}
{big}
args = json.loads(sys.argv[1])
x = torch.zeros(1, 3, 16, 16)
sweep(tiny_cnn(), args["paths"], x, workers=2, output=args["out"][0])


@numba.njit(parallel=True)
def total(a):
    s = 0.0
    for i in numba.prange(a.size):
        s += a[i]
    return s


total(np.ones(1 << 20))  # numba's threading layer starts and runs a parallel region here
sweep(tiny_cnn(), args["paths"], x, workers=2, output=args["out"][1])
# kernels with parallel-sized work in the workers, forked from this process
sweep(big_linear(), args["big"], x, workers=2, output=args["out"][2])
"""


def big_linear() -> nn.Module:
    """A Linear whose passes are large enough for the parallel kernels (98304 weights)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 128))


def test_process_sweep_forks_after_parallel_kernels_ran(ckpts, bad, tmp_path):
    """Workers on one thread are forked, in a fresh process and after a parallel kernel
    has run in it (they run every kernel's serial twin, so the inherited threading layer
    is never used, even for work that would run in parallel). Every sweep gives report()'s
    numbers, and none hangs (the subprocess has a time limit)."""
    import inspect
    import json
    import subprocess
    import sys

    _, paths, expected = ckpts
    big_expected = {}
    big_paths = []
    for i in range(3):
        torch.manual_seed(i)
        model = big_linear().eval()
        big_paths.append(str(tmp_path / f"big-step={i}.pt"))
        torch.save(model.state_dict(), big_paths[-1])
        big_expected[f"big-step={i}"] = foresight_sparse.report(model, INPUT)
    files = [*paths, bad["step=5"], bad["step=6"], bad["step=7"], bad["step=8"]]
    out = [str(tmp_path / f"sweep{i}.csv") for i in range(3)]
    script = _FRESH_PROCESS.format(
        model=inspect.getsource(tiny_cnn), big=inspect.getsource(big_linear)
    )
    args = json.dumps({"paths": files, "big": big_paths, "out": out})
    proc = subprocess.run(
        [sys.executable, "-c", script, args], capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr
    methods = [line.split()[2] for line in proc.stderr.splitlines() if "workers," in line]
    assert methods == ["fork", "fork", "fork"], proc.stderr
    for csv in out[:2]:
        history = History.from_csv(csv)
        assert_matches(history, expected)
        _assert_errors(history)
    assert_matches(History.from_csv(out[2]), big_expected)


@pytest.fixture
def opened_files(monkeypatch):
    """Every file the test opens through Python's ``open`` (the sweep's reader, torch.load,
    the format sniffing), as (path, thread ident), in order; an attempt on a file that
    cannot be opened counts too."""
    import builtins
    import threading

    opened: list[tuple[str, int]] = []
    real_open = builtins.open

    def recording_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            opened.append((os.fspath(file), threading.get_ident()))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    return opened


def test_reader_thread_only_reads_ahead(ckpts, opened_files):
    """The serial sweep reads each file ahead in another thread, in order and once, before
    the calling thread loads it (so the load finds it in the page cache); the load itself,
    and with it every torch and numba call, stays in the calling thread. Seen through the
    files each thread opens (the .safetensors checkpoint is left out: safetensors reads it
    in its own code, which Python's open does not see)."""
    import threading

    _, paths, expected = ckpts
    files = [p for p in paths if not p.endswith(".safetensors")]
    res = sweep(tiny_cnn(), files, INPUT)
    labels = [e.label for e in checkpoint_entries(files)]
    assert_matches(res.history, {label: expected[label] for label in labels})
    order = [e.path for e in checkpoint_entries(files)]  # sorted naturally
    events = [(i, path, tid) for i, (path, tid) in enumerate(opened_files) if path in order]
    me = threading.get_ident()
    ahead = [(i, path) for i, path, tid in events if tid != me]
    assert [path for _, path in ahead] == order  # each once, in order, by another thread
    loads = {}  # the calling thread's first open of each file: its load
    for i, path, tid in events:
        if tid == me:
            loads.setdefault(path, i)
    assert list(loads) == order  # every file loaded, in order, by the calling thread
    for i, path in ahead:  # each file is read ahead before it is loaded
        assert i < loads[path], (path, events)


def test_read_ahead_leaves_errors_to_the_load(ckpts, tmp_path, opened_files):
    """Reading ahead a missing file or a folder raises nothing: the serial executor reads
    ahead both, its load turns each into the checkpoint's one-line error, and it goes on
    to the next checkpoint."""
    import threading

    _, paths, expected = ckpts
    missing = str(tmp_path / "missing.pt")
    folder = tmp_path / "folder.pt"
    folder.mkdir()
    good = checkpoint_entries(paths[0])[0]
    entries = [Checkpoint(missing, "missing"), Checkpoint(str(folder), "folder"), good]
    p = foresight_sparse.plan(tiny_cnn(), INPUT)
    results = list(SerialExecutor().run(p, entries))
    assert [entry for entry, _ in results] == entries
    for (entry, why), name in zip(results[:2], ("missing.pt", "folder.pt")):
        assert isinstance(why, str) and name in why, (entry, why)
    rep, ref = results[2][1], expected[good.label]
    assert abs(rep.ei - ref.ei) <= TOL * max(1.0, abs(ref.ei))
    me = threading.get_ident()
    read_ahead = [path for path, tid in opened_files if tid != me]
    assert read_ahead == [missing, str(folder), good.path]


#: mallopt's parameters, as glibc's <malloc.h> numbers them.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


class _FakeLibc:
    """A C library whose ``mallopt`` records its calls and returns ``result`` (glibc's
    returns 1 when it takes the setting, 0 when it refuses it)."""

    def __init__(self, result: int = 1):
        self.calls: list[tuple[int, int]] = []
        self.result = result

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.result


def _fake_c_library(monkeypatch, lib, found="libc.so.6", sys_platform="linux") -> list:
    """Make ``ctypes.CDLL`` return ``lib`` (or raise it, an exception) and
    ``ctypes.util.find_library`` return ``found``; the names CDLL was asked for."""
    import ctypes
    import ctypes.util

    opened = []

    def cdll(name, *args, **kwargs):
        opened.append(name)
        if isinstance(lib, BaseException):
            raise lib
        return lib

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: found if name == "c" else None)
    monkeypatch.setattr(sys, "platform", sys_platform)
    return opened


def test_keep_freed_memory_turns_off_mmap_and_trimming(monkeypatch):
    """_keep_freed_memory asks the C library's mallopt for no mmap-ed blocks
    (M_MMAP_MAX 0) and no trimming (M_TRIM_THRESHOLD -1), once each, and says whether it
    took them. What that spares a sweep (a page fault per 4 KiB of each checkpoint) is
    glibc's behaviour, not this package's: benchmarks/freed_memory.py measures it."""
    from foresight_sparse.sweeps import _keep_freed_memory

    libc = _FakeLibc()
    opened = _fake_c_library(monkeypatch, libc)
    assert _keep_freed_memory() is True
    assert opened == ["libc.so.6"]
    assert sorted(libc.calls) == sorted([(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)])
    # where find_library finds nothing, glibc's usual name
    libc = _FakeLibc()
    opened = _fake_c_library(monkeypatch, libc, found=None)
    assert _keep_freed_memory() is True
    assert opened == ["libc.so.6"] and len(libc.calls) == 2


def test_keep_freed_memory_is_a_no_op_without_glibc(monkeypatch):
    """False, and no call, where there is no mallopt to take the settings: not Linux, no C
    library to open, one without mallopt; False where mallopt refuses them (returns 0)."""
    from foresight_sparse.sweeps import _keep_freed_memory

    libc = _FakeLibc()
    opened = _fake_c_library(monkeypatch, libc, sys_platform="darwin")
    assert _keep_freed_memory() is False
    assert opened == [] and libc.calls == []
    opened = _fake_c_library(monkeypatch, OSError("no such library"))
    assert _keep_freed_memory() is False and opened == ["libc.so.6"]
    _fake_c_library(monkeypatch, object())  # a C library without mallopt
    assert _keep_freed_memory() is False
    refusing = _FakeLibc(result=0)
    _fake_c_library(monkeypatch, refusing)
    assert _keep_freed_memory() is False
    assert refusing.calls and set(refusing.calls) <= {(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)}


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc"
)
def test_glibc_takes_the_kept_memory_settings():
    """The real glibc takes both settings (in a process of its own: they are permanent)."""
    import subprocess

    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from foresight_sparse.sweeps import _keep_freed_memory; print(_keep_freed_memory())",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True"], proc.stdout


_TWINS = """
import sys

import numba
import torch
from torch import nn

import foresight_sparse as fs

{probe}
torch.set_num_threads(1)  # torch's own OpenMP pool stays out of the forks
if not parallel_probe_ready():
    print("no probe")
    sys.exit(0)
torch.manual_seed(0)
# both layers' passes are parallel-sized; the small model's work is not
big = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 22 * 22, 9)).double()
big_x = torch.zeros(1, 8, 24, 24, dtype=torch.float64)
small = nn.Sequential(nn.Linear(4, 3)).double()
small_x = torch.zeros(1, 4, dtype=torch.float64)
seen = []
for engine in ("sparse", "implicit"):
    for model, x, threads in ((big, big_x, 1), (big, big_x, 2), (small, small_x, 2)):
        plan = fs.plan(model, x, engine=engine, skipped="ignore")
        numba.set_num_threads(3 - threads)
        plan.report()  # every kernel compiled here, so the fork only runs them
        numba.set_num_threads(threads)
        want = plan.report()  # what the fork must give

        def run(plan=plan, want=want):
            got = plan.report()
            assert (got.determinism, got.degeneracy) == (want.determinism, want.degeneracy)

        seen.append(opens_parallel_region(run, threads))
print(*seen)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="observed through os.fork")
def test_one_thread_runs_serial_twins():
    """With one numba thread a report opens no parallel region, whatever its work (so a
    worker forked after numba's threading layer started never uses it); on two threads
    parallel-sized work opens one and small work none. Seen, in a fresh process, through
    the ``omp`` layer's fork guard (``conftest.opens_parallel_region``), for the sparse
    and the implicit engine; the forks on one thread give the numbers computed before."""
    from conftest import run_parallel_probe

    # per engine: big on 1 thread, big on 2, small on 2
    seen = run_parallel_probe(_TWINS)
    assert seen == ["False", "True", "False"] * 2, seen


def test_start_method_forks_only_while_safe(monkeypatch):
    import foresight_sparse.sweeps as sweeps

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    if sweeps.sys.platform.startswith("linux"):
        assert sweeps._start_method(1) == "fork"
    assert sweeps._start_method(2) != "fork"  # torch's pool would be used in the child
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert sweeps._start_method(1) != "fork"


def _assert_errors(res):
    """The error records of ``bad``'s four checkpoints (``res``: a SweepResult or History)."""
    errors = {r.label: r for r in res.errors}
    assert sorted(errors) == ["step=5", "step=6", "step=7", "step=8"]
    assert all(r.file and r.file.endswith(f"{r.label}.pt") for r in errors.values())
    assert "cannot read" in errors["step=5"].error
    assert "does not fit" in errors["step=6"].error
    assert "NaN" in errors["step=7"].error or "non-finite" in errors["step=7"].error.lower()
    assert "trust_pickle" in errors["step=8"].error
    assert errors["step=5"].step == 5 and errors["step=5"].ei is None


def test_serial_errors_and_trusted_pickle(ckpts, bad):
    _, paths, expected = ckpts
    files = [paths[0], bad["step=5"], bad["step=6"], bad["step=7"], bad["step=8"]]
    res = sweep(tiny_cnn(), files, INPUT)
    assert not res.ok
    _assert_errors(res)
    assert_matches(res.history, {ORDER[1]: expected[ORDER[1]]})
    trusted = sweep(tiny_cnn(), [bad["step=8"]], INPUT, trust_pickle=True)
    assert trusted.ok
    assert_matches(trusted.history, {"step=8": foresight_sparse.report(bad["module"], INPUT)})


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_sweep_equals_report(local_ray, ckpts, bad, tmp_path):
    _, paths, expected = ckpts
    files = [*paths, bad["step=5"], bad["step=6"], bad["step=7"], bad["step=8"]]
    res = sweep(tiny_cnn(), files, INPUT, executor="ray", output=tmp_path / "ei.csv")
    assert_matches(res.history, expected)
    _assert_errors(res)
    serial = sweep(tiny_cnn(), files, INPUT)
    assert res.history.labels == serial.history.labels
    capped = sweep(tiny_cnn(), paths[:2], INPUT, executor=RayExecutor(workers=1))
    assert capped.history.labels == ["epoch=2-step=20", "epoch=10-step=100"]
    assert_matches(capped.history, {k: expected[k] for k in capped.history.labels})


def test_ray_missing_says_how_to_install(monkeypatch, ckpts):
    import builtins

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(MissingDependencyError, match=r"foresight-sparse\[ray\]"):
        sweep(tiny_cnn(), ckpts[1], INPUT, executor="ray")
    with pytest.raises(MissingDependencyError, match=r"executor='ray' needs Ray"):
        RayExecutor()


def test_bad_arguments(ckpts, tmp_path):
    """Each option outside its domain, and each contradiction, is refused before planning,
    with a message naming the options."""
    paths = ckpts[1]
    refused = [
        (UnknownNameError, "unknown executor 'threads'", {"executor": "threads"}),
        (OptionError, "executor=3: give an Executor", {"executor": 3}),
        (
            OptionError,
            r"workers=2 needs executor='process' or 'ray'",
            dict(executor="serial", workers=2),
        ),
        (OptionError, r"ray_address='auto' needs executor='ray'", {"ray_address": "auto"}),
        (
            OptionError,
            r"ray_address='auto' needs executor='ray'",
            dict(executor="process", ray_address="auto"),
        ),
        (
            OptionError,
            r"workers=2 is for a named executor.*SerialExecutor",
            dict(executor=SerialExecutor(), workers=2),
        ),
        (OptionError, r"workers=0 must be a positive int", {"workers": 0}),
        (OptionError, r"workers=True must be a positive int", {"workers": True}),
        (OptionError, r"resume=True needs output", {"resume": True}),
    ]
    for error, message, options in refused:
        with pytest.raises(error, match=message):
            sweep(tiny_cnn(), paths, INPUT, **options)
    with pytest.raises(OptionError, match=r"workers=0"):
        ProcessExecutor(0)
    assert issubclass(OptionError, ValueError) and issubclass(OptionError, TypeError)


def test_executor_names_pick_and_configure_an_executor(monkeypatch):
    """None keeps the old rule (processes for workers > 1, else serial); a name takes
    workers and ray_address; an Executor is used as it is."""
    from foresight_sparse.sweeps import _executor

    monkeypatch.setitem(sys.modules, "ray", FakeRay())  # RayExecutor only imports it here
    assert type(_executor(None, None, None)) is SerialExecutor
    assert type(_executor(None, 1, None)) is SerialExecutor
    assert type(_executor("serial", 1, None)) is SerialExecutor
    picked = _executor(None, 3, None)
    assert type(picked) is ProcessExecutor and picked.workers == 3
    assert _executor("process", None, None).workers is None  # one per core, when it runs
    ray = _executor("ray", 2, "auto")
    assert type(ray) is RayExecutor and (ray.workers, ray.address) == (2, "auto")
    assert repr(ray) == "RayExecutor(workers=2, address='auto')"
    mine = ProcessExecutor(2)
    assert _executor(mine, None, None) is mine


def test_backend_still_works_with_a_future_warning(ckpts):
    """backend='serial'|'process'|'ray' is executor= under its old name for one cycle: a
    FutureWarning at the caller's line, the same records; both at once are refused."""
    import foresight_sparse.sweeps as sweeps

    _, paths, expected = ckpts
    with pytest.warns(
        FutureWarning, match=r"backend='serial' is deprecated.*use executor='serial'"
    ) as caught:
        old = sweep(tiny_cnn(), paths[:2], INPUT, backend="serial")
    assert [w.filename for w in caught if issubclass(w.category, FutureWarning)] == [__file__]
    new = sweep(tiny_cnn(), paths[:2], INPUT, executor="serial")
    assert old.history == new.history
    assert_matches(old.history, {k: expected[k] for k in old.history.labels})
    with pytest.raises(OptionError, match=r"backend='serial' and executor='process' both"):
        sweep(tiny_cnn(), paths, INPUT, backend="serial", executor="process")
    with pytest.raises(UnknownNameError, match=r"unknown backend 'threads'"):
        sweep(tiny_cnn(), paths, INPUT, backend="threads")
    with pytest.warns(FutureWarning, match="EXECUTORS"):
        assert sweeps.BACKENDS == sweeps.EXECUTORS == ("serial", "process", "ray")


def test_backend_names_the_numeric_forms_as_for_plan(ckpts):
    """backend='torch' or 'numba' reaches the plan the executor evaluates every checkpoint
    with (each planned layer names it) and gives the report's records; skipped='ignore'
    silences the skipped layers."""

    class Recording(SerialExecutor):
        def run(self, plan, checkpoints, **kwargs):
            self.plan = plan
            return super().run(plan, checkpoints, **kwargs)

    _, paths, expected = ckpts
    model = tiny_cnn()  # its BatchNorm2d runs but does not count: a skipped layer
    runs = {}
    for b in ("torch", "numba"):
        runner = Recording()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # neither the skipped-layer nor a deprecation
            runs[b] = sweep(model, paths[:2], INPUT, executor=runner, backend=b, skipped="ignore")
        assert runner.plan.settings.backend == b
        assert {layer.backend for layer in runner.plan.layers} == {b}
    assert_matches(runs["torch"].history, {k: expected[k] for k in runs["torch"].history.labels})
    assert_matches(runs["numba"].history, {k: expected[k] for k in runs["numba"].history.labels})
    with pytest.warns(UserWarning, match="skipped layers.*BatchNorm2d"):
        sweep(model, paths[:1], INPUT)


class Reversed(Executor):
    """A user's executor: the checkpoints last to first, through Executor.evaluate."""

    def __init__(self):
        self.calls = []

    def run(self, plan, checkpoints, *, key=None, trust_pickle=False):
        self.calls.append((plan, [c.label for c in checkpoints], key, trust_pickle))
        for entry in reversed(checkpoints):
            yield entry, self.evaluate(plan, entry.path, key=key, trust_pickle=trust_pickle)


def test_a_user_executor_plugs_in(ckpts, bad, tmp_path):
    """An Executor subclass receives the plan and what is left to do, and its results, in
    whatever order it yields them, become the sorted history and the CSV."""
    _, paths, expected = ckpts
    out = tmp_path / "ei.csv"
    mine = Reversed()
    res = sweep(tiny_cnn(), [*paths, bad["step=5"]], INPUT, executor=mine, output=out)
    [(plan, labels, key, trust_pickle)] = mine.calls
    assert isinstance(plan, Plan) and labels == [*ORDER, "step=5"]
    assert (key, trust_pickle) == (None, False)
    assert res.history.labels == [*ORDER, "step=5"]
    assert_matches(res.history, expected)
    assert [r.label for r in res.errors] == ["step=5"] and "cannot read" in res.errors[0].error
    assert History.from_csv(out) == res.history


def test_a_sweep_that_stops_closes_its_executor_and_keeps_what_finished(
    ckpts, tmp_path, monkeypatch
):
    """When the sweep stops between two results (Ctrl-C, a full disk), it closes the
    executor's iterator at once, so the executor shuts its workers down then; the CSV holds
    the checkpoints that finished."""
    import foresight_sparse.sweeps as sweeps

    _, paths, expected = ckpts
    closed = []

    class Tracked(Executor):
        def run(self, plan, checkpoints, *, key=None, trust_pickle=False):
            try:
                for entry in checkpoints:
                    yield entry, self.evaluate(plan, entry.path)
            finally:
                closed.append(True)

    add = sweeps._Sink.add

    def interrupted(sink, entry, result):
        if sink.history.labels:
            raise KeyboardInterrupt
        add(sink, entry, result)

    monkeypatch.setattr(sweeps._Sink, "add", interrupted)
    out = tmp_path / "ei.csv"
    with pytest.raises(KeyboardInterrupt):
        sweep(tiny_cnn(), paths, INPUT, executor=Tracked(), output=out)
    assert closed == [True]  # while the traceback still holds the sweep's frame
    kept = History.from_csv(out)
    assert kept.labels == [ORDER[0]]
    assert_matches(kept, {ORDER[0]: expected[ORDER[0]]})


class _Ref:
    def __init__(self, value):
        self.value = value


class FakeRay:
    """Enough of Ray to run RayExecutor in this process: actors are built and their calls
    run at once; ``ray.wait`` says the latest call finished first, so the first actor's
    start is never seen (an actor left waiting for a CPU)."""

    def __init__(self):
        self.initialized = False
        self.inits, self.puts, self.actors, self.killed = [], [], [], []

    def is_initialized(self):
        return self.initialized

    def init(self, **options):
        self.inits.append(options)
        self.initialized = True

    def shutdown(self):
        self.initialized = False

    def put(self, value):
        self.puts.append(value)
        return _Ref(value)

    def get(self, ref):
        return ref.value

    def wait(self, refs, num_returns=1):
        return refs[-num_returns:], refs[:-num_returns]

    def kill(self, actor):
        self.killed.append(actor)

    def cluster_resources(self):
        return {"CPU": 3.0}

    def get_runtime_context(self):
        import types

        return types.SimpleNamespace(get_assigned_resources=lambda: {"CPU": 1.0})

    def remote(self, **options):
        fake = self

        class Handle:
            def __init__(self, instance):
                self.instance, self.evaluated = instance, []

            def __getattr__(self, name):
                method = getattr(self.instance, name)
                calls = self.evaluated

                class Method:
                    @staticmethod
                    def remote(*args):
                        if name == "evaluate":
                            calls.append(os.path.basename(args[0]))
                        return _Ref(method(*args))

                return Method

        def actor_class(cls):
            class ActorClass:
                @staticmethod
                def remote(*args):
                    refs = [a for a in args if isinstance(a, _Ref)]
                    # Ray hands an actor the value of an object reference it is given
                    handle = Handle(cls(*(a.value if isinstance(a, _Ref) else a for a in args)))
                    fake.actors.append((options, refs, handle))
                    return handle

            return ActorClass

        return actor_class


@pytest.mark.parametrize("workers, actors", [(2, 2), (None, 3)])
def test_ray_executor_keeps_the_plan_in_the_object_store(ckpts, bad, monkeypatch, workers, actors):
    """The plan is put in Ray's object store once and handed to each actor as that one
    reference; nothing in the module keeps it. Checkpoints go only to actors that have
    started; the actors are killed and the Ray the sweep started is shut down."""
    import foresight_sparse.sweeps as sweeps

    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    threads = []
    monkeypatch.setattr(sweeps, "_set_threads", threads.append)
    _, paths, expected = ckpts
    files = [*paths, bad["step=5"], bad["step=6"], bad["step=7"], bad["step=8"]]
    res = sweep(tiny_cnn(), files, INPUT, executor=RayExecutor(workers))
    assert_matches(res.history, expected)
    _assert_errors(res)
    [plan] = fake.puts
    assert isinstance(plan, Plan)
    assert len(fake.actors) == actors  # workers, or the cluster's CPUs
    for options, refs, handle in fake.actors:
        assert options["num_cpus"] == 1
        assert [r.value for r in refs] == [plan] and handle.instance.plan is plan
    evaluated = [handle.evaluated for _, _, handle in fake.actors]
    assert evaluated[0] == []  # never started: given nothing
    assert sorted(sum(evaluated, [])) == sorted(os.path.basename(f) for f in files)
    assert threads == [1] * len(files)  # each actor's one CPU
    # no module global keeps the plan (the old per-worker cache did)
    held = [
        name
        for name, value in vars(sweeps).items()
        if value is plan
        or isinstance(value, dict)
        and any(v is plan for v in value.values())
        or isinstance(value, (list, tuple))
        and any(v is plan for v in value)
    ]
    assert held == []
    assert fake.killed == [handle for _, _, handle in fake.actors]
    assert fake.inits == [{"address": None, "log_to_driver": False, "include_dashboard": False}]
    assert not fake.initialized


# --------------------------------------------------------------------------- resume


def test_resume_computes_only_what_is_missing(ckpts, tmp_path, monkeypatch):
    _, paths, expected = ckpts
    full = tmp_path / "full.csv"
    sweep(tiny_cnn(), paths, INPUT, output=full)

    # An interrupted run: two checkpoints finished, the third cut off mid-write.
    part = tmp_path / "part.csv"
    sweep(tiny_cnn(), [paths[0], paths[2], paths[3]], INPUT, output=part)
    text = part.read_text()
    part.write_text(text[: text.rindex("epoch=9-step=90,layer") + 30])

    import foresight_sparse.sweeps as sweeps

    calls = []
    real = sweeps._load  # every backend reads a checkpoint through it

    def counting(p, path, key, trust_pickle):
        calls.append(os.path.basename(path))
        return real(p, path, key, trust_pickle)

    monkeypatch.setattr(sweeps, "_load", counting)
    res = sweep(tiny_cnn(), paths, INPUT, output=part, resume=True)
    assert sorted(calls) == ["epoch=10-step=100.pth", "epoch=9-step=90.ckpt"]
    assert res.resumed == ["epoch=0-step=0", "epoch=2-step=20"]
    assert part.read_bytes() == full.read_bytes()
    assert_matches(res.history, expected)

    calls.clear()  # everything is there now: nothing to compute
    again = sweep(tiny_cnn(), paths, INPUT, output=part, resume=True)
    assert calls == [] and again.history == res.history


def test_resume_retries_errors_and_refuses_other_settings(ckpts, tmp_path):
    _, paths, _ = ckpts
    out = tmp_path / "ei.csv"
    broken = tmp_path / "epoch=99.pt"
    broken.write_bytes(b"not a checkpoint")
    first = sweep(tiny_cnn(), [paths[0], broken], INPUT, output=out)
    assert [r.label for r in first.errors] == ["epoch=99"]
    torch.save(torch.load(paths[0], weights_only=True), broken)  # the file is fixed
    res = sweep(tiny_cnn(), [paths[0], broken], INPUT, output=out, resume=True)
    assert res.ok and res.resumed == ["epoch=2-step=20"]
    with pytest.raises(HistoryFileError, match="norm"):
        sweep(tiny_cnn(), [paths[0]], INPUT, output=out, resume=True, norm="soft")


# --------------------------------------------------------------------------- command line


def _cli(capsys, *argv):
    from foresight_sparse.cli import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_sweep_writes_csv_and_fails_on_an_error_row(ckpts, bad, tmp_path, capsys):
    _, paths, expected = ckpts
    out = tmp_path / "ei.csv"
    rc, stdout, stderr = _cli(
        capsys,
        "sweep",
        "test_sweeps:tiny_cnn",
        *paths,
        bad["step=5"],
        "--input-shape",
        "1,3,16,16",
        "--csv",
        str(out),
        "--json",
        str(tmp_path / "ei.json"),
        "--no-progress",
    )
    assert rc == 1
    assert "step=5" in stderr and "cannot read" in stderr and "1 of 5 checkpoints" in stderr
    hist = History.from_csv(out)
    assert hist.labels == [*ORDER, "step=5"]
    assert_matches(hist, expected)
    assert hist.meta["model"] == "test_sweeps:tiny_cnn"
    assert History.from_json(tmp_path / "ei.json") == hist
    for label, ref in expected.items():  # one printed line per checkpoint, with its EI
        line = next(ln for ln in stdout.splitlines() if ln.startswith(label + " "))
        assert f"{ref.ei:.6f}" in line


def test_cli_sweep_resume_and_status_0(ckpts, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _, paths, _ = ckpts
    out = tmp_path / "ei.csv"
    args = [
        "sweep",
        "test_sweeps:tiny_cnn",
        *paths,
        "--input-shape",
        "1,3,16,16",
        "--csv",
        str(out),
        "--no-progress",
    ]
    assert _cli(capsys, *args)[0] == 0
    full = out.read_bytes()
    text = out.read_text()
    out.write_text(text[: text.index("epoch=9-step=90,network")])  # the last two missing
    rc, stdout, _ = _cli(
        capsys,
        *args,
        "--resume",
        "--plot",
        str(tmp_path / "ei.png"),
        "--plane-plot",
        str(tmp_path / "plane.png"),
    )
    assert rc == 0 and out.read_bytes() == full
    assert (tmp_path / "plane.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        _cli(
            capsys,
            "sweep",
            "test_sweeps:tiny_cnn",
            *paths,
            "--input-shape",
            "1,3,16,16",
            "--resume",
        )[0]
        == 2
    )
