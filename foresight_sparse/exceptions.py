"""Exceptions raised by foresight-sparse.

Each subclasses the built-in exception a caller would expect, so ``except ValueError``
keeps working, and every message names the layer, the shapes involved and what to do.
"""

from __future__ import annotations

__all__ = [
    "ForesightError",
    "UnsupportedLayerError",
    "ShapeMismatchError",
    "MissingInputError",
    "NoSupportedLayersError",
    "NonFiniteWeightsError",
    "ForwardError",
    "MemoryBudgetError",
    "UnknownNameError",
    "CheckpointError",
]


class ForesightError(Exception):
    """Base class of every error this library raises on purpose."""


class UnsupportedLayerError(ForesightError, TypeError):
    """A module type has no registered connectivity builder, or an option it cannot honour."""


class ShapeMismatchError(ForesightError, ValueError):
    """The recorded input/output shapes do not fit the module they belong to."""


class MissingInputError(ForesightError, ValueError):
    """Neither ``input`` nor ``shapes`` was given, so the layers cannot be traced."""


class NoSupportedLayersError(ForesightError, ValueError):
    """The model contains no layer with a registered connectivity builder."""


class NonFiniteWeightsError(ForesightError, ValueError):
    """A layer's weights contain NaN or infinity, so its entropies are undefined."""


class ForwardError(ForesightError, RuntimeError):
    """The model's forward pass failed while its layers were being traced."""


class MemoryBudgetError(ForesightError, MemoryError):
    """An operation would need more memory than the budget allows.

    Attributes
    ----------
    needed : int
        The estimated number of bytes.
    budget : int
        The budget in bytes that refused it.
    """

    def __init__(self, message: str, needed: int, budget: int):
        super().__init__(message)
        self.needed = needed
        self.budget = budget


class UnknownNameError(ForesightError, ValueError):
    """A name (norm, engine, layout) is not one of the valid choices."""


class CheckpointError(ForesightError, ValueError):
    """A weights file cannot be read, or its weights do not fit the model.

    The message names the file and, for a mismatch, the keys and shapes involved.
    """
