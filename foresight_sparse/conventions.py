"""How the connectivity EI is split into determinism and degeneracy: two conventions.

Both start from the same row-normalised connectivity ``P`` of each layer (rows: input
neurons, the causes; columns: output neurons, the effects) and agree on nothing but the
entropies they are made of: ``H(P[r, :])`` of each row and ``H(<W_out>)``, the entropy of
the normalised column sums (the average effect distribution).

``'seed'`` (the old ``foresight.ei``, and the drop-in :mod:`foresight_sparse.ei`)::

    determinism = sum_r H(P[r, :]) / (all rows, empty ones included)
    degeneracy  = H(<W_out>)
    ei          = degeneracy - determinism

``'graph'`` (Klein & Hoel, "The emergence of informative higher scales in complex
networks", Complexity 2020, and einet's ``ei_net.py``), with N the number of rows that
have out-weights (a row whose weights all vanish under the norm is not a node that can be
intervened on, and is left out)::

    <H(W_out)>    = sum_r H(P[r, :]) / N
    determinism   = log2 N - <H(W_out)>
    degeneracy    = log2 N - H(<W_out>)
    ei            = determinism - degeneracy = H(<W_out>) - <H(W_out)>
    effectiveness = ei / log2 N                       (0 when N <= 1)

So both give ``log2 N`` bits for a permutation matrix, and the two EIs are equal when no
row is empty; the graph convention's determinism and degeneracy are "bits short of the
maximum", the seed's are entropies. Layers pool as in the seed: the network is the
block-diagonal matrix of its layers, so N, the row entropies and the column sums add up.

N needs no pass of its own: each non-empty row of ``P`` sums to 1, so N is the sum of all
column sums, which the engines compute anyway. That is why the graph convention needs a
norm that makes each row a distribution (``lin``, ``soft``, ``sig``), not ``norm=None``.
"""

from __future__ import annotations

import math

from .exceptions import Opt, UnknownNameError, UnsupportedEngineError

__all__ = ["CONVENTIONS", "GRAPH_COLUMNS", "check_convention", "graph_values"]

#: The valid ``convention=`` values.
CONVENTIONS = ("seed", "graph")

#: The quantities the graph convention adds to a report's columns.
GRAPH_COLUMNS = ("effectiveness", "nodes")


def check_convention(convention: str, norm) -> str:
    """Check a ``convention=`` argument against the norm it will be used with.

    Raises
    ------
    UnknownNameError
        For a name other than ``'seed'`` and ``'graph'``.
    UnsupportedEngineError
        For ``'graph'`` with a norm that does not make each row a distribution.
    """
    if convention not in CONVENTIONS:
        raise UnknownNameError(
            "unknown ",
            Opt("convention", convention),
            f"; valid conventions are {', '.join(CONVENTIONS)}",
        )
    if convention == "graph" and not getattr(norm, "normalizes", False):
        raise UnsupportedEngineError(
            Opt("convention", "graph"),
            " needs rows that are distributions, but ",
            Opt("norm", norm.name),
            " does not normalise them; use ",
            Opt("norm", "lin", "soft", "sig"),
            param="norm",
        )
    return convention


def graph_values(h_sum: float, column_total: float, degeneracy_seed: float) -> dict[str, float]:
    """The graph convention's values from the quantities the engines compute.

    Parameters
    ----------
    h_sum : float
        Sum of the row entropies, in bits.
    column_total : float
        Sum of all column sums of the normalised matrix: the number of non-empty rows, up
        to rounding (it is rounded here).
    degeneracy_seed : float
        ``H(<W_out>)``: the entropy of the normalised column sums (the seed's degeneracy).

    Returns
    -------
    dict
        ``determinism``, ``degeneracy``, ``ei``, ``effectiveness`` (floats, bits or a
        fraction) and ``nodes`` (N, an int).
    """
    nodes = int(round(column_total))
    log_n = math.log2(nodes) if nodes > 0 else 0.0
    mean_h = h_sum / nodes if nodes else 0.0
    ei = degeneracy_seed - mean_h
    return {
        "determinism": log_n - mean_h,
        "degeneracy": log_n - degeneracy_seed,
        "ei": ei,
        "effectiveness": ei / log_n if log_n > 0 else 0.0,
        "nodes": nodes,
    }
