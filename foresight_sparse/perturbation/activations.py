"""Which activation follows a layer, what it maps to, and the ranges the bins cover.

deep-ei bins a layer's inputs over the range of the activation *before* the layer and its
outputs over the range of the activation *after* it (``VALID_ACTIVATIONS``): Sigmoid
(0, 1), Tanh (-1, 1), ReLU (0, 10) and no activation (-10, 10). :data:`RANGES` keeps those
and adds the bounded or half-bounded activations whose range follows from their definition.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..exceptions import UnsupportedLayerError

__all__ = ["RANGES", "NO_ACTIVATION", "activation_range", "is_activation", "resolve"]

#: The range of no activation (deep-ei's ``type(None)`` entry).
NO_ACTIVATION = (-10.0, 10.0)

#: Activation type -> its range: a pair, or a function of the module for activations
#: whose bounds are attributes. Unbounded sides are cut at 10, as deep-ei does for ReLU.
RANGES: dict[type, tuple[float, float] | Callable[[nn.Module], tuple[float, float]]] = {
    nn.Sigmoid: (0.0, 1.0),
    nn.Tanh: (-1.0, 1.0),
    nn.ReLU: (0.0, 10.0),
    nn.ReLU6: (0.0, 6.0),
    nn.Hardsigmoid: (0.0, 1.0),
    nn.Softsign: (-1.0, 1.0),
    nn.Softplus: (0.0, 10.0),
    nn.Hardtanh: lambda m: (float(m.min_val), float(m.max_val)),
    nn.ELU: lambda m: (-float(m.alpha), 10.0),
    nn.CELU: lambda m: (-float(m.alpha), 10.0),
    nn.LogSigmoid: (-10.0, 0.0),
    nn.Identity: NO_ACTIVATION,
}

# activations that are not elementwise maps of one neuron: never a layer's activation
_NOT_ELEMENTWISE = (
    nn.Softmax,
    nn.Softmin,
    nn.LogSoftmax,
    nn.Softmax2d,
    nn.GLU,
    nn.MultiheadAttention,
)


def is_activation(module: nn.Module | None) -> bool:
    """Whether ``module`` is an elementwise activation: a type of :data:`RANGES` or one of
    ``torch.nn``'s activation modules (GELU, SiLU, LeakyReLU, ...). Anything else after a
    layer (a batch norm, a pool, dropout, a flatten) is no activation."""
    if module is None:
        return False
    if type(module) in RANGES:
        return True
    if isinstance(module, _NOT_ELEMENTWISE):
        return False
    return type(module).__module__ == "torch.nn.modules.activation"


def activation_range(module: nn.Module | None) -> tuple[float, float] | None:
    """The range of ``module`` as an activation: :data:`NO_ACTIVATION` for anything that is
    no activation, None for an activation of unknown range."""
    if not is_activation(module):
        return NO_ACTIVATION
    entry = RANGES.get(type(module))
    if entry is None:
        return None
    return entry(module) if callable(entry) else (float(entry[0]), float(entry[1]))


def resolve(
    before: nn.Module | None,
    after: nn.Module | None,
    in_range: tuple[float, float] | None,
    out_range: tuple[float, float] | None,
    label: str,
) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, tuple, tuple]:
    """The layer's activation (None for none) and its input and output ranges.

    Raises
    ------
    UnsupportedLayerError
        When a range is not given and the activation it would come from has no known range.
    """
    if in_range is None:
        in_range = activation_range(before)
        if in_range is None:
            raise UnsupportedLayerError(
                f"{label}: the activation before it, {type(before).__name__}, has no known "
                "range, so the input range of the perturbation is undefined; pass "
                f"in_range=(low, high) (known ranges: {_known()})",
                param="in_range",
            )
    if out_range is None:
        out_range = activation_range(after)
        if out_range is None:
            raise UnsupportedLayerError(
                f"{label}: its activation, {type(after).__name__}, has no known range, so "
                "the output bins are undefined; pass out_range=(low, high) (known ranges: "
                f"{_known()})",
                param="out_range",
            )
    activation = after if is_activation(after) else None
    in_range = (float(in_range[0]), float(in_range[1]))
    out_range = (float(out_range[0]), float(out_range[1]))
    return activation, in_range, out_range


def _known() -> str:
    return ", ".join(t.__name__ for t in RANGES)
