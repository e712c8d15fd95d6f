"""EI of many checkpoints of one architecture: :func:`sweep`, through an :class:`Executor`:
serially (:class:`SerialExecutor`), in worker processes (:class:`ProcessExecutor`) or on a
Ray cluster (:class:`RayExecutor`); a subclass of :class:`Executor` plugs in another.

The architecture is planned once, in the calling process. Each worker (a process of the
pool, or a Ray actor) receives the plan once and then only checkpoint paths; it reads each
checkpoint file once, with :func:`foresight_sparse.checkpoints.load_state_dict` (so state
dicts and Lightning ``.ckpt`` files load with ``weights_only=True``, and a whole pickled
module only with ``trust_pickle=True``), fits it to the model with
:func:`~foresight_sparse.checkpoints.fit_state_dict` and evaluates it with
:meth:`Plan.report <foresight_sparse.plans.Plan.report>` (:meth:`Executor.evaluate`). A
checkpoint that cannot be read, does not fit, or holds non-finite weights becomes an error
record; the others go on.

Labels, steps and epochs come from the file names (:func:`checkpoint_entries`): the label
is the file name without its extension, and the checkpoints are sorted naturally
(``epoch=9`` before ``epoch=10``). These patterns are recognised, case-insensitively,
anywhere in the name, with ``=``, ``_``, ``-`` or nothing between word and number:

- an epoch: ``epoch=3``, ``epoch_3``, ``epoch-3``, ``epoch3``;
- a step: ``step=1200``, ``global_step=1200``, ``iter_500``, ``iteration-500``,
  ``ckpt-500``, ``checkpoint_500``;
- a name that is only a number (``1200.pt``) is a step.

Lightning's ``epoch=3-step=1200.ckpt`` gives epoch 3 and step 1200.
"""

from __future__ import annotations

import abc
import logging
import os
import pickle
import re
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .checkpoints import fit_state_dict, load_state_dict
from .exceptions import (
    CheckpointError,
    ForesightError,
    HistoryFileError,
    MissingDependencyError,
    Opt,
    OptionError,
    UnknownNameError,
    warn_caller,
)
from .history import CSVAppender, History, Record, records_from_report
from .norms import lin_norm
from .plans import Plan, plan
from .results import Report

__all__ = [
    "Checkpoint",
    "SweepResult",
    "sweep",
    "Executor",
    "SerialExecutor",
    "ProcessExecutor",
    "RayExecutor",
    "EXECUTORS",
    "checkpoint_entries",
    "natural_key",
    "RAY_HINT",
]

log = logging.getLogger("foresight_sparse")

#: The executors :func:`sweep` knows by name (``executor='serial'``, ...).
EXECUTORS = ("serial", "process", "ray")

#: How to install what the Ray executor needs.
RAY_HINT = "pip install 'foresight-sparse[ray]'"

#: Extensions of checkpoint files, tried when ``checkpoints`` is a folder.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".pkl", ".tar")
_EPOCH_RE = re.compile(r"(?<![a-z])epoch[=_-]?(\d+)", re.IGNORECASE)
_STEP_RE = re.compile(
    r"(?<![a-z])(?:global_step|step|iteration|iter|ckpt|checkpoint)[=_-]?(\d+)", re.IGNORECASE
)
_NUMBER_RE = re.compile(r"\d+")


def natural_key(text: str) -> list:
    """Sort key that orders the numbers in ``text`` by value: ``epoch=9`` before
    ``epoch=10``."""
    parts = re.split(r"(\d+)", text)
    return [(0, int(p), "") if p.isdigit() else (1, 0, p.lower()) for p in parts]


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file of a sweep, with what its name says.

    Attributes
    ----------
    path : str
        The file, as given.
    label : str
        Its name without the extension (with its folder, relative to the checkpoints'
        common folder, when two files share a name).
    step, epoch : int or None
        Parsed from the name (see the module's description).
    """

    path: str
    label: str
    step: int | None = None
    epoch: int | None = None


def _step_epoch(name: str) -> tuple[int | None, int | None]:
    epoch = _EPOCH_RE.search(name)
    step = _STEP_RE.search(name)
    if step is None and _NUMBER_RE.fullmatch(name):
        return int(name), None
    return (int(step.group(1)) if step else None), (int(epoch.group(1)) if epoch else None)


def _strip_suffix(name: str) -> str:
    stem, ext = os.path.splitext(name)
    return stem if ext else name


def checkpoint_entries(
    checkpoints: Iterable[str | os.PathLike] | str | os.PathLike,
) -> list[Checkpoint]:
    """The checkpoints of a sweep, labelled and sorted naturally.

    Parameters
    ----------
    checkpoints : path, or iterable of paths
        Checkpoint files; a folder stands for its files with a checkpoint extension
        (``.pt``, ``.pth``, ``.ckpt``, ``.bin``, ``.safetensors``, ``.pkl``, ``.tar``).

    Returns
    -------
    list of Checkpoint
        Sorted by label, numbers by value.

    Raises
    ------
    CheckpointError
        When a file is listed twice.
    """
    if isinstance(checkpoints, (str, os.PathLike)):
        checkpoints = [checkpoints]
    paths: list[str] = []
    for item in checkpoints:
        p = os.fspath(item)
        if os.path.isdir(p):
            paths += [
                os.path.join(p, f)
                for f in sorted(os.listdir(p))
                if f.lower().endswith(CHECKPOINT_SUFFIXES)
            ]
        else:
            paths.append(p)
    seen: set[str] = set()
    for p in paths:
        real = os.path.realpath(p)
        if real in seen:
            raise CheckpointError(f"checkpoint {p!r} is listed twice")
        seen.add(real)
    labels = [_strip_suffix(os.path.basename(p)) for p in paths]
    if len(set(labels)) < len(labels):  # same names in several folders: keep the folders
        base = os.path.commonpath([os.path.abspath(p) for p in paths])
        labels = [
            _strip_suffix(os.path.relpath(os.path.abspath(p), base)).replace(os.sep, "/")
            for p in paths
        ]
    entries = []
    for p, lab in zip(paths, labels):
        step, epoch = _step_epoch(_strip_suffix(os.path.basename(p)))
        entries.append(Checkpoint(p, lab, step, epoch))
    return sorted(entries, key=lambda e: natural_key(e.label))


@dataclass
class SweepResult:
    """What :func:`sweep` returns.

    Attributes
    ----------
    history : History
        A network record and one record per layer for every checkpoint, an error record for
        each that failed; grouped by checkpoint in sorted order (resumed ones included).
    checkpoints : list of Checkpoint
        Every checkpoint of the sweep, sorted.
    resumed : list of str
        Labels read back from the output instead of computed (``resume=True``).
    seconds : float
        Wall time of the sweep.
    """

    history: History
    checkpoints: list[Checkpoint] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def errors(self) -> list[Record]:
        """The error records: one per checkpoint that could not be evaluated."""
        return self.history.errors

    @property
    def ok(self) -> bool:
        """True when every checkpoint was evaluated."""
        return not self.errors


# --------------------------------------------------------------------------- one checkpoint

#: What makes a checkpoint an error record instead of stopping the sweep.
_CHECKPOINT_ERRORS = (ForesightError, RuntimeError, MemoryError, OSError)


def _why(exc: BaseException) -> str:
    """One line saying why a checkpoint has no report."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {text}"


def _load(p: Plan, path: str, key: str | None, trust_pickle: bool) -> dict | str:
    """The state dict of one checkpoint, fitted to the plan's model, or why there is none."""
    try:
        state = load_state_dict(path, key=key, trust_pickle=trust_pickle)
        return fit_state_dict(state, p.model, source=path)
    except _CHECKPOINT_ERRORS as exc:
        return _why(exc)


def _compute(p: Plan, state: dict | str) -> Report | str:
    """The report of a loaded state dict, or why there is none (passed on from ``_load``)."""
    if isinstance(state, str):
        return state
    try:
        with torch.no_grad():
            return p.report(state)
    except _CHECKPOINT_ERRORS as exc:
        return _why(exc)


def _evaluate(p: Plan, path: str, key: str | None, trust_pickle: bool) -> Report | str:
    """The report of one checkpoint, or why there is none (one line)."""
    return _compute(p, _load(p, path, key, trust_pickle))


def _warm_file(path: str, buf: bytearray) -> None:
    """Read ``path`` through ``buf`` and drop the bytes: afterwards the file is in the page
    cache. Only I/O (the GIL is released while it waits); errors are left for the load."""
    try:
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    except OSError:
        pass


def _read_ahead(p: Plan, todo: Sequence[Checkpoint], key, trust_pickle) -> Iterator[tuple]:
    """Each checkpoint with its state dict (or why there is none), loaded in the calling
    thread while a thread reads the next file into the page cache.

    A sweep usually reads files that are not in the page cache (written long before, or on
    a network file system): the thread hides the wait for the disk. It only reads, through
    one reused 1 MiB buffer, so it takes almost no CPU from the evaluation when the files
    are cached; an earlier reader that ran the whole ``torch.load`` in the thread competed
    with torch's and numba's threads for the cores. 24 ResNet-18 checkpoints on the 2-core
    machine, 3 sweeps each (``docs/benchmarks.md``): cached 2.24-2.26 s against 2.20-2.36 s
    with the old reader and 2.10-2.34 s with none; evicted from the cache 2.23-2.33 s
    against 2.48-2.61 s and 2.73-2.83 s.
    """
    from concurrent.futures import ThreadPoolExecutor

    if not todo:
        return
    buf = bytearray(1 << 20)
    with ThreadPoolExecutor(1, thread_name_prefix="foresight-sparse-reader") as reader:
        ahead = reader.submit(_warm_file, todo[0].path, buf)
        for i, entry in enumerate(todo):
            ahead.result()
            if i + 1 < len(todo):
                ahead = reader.submit(_warm_file, todo[i + 1].path, buf)
            yield entry, _load(p, entry.path, key, trust_pickle)


#: Whether the calling process evaluates checkpoints while a forkserver pool starts (the
#: tests turn it off to send every checkpoint through the workers).
_HELP_WHILE_STARTING = True


# A worker process keeps the plan it was started with (the pool's initializer sets it).
_WORKER_PLAN: Plan | None = None


def _set_threads(threads: int) -> None:
    """Use ``threads`` threads for numba's kernels and torch's ops in this process.

    numba first: starting its threading layer in a forked child resets the OpenMP thread
    count torch reads (seen here: torch went back from 1 to 2 threads), so torch is set
    after it.
    """
    import numba

    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel work
        pass


def _keep_freed_memory() -> bool:
    """Let this process's C allocator keep the memory it frees instead of handing it back
    to the system; True where it could (glibc; other C libraries lack ``mallopt`` or
    ignore these settings, returning 0).

    Each checkpoint's tensors are new allocations of the checkpoint's size, freed after
    its report. glibc hands such blocks back to the system (``mmap`` for large blocks,
    trimming the heap top), so every checkpoint's load touches fresh pages: one page fault
    per 4 KiB, about 11,000 for a ResNet-18 checkpoint (a virtual machine's faults are
    slow: a worker's load took 40-57 ms on the 2-core VM). With every block taken from the
    heap (no ``mmap``) and the heap never trimmed, the next checkpoint reuses the same
    memory: the load fell to 25-33 ms, with no faults after the second (measured with
    blocks up to 32 MiB kept, which covers every ResNet-18 tensor). The process keeps the
    most memory it ever held until it exits.

    Process-wide and permanent (glibc has no way back to its adaptive thresholds), so the
    library calls it only in processes it owns: sweep workers and the ``sweep`` command.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # a C library without mallopt
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    # no block is mmap-ed (so none is unmapped when freed); a trim threshold of -1 turns
    # trimming off
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))


def _init_worker(plan_or_bytes: Plan | bytes, threads: int) -> None:
    """Process-pool initializer: share the cores between the workers, keep freed memory
    for the next checkpoint, keep the plan (a forked worker inherits it; others unpickle
    it, once)."""
    global _WORKER_PLAN
    _set_threads(threads)
    _keep_freed_memory()
    if isinstance(plan_or_bytes, bytes):
        plan_or_bytes = pickle.loads(plan_or_bytes)
    _WORKER_PLAN = plan_or_bytes


def _worker_ready() -> bool:
    return _WORKER_PLAN is not None


def _process_task(path: str, key: str | None, trust_pickle: bool) -> Report | str:
    assert _WORKER_PLAN is not None, "worker started without a plan"
    return _evaluate(_WORKER_PLAN, path, key, trust_pickle)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _worker_modules(model: nn.Module) -> list[str]:
    """Modules a worker imports to unpickle the plan and evaluate checkpoints (the server
    skips a name it cannot import)."""
    names = [
        __name__,
        "scipy.sparse",
        "foresight_sparse._numba",
        "foresight_sparse._entropy_kernels",
        "foresight_sparse.connectivity._fill_kernels",
        "foresight_sparse.engines",
        "foresight_sparse.engines._block_kernels",
        "foresight_sparse.engines._conv_kernels",
        "foresight_sparse.engines._dense_kernels",
    ]
    for mod in model.modules():
        owner = type(mod).__module__
        if owner != "__main__" and owner not in names:  # __main__ is prepared separately
            names.append(owner)
    return names


def _start_method(threads: int) -> str:
    """How to start the workers: ``fork`` where it is safe, else ``forkserver``.

    A forked worker starts at once, with torch, numba and the plan already in memory; a
    forkserver must first import them (seconds). Fork is safe here only when no thread
    pool of this process is used in the child:

    - torch's OpenMP (GNU libgomp) pool hangs a child that opens a parallel region with
      more than one thread after the parent has used it, so each worker must run torch on
      one thread (as PyTorch's DataLoader workers do);
    - numba's threading layer does not survive a fork once started (the ``omp`` layer
      terminates a child that runs a parallel kernel, ``workqueue`` frees its queues in
      the child); a worker on one thread runs every kernel's serial twin
      (:func:`foresight_sparse._numba._launch`), which opens no parallel region, so it
      never touches the layer, whether or not this process started it;
    - CUDA cannot be used in a forked child once this process has initialised it.

    Linux only: on macOS system libraries are not fork-safe either (Python spawns there).
    """
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    if sys.platform.startswith("linux") and threads == 1 and not torch.cuda.is_initialized():
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


def _feed(pool, queue: deque, key, trust_pickle, workers: int, started) -> Iterator[tuple]:
    """Hand the checkpoints in ``queue`` to a started pool, two per worker at a time (each
    worker has the next one ready), yield each as it finishes, then shut the pool down."""
    pending: dict[Any, Checkpoint] = {}
    try:
        for fut in started:
            fut.result()  # raises if a worker could not start
        while queue or pending:
            while queue and len(pending) < 2 * workers:
                entry = queue.popleft()
                pending[pool.submit(_process_task, entry.path, key, trust_pickle)] = entry
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                entry = pending.pop(fut)
                yield entry, fut.result()
    finally:
        pool.shutdown(wait=not pending, cancel_futures=True)


def _stop_pool(pool, starter: threading.Thread) -> None:
    if starter.ident is not None:
        starter.join()
    pool.shutdown(wait=True, cancel_futures=True)


def _start_pool(pool, workers: int, starting: list, failure: list) -> None:
    try:
        for _ in range(workers):
            starting.append(pool.submit(_worker_ready))
    except BaseException as exc:  # re-raised by the sweep's own thread
        failure.append(exc)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MissingDependencyError(Opt("executor", "ray"), f" needs Ray: {RAY_HINT}") from None
    return ray


class _RayWorker:
    """A Ray actor holding the plan: Ray resolves the object reference given to it once,
    when the actor starts, so each actor fetches and unpickles the plan once and then
    receives only checkpoint paths."""

    def __init__(self, p: Plan):
        import ray

        # Ray sets OMP_NUM_THREADS to the actor's CPUs, which torch follows, but numba
        # starts one thread per core of the machine: give both the actor's share.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        self.threads = max(1, int(cpus))
        self.plan = p

    def ready(self) -> bool:
        return True

    def evaluate(self, path: str, key: str | None, trust_pickle: bool) -> Report | str:
        # each call: numba's thread count belongs to the thread that sets it
        _set_threads(self.threads)
        return _evaluate(self.plan, path, key, trust_pickle)


def _check_workers(workers) -> int | None:
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise OptionError(Opt("workers"), f"={workers!r} must be a positive int")
    return workers


# --------------------------------------------------------------------------- executors


class Executor(abc.ABC):
    """How :func:`sweep` evaluates its checkpoints: subclass it and implement :meth:`run`
    to plug in another (a Dask cluster, a job queue).

    Attributes
    ----------
    name : str
        A short name for messages (``'serial'``, ``'process'``, ``'ray'``).
    """

    name = "custom"

    @abc.abstractmethod
    def run(
        self,
        plan: Plan,
        checkpoints: Sequence[Checkpoint],
        *,
        key: str | None = None,
        trust_pickle: bool = False,
    ) -> Iterator[tuple[Checkpoint, Report | str]]:
        """Evaluate ``checkpoints`` with ``plan``, yielding each as it finishes.

        Parameters
        ----------
        plan : Plan
            The architecture's plan, made once by :func:`sweep`; a worker elsewhere needs
            it once (it pickles), then only the checkpoint paths.
        checkpoints : sequence of Checkpoint
            What is left to do, sorted (resumed ones are not included); never empty.
        key, trust_pickle
            As for :func:`sweep`: pass them on to :meth:`evaluate`.

        Yields
        ------
        (Checkpoint, Report or str)
            Each checkpoint once, in the order they finish, with its report or the one
            line saying why it has none (what :meth:`evaluate` returns). The sweep writes
            each to its output as it comes, and closes the iterator if it stops early.
        """

    @staticmethod
    def evaluate(
        plan: Plan, path: str, *, key: str | None = None, trust_pickle: bool = False
    ) -> Report | str:
        """The report of one checkpoint file, or why there is none: what a worker runs.

        Reads the file (:func:`~foresight_sparse.checkpoints.load_state_dict`), fits it
        to the plan's model and evaluates it under ``torch.no_grad()``. A file that cannot
        be read, does not fit or holds non-finite weights gives one line saying why (the
        sweep's error record) instead of an exception.
        """
        return _evaluate(plan, path, key, trust_pickle)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class SerialExecutor(Executor):
    """Every checkpoint in the calling process, one at a time, in order; a thread reads
    the next file into the page cache meanwhile."""

    name = "serial"

    def run(self, plan, checkpoints, *, key=None, trust_pickle=False):
        for entry, state in _read_ahead(plan, checkpoints, key, trust_pickle):
            yield entry, _compute(plan, state)


class ProcessExecutor(Executor):
    """A pool of worker processes on this machine, the cores shared between them.

    On Linux the workers are forked when that is safe (each on one thread, CUDA not
    initialised here), else started with forkserver or spawn while the calling process
    evaluates the first checkpoints itself. Each worker keeps the plan, and the memory one
    checkpoint frees for the next, and has its next checkpoint queued.

    Parameters
    ----------
    workers : int, optional
        The number of processes (at most one per checkpoint); default one per core.
    """

    name = "process"

    def __init__(self, workers: int | None = None):
        self.workers = _check_workers(workers)

    def run(self, plan, checkpoints, *, key=None, trust_pickle=False):
        import multiprocessing

        p, todo = plan, list(checkpoints)
        if not todo:
            return
        workers = min(self.workers or _cores(), len(todo))
        threads = max(1, _cores() // workers)
        method = _start_method(threads)
        ctx = multiprocessing.get_context(method)
        log.debug("sweep: %d %s workers, %d threads each", workers, method, threads)
        if method == "fork":
            # The workers inherit the plan: nothing to pickle, and they start in
            # milliseconds, here in this thread, while no parallel region of this process
            # is running.
            pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(p, threads),
            )
            try:
                with warnings.catch_warnings():
                    # Python 3.12+ warns about forking a process with threads; the ones
                    # here are torch's idle OpenMP workers, which the checks above make safe.
                    warnings.filterwarnings("ignore", ".*fork", DeprecationWarning)
                    started = [pool.submit(_worker_ready) for _ in range(workers)]
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            yield from _feed(pool, deque(todo), key, trust_pickle, workers, started)
            return
        if method == "forkserver":
            # The server imports what a worker needs once (torch, numba, scipy, the
            # engines, the model's module: seconds), so each child starts by a fork
            # instead of importing them again.
            ctx.set_forkserver_preload(_worker_modules(p.model))
        plan_bytes = pickle.dumps(p, protocol=pickle.HIGHEST_PROTOCOL)  # pickled once
        pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(plan_bytes, threads),
        )
        queue = deque(todo)
        starting: list = []
        failure: list[BaseException] = []
        # The first submission blocks until the server has imported torch and numba and
        # forked the workers (seconds), so a thread makes it: an empty task per worker,
        # which starts the pool without committing a checkpoint to it.
        starter = threading.Thread(
            target=_start_pool,
            args=(pool, workers, starting, failure),
            name="foresight-sparse-pool-start",
        )
        handed_over = False
        try:
            starter.start()
            # Meanwhile this process evaluates checkpoints itself, so a pool never makes a
            # short sweep slower than a serial one.
            while (
                _HELP_WHILE_STARTING
                and queue
                and (starter.is_alive() or not any(f.done() for f in starting))
                and not failure
            ):
                entry = queue.popleft()
                yield entry, _evaluate(p, entry.path, key, trust_pickle)
            if queue:
                starter.join()
                if failure:
                    raise failure[0]
                handed_over = True
                yield from _feed(pool, queue, key, trust_pickle, workers, starting)
        finally:
            if not handed_over:
                # Nothing was left for the pool, an error, or the sweep stopped early:
                # rather than wait for the pool to finish starting, stop it from a thread
                # once it has (not a daemon thread, so a program ending now still closes
                # the workers cleanly).
                threading.Thread(
                    target=_stop_pool, args=(pool, starter), name="foresight-sparse-pool-stop"
                ).start()


class RayExecutor(Executor):
    """Ray actors on a cluster, or on a local Ray, each evaluating one checkpoint at a time.

    The plan goes into the object store once (``ray.put``); each actor fetches it once,
    when it starts, and then receives only checkpoint paths, so they must be readable
    where the actors run. An actor gets a checkpoint once it has started and each time it
    finishes one; one still waiting for a CPU gets none. A Ray already initialised in the
    calling process is used as it is; otherwise the executor connects to ``address`` (or
    starts a local Ray) and shuts down what it started.

    Parameters
    ----------
    workers : int, optional
        The number of actors (one CPU each; at most one per checkpoint); default as many
        as the cluster has CPUs when the sweep starts.
    address : str, optional
        The cluster to connect to (``"auto"``, ``"ray://host:10001"``, ...).

    Raises
    ------
    MissingDependencyError
        When Ray is not installed (``pip install 'foresight-sparse[ray]'``).
    """

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None):
        self.workers = _check_workers(workers)
        self.address = address
        _import_ray()  # fail before planning

    def run(self, plan, checkpoints, *, key=None, trust_pickle=False):
        ray = _import_ray()
        todo = deque(checkpoints)
        if not todo:
            return
        started = False
        if not ray.is_initialized():
            # A local Ray needs no dashboard; a cluster's own settings are left alone.
            extra = {"include_dashboard": False} if self.address is None else {}
            ray.init(address=self.address, log_to_driver=False, **extra)
            started = True
        actors: list = []
        try:
            plan_ref = ray.put(plan)  # the object store holds the plan once
            worker = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(_RayWorker)
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
            actors = [worker.remote(plan_ref) for _ in range(min(self.workers or cpus, len(todo)))]
            calls = {actor.ready.remote(): (actor, None) for actor in actors}
            busy = 0
            while todo or busy:
                (ref,), _ = ray.wait(list(calls), num_returns=1)
                actor, entry = calls.pop(ref)
                result = ray.get(ref)
                if entry is not None:
                    busy -= 1
                    yield entry, result
                if todo:  # the actor is free: give it the next checkpoint
                    entry = todo.popleft()
                    calls[actor.evaluate.remote(entry.path, key, trust_pickle)] = (actor, entry)
                    busy += 1
        finally:
            for actor in actors:
                ray.kill(actor)
            if started:
                ray.shutdown()


# --------------------------------------------------------------------------- choosing one


def __getattr__(name: str):
    if name == "BACKENDS":  # the old name of EXECUTORS, kept while backend= is
        warn_caller("foresight_sparse.sweeps.BACKENDS is now EXECUTORS", category=FutureWarning)
        return EXECUTORS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _from_backend(backend, executor) -> tuple[Any, Any]:
    """``(numeric backend, executor)`` from sweep's ``backend=`` and ``executor=``: the one
    place ``backend=`` is read. It names the numeric forms, as for :func:`plan`; its old
    meaning, an executor name (``'serial'``, ``'process'``, ``'ray'``), still selects the
    executor, with a FutureWarning, and leaves the numeric backend at ``'auto'``."""
    if not (isinstance(backend, str) and backend in EXECUTORS):
        return backend, executor
    if executor is not None:
        raise OptionError(
            Opt("backend", backend),
            " and ",
            Opt("executor", executor),
            " both given; give only ",
            Opt("executor", backend),
        )
    warn_caller(
        "sweep's ",
        Opt("backend", backend),
        " is deprecated and will be removed: use ",
        Opt("executor", backend),
        " (",
        Opt("backend", metavar=""),
        " names the numeric forms now, as for plan())",
        category=FutureWarning,
    )
    return "auto", backend


def _executor(executor, workers, ray_address) -> Executor:
    """The executor for ``executor=`` (a name, an :class:`Executor` or None), configured
    with ``workers`` and ``ray_address``; contradictions refused."""
    _check_workers(workers)
    if isinstance(executor, Executor):
        for name, value in (("workers", workers), ("ray_address", ray_address)):
            if value is not None:
                raise OptionError(
                    Opt(name, value),
                    f" is for a named executor; configure the {type(executor).__name__} given as ",
                    Opt("executor", metavar=""),
                    " instead",
                )
        return executor
    if executor is None:
        executor = "process" if workers is not None and workers > 1 else "serial"
    elif not isinstance(executor, str):
        raise OptionError(
            Opt("executor", executor),
            ": give an Executor or ",
            Opt("executor", *EXECUTORS),
        )
    if executor not in EXECUTORS:
        raise UnknownNameError(
            f"unknown executor {executor!r}; the executors are ", Opt("executor", *EXECUTORS)
        )
    if ray_address is not None and executor != "ray":
        raise OptionError(
            Opt("ray_address", ray_address),
            " needs ",
            Opt("executor", "ray"),
            ", not ",
            Opt("executor", executor),
        )
    if executor == "serial":
        if workers not in (None, 1):
            raise OptionError(
                Opt("workers", workers),
                " needs ",
                Opt("executor", "process", "ray"),
                "; the serial executor evaluates one checkpoint at a time",
            )
        return SerialExecutor()
    if executor == "process":
        return ProcessExecutor(workers)
    return RayExecutor(workers, ray_address)


# --------------------------------------------------------------------------- the sink


class _Sink:
    """Where a sweep's results go as they come: the history, the CSV ``output`` (appended
    to), the progress bar and the log (a warning per failed checkpoint)."""

    def __init__(self, history: History, columns, output: str | None, total: int, progress):
        self.history = history
        self.writer = self.bar = None
        if output is not None:
            # what is kept, in order; then the new results are appended
            history.to_csv(output, columns=columns)
            self.writer = CSVAppender(output, history.meta, columns=columns)
        if progress:
            from tqdm.auto import tqdm

            initial = len(history.labels)
            self.bar = tqdm(total=total, initial=initial, desc="sweep", unit="ckpt")

    def add(self, entry: Checkpoint, result: Report | str) -> None:
        """Record one checkpoint's report, or its error record when ``result`` says why
        there is none."""
        if isinstance(result, Report):
            recs = records_from_report(
                result, entry.label, step=entry.step, epoch=entry.epoch, file=entry.path
            )
        else:
            log.warning("checkpoint %s: %s", entry.path, result)
            recs = [
                Record(
                    entry.label,
                    "error",
                    step=entry.step,
                    epoch=entry.epoch,
                    file=entry.path,
                    error=result,
                )
            ]
        self.history.extend(recs)
        if self.writer is not None:
            self.writer.write(recs)
        if self.bar is not None:
            self.bar.update(1)

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- resuming


def _resume(
    output: str, meta: dict[str, Any], entries: Sequence[Checkpoint], n_layers: int
) -> History:
    """The finished checkpoints recorded in ``output`` (error records are dropped: those
    checkpoints are tried again)."""
    old = History.from_csv(output)
    for k in (
        "measure",
        "convention",
        "settings",
        "norm",
        "legacy",
        "layers",
        "input_shape",
        "model",
    ):
        if k in old.meta and k in meta and old.meta[k] != meta[k]:
            raise HistoryFileError(
                f"{output!r} was made with ",
                Opt(k, old.meta[k]),
                ", but this sweep has ",
                Opt(k, meta[k]),
                "; resume with the same settings, or write to a new file",
            )
    wanted = {e.label for e in entries}
    by_label: dict[str, list[Record]] = {}
    for rec in old.records:
        if rec.label in wanted and rec.kind != "error":
            by_label.setdefault(rec.label, []).append(rec)
    kept = History(meta=old.meta)
    for recs in by_label.values():
        # Complete: the network totals and every layer, each once.
        if (
            sum(r.kind == "network" for r in recs) == 1
            and sum(r.kind == "layer" for r in recs) == n_layers
        ):
            kept.extend(recs)
    return kept


# --------------------------------------------------------------------------- the sweep


def sweep(
    model: nn.Module,
    checkpoints,
    input=None,
    *,
    executor: str | Executor | None = None,
    workers: int | None = None,
    backend: str = "auto",
    norm=lin_norm,
    device="cpu",
    engine: str = "auto",
    legacy: bool = False,
    max_memory=None,
    shapes=None,
    key: str | None = None,
    trust_pickle: bool = False,
    output: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = False,
    ray_address: str | None = None,
    meta: dict[str, Any] | None = None,
    layers="seed",
    measure="ei",
    convention: str = "seed",
    skipped: str = "warn",
) -> SweepResult:
    """Determinism, degeneracy and EI of every checkpoint of one architecture.

    Parameters
    ----------
    model : torch.nn.Module
        The architecture; its own weights are not evaluated (nor modified).
    checkpoints : path or iterable of paths
        Checkpoint files (a folder stands for its checkpoint files): state dicts saved with
        ``torch.save``, training checkpoints, Lightning ``.ckpt``, ``.safetensors`` files,
        or with ``trust_pickle`` whole saved modules. Labels, steps and epochs come from
        the names (see the module's description).
    input : torch.Tensor, tuple or dict, optional
        An example input, as for :func:`foresight_sparse.plan` (or give ``shapes``).
    executor : {'serial', 'process', 'ray'} or Executor, optional
        Where the checkpoints are evaluated. ``'serial'`` (:class:`SerialExecutor`): in
        this process. ``'process'`` (:class:`ProcessExecutor`): a pool of ``workers``
        processes on this machine (started by fork where safe, else forkserver or spawn),
        the cores shared between them. ``'ray'`` (:class:`RayExecutor`): Ray actors on a
        cluster (``ray_address``, or a local Ray; an already initialised Ray is used as it
        is); the checkpoint paths must be readable where the actors run. An
        :class:`Executor` is used as it is (configure it yourself). Default:
        ``'process'`` when ``workers`` is more than 1, else ``'serial'``.
    workers : int, optional
        How many checkpoints are evaluated at once, for a named executor: the number of
        worker processes (default: one per core), or of Ray actors (default: one per CPU
        of the cluster). The serial executor takes only 1.
    backend : {'auto', 'numba', 'torch'}, default 'auto'
        The numeric forms, as for :func:`foresight_sparse.plan`. The old meaning,
        ``'serial'``, ``'process'`` or ``'ray'``, is deprecated (a FutureWarning) and
        selects the executor as ``executor=`` does.
    norm, device, engine, legacy, max_memory, shapes, layers, measure, convention, skipped
        As for :func:`foresight_sparse.plan`.
    key : str, optional
        The checkpoint key holding the state dict, when it is not a usual one.
    trust_pickle : bool, default False
        Allow checkpoints that hold pickled objects (a whole module). Unpickling runs code
        from the file: only for files you trust.
    output : str or os.PathLike, optional
        A CSV file the records of each checkpoint are appended to as it finishes; at the
        end it is rewritten with the checkpoints in sorted order. It is started anew unless
        ``resume`` is True.
    resume : bool, default False
        Keep the checkpoints already complete in ``output`` (matched by label) and compute
        only the others; error records in it are dropped and tried again. ``output`` must
        have been written with the same measure (and its settings), convention, norm,
        legacy and layers settings, input shape and model.
    progress : bool, default False
        A tqdm progress bar over the checkpoints (on stderr).
    ray_address : str, optional
        The Ray cluster to connect to (``"auto"``, ``"ray://host:10001"``, ...); with
        ``executor='ray'`` only.
    meta : dict, optional
        Extra JSON-ready metadata for the history and ``output`` (the command line records
        the model's name here).

    Returns
    -------
    SweepResult
        ``history`` (the same :class:`~foresight_sparse.history.History` a tracker
        keeps) and ``errors``.

    Raises
    ------
    UnknownNameError
        For an unknown executor, or a name unknown to the options of :func:`plan`.
    DeviceError, UnsupportedEngineError
        As for :func:`plan`.
    OptionError
        For contradicting options: ``workers`` other than 1 with the serial executor,
        ``ray_address`` without Ray, ``workers`` or ``ray_address`` with an
        :class:`Executor`, both ``backend`` and ``executor``; ``resume`` without ``output``.
    MissingDependencyError
        For ``executor='ray'`` without Ray installed (``pip install 'foresight-sparse[ray]'``).
    HistoryFileError
        When ``resume`` finds an ``output`` it cannot read or made with other settings.
    """
    start = time.perf_counter()
    backend, executor = _from_backend(backend, executor)
    runner = _executor(executor, workers, ray_address)
    if resume and output is None:
        raise OptionError(
            Opt("resume", True), " needs ", Opt("output"), ", the CSV file of the run to resume"
        )
    entries = checkpoint_entries(checkpoints)
    p = plan(
        model,
        input,
        shapes,
        norm,
        device,
        engine=engine,
        backend=backend,
        legacy=legacy,
        max_memory=max_memory,
        layers=layers,
        measure=measure,
        convention=convention,
        skipped=skipped,
    )
    in_shape = list(p.layers[0].in_shape) if p.layers else []
    info = {
        "model": type(model).__name__,
        "input_shape": in_shape,
        "engine": engine,
        "device": str(p.device),
        **p.settings.metadata(),
        **(meta or {}),
    }
    history = History(meta=info)
    out_path = os.fspath(output) if output is not None else None
    if resume and os.path.exists(out_path) and os.path.getsize(out_path) > 0:
        history.extend(_resume(out_path, info, entries, len(p.layers)).records)
    resumed = history.labels
    todo = [e for e in entries if e.label not in set(resumed)]
    with _Sink(history, p.columns, out_path, len(entries), progress) as sink:
        results = runner.run(p, todo, key=key, trust_pickle=trust_pickle) if todo else ()
        try:
            for entry, result in results:
                sink.add(entry, result)
        finally:  # an executor stopped early (an error here) shuts its workers down now
            getattr(results, "close", lambda: None)()
    history = history.sorted([e.label for e in entries])
    if out_path is not None:
        history.to_csv(out_path, columns=p.columns)
    return SweepResult(history, entries, resumed, time.perf_counter() - start)
