"""The tracking tutorial (docs/tracking.rst) as one script; it also draws the page's charts.

Trains a small CNN on synthetic 16x16 images for 400 steps with a Tracker, saves a
checkpoint every 50 steps, sweeps the checkpoints, and writes

- docs/_static/tracking_layers.png: EI of every layer and the network over the steps;
- docs/_static/tracking_plane.png: each layer's path in the determinism-degeneracy plane;
- docs/_static/sweep_layers.png: the sweep's EI over its checkpoints.

Run it from the repository root: ``python docs/examples/tracking_tutorial.py`` (about a
minute on a 2-core CPU).
"""

from __future__ import annotations

import os
import tempfile

import torch
from torch import nn

import foresight_sparse

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "_static")


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def synthetic_batches(n: int, batch: int = 32, seed: int = 0):
    """Ten classes, each a fixed random image, seen through noise."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 3, 16, 16, generator=gen)
    for _ in range(n):
        y = torch.randint(0, 10, (batch,), generator=gen)
        yield prototypes[y] + 1.5 * torch.randn(batch, 3, 16, 16, generator=gen), y


def main(steps: int = 400, every: int = 20, save_every: int = 50) -> None:
    torch.manual_seed(0)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = foresight_sparse.Tracker(model, torch.zeros(1, 3, 16, 16), every=every)
    folder = tempfile.mkdtemp(prefix="ei-tutorial-")
    for step, (x, y) in enumerate(synthetic_batches(steps)):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tracker.step(step)
        if step % save_every == 0 or step == steps - 1:
            torch.save(model.state_dict(), os.path.join(folder, f"step={step}.pt"))
    tracker.history.to_csv(os.path.join(folder, "tracked.csv"))
    tracker.history.plot(
        os.path.join(STATIC, "tracking_layers.png"),
        title="small CNN, synthetic data: EI every 20 steps",
    )
    tracker.history.plot(
        os.path.join(STATIC, "tracking_plane.png"),
        kind="plane",
        title="each layer's path, circle (step 0) to square (step 380)",
    )
    res = foresight_sparse.sweep(
        small_cnn(), folder, torch.zeros(1, 3, 16, 16), output=os.path.join(folder, "sweep.csv")
    )
    res.history.plot(
        os.path.join(STATIC, "sweep_layers.png"), title="sweep of the saved checkpoints"
    )
    print(f"loss {loss.item():.3f}; checkpoints and CSV files in {folder}")


if __name__ == "__main__":
    main()
