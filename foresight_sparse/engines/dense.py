"""The dense engine: the reference implementation, one layer at a time.

Builds each layer's dense matrix with :mod:`foresight_sparse.reference` (float64), applies the
norm densely and reduces it. Exponentially wasteful by design: it is the oracle the other
engines are checked against and the baseline the benchmarks compare with. Layers whose type
the reference does not know (user builders) are densified from their connectivity.
"""

from __future__ import annotations

import torch

from .. import reference
from ..budget import check_budget
from ..entropy import H
from . import LayerJob, LayerStats

__all__ = ["layer_stats"]


def layer_stats(job: LayerJob) -> LayerStats:
    """Reduce one layer densely (see module docstring)."""
    conn, layer = job.conn, job.layer
    check_budget(conn.n_rows * conn.n_cols * 8 * 3, job.budget,
                 f"{conn.label}: the dense {conn.n_rows} x {conn.n_cols} matrix",
                 "use engine='sparse' or 'implicit', or raise max_memory")
    module = layer.module
    builder = reference.VALID_MODULES.get(type(module))
    if builder is None:
        dense = conn.to_dense(torch.float64)
    elif builder is reference.avgpool2d_create_matrix:
        dense = builder(module, layer.in_shape, layer.out_shape, legacy=job.legacy)
    else:
        dense = builder(module, layer.in_shape, layer.out_shape)
    p = job.norm(dense.to(job.device, torch.float64))
    return LayerStats(float(H(p, dim=1).sum()), conn.n_rows, p.sum(0), "dense")
