"""Ours against deep-ei on its 100-30-30-30-10 Sigmoid MLP (a measurement script, not
collected by pytest; needs the ``bench`` extra):

``python -m benchmarks.perturbation_deep_ei time SAMPLES`` times ``ei_parts`` of the four
layers once each way (ours first, its kernels compiled beforehand), and
``python -m benchmarks.perturbation_deep_ei agree SAMPLES SEEDS`` runs both on ``SEEDS``
noise seeds each and prints the means and standard deviations: deep-ei's spread is its own
statistical error. Same network (seed 0), samples, ranges (0, 1) and 64 x 64 bins.
``python -m benchmarks.perturbation_deep_ei floor SAMPLES`` measures the rate of the
histogram increments alone, into one L1-resident histogram per input neuron (no input-bin
dimension, no binning, no forward pass): a bound that no counting of ``samples x pairs``
increments on this machine beats.
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


def floor(samples: int) -> None:
    import numpy as np
    from numba import njit, prange

    @njit(parallel=True)
    def counts(hist, yb):  # pragma: no cover - numba
        n_samples, n_out = yb.shape
        out_bins = hist.shape[1] // n_out
        for r in prange(hist.shape[0]):
            h = hist[r]
            for s in range(n_samples):
                for e in range(n_out):
                    h[e * out_bins + yb[s, e]] += 1

    rng = np.random.default_rng(0)
    total_seconds = total = 0.0
    for n_in, n_out in zip((100, 30, 30, 30), (30, 30, 30, 10)):
        yb = rng.integers(0, 64, (samples, n_out)).astype(np.int16)
        hist = np.zeros((n_in, n_out * 64), np.int32)
        counts(hist[:1], yb[:10])  # compile
        t = time.perf_counter()
        counts(hist, yb)
        total_seconds += time.perf_counter() - t
        total += samples * n_in * n_out
    print(
        f"{total:.3g} increments in {total_seconds:.2f} s: {total / total_seconds:.3g} per s",
        flush=True,
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
    elif mode == "floor":
        floor(samples)
    else:
        raise SystemExit(f"unknown mode {mode!r}: time, agree or floor")


if __name__ == "__main__":
    main()
