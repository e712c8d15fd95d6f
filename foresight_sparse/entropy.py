"""Shannon entropy in bits, densely and from the sufficient row statistics the engines keep."""

from __future__ import annotations

import math

import torch

from .backends import default_backend, numba_kernels

__all__ = [
    "H",
    "row_entropy",
    "safe_inverse",
    "complete_row_sums",
    "column_terms",
    "entropy_from_terms",
]


def H(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    r"""Shannon entropy in bits of the distributions laid along ``dim`` of ``x``.

    Computes :math:`-\sum_i x_i \log_2 x_i`, where every term that is NaN (from a zero or a
    negative entry) counts as 0. ``x`` is not checked to be a distribution.

    Parameters
    ----------
    x : torch.Tensor
        Probabilities (or any non-negative weights).
    dim : int, default 0
        The axis to sum over; a 1-d ``x`` gives a 0-d tensor.

    Returns
    -------
    torch.Tensor
        ``x`` with ``dim`` reduced away.
    """
    terms = x * torch.log2(x)
    terms = torch.nan_to_num(terms, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    return -terms.sum(dim=dim)


def row_entropy(total: torch.Tensor, plogp: torch.Tensor) -> torch.Tensor:
    r"""Entropy of rows ``f / Z`` from ``Z = sum f`` and ``T = sum f log2 f``.

    :math:`H = \log_2 Z - T / Z`, and 0 for an all-zero row (``Z = 0``). Accumulate both
    sums in float64: the difference loses the digits the sums lack.
    """
    return torch.where(total > 0, torch.log2(total) - plogp * safe_inverse(total), 0.0)


def safe_inverse(total: torch.Tensor) -> torch.Tensor:
    """``1 / Z`` where ``Z > 0``, and 0 for an all-zero row (``Z = 0``): such a row adds
    nothing to any column and has entropy 0."""
    positive = total > 0
    return torch.where(positive, 1.0 / torch.where(positive, total, 1.0), 0.0)


def complete_row_sums(norm, shift: float, stored, n_cols: int, z: torch.Tensor, t: torch.Tensor):
    """Complete rows' sums over their stored entries, ``Z`` and ``T``, with the absent
    entries (``n_cols - stored`` per row, each ``c = norm.zero(shift)``); return
    ``(Z, T, 1/Z)``. Rows are not divided by their sum when the norm does not normalise:
    ``Z`` is then 1."""
    if norm.normalizes:
        absent = n_cols - stored
        z = z + norm.zero(shift) * absent
        t = t + norm.zero_log2(shift) * absent
    else:
        z = torch.ones_like(z)
    return z, t, safe_inverse(z)


def column_terms(
    v: torch.Tensor, add: float = 0.0, weights: torch.Tensor | None = None, *, backend=None
) -> torch.Tensor:
    """Sufficient statistics of ``H(x / sum x)`` for ``x = v + add``, as float64 ``(4,)``.

    ``[sum x, sum x log2 x]`` over the positive entries and ``[sum x, sum |x| log2 |x|]``
    over the negative ones, each entry counted ``weights[j]`` times when ``weights`` is
    given. They add up across layers, so the network's degeneracy needs no concatenated
    column vector (see :func:`entropy_from_terms`). Computed in the form of ``backend`` (a
    :class:`~foresight_sparse.backends.Backend`; by default the one for ``v``'s device:
    numba on the CPU, torch elsewhere), and returned on the CPU.
    """
    if backend is None:
        backend = default_backend(v.device)
    return _COLUMN_TERMS[backend.name](v, add, weights)


def _column_terms_torch(v: torch.Tensor, add: float, weights: torch.Tensor | None):
    x = v.to(torch.float64) + add
    pos, neg = x > 0, x < 0
    ax = torch.where(pos | neg, x.abs(), torch.ones_like(x))
    xlx = ax * torch.log2(ax)
    if weights is not None:
        w = weights.to(x.device, torch.float64)
        x, xlx = x * w, xlx * w
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    return torch.stack(
        [
            torch.where(pos, x, zero).sum(),
            torch.where(pos, xlx, zero).sum(),
            torch.where(neg, x, zero).sum(),
            torch.where(neg, xlx, zero).sum(),
        ]
    ).cpu()


def _column_terms_numba(v: torch.Tensor, add: float, weights: torch.Tensor | None):
    arr = v.detach().contiguous().numpy()
    w = None if weights is None else weights.detach().to(torch.float64).contiguous().numpy()
    return torch.from_numpy(numba_kernels("_entropy_kernels").column_terms(arr, float(add), w))


#: The forms of :func:`column_terms`, by backend name.
_COLUMN_TERMS = {"numba": _column_terms_numba, "torch": _column_terms_torch}


def entropy_from_terms(terms) -> float:
    r"""``H(x / sum x)`` in bits, from :func:`column_terms`, with the old module's rule.

    As in :func:`H`, a term with ``x / sum x <= 0`` counts as 0: for ``S = sum x > 0`` only
    positive entries count and :math:`H = (A_+ \log_2 S - B_+) / S`; for ``S < 0`` only
    negative ones. An all-zero vector has entropy 0.
    """
    values = terms.tolist() if hasattr(terms, "tolist") else terms  # one call, not four
    ap, bp, an, bn = (float(t) for t in values)
    s = ap + an
    if s > 0:
        return (ap * math.log2(s) - bp) / s
    if s < 0:
        return (-an * math.log2(-s) - bn) / -s
    return 0.0 if ap == 0 and an == 0 else float("nan")
