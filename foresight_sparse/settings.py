"""Settings: every option of a computation, validated once, carried by its plan.

:func:`foresight_sparse.plan`, :func:`foresight_sparse.report`, :func:`foresight_sparse.sweep`,
:class:`~foresight_sparse.tracking.Tracker`, the Lightning callback and the command line
take the same options with the same defaults, and each turns them into one
:class:`Settings` with :meth:`Settings.make`. The :class:`~foresight_sparse.plans.Plan`
carries it, and the metadata that reports, histories and CSV files record comes from it
(:meth:`Settings.metadata`), so no entry point declares an option's meaning or default
twice. The drop-in functions of :mod:`foresight_sparse.ei` keep the old module's
signatures: they take a subset of the options (``norm``, ``device``, ``engine``,
``legacy``, ``max_memory``), with the same defaults.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any

import torch

from .backends import resolve_backend
from .budget import resolve_budget
from .connectivity import LayerSelection
from .conventions import check_convention
from .engines import check_engine
from .exceptions import DeviceError, Opt, OptionError, UnknownNameError
from .measures import RESERVED, Measure
from .norms import Norm, get_norm, lin_norm

__all__ = ["Settings", "OPTIONS", "SKIPPED", "MEASURES", "get_measure", "resolve_device"]

#: What ``skipped=`` accepts: warn once about the skipped layers, or say nothing.
SKIPPED = ("warn", "ignore")

#: The names ``measure=`` accepts, each with the ``"module:class"`` of its
#: :class:`~foresight_sparse.measures.Measure` (None: the connectivity EI the plans'
#: engines compute). A measure's module is imported when the measure is first asked for,
#: so the perturbation measure's numba kernels load only for it. The registry lives here,
#: above the measures it names: they import the protocol
#: (:mod:`foresight_sparse.measures`), never this module.
MEASURES: dict[str, str | None] = {
    "ei": None,
    "perturbation": "foresight_sparse.perturbation:Perturbation",
    "svd": "foresight_sparse.svd:Reversibility",
}


def get_measure(measure: str | Measure | None) -> Measure | None:
    """Resolve a ``measure=`` argument: None for the connectivity EI (``'ei'`` or None), a
    :class:`~foresight_sparse.measures.Measure` object as it is, a name of
    :data:`MEASURES` as that measure with its default settings.

    Raises
    ------
    UnknownNameError
        For any other value (the message lists the valid names), and for a measure whose
        :attr:`~foresight_sparse.measures.Measure.columns` repeat a name or take one of
        :data:`~foresight_sparse.measures.RESERVED`.
    """
    if measure is None or measure == "ei":
        return None
    if isinstance(measure, Measure):
        return _checked(measure)
    target = MEASURES.get(measure) if isinstance(measure, str) else None
    if target is None:
        raise UnknownNameError(
            "unknown ",
            Opt("measure", measure),
            f"; valid measures are {', '.join(MEASURES)} "
            "(or a Measure object such as foresight_sparse.perturbation.Perturbation(...))",
        )
    module, _, cls = target.partition(":")
    return _checked(getattr(importlib.import_module(module), cls)())


def _checked(measure: Measure) -> Measure:
    clash = [c for c in measure.columns if c in RESERVED]
    if clash or len(set(measure.columns)) != len(measure.columns):
        raise UnknownNameError(
            f"measure {measure.name!r} has the columns {', '.join(measure.columns)}; "
            f"{', '.join(clash) or 'one name twice'} would clash with a report's or a "
            "history's own fields. Rename them",
            param="measure",
        )
    return measure


def resolve_device(device) -> torch.device:
    """Check and normalise a ``device`` argument.

    Raises
    ------
    DeviceError
        For a CUDA device when CUDA is not available.
    UnknownNameError
        For anything that is not a CPU or CUDA device.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UnknownNameError(
            Opt("device", device), " is not a device; use ", Opt("device", "cpu", "cuda")
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            Opt("device", device),
            " asks for CUDA, but this torch has no CUDA device available; use ",
            Opt("device", "cpu"),
        )
    if dev.type not in ("cpu", "cuda"):
        raise UnknownNameError(
            Opt("device", device), " is not supported; use ", Opt("device", "cpu", "cuda")
        )
    return dev


@dataclass(frozen=True)
class Settings:
    """The options of one computation, checked and resolved (immutable).

    Build it with :meth:`make` from the keyword options every entry point takes; the
    defaults below are the only place they are declared.

    Attributes
    ----------
    norm : Norm
        The row normalisation (``norm=``: ``'lin'``, ``'soft'``, ``'sig'``, ``None`` or a
        callable; default ``lin_norm``).
    device : torch.device
        Where the reductions run (``device=``, default ``'cpu'``).
    engine : str
        ``'auto'``, ``'implicit'``, ``'sparse'`` or ``'dense'`` (default ``'auto'``).
    backend : str
        The numeric forms: ``'auto'``, ``'numba'`` or ``'torch'`` (default ``'auto'``;
        :mod:`foresight_sparse.backends`).
    legacy : bool
        The old module's cross-channel AvgPool2d connectivity (default False).
    max_memory : int
        The working-memory budget in bytes (``max_memory=`` as an int or a string such as
        ``'4GiB'``; default 2 GiB).
    layers : str or tuple of type
        Which layers count: ``'seed'`` (default), ``'all'`` or module types.
    measure : Measure or None
        What a report computes: None for the connectivity EI (``measure='ei'``, the
        default), else a :class:`~foresight_sparse.measures.Measure`.
    convention : str
        How the connectivity EI is split: ``'seed'`` (default) or ``'graph'``.
    skipped : str
        ``'warn'`` (default): one warning names the layers that ran but do not count;
        ``'ignore'``: no warning (:attr:`Plan.skipped <foresight_sparse.plans.Plan>` still
        lists them).
    """

    norm: Norm = lin_norm
    device: torch.device = torch.device("cpu")
    engine: str = "auto"
    backend: str = "auto"
    legacy: bool = False
    max_memory: int = 0
    layers: Any = "seed"
    measure: Measure | None = None
    convention: str = "seed"
    skipped: str = "warn"
    selection: LayerSelection = field(default=None, repr=False, compare=False)

    @classmethod
    def make(
        cls,
        *,
        norm=lin_norm,
        device="cpu",
        engine: str = "auto",
        backend: str = "auto",
        legacy: bool = False,
        max_memory=None,
        layers="seed",
        measure="ei",
        convention: str = "seed",
        skipped: str = "warn",
    ) -> Settings:
        """Check every option and resolve it (norm objects, the device, the budget in
        bytes, the layer selection, the measure object).

        Raises
        ------
        UnknownNameError
            For an unknown norm, engine, backend, measure, convention or layer set, or a
            convention other than ``'seed'`` with a measure other than ``'ei'``.
        DeviceError
            For CUDA where there is none, or ``backend='numba'`` on a CUDA device.
        UnsupportedEngineError
            For ``backend='numba'`` with a custom norm, and ``convention='graph'`` with a
            norm that does not normalise rows.
        OptionError
            For a ``legacy`` that is not a bool, a ``skipped`` other than ``'warn'`` or
            ``'ignore'``, or a ``max_memory`` that is not a positive size.
        """
        norm_obj = get_norm(norm)
        measure_obj = get_measure(measure)
        check_convention(convention, norm_obj)
        if measure_obj is not None and convention != "seed":
            raise UnknownNameError(
                Opt("convention", convention),
                " splits the connectivity EI; ",
                Opt("measure", measure_obj.name),
                " has its own quantities. Use ",
                Opt("convention", "seed"),
                " with it",
                param="convention",
            )
        dev = resolve_device(device)
        check_engine(engine)
        resolve_backend(
            backend, dev, norm_obj
        )  # an unknown name, numba on CUDA or for a custom norm
        if not isinstance(legacy, bool):
            raise OptionError(Opt("legacy"), f" must be True or False, not {legacy!r}")
        if skipped not in SKIPPED:
            raise OptionError(
                Opt("skipped"), f"={skipped!r} is not valid; use ", Opt("skipped", *SKIPPED)
            )
        selection = LayerSelection(layers)
        return cls(
            norm_obj,
            dev,
            engine,
            backend if isinstance(backend, str) else backend.name,
            legacy,
            resolve_budget(max_memory, dev),
            selection.layers,
            measure_obj,
            convention,
            skipped,
            selection,
        )

    def replace(self, **changes) -> Settings:
        """These settings with some options changed, checked again (the options as
        :meth:`make` takes them; the others keep their resolved values)."""
        current = {
            "norm": self.norm,
            "device": self.device,
            "engine": self.engine,
            "backend": self.backend,
            "legacy": self.legacy,
            "max_memory": self.max_memory,
            "layers": self.layers,
            "measure": self.measure if self.measure is not None else "ei",
            "convention": self.convention,
            "skipped": self.skipped,
        }
        unknown = set(changes) - set(current)
        if unknown:
            raise OptionError(
                f"unknown option {', '.join(sorted(unknown))}; the options are {', '.join(current)}"
            )
        return Settings.make(**{**current, **changes})

    @property
    def measure_name(self) -> str:
        """``'ei'`` for the connectivity EI, else the measure's name."""
        return "ei" if self.measure is None else self.measure.name

    @property
    def layers_label(self) -> str:
        """The ``layers`` option as text (``'seed'``, ``'all'`` or the type names)."""
        return self.selection.label

    def metadata(self) -> dict[str, Any]:
        """The settings as JSON-ready metadata: what a history records once and a resumed
        sweep must match (the device and engine included, which do not change the
        numbers beyond float precision)."""
        out = {
            "measure": self.measure_name,
            "convention": self.convention,
            "norm": self.norm.name,
            "legacy": self.legacy,
            "layers": self.layers_label,
            "max_memory": self.max_memory,
        }
        if self.measure is not None:
            out["settings"] = self.measure.settings()
        return out


#: The option names :meth:`Settings.make` takes, in order: what every entry point accepts.
OPTIONS = tuple(f.name for f in dataclasses.fields(Settings) if f.name != "selection")
