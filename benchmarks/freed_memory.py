"""Page faults and load time of a sweep's checkpoints with and without glibc keeping freed
memory (a measurement script, not collected by pytest; Linux only):

``python -m benchmarks.freed_memory [ROUNDS]`` runs two fresh processes, one that calls
``foresight_sparse.sweeps._keep_freed_memory()`` first (as every sweep worker and the
``sweep`` command do) and one with glibc's default allocator. Each allocates and frees a
checkpoint's worth of tensors ``ROUNDS`` times (default 8: two of 40 MiB, which glibc always
maps afresh by default, and four of 4 MiB) and prints, per round, the minor page faults
(``getrusage``'s ``ru_minflt``) and the seconds the allocation took.

What it shows (and what the test suite no longer asserts, since it is the C library's
behaviour, not this package's): with the setting kept, the rounds after the heap settles
(the third on) fault at most a few thousand times; with the default allocator every round
touches every page afresh, about 20,480 faults for 80 MiB of 4 KiB pages (unless the
kernel backs the blocks with huge pages). A sweep's load of each checkpoint pays those
faults; see ``_keep_freed_memory``'s docstring for the figures on a ResNet-18 sweep.
"""

from __future__ import annotations

import statistics
import subprocess
import sys

CHILD = """
import resource, sys, time, torch
from foresight_sparse.sweeps import _keep_freed_memory
kept = _keep_freed_memory() if sys.argv[1] == "keep" else None
print("kept", kept)
for _ in range(int(sys.argv[2])):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    blocks = [torch.ones(10 << 20) for _ in range(2)] + [torch.ones(1 << 20) for _ in range(4)]
    seconds = time.perf_counter() - t0
    del blocks
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, seconds)
"""


def measure(mode: str, rounds: int) -> tuple[str, list[int], list[float]]:
    """(what ``_keep_freed_memory`` returned, faults per round, seconds per round) of a
    fresh process in ``mode`` ('keep' or 'default')."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(rounds)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    kept = out[0].split()[1]
    rows = [line.split() for line in out[1:]]
    return kept, [int(f) for f, _ in rows], [float(s) for _, s in rows]


def main(argv: list[str]) -> None:
    if not sys.platform.startswith("linux"):
        sys.exit("glibc's allocator: Linux only")
    rounds = int(argv[0]) if argv else 8
    kept, faults_kept, secs_kept = measure("keep", rounds)
    if kept != "True":
        sys.exit("this C library has no mallopt (not glibc): nothing to measure")
    _, faults_default, secs_default = measure("default", rounds)
    print("| round | faults, kept | faults, default | ms, kept | ms, default |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for i in range(rounds):
        print(
            f"| {i} | {faults_kept[i]} | {faults_default[i]} | "
            f"{secs_kept[i] * 1e3:.1f} | {secs_default[i] * 1e3:.1f} |"
        )
    settled = slice(2, None)  # the heap's layout settles over the first two rounds
    print(
        f"\nfrom round 2 on: at most {max(faults_kept[settled])} faults a round kept, "
        f"{min(faults_default[settled])} at least by default; median "
        f"{statistics.median(secs_kept[settled]) * 1e3:.1f} ms against "
        f"{statistics.median(secs_default[settled]) * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
