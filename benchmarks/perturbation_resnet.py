"""Perturbation of every counted layer of torchvision's resnet18 at 1x3x32x32 (a measurement
script, not collected by pytest): ``python benchmarks/perturbation_resnet.py [samples] [bins]``.

Prints one line per layer and the total time and peak RSS.
"""

from __future__ import annotations

import resource
import sys
import time

import torch
from torch import nn

from foresight_sparse.connectivity.registry import SEED_TYPES
from foresight_sparse.perturbation import perturb_layer


def counted_layers(model: nn.Module, x: torch.Tensor):
    """(module, input shape, module before, module after) of each counted layer, from the
    order the leaf modules run in."""
    order, shapes = [], {}

    def record(m, inputs, output):
        order.append(m)
        shapes.setdefault(id(m), tuple(inputs[0].shape))

    hooks = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for k, m in enumerate(order):
        if type(m) in SEED_TYPES or isinstance(m, nn.AdaptiveAvgPool2d):
            before = order[k - 1] if k else None
            after = order[k + 1] if k + 1 < len(order) else None
            out.append((m, shapes[id(m)][1:], before, after))
    return out


def main() -> None:
    import torchvision

    samples = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    bins = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    layers = counted_layers(model, torch.zeros(1, 3, 32, 32))
    start = time.perf_counter()
    parts = sens = 0.0
    for m, shape, before, after in layers:
        t = time.perf_counter()
        r = perturb_layer(
            m,
            shape,
            before=before,
            activation=after,
            in_range=(0.0, 1.0) if before is None else None,
            in_bins=bins,
            out_bins=bins,
            samples=samples,
        )
        parts += r.ei_parts
        sens += r.sensitivity
        print(
            f"{type(m).__name__:18s} {str(shape):16s} pairs={r.pairs:>9d} "
            f"ei_parts={r.ei_parts:12.2f} sens={r.sensitivity:12.2f} "
            f"bias={r.unconnected_bias:12.2f} {time.perf_counter() - t:7.1f}s",
            flush=True,
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"layers={len(layers)} samples={samples} bins={bins} ei_parts={parts:.2f} "
        f"sensitivity={sens:.2f} time={time.perf_counter() - start:.1f}s peak_rss={rss:.0f}MiB"
    )


if __name__ == "__main__":
    main()
