"""Exceptions raised by foresight-sparse.

Each subclasses the built-in exception a caller would expect, so ``except ValueError``
keeps working, and every message names the layer, the shapes involved and what to do.
"""

from __future__ import annotations

import os
import sys
import warnings

__all__ = [
    "Opt",
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
    "OptionError",
]


class Opt:
    """An option of the library named in a message, rendered where the message is shown.

    In Python (``str(error)``) it reads as the keyword argument: ``Opt("engine", "sparse",
    "implicit")`` is ``engine='sparse' or 'implicit'``, ``Opt("legacy", True)`` is
    ``legacy=True`` and ``Opt("max_memory")`` is ``max_memory``. The command line renders
    the same message with its flags (:meth:`ForesightError.render`): ``--engine sparse or
    implicit``, ``--legacy``, ``--max-memory``.

    Parameters
    ----------
    name : str
        The keyword argument, as the public functions spell it.
    *values
        The values to suggest (none for the bare name).
    """

    __slots__ = ("name", "values")

    def __init__(self, name: str, *values):
        self.name = name
        self.values = values

    def render(self, flags: dict[str, str] | None = None) -> str:
        """The option as Python code (``flags`` None) or as the flag ``flags[name]``; an
        option without a flag stays in its Python form."""
        flag = None if flags is None else flags.get(self.name)
        if flag is None:
            if not self.values:
                return self.name
            return f"{self.name}=" + " or ".join(repr(v) for v in self.values)
        if not self.values:
            return flag
        if all(isinstance(v, bool) for v in self.values):
            return " or ".join(flag if v else f"no {flag}" for v in self.values)
        return f"{flag} " + " or ".join(
            "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
            for v in self.values
        )

    def __repr__(self) -> str:
        return f"Opt({self.render()})"


def render_parts(parts, flags: dict[str, str] | None = None) -> str:
    """Join a message's parts: text as it is, each :class:`Opt` rendered for ``flags``."""
    return "".join(p.render(flags) if isinstance(p, Opt) else str(p) for p in parts)


class ForesightError(Exception):
    """Base class of every error this library raises on purpose.

    Made of message parts: text and :class:`Opt` markers for the options it names, so the
    same error reads as Python in a traceback and as flags on the command line.

    Parameters
    ----------
    *parts : str or Opt
        The message, in pieces.
    param : str, optional
        The option the error concerns (by default the first :class:`Opt` of the message):
        what the command line maps to its flag.

    Attributes
    ----------
    parts : tuple
        The message's pieces.
    param : str or None
        The option the error concerns, if any.
    """

    def __init__(self, *parts, param: str | None = None):
        self.parts = parts
        if param is None:
            param = next((p.name for p in parts if isinstance(p, Opt)), None)
        self.param = param
        super().__init__(render_parts(parts))

    def render(self, flags: dict[str, str] | None = None) -> str:
        """The message with every option as ``flags`` spells it (Python by default)."""
        return render_parts(self.parts, flags)

    def __reduce__(self):  # pickles (sweeps send errors between processes) with its parts
        return (_rebuild, (type(self), self.parts, self.param, dict(self.__dict__)))


def _rebuild(cls, parts, param, state):
    exc = Exception.__new__(cls)  # no subclass __init__: their arguments differ
    ForesightError.__init__(exc, *parts, param=param)
    exc.__dict__.update(state)
    return exc


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

    def __init__(self, *parts, needed: int, budget: int, param: str | None = "max_memory"):
        super().__init__(*parts, param=param)
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


class OptionError(ForesightError, ValueError, TypeError):
    """An option has a value outside its domain or of the wrong type (``max_memory='lots'``,
    ``workers=0``, ``every=1.5``); the message names the option, the value and what it
    accepts. A ``ValueError`` and a ``TypeError`` both, so either ``except`` catches it."""
