"""Memory budgets: estimate bytes before allocating, refuse or stream when over budget."""

from __future__ import annotations

import math
import numbers
import os
import re

import torch

from .exceptions import MemoryBudgetError, Opt, OptionError

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "parse_bytes",
    "format_bytes",
    "available_memory",
    "resolve_budget",
    "check_budget",
]

#: Working memory the engines stream within unless told otherwise (2 GiB).
DEFAULT_MAX_MEMORY = 2 * 1024**3

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_bytes(value: int | float | str) -> int:
    """Read a byte count: a number (numpy scalars included), or a string such as
    ``"512MiB"``, ``"2GiB"``, ``"1.5GB"``.

    Raises
    ------
    OptionError
        For a number below one byte, NaN or infinity, or an unknown unit (as a
        ``ValueError``), and for anything that is neither a number nor a string, ``bool``
        included (as a ``TypeError``); every message names ``max_memory``, its ``param``.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(value):  # int() would raise a bare ValueError/OverflowError
            raise OptionError(
                Opt("max_memory"), f" must be a finite number of bytes, got {value!r}"
            )
        n = int(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise OptionError(
                Opt("max_memory", value),
                " is not a byte count; write e.g. 2GiB, 512MiB or a number of bytes",
            )
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise OptionError(
            Opt("max_memory"),
            f" must be a number of bytes or a string like '2GiB', not {type(value).__name__}",
        )
    if n <= 0:
        raise OptionError(Opt("max_memory"), f" must be positive, got {value!r}")
    return n


def format_bytes(n: float) -> str:
    """A byte count for people: ``format_bytes(3 * 2**30) == '3.00 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes that can be allocated now on ``device`` (free device memory for CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * 1024**3


def resolve_budget(
    max_memory: int | float | str | None,
    device: torch.device | str = "cpu",
    default: int | None = DEFAULT_MAX_MEMORY,
) -> int:
    """The budget in bytes: ``max_memory`` if given, else ``default``, else half of what is free."""
    if max_memory is not None:
        return parse_bytes(max_memory)
    if default is not None:
        return default
    return max(available_memory(device) // 2, 1)


def check_budget(needed: int, budget: int, what: str, fix) -> None:
    """Raise :class:`MemoryBudgetError` when ``needed`` bytes exceed ``budget``.

    ``what`` names the layer and the allocation; ``fix`` says how to proceed: a string, or
    a tuple of message parts (text and :class:`~foresight_sparse.exceptions.Opt`).
    """
    if needed > budget:
        fix_parts = (fix,) if isinstance(fix, str) else tuple(fix)
        raise MemoryBudgetError(
            f"{what} needs about {format_bytes(needed)} but ",
            Opt("max_memory"),
            f" is {format_bytes(budget)}; ",
            *fix_parts,
            needed=needed,
            budget=budget,
        )


def row_blocks(
    counts, bytes_per_entry: int, bytes_per_row: int, budget: int, label: str, reserved: int = 0
) -> list[tuple[int, int]]:
    """Split rows into consecutive blocks whose working memory stays within ``budget``.

    Parameters
    ----------
    counts : numpy.ndarray
        Stored entries of every row.
    bytes_per_entry : int
        Working bytes per stored entry.
    bytes_per_row : int
        Working bytes per row.
    budget : int
        The whole budget (``max_memory``).
    label : str
        The layer, for the error message.
    reserved : int, default 0
        Bytes held for the whole layer (e.g. column accumulators); blocks get the rest.

    Raises
    ------
    MemoryBudgetError
        When the reserved bytes and a single row need more than ``budget``; the error
        reports the full ``budget`` and the full need.
    """
    import numpy as np

    counts = np.asarray(counts, dtype=np.int64)
    cost = counts * bytes_per_entry + bytes_per_row
    if len(cost) and int(cost.max()) + reserved > budget:
        check_budget(
            int(cost.max()) + reserved,
            budget,
            f"{label}: one row of the connectivity matrix and the layer's column accumulators",
            ("raise ", Opt("max_memory"), " to at least that"),
        )
    budget -= reserved
    cum = np.cumsum(cost)
    blocks = []
    start, spent = 0, 0
    while start < len(counts):
        stop = int(np.searchsorted(cum, spent + budget, side="right"))
        stop = max(stop, start + 1)
        blocks.append((start, stop))
        spent = int(cum[stop - 1])
        start = stop
    return blocks
