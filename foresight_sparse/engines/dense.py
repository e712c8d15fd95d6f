"""The dense engine: each layer's whole matrix, normalised and reduced densely.

Densifies the layer's :class:`~foresight_sparse.connectivity.Connectivity` in float64, applies
the norm as the old module does and reduces it. Wasteful by design: it is the benchmark
baseline, and checked itself against the independent dense reference
(:mod:`foresight_sparse.reference`), which shares no code with it.
"""

from __future__ import annotations

import torch

from ..budget import check_budget
from ..entropy import H
from ..exceptions import Opt
from .base import LayerJob, LayerStats

__all__ = ["layer_stats"]


def layer_stats(job: LayerJob) -> LayerStats:
    """Reduce one layer densely (see module docstring)."""
    conn = job.conn
    conn.check_finite()
    check_budget(
        conn.n_rows * conn.n_cols * 8 * 3,
        job.budget,
        f"{conn.label}: the dense {conn.n_rows} x {conn.n_cols} matrix",
        ("use ", Opt("engine", "sparse", "implicit"), ", or raise ", Opt("max_memory")),
    )
    p = job.norm(conn.to_dense(torch.float64, backend=job.backend).to(job.device))
    return LayerStats(
        float(H(p, dim=1).sum()), conn.n_rows, p.sum(0), "dense", backend=job.backend.name
    )
