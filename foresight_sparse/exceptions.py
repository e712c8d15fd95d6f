"""Exceptions raised by foresight-sparse.

Each subclasses the built-in exception a caller would expect, so ``except ValueError``
keeps working, and every message names the layer, the shapes involved and what to do.
"""

from __future__ import annotations

import os
import sys
import warnings

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
    "DeviceError",
    "UnsupportedEngineError",
    "WeightsError",
    "warn_caller",
    "CheckpointError",
    "ReportFileError",
    "MissingDependencyError",
    "HistoryFileError",
    "MeasureSettingsError",
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


class DeviceError(ForesightError, ValueError):
    """The device cannot serve the request: CUDA asked for where this torch has none, or a
    CPU-only result (a scipy matrix) asked of tensors on CUDA."""


class UnsupportedEngineError(ForesightError, ValueError):
    """An engine called directly cannot compute a layer exactly (``engine='auto'`` and
    ``'implicit'`` hand such layers to the sparse engine instead)."""


class WeightsError(ForesightError, ValueError):
    """Weights given for a planned architecture do not fit it (a missing key, a tensor of
    another shape or type)."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def warn_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn with the location of the first frame outside this package: the user's line,
    whichever public entry point (drop-in function, report, plan, tracker, sweep) led here."""
    level = 2  # stacklevel 2 is the caller of this function
    frame = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _PACKAGE_DIR + os.sep
    ):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


class CheckpointError(ForesightError, ValueError):
    """A weights file cannot be read, or its weights do not fit the model.

    The message names the file and, for a mismatch, the keys and shapes involved.
    """


class ReportFileError(ForesightError, ValueError):
    """A saved report (JSON) cannot be read back; the message names the file and what is
    missing."""


class MissingDependencyError(ForesightError, ImportError):
    """An optional feature needs a package that is not installed; the message says which
    ``pip install`` adds it."""


class HistoryFileError(ForesightError, ValueError):
    """A saved history (CSV or JSON) cannot be read, or does not fit the sweep resuming it;
    the message names the file."""


class MeasureSettingsError(ForesightError, ValueError):
    """A measure's setting is outside its domain (a bin count below 2, an empty range, a
    sample count below 1); the message names the setting, the value and the layer where
    known."""
