"""Perturbation EI of every counted layer of torchvision's resnet18 at 1x3x32x32, through a
plan (a measurement script, not collected by pytest):
``python benchmarks/perturbation_resnet.py [samples] [bins] [layers]``.

``layers`` is the plan's ``layers=`` (``seed``, the default, or ``all``). Prints the report's
table, the total time and the peak RSS.
"""

from __future__ import annotations

import resource
import sys
import time
import warnings

import torch

import foresight_sparse as fs
from foresight_sparse.perturbation import Perturbation


def main() -> None:
    import torchvision

    samples = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    bins = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    layers = sys.argv[3] if len(sys.argv) > 3 else "seed"
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    measure = Perturbation(samples=samples, in_bins=bins, out_bins=bins)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the skipped BatchNorm and MaxPool
        rep = fs.report(model, torch.zeros(1, 3, 32, 32), measure=measure, layers=layers)
    seconds = time.perf_counter() - start
    print(rep.table())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"layers={len(rep.layers)} samples={samples} bins={bins} time={seconds:.1f}s "
        f"peak_rss={rss:.0f}MiB torch_threads={torch.get_num_threads()}"
    )


if __name__ == "__main__":
    main()
