"""Exceptions raised by foresight-sparse.

Each subclasses the built-in exception a caller would expect, so ``except ValueError``
keeps working, and every message names the layer, the shapes involved and what to do.
Errors and warnings (:class:`ForesightWarning`, emitted by :func:`warn_caller`) are made
of message parts, text and an :class:`Opt` for each option they name, so that the command
line can print the options as its flags.
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
    "UnknownLayerError",
    "DeviceError",
    "UnsupportedEngineError",
    "WeightsError",
    "ForesightWarning",
    "ForesightFutureWarning",
    "ForesightDeprecationWarning",
    "warn_caller",
    "CheckpointError",
    "ReportFileError",
    "MissingDependencyError",
    "HistoryFileError",
    "EmptyHistoryError",
    "MeasureSettingsError",
    "OptionError",
]


class Opt:
    """An option of the library named in a message, rendered where the message is shown.

    In Python (``str(error)``) it reads as the keyword argument: ``Opt("engine", "sparse",
    "implicit")`` is ``engine='sparse' or 'implicit'`` (three values read ``'a', 'b' or
    'c'``), ``Opt("legacy", True)`` is ``legacy=True`` and ``Opt("max_memory")`` is
    ``max_memory``. The command line renders the same message with its flags
    (``error.render(flags)``): ``--engine sparse or implicit``, ``--legacy``,
    ``--max-memory``.

    Parameters
    ----------
    name : str
        The keyword argument, as the public functions spell it.
    *values
        The values to suggest (none for the bare name).
    metavar : str, optional
        A placeholder for the value, written as it is, as argparse's ``metavar``:
        ``Opt("key", metavar="NAME")`` is ``key=NAME`` in Python and ``--weights-key NAME``
        on the command line; ``Opt("weights", metavar="")`` is ``weights=`` and
        ``--weights``.
    """

    __slots__ = ("name", "values", "metavar")

    def __init__(self, name: str, *values, metavar: str | None = None):
        self.name = name
        self.values = values
        self.metavar = metavar

    def render(self, flags: dict[str, str] | None = None) -> str:
        """The option as Python code (``flags`` None) or as the flag ``flags[name]``; an
        option without a flag stays in its Python form."""
        flag = None if flags is None else flags.get(self.name)
        if flag is None:
            if self.metavar is not None:
                return f"{self.name}={self.metavar}"
            if not self.values:
                return self.name
            return f"{self.name}=" + _alternatives(repr(v) for v in self.values)
        if self.metavar is not None:
            return f"{flag} {self.metavar}" if self.metavar else flag
        if not self.values:
            return flag
        if all(isinstance(v, bool) for v in self.values):
            return _alternatives(flag if v else f"no {flag}" for v in self.values)
        return f"{flag} " + _alternatives(
            "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
            for v in self.values
        )

    def __repr__(self) -> str:
        return f"Opt({self.render()})"


def _alternatives(words) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    words = list(words)
    return " or ".join(filter(None, (", ".join(words[:-1]), words[-1])))


def render_parts(parts, flags: dict[str, str] | None = None) -> str:
    """Join a message's parts: text as it is, each :class:`Opt` rendered for ``flags``."""
    return "".join(p.render(flags) if isinstance(p, Opt) else str(p) for p in parts)


class _Message:
    """What the errors and warnings of this library share: a message made of parts, and
    the option it concerns."""

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
    _Message.__init__(exc, *parts, param=param)
    exc.__dict__.update(state)
    return exc


class ForesightError(_Message, Exception):
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

    Notes
    -----
    ``str(error)`` is the message with every option in Python form; ``error.render(flags)``
    spells each option as the mapping ``flags`` (``{"engine": "--engine", ...}``) does, so
    ``Opt("engine", "sparse")`` reads ``--engine sparse``.
    """


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


class UnknownLayerError(ForesightError, KeyError):
    """A layer or layer type looked up is not there: a layer a history holds no record of,
    a type with no registered builder to unregister. A ``KeyError``; the message lists what
    there is."""

    def __str__(self) -> str:  # the message as it is (KeyError's own str quotes it)
        return self.render()


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


class ForesightWarning(_Message, UserWarning):
    """Base class of the warnings of this library, made of message parts as
    :class:`ForesightError` is: ``str(warning)`` reads as Python, ``warning.render(flags)``
    with the command line's flags, ``warning.parts`` and ``warning.param`` as for errors.

    Parameters
    ----------
    *parts : str or Opt
        The message, in pieces.
    param : str, optional
        The option the warning concerns (by default the first :class:`Opt` of the message).
    """


class ForesightFutureWarning(ForesightWarning, FutureWarning):
    """A :class:`ForesightWarning` that is a ``FutureWarning`` too: a behaviour that will
    change (``warn_caller(..., category=FutureWarning)`` emits it)."""


class ForesightDeprecationWarning(ForesightWarning, DeprecationWarning):
    """A :class:`ForesightWarning` that is a ``DeprecationWarning`` too: an argument or
    function on its way out (``warn_caller(..., category=DeprecationWarning)`` emits it)."""


# The built-in categories warn_caller accepts, and the warning class that carries its parts.
_WARNINGS = {
    UserWarning: ForesightWarning,
    FutureWarning: ForesightFutureWarning,
    DeprecationWarning: ForesightDeprecationWarning,
}


def warn_caller(
    *parts, category: type[Warning] = ForesightWarning, param: str | None = None
) -> None:
    """Warn with the location of the first frame outside this package: the user's line,
    whichever public entry point (drop-in function, report, plan, tracker, sweep) led here.

    Parameters
    ----------
    *parts : str or Opt
        The message, in pieces, as for :class:`ForesightError`. A warning class as the
        last of them is taken as ``category`` (``warn_caller(message, FutureWarning)``).
    category : type of Warning, default ForesightWarning
        A :class:`ForesightWarning` subclass, or ``UserWarning``, ``FutureWarning`` or
        ``DeprecationWarning`` (emitted as :class:`ForesightWarning`,
        :class:`ForesightFutureWarning` or :class:`ForesightDeprecationWarning`); any
        other category gets the message as plain text.
    param : str, optional
        The option the warning concerns (by default its first :class:`Opt`).
    """
    if parts and isinstance(parts[-1], type) and issubclass(parts[-1], Warning):
        *parts, category = parts
    level = 2  # stacklevel 2 is the caller of this function
    frame = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _PACKAGE_DIR + os.sep
    ):
        frame = frame.f_back
        level += 1
    cls = category if issubclass(category, ForesightWarning) else _WARNINGS.get(category)
    if cls is None:
        warnings.warn(render_parts(parts), category, stacklevel=level)
    else:
        warnings.warn(cls(*parts, param=param), stacklevel=level)


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


class EmptyHistoryError(ForesightError, ValueError):
    """A history holds nothing the call can use: no evaluation to draw (only error records,
    or none), or no quantity to plot; the message says what is missing."""


class MeasureSettingsError(ForesightError, ValueError):
    """A measure's setting is outside its domain (a bin count below 2, an empty range, a
    sample count below 1); the message names the setting, the value and the layer where
    known."""


class OptionError(ForesightError, ValueError, TypeError):
    """An option has a value outside its domain or of the wrong type (``max_memory='lots'``,
    ``workers=0``, ``every=1.5``); the message names the option, the value and what it
    accepts. A ``ValueError`` and a ``TypeError`` both, so either ``except`` catches it."""
