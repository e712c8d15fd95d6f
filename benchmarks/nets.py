"""Networks the benchmarks run: small ones the dense reference can hold, and ImageNet CNNs."""

from __future__ import annotations

import torch
from torch import nn


def lenet5() -> nn.Module:
    """LeNet-5 for 1x1x28x28 inputs (average pooling, as in the original)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120),
        nn.Tanh(),
        nn.Linear(120, 84),
        nn.Tanh(),
        nn.Linear(84, 10),
    )


def cifar_cnn(size: int = 32) -> nn.Module:
    """A small CIFAR-10 CNN for 1x3x32x32 inputs (1x3xSIZExSIZE, SIZE a multiple of 8)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (size // 8) ** 2, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


SMALL = {"lenet5": (lenet5, (1, 1, 28, 28)), "cifar_cnn": (cifar_cnn, (1, 3, 32, 32))}

#: The same networks in the smoke run, where the dense baselines must take seconds: the
#: CIFAR CNN at 16x16 (LeNet-5 takes no other input size).
SMOKE = {"lenet5": SMALL["lenet5"], "cifar_cnn": (lambda: cifar_cnn(16), (1, 3, 16, 16))}


def imagenet(name: str) -> nn.Module:
    """A torchvision model with seeded random weights, in eval mode."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()
