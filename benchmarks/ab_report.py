"""Interleaved A/B timing of ``Plan.report()`` between two checkouts of this repository (a
measurement script, not collected by pytest; needs torchvision):

``python -m benchmarks.ab_report --baseline /tmp/ab_base --rounds 5 --repeats 3``

A is the checkout at ``--baseline`` (make one with ``git worktree add /tmp/ab_base REV``),
B the checkout this script lives in (or ``--current DIR``). Each round, for each model, A
and B run one after the other, the order alternating every round, each in a fresh Python
process that puts its checkout's directory first on ``sys.path`` (and checks that
``foresight_sparse.__file__`` lies in it, so neither side loads the installed package).
A process builds the model (torchvision, random initialisation with ``--seed``, eval mode),
plans it on the CPU with the default settings (``foresight_sparse.plan(model,
torch.zeros(1, 3, 224, 224))``), runs one warm-up ``report()`` (numba compiles or loads its
cache there), then times ``--repeats`` calls of ``report()`` and as many forward passes of
the model (after one warm-up forward), and prints the medians.

The output is Markdown: per model the median over rounds of each side's median report time,
B/A, each side's report time over its forward pass, and the rounds; then the largest
relative difference between A's and B's determinism, degeneracy and EI (the same
architecture and weights must give the same numbers); then the machine, the torch version,
both checkouts' commits and the date.

Numba caches compiled kernels in ``__pycache__`` beside each kernel's source file, so two
checkouts in two directories keep separate caches (under ``NUMBA_CACHE_DIR`` too: numba
names each cache folder after a hash of the source file's full path); the script counts
each side's cache index files at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

MODELS = ("resnet50", "mobilenet_v3_small", "alexnet")
SHAPE = (1, 3, 224, 224)
MEASURES = ("determinism", "degeneracy", "ei")

#: The child process: argv = checkout, model, seed, repeats. Prints one JSON line last.
CHILD = """
import sys
checkout = sys.argv[1]
sys.path.insert(0, checkout)
import json, os, statistics, time, warnings
import torch, torchvision
import foresight_sparse as fs

if not os.path.abspath(fs.__file__).startswith(os.path.join(checkout, "")):
    raise SystemExit(f"loaded {fs.__file__}, not the checkout {checkout}")
name, seed, repeats = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(seed)
model = getattr(torchvision.models, name)(weights=None).eval()
x = torch.zeros(SHAPE)
warnings.simplefilter("ignore")  # skipped pools and norms: nothing to time
t0 = time.perf_counter()
p = fs.plan(model, x)
plan_s = time.perf_counter() - t0
t0 = time.perf_counter()
rep = p.report()
warmup_s = time.perf_counter() - t0
report_s = []
for _ in range(repeats):
    t0 = time.perf_counter()
    p.report()
    report_s.append(time.perf_counter() - t0)
forward_s = []
with torch.no_grad():
    model(x)
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        forward_s.append(time.perf_counter() - t0)
import numba
print(json.dumps({
    "file": fs.__file__,
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
    "numba_cache_dir": numba.config.CACHE_DIR,
    "plan_s": plan_s,
    "warmup_s": warmup_s,
    "report_s": report_s,
    "forward_s": forward_s,
    "determinism": rep.determinism,
    "degeneracy": rep.degeneracy,
    "ei": rep.ei,
}))
""".replace("SHAPE", repr(SHAPE))


def run_child(checkout: Path, model: str, seed: int, repeats: int, timeout: float) -> dict:
    """One fresh process timing ``model`` with the package of ``checkout``."""
    with tempfile.TemporaryDirectory() as cwd:  # nothing of either checkout on '' (cwd)
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(checkout), model, str(seed), str(repeats)],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if done.returncode != 0:
        raise RuntimeError(
            f"{model} with {checkout} failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit(checkout: Path) -> str:
    """The checkout's short commit, with '+changes' when tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(checkout), *args], capture_output=True, text=True
        ).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    return rev + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def numba_caches(checkout: Path) -> list[Path]:
    return sorted((checkout / "foresight_sparse").rglob("__pycache__/*.nbi"))


def rel_diff(a: float, b: float) -> float:
    return abs(b - a) / max(abs(a), 1e-300) if a != b else 0.0


def main(argv: list[str] | None = None) -> None:
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ab_report", description=__doc__)
    ap.add_argument("--baseline", type=Path, required=True, help="checkout A")
    ap.add_argument("--current", type=Path, default=here, help=f"checkout B (default {here})")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="timed report() calls per process")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision names")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    args = ap.parse_args(argv)
    sides = {"A": args.baseline.resolve(), "B": args.current.resolve()}
    for side, path in sides.items():
        if not (path / "foresight_sparse" / "__init__.py").is_file():
            ap.error(f"{side}: {path} is not a checkout of foresight-sparse")
    if sides["A"] == sides["B"]:
        ap.error("A and B are the same directory")
    models = [m for m in args.models.split(",") if m]

    load_before = os.getloadavg()[0]  # other work on the machine skews both sides
    results: dict[tuple[str, str], list[dict]] = {(m, s): [] for m in models for s in sides}
    for r in range(args.rounds):
        order = ("A", "B") if r % 2 == 0 else ("B", "A")
        for m in models:
            for side in order:
                res = run_child(sides[side], m, args.seed, args.repeats, args.timeout)
                results[m, side].append(res)
                print(
                    f"round {r + 1}/{args.rounds} {m} {side}: report median "
                    f"{statistics.median(res['report_s']):.3f} s, forward median "
                    f"{statistics.median(res['forward_s']):.3f} s (warm-up "
                    f"{res['warmup_s']:.1f} s, plan {res['plan_s']:.2f} s; {res['file']})",
                    file=sys.stderr,
                    flush=True,
                )

    def median_of_medians(m: str, side: str, key: str) -> float:
        return statistics.median(statistics.median(res[key]) for res in results[m, side])

    print("| model | A median s | B median s | B/A | A/forward | B/forward | rounds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for m in models:
        a, b = (median_of_medians(m, s, "report_s") for s in ("A", "B"))
        fa, fb = (median_of_medians(m, s, "forward_s") for s in ("A", "B"))
        print(
            f"| {m} | {a:.3f} | {b:.3f} | {b / a:.3f} | {a / fa:.1f} | {b / fb:.1f} "
            f"| {args.rounds} |"
        )

    print("\nLargest relative difference, B against A, over the rounds:\n")
    print("| model | " + " | ".join(MEASURES) + " | A's EI |")
    print("| --- |" + " ---: |" * (len(MEASURES) + 1))
    for m in models:
        diffs = [
            max(rel_diff(ra[k], rb[k]) for ra, rb in zip(results[m, "A"], results[m, "B"]))
            for k in MEASURES
        ]
        cells = " | ".join(f"{d:.1e}" for d in diffs)
        print(f"| {m} | {cells} | {results[m, 'A'][0]['ei']:.6f} |")

    first = results[models[0], "B"][0]
    print(
        f"\nMachine: {cpu_model()}, {os.cpu_count()} cores "
        f"({len(os.sched_getaffinity(0))} usable, torch threads {first['threads']}); "
        f"torch {first['torch']}; Python {platform.python_version()}; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; 1-minute load average "
        f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after."
    )
    print(
        f"A: {sides['A']} at {commit(sides['A'])}; B: {sides['B']} at {commit(sides['B'])}; "
        f"input {SHAPE}, seed {args.seed}, {args.repeats} timed report() per process."
    )
    for side, path in sides.items():
        cache_dir = results[models[0], side][0]["numba_cache_dir"]
        where = f"NUMBA_CACHE_DIR={cache_dir}" if cache_dir else f"{len(numba_caches(path))}"
        print(f"{side}'s numba cache index files under {path / 'foresight_sparse'}: {where}")


if __name__ == "__main__":
    main()
