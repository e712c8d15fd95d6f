"""Ours against deep-ei on its 100-30-30-30-10 Sigmoid MLP (a measurement script, not
collected by pytest; needs the ``bench`` extra):

``python benchmarks/perturbation_deep_ei.py time SAMPLES`` times ``ei_parts`` of the four
layers once each way (ours first, its kernels compiled beforehand), and
``python benchmarks/perturbation_deep_ei.py agree SAMPLES SEEDS`` runs both on ``SEEDS``
noise seeds each and prints the means and standard deviations: deep-ei's spread is its own
statistical error. Same network (seed 0), samples, ranges (0, 1) and 64 x 64 bins.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from torch import nn

from benchmarks._deep_ei_net import mlp, topology
from foresight_sparse.perturbation import ei_parts

OPTIONS = dict(in_range=(0.0, 1.0), out_range=(0.0, 1.0), in_bins=64, out_bins=64)


def ours(net: nn.Sequential, samples: int, seed: int = 0) -> float:
    total = 0.0
    for i, m in enumerate(net):
        if isinstance(m, nn.Linear):
            r = ei_parts(
                m, (m.in_features,), activation=net[i + 1], samples=samples, seed=seed, **OPTIONS
            )
            total += r.ei_parts
    return total


def theirs(net: nn.Sequential, samples: int, seed: int = 0) -> float:
    import deep_ei

    torch.manual_seed(seed)  # deep-ei draws its noise from torch's global generator
    graph = topology(net)
    return sum(
        deep_ei.ei_parts(m, graph, samples=samples, **OPTIONS)
        for m in net
        if isinstance(m, nn.Linear)
    )


def main() -> None:
    mode, samples = sys.argv[1], int(float(sys.argv[2]))
    net = mlp(0)
    print(f"torch threads {torch.get_num_threads()}, samples {samples}", flush=True)
    if mode == "time":
        ours(net, 1000)  # compile (or load) the kernels
        t = time.perf_counter()
        a = ours(net, samples)
        t_ours = time.perf_counter() - t
        print(f"ours    {a:.4f} bits  {t_ours:.2f} s", flush=True)
        t = time.perf_counter()
        b = theirs(net, samples)
        t_theirs = time.perf_counter() - t
        print(f"deep-ei {b:.4f} bits  {t_theirs:.2f} s", flush=True)
        print(f"speed-up {t_theirs / t_ours:.1f}x", flush=True)
    elif mode == "agree":
        seeds = int(sys.argv[3])
        for name, fn in (("ours", ours), ("deep-ei", theirs)):
            values = [fn(net, samples, seed) for seed in range(seeds)]
            print(
                f"{name:8s} mean {statistics.mean(values):.4f}  sd {statistics.stdev(values):.4f}"
                f"  ({', '.join(f'{v:.3f}' for v in values)})",
                flush=True,
            )
    else:
        raise SystemExit(f"unknown mode {mode!r}: time or agree")


if __name__ == "__main__":
    main()
