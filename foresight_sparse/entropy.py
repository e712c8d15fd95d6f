"""Shannon entropy in bits, densely and from the sufficient row statistics the engines keep."""

from __future__ import annotations

import torch

__all__ = ["H", "row_entropy"]


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
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, torch.log2(safe) - plogp / safe, torch.zeros_like(total))
