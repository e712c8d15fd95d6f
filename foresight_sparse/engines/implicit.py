"""The implicit engine (work in progress in this commit: serves no layer yet)."""

from __future__ import annotations

from . import LayerJob, LayerStats


def supports(job: LayerJob) -> bool:
    return False


def layer_stats(job: LayerJob) -> LayerStats:
    raise NotImplementedError
