"""Small models for tests/test_cli.py, importable as ``_cli_models:NAME`` from the CLI."""

from __future__ import annotations

import torch
from torch import nn

#: The input shape every model here accepts.
SHAPE = (1, 3, 8, 8)


def tiny_cnn() -> nn.Sequential:
    """Conv2d, AvgPool2d and Linear in an nn.Sequential (TorchScript-convertible)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),
    )


class TinyNet(nn.Module):
    """The same layers with a forward of its own (not an nn.Sequential)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2))
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class FlattensWrongly(nn.Module):
    """A model whose own forward (not a submodule's) fails on a 1x3x8x8 input."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(-1, 10, 7))


#: An nn.Module instance rather than a factory: the CLI accepts both.
INSTANCE = tiny_cnn()


def not_a_module():
    return "not a module"


def fails_to_build():
    raise RuntimeError("this factory always fails")
