"""Backends: where a plan's numeric forms run, chosen once per plan.

Every quantity the engines compute has two forms, side by side in the module of its
algorithm (the block fills beside the connectivity they fill, the sparse reduction in
:mod:`foresight_sparse.engines.blocks`, the implicit passes in
:mod:`foresight_sparse.engines.conv` and :mod:`foresight_sparse.engines.linear`, the column
terms in :mod:`foresight_sparse.entropy`):

- the *numba* form: numba kernels over NumPy views of CPU tensors, for the norms they know
  (``lin``, ``soft``, ``sig`` and ``none``). What the CPU runs.
- the *torch* form: torch operations, on any device. What CUDA runs, what custom norms run
  everywhere, and what ``backend='torch'`` runs on the CPU.

A :class:`Backend` says which: :func:`resolve_backend` turns the ``backend=`` option of
:func:`foresight_sparse.plan` into one, once per plan, and each layer's
:class:`~foresight_sparse.engines.LayerJob` carries it. The engines find their forms by the
backend's :attr:`~Backend.name` in one table (:mod:`foresight_sparse.engines.dispatch`,
which also hands a layer the numba forms cannot take to torch), and the report records
which backend served each layer (:attr:`LayerReport.backend
<foresight_sparse.results.LayerReport>`).

numba loads on first use, not at ``import foresight_sparse``: the kernel modules import it,
and the numba forms reach them through :func:`numba_kernels`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import torch

from .exceptions import DeviceError, Opt, UnknownNameError, UnsupportedEngineError
from .norms import KERNEL_CODES, NORMS, Norm

__all__ = [
    "BACKENDS",
    "NUMBA_FLOATS",
    "Backend",
    "TORCH",
    "resolve_backend",
    "default_backend",
    "numba_kernels",
]

#: The names ``backend=`` accepts.
BACKENDS = ("auto", "numba", "torch")

#: The float dtypes the numba kernels read as they are.
NUMBA_FLOATS = (torch.float32, torch.float64)


@dataclass(frozen=True)
class Backend:
    """Where and how a plan's numeric forms run: what a plan resolves once.

    Attributes
    ----------
    name : str
        ``'numba'`` or ``'torch'``: which form of each quantity runs, and what
        :attr:`LayerReport.backend <foresight_sparse.results.LayerReport>` records.
    kind : int or None
        The norm's code in :data:`foresight_sparse.norms.KERNEL_CODES`, which the numba
        kernels evaluate; ``None`` for the torch backend, and for a numba backend that only
        fills blocks and computes column terms (as :func:`default_backend` gives).
    bytes_per_entry : int
        Working bytes per stored entry while the sparse engine reduces a block (indices,
        values and temporaries).
    """

    name: str
    kind: int | None
    bytes_per_entry: int

    def __repr__(self) -> str:
        return f"<{self.name} backend>"

    def threads(self) -> int:
        """Per-thread column accumulators the sparse engine keeps: numba's threads, or 1."""
        if self.name == "numba":
            return numba_kernels("_numba").threads()
        return 1


def numba_kernels(module: str) -> ModuleType:
    """The numba kernel module ``foresight_sparse.<module>``, imported on first use.

    The kernel modules import numba (a few tenths of a second) at their top, and
    ``import foresight_sparse`` must not pay for it. So no module imports them: every
    numba form reaches its kernels through this function, the one place the package
    imports a module of its own at run time (``tests/test_architecture.py`` counts these
    names in the import graph, and checks there is no other).

    Parameters
    ----------
    module : str
        The module's name inside the package, e.g. ``'engines._conv_kernels'``.
    """
    # A dict lookup: the forms ask for their kernels on every call, and importlib's
    # import_module (a lock and a sys.modules check) costs microseconds each time.
    try:
        return _LOADED[module]
    except KeyError:
        loaded = _LOADED[module] = importlib.import_module(f"foresight_sparse.{module}")
        return loaded


#: The kernel modules :func:`numba_kernels` has loaded, by name.
_LOADED: dict[str, ModuleType] = {}


#: The torch backend (stateless: one instance serves every plan).
TORCH = Backend("torch", None, 96)

#: One numba backend per kernel code (and one for fills alone, under ``None``).
_NUMBA = {kind: Backend("numba", kind, 16) for kind in (None, *sorted(set(KERNEL_CODES.values())))}


def resolve_backend(backend: str = "auto", device="cpu", norm: Norm | None = None) -> Backend:
    """The backend a plan runs with: the ``backend=`` option resolved for its device and
    norm, once.

    Parameters
    ----------
    backend : {'auto', 'numba', 'torch'}, default 'auto'
        ``'auto'``: numba on a CPU device for the norms the kernels know (``lin``,
        ``soft``, ``sig``, ``none``), torch otherwise (CUDA, custom norms). ``'torch'``:
        the torch forms on any device (what CUDA runs, here also on CPU tensors).
        ``'numba'``: the numba kernels; CPU only, built-in norms only.
    device : torch.device or str
        Where the plan's reductions run.
    norm : Norm, optional
        The plan's norm; ``None`` asks for a backend that only fills blocks.

    Raises
    ------
    UnknownNameError
        For a name not in :data:`BACKENDS`.
    DeviceError
        For ``'numba'`` on a device other than the CPU.
    UnsupportedEngineError
        For ``'numba'`` with a norm the kernels do not have (a custom norm).
    """
    if isinstance(backend, Backend):
        return backend
    if backend not in BACKENDS:
        raise UnknownNameError(
            f"unknown backend {backend!r}; valid backends are {', '.join(BACKENDS)}"
        )
    dev = torch.device(device)
    if backend == "torch":
        return TORCH
    kind = None if norm is None else KERNEL_CODES.get(type(norm))
    if backend == "numba":
        if dev.type != "cpu":
            raise DeviceError(
                Opt("backend", "numba"),
                f" runs on the CPU only, and the device is {dev}; use ",
                Opt("backend", "auto", "torch"),
                " there, or ",
                Opt("device", "cpu"),
            )
        if norm is not None and kind is None:
            raise UnsupportedEngineError(
                Opt("backend", "numba"),
                f" has no kernel for the norm {norm.name!r} (the kernels know "
                f"{', '.join(NORMS)}); use ",
                Opt("backend", "auto", "torch"),
                ", which evaluate any norm with torch",
            )
        return _NUMBA[kind]
    if dev.type == "cpu" and (norm is None or kind is not None):
        return _NUMBA[kind]
    return TORCH


def default_backend(device) -> Backend:
    """The backend for work outside a plan (filling blocks, column terms): numba on the
    CPU, torch elsewhere. The one place that decides by the device alone."""
    return _NUMBA[None] if torch.device(device).type == "cpu" else TORCH
