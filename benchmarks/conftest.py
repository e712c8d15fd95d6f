"""Shared fixtures of the benchmark suite (pytest-benchmark).

Run the full suite with
``python -m pytest benchmarks --benchmark-enable --benchmark-json=bench.json`` and regenerate
``docs/benchmarks.md`` with ``python benchmarks/make_table.py bench.json``. Without
``--benchmark-enable`` (pyproject.toml passes ``--benchmark-disable``) it is a quick smoke
run, part of the test suite: each function once, ImageNet networks at 32x32.
"""

from __future__ import annotations

import os
import platform
import time

import pytest
import torch


@pytest.fixture
def smoke(request) -> bool:
    """True under ``--benchmark-disable``: run each case once, at small sizes."""
    opt = request.config.getoption
    return bool(opt("benchmark_disable")) and not bool(opt("benchmark_enable"))


@pytest.fixture
def peak_rss():
    """Reset the process's peak resident set, then read it (bytes) when called."""

    def reset():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:  # pragma: no cover - not Linux
            pass

    def read() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0  # pragma: no cover

    reset()
    return read


def machine() -> dict:
    """Where a figure came from: CPU model, cores, torch version, and the GPU if used."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def median_time(fn, repeat: int = 5) -> float:
    """Median wall time of ``fn()`` over ``repeat`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def best_time(fn, repeat: int = 5) -> float:
    """Shortest wall time of ``fn()`` over ``repeat`` calls, after one warm-up call: on a
    machine that other jobs share, the least disturbed run."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
