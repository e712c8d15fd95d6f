"""Regenerate docs/benchmarks.md from a pytest-benchmark JSON file.

Usage::

    python -m pytest benchmarks --benchmark-enable --benchmark-json=bench.json
    python benchmarks/make_table.py bench.json [more.json ...] [--out docs/benchmarks.md]

Several files are merged; where two hold the same benchmark, the later file wins.

Every figure in the page comes from the JSON, with the machine it was measured on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _gib(n) -> str:
    return f"{n / 2**30:.2f} GiB" if n else "-"


def _ms(s) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


def render(data: dict) -> str:
    rows = data["benchmarks"]
    machine = data.get("machine_info", {})
    first = rows[0]["extra_info"] if rows else {}
    gpu = next((r["extra_info"].get("gpu") for r in rows if r["extra_info"].get("gpu")), None)
    cpu = first.get("cpu", machine.get("cpu", {}).get("brand_raw", "?"))
    out = [
        "# Benchmarks",
        "",
        f"Measured in {len(data.get('runs', [1]))} run(s) "
        f"({', '.join(data.get('runs', [data.get('datetime', '?')[:16]]))}) on {cpu}, "
        f"{first.get('cores', '?')} cores, {first.get('threads', '?')} torch threads, "
        f"torch {first.get('torch', '?')}" + (f"; GPU: {gpu}" if gpu else "; no GPU") + ".",
        "Regenerate with `python -m pytest benchmarks --benchmark-enable "
        "--benchmark-json=bench.json && python benchmarks/make_table.py bench.json`.",
        "",
    ]

    imagenet = [r for r in rows if "ratio" in r["extra_info"]]
    if imagenet:
        out += [
            "## ImageNet CNNs at 1x3x224x224",
            "",
            "One forward pass (batch 1, no grad, median of 5) and one `report()` in the "
            "same process.",
            "",
            "| net | engine | device | entries | forward | EI | EI / forward | peak RSS "
            "| EI (bits) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in imagenet:
            e = r["extra_info"]
            out.append(
                f"| {e['net']} | {e['engine']} | {e['device']} | {e['nnz']:.3g} | "
                f"{_ms(e['forward_s'])} | {_ms(e['ei_s'])} | {e['ratio']:.2f}x | "
                f"{_gib(e['peak_rss'])} | {e['ei']:.6f} |"
            )
        out.append("")
        for r in imagenet:
            e = r["extra_info"]
            out += [
                f"### {e['net']}, {e['engine']} engine, {e['device']}: layer by layer",
                "",
                "| layer | type | engine | entries | time |",
                "|---|---|---|---|---|",
            ]
            out += [
                f"| {lay['name']} | {lay['type']} | {lay['engine']} | {lay['nnz']:.3g} | "
                f"{_ms(lay['seconds'])} |"
                for lay in e["layers"]
            ]
            out.append("")

    small = [r for r in rows if "net" in r["extra_info"] and "ratio" not in r["extra_info"]]
    if small:
        out += [
            "## Small networks: every engine against the dense reference",
            "",
            "| net | engine | median time | entries | peak RSS | EI (bits) |",
            "|---|---|---|---|---|---|",
        ]
        for r in small:
            e = r["extra_info"]
            out.append(
                f"| {e['net']} | {e['engine']} | {_ms(r['stats']['median'])} | "
                f"{e['nnz']} | {_gib(e['peak_rss'])} | {e['ei']:.9f} |"
            )
        out.append("")

    builders = [r for r in rows if "entries_per_s" in r["extra_info"]]
    if builders:
        out += [
            "## Connectivity builders",
            "",
            "| benchmark | entries | median time | entries/s |",
            "|---|---|---|---|",
        ]
        for r in builders:
            e = r["extra_info"]
            out.append(
                f"| {r['name']} | {e['nnz']:.4g} | {_ms(r['stats']['median'])} | "
                f"{e['entries_per_s'] / 1e6:.0f}M/s |"
            )
        out.append("")
    video = [r["extra_info"] for r in rows if "video" in r["extra_info"]]
    if video:
        out += [
            '## Video models, `layers="all"`',
            "",
            '`report(model, x, layers="all")` (trace included, best of 3) against one '
            "forward pass (best of 3) in the same process.",
            "",
            "| model | input | layers | forward | `report()` | ratio | peak RSS | engines |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for e in video:
            out.append(
                f"| {e['video']} | {'x'.join(map(str, e['input']))} | {e['layers']} | "
                f"{_ms(e['forward_s'])} | {_ms(e['report_s'])} | "
                f"{e['report_ratio']:.2f}x | {_gib(e['peak_rss'])} | "
                f"{', '.join(e['engines'])} |"
            )
        out.append("")
    zoo = [r["extra_info"] for r in rows if "zoo" in r["extra_info"]]
    if zoo:
        out += _zoo_rows(zoo)
    tracking = {
        r["extra_info"]["tracking"]: r["extra_info"] for r in rows if "tracking" in r["extra_info"]
    }
    if tracking:
        out += _tracking_rows(tracking)
    cold = [r["extra_info"] for r in rows if "cold" in r["extra_info"]]
    for e in cold:
        out += [
            f"## Cold start ({e['cold']})",
            "",
            "A new interpreter per round (best of 3), numba's kernels cached on disk.",
            "",
            "| measure | measured | target |",
            "|---|---|---|",
            f"| `import foresight_sparse` after torch | {_ms(e['import_s'])} | <= 200 ms |",
            f"| first `report()` vs a warm one | {_ms(e['first_s'])} vs {_ms(e['warm_s'])}: "
            f"+{_ms(e['extra_s'])} (rounds: "
            f"{', '.join('+' + _ms(x) for x in e['extra_all'])}) | <= warm + 100 ms |",
            "",
        ]
    return "\n".join(out)


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def _zoo_rows(zoo: list[dict]) -> list[str]:
    """Every torchvision classifier (test_bench_zoo.py): summary, then one row a model."""
    rep = [e["report_ratio"] for e in zoo]
    plan = [e["plan_ratio"] for e in zoo]
    tr = [e["trace_ratio"] for e in zoo]
    worst_tr = max(zoo, key=lambda e: e["trace_ratio"])
    worst_rep = max(zoo, key=lambda e: e["report_ratio"])
    worst_plan = max(zoo, key=lambda e: e["plan_ratio"])
    out = [
        f"## The torchvision zoo ({len(zoo)} classification models)",
        "",
        "Random weights (seed 0), batch 1, 224x224 (inception_v3 299x299), the default "
        "settings. `report()` includes the trace; `Plan.report()` evaluates another set of "
        "weights with a plan made beforehand. Each is the best of 3 runs (2 where the "
        "forward pass takes over 2 s), as a ratio to one forward pass (no grad, best of 3) "
        "in the same process.",
        "",
        "| measure | median | worst | target |",
        "|---|---|---|---|",
        f"| `report()` / forward | {_median(rep):.2f}x | {worst_rep['report_ratio']:.2f}x "
        f"({worst_rep['zoo']}) | median <= 1.5x, every model <= 3x |",
        f"| `Plan.report()` / forward | {_median(plan):.2f}x | "
        f"{worst_plan['plan_ratio']:.2f}x ({worst_plan['zoo']}) | median <= 1x, every "
        "model <= 2x |",
        f"| trace (`method='auto'`) / forward | {_median(tr):.2f}x | "
        f"{worst_tr['trace_ratio']:.2f}x ({worst_tr['zoo']}) | |",
        f"| models over the `report()` target (3x) | {sum(r > 3 for r in rep)} | | 0 |",
        f"| models over the `Plan.report()` target (2x) | {sum(p > 2 for p in plan)} | | 0 |",
        "",
        "| model | layers | forward | trace | `report()` | ratio | `Plan.report()` | ratio | "
        "peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in sorted(zoo, key=lambda e: e["zoo"]):
        out.append(
            f"| {e['zoo']} | {e['layers']} | {_ms(e['forward_s'])} | "
            f"{_ms(e['trace_s'])} | {_ms(e['report_s'])} | {e['report_ratio']:.2f}x | "
            f"{_ms(e['plan_report_s'])} | {e['plan_ratio']:.2f}x | "
            f"{_gib(e['peak_rss'])} |"
        )
    out.append("")
    return out


def _tracking_rows(t: dict) -> list[str]:
    """Tracking during training and checkpoint sweeps (test_bench_tracking.py)."""
    out = [
        "## Tracking and sweeps (ResNet-18)",
        "",
        "| measure | measured | target |",
        "|---|---|---|",
    ]
    if "train" in t:
        e = t["train"]
        out.append(
            f"| training, tracker every {e['every']} steps vs none ({e['steps']} steps, "
            f"batch {e['batch']}, 3x32x32, 10 classes) | {_ms(e['tracked_s'])} vs "
            f"{_ms(e['plain_s'])}: {e['added']:+.1%} | <= 5% |"
        )
        if e.get("eval_s") is not None:
            out.append(
                f"| the same, a long run: one evaluation ({_ms(e['eval_s'])}; the process's "
                f"first took {_ms(e['first_eval_s'])}) every {e['every']} steps | "
                f"{e['steady_added']:+.2%} | <= 5% |"
            )
    if "sweep" in t:
        e = t["sweep"]
        out.append(
            f"| sweep of {e['n']} checkpoints at {e['size']}x{e['size']}, 2 worker "
            f"processes vs serial, fresh process (forked workers) | {_ms(e['process_s'])} vs "
            f"{_ms(e['serial_s'])}: {e['speedup']:.2f}x | >= 1.6x |"
        )
        if "warm_speedup" in e:
            out.append(
                f"| the same after a `report()` in the process (forked workers) | "
                f"{_ms(e['warm_process_s'])} vs {_ms(e['warm_serial_s'])}: "
                f"{e['warm_speedup']:.2f}x | >= 1.6x |"
            )
            out.append(
                f"| the most 2 workers can give: one pinned one-core serial sweep per "
                f"core over its half, both at once, vs serial (both after a `report()`) "
                f"| {_ms(e['independent_s'])} vs {_ms(e['warm_serial_s'])}: "
                f"{e['ideal_speedup']:.2f}x | |"
            )
        out.append(
            f"| serial sweep's CPU use; the process run's CPU time over the cores | "
            f"{e['serial_util']:.2f} cores; {_ms(e['process_cpu_s'])}: at most "
            f"{e['cpu_bound_speedup']:.2f}x | |"
        )
    if "per_checkpoint" in t:
        e = t["per_checkpoint"]
        out.append(
            f"| serial sweep, per checkpoint, vs load + `Plan.report` | "
            f"{_ms(e['sweep_s'])} vs {_ms(e['load_s'])} + {_ms(e['report_s'])}: "
            f"{e['over_parts']:.2f}x | <= 1.1x |"
        )
    if "ray" in t:
        e = t["ray"]
        if "process_s" in e:
            out.append(
                f"| local Ray (2 CPUs, started before) vs 2 worker processes, {e['n']} "
                f"checkpoints | {_ms(e['ray_s'])} vs {_ms(e['process_s'])}: "
                f"{e['ray_over_process']:.2f}x; EI differs by "
                f"{e['max_ei_difference']:.1e} at most | <= 1.5x |"
            )
            out.append(
                f"| the same, Ray's workers ready (a second sweep) | "
                f"{_ms(e['ray_again_s'])} vs {_ms(e['process_s'])}: "
                f"{e['ray_again_over_process']:.2f}x | <= 1.5x |"
            )
        else:
            out.append(
                f"| local Ray (2 CPUs), {e['n']} checkpoints | {_ms(e['ray_s'])}; EI differs "
                f"by {e['max_ei_difference']:.1e} at most | |"
            )
    out.append("")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args(argv)
    merged: dict = {}
    by_name: dict = {}
    for path in args.json:
        data = json.loads(path.read_text())
        merged.update({k: v for k, v in data.items() if k != "benchmarks"})
        merged.setdefault("runs", []).append(data.get("datetime", "?")[:16])
        by_name.update({b["fullname"]: b for b in data["benchmarks"]})
    merged["benchmarks"] = list(by_name.values())
    args.out.write_text(render(merged))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
