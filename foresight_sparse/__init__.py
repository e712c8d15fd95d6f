"""foresight-sparse: effective information of PyTorch networks, sparse and matrix-free.

``import foresight_sparse.ei as ei`` is a drop-in replacement for the old ``foresight.ei``.
:func:`report` gives the totals with a per-layer breakdown; :func:`register` adds a
connectivity builder for a new layer type. ``measure='perturbation'`` and ``measure='svd'``
compute the other measures of :mod:`foresight_sparse.measures` through the same plans and
reports; ``convention='graph'`` splits the EI as einet does.
"""

from __future__ import annotations

import logging

from . import ei
from ._version import __version__
from .analysis import report
from .budget import DEFAULT_MAX_MEMORY
from .connectivity import Connectivity, ExplicitMatrix, register, unregister
from .exceptions import (
    CheckpointError,
    DeviceError,
    EmptyHistoryError,
    ForesightDeprecationWarning,
    ForesightError,
    ForesightFutureWarning,
    ForesightWarning,
    ForwardError,
    HistoryFileError,
    MeasureSettingsError,
    MemoryBudgetError,
    MissingDependencyError,
    MissingInputError,
    NonFiniteWeightsError,
    NoSupportedLayersError,
    OptionError,
    ReportFileError,
    ShapeMismatchError,
    UnknownLayerError,
    UnknownNameError,
    UnsupportedEngineError,
    UnsupportedLayerError,
    WeightsError,
)
from .history import History
from .measures import Measure
from .norms import lin_norm, sig_norm, soft_norm
from .plans import Plan, PlannedLayer, plan
from .results import LayerReport, Report
from .settings import MEASURES, Settings
from .sweeps import Executor, ProcessExecutor, RayExecutor, SerialExecutor, SweepResult, sweep
from .tracking import Tracker

__all__ = [
    "ei",
    "report",
    "plan",
    "Settings",
    "Plan",
    "PlannedLayer",
    "Report",
    "LayerReport",
    "Tracker",
    "sweep",
    "SweepResult",
    "Executor",
    "SerialExecutor",
    "ProcessExecutor",
    "RayExecutor",
    "History",
    "Measure",
    "MEASURES",
    "register",
    "unregister",
    "Connectivity",
    "ExplicitMatrix",
    "lin_norm",
    "soft_norm",
    "sig_norm",
    "DEFAULT_MAX_MEMORY",
    "CheckpointError",
    "EmptyHistoryError",
    "ForesightError",
    "ForwardError",
    "HistoryFileError",
    "MemoryBudgetError",
    "MeasureSettingsError",
    "MissingDependencyError",
    "MissingInputError",
    "NoSupportedLayersError",
    "NonFiniteWeightsError",
    "OptionError",
    "ReportFileError",
    "ShapeMismatchError",
    "UnknownLayerError",
    "UnknownNameError",
    "DeviceError",
    "UnsupportedEngineError",
    "UnsupportedLayerError",
    "WeightsError",
    "ForesightWarning",
    "ForesightFutureWarning",
    "ForesightDeprecationWarning",
    "__version__",
]

logging.getLogger("foresight_sparse").addHandler(logging.NullHandler())
