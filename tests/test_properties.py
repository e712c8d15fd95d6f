"""Properties every result must have, over random small networks and every shipped norm.

The networks (``conftest.random_nets``) mix Linear, Conv2d (every padding mode) and AvgPool2d
layers with ReLU and Flatten between, with seeded weights that are negative, positive and
exactly zero. For each norm:

- EI is finite, and equals the dense reference's;
- ``0 <= mean_row_entropy <= log2(n_out)`` for every layer (a row is a distribution over
  ``n_out`` columns), so ``determinism <= log2(max n_out)``;
- a layer's degeneracy is at most ``log2(n_out)``, the network's at most
  ``log2(total columns)``;
- the sparse engine's result does not depend on the size of the row blocks it streams
  (1e-12 relative).

That every engine gives the reference's determinism, degeneracy and EI on these networks
(the dense engine included) is ``test_engines.test_engine_equals_reference``.

The lower bound allows ``-1e-12``: a row with one stored entry has ``H = log2 Z - T / Z``,
which float64 rounding may leave a few ulps below zero.
"""

from __future__ import annotations

import math

import numba
from conftest import assert_close, random_nets, smallest_budget
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import foresight_sparse as fs
from foresight_sparse import reference as R

NORMS = ["lin", "soft", "sig"]
SLACK = 1e-9
PROPS = settings(
    deadline=None, max_examples=25, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@PROPS
@given(net=random_nets())
def test_entropies_are_finite_and_bounded(net):
    for norm in NORMS:
        rep = fs.report(net.model, net.input, norm=norm)
        assert math.isfinite(rep.ei), (norm, rep)
        ref_norm = getattr(R, f"{norm}_norm")
        # EI is a difference of two terms a few bits large: an absolute bound
        assert_close(rep.ei, R.ei(net.model, net.input, norm=ref_norm), 1e-9, 1e-9, what=norm)
        for lay in rep.layers:
            bound = math.log2(lay.n_out) + SLACK
            assert -1e-12 <= lay.mean_row_entropy <= bound, (norm, lay)
            assert -1e-12 <= lay.degeneracy <= bound, (norm, lay)
        assert -1e-12 <= rep.determinism <= math.log2(max(l.n_out for l in rep.layers)) + SLACK
        total_columns = sum(lay.n_out for lay in rep.layers)
        assert -1e-12 <= rep.degeneracy <= math.log2(total_columns) + SLACK, (norm, rep)


@PROPS
@given(net=random_nets(), norm=st.sampled_from(NORMS))
def test_sparse_result_does_not_depend_on_the_block_size(net, norm):
    # Streaming a row at a time is hundreds of kernel launches per network, and a parallel
    # numba launch costs milliseconds on a busy 2-core machine: one drawn norm per network
    # (25 networks still cover all three) and one numba thread here. Independence from the
    # thread count is test_engines.test_numba_threads_do_not_change_the_result.
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        # blocks of a row or two; the budget does not depend on the (elementwise) norm
        budget = smallest_budget(net.model, net.input, engine="sparse")
        whole = fs.report(net.model, net.input, norm=norm, engine="sparse")
        streamed = fs.report(net.model, net.input, norm=norm, engine="sparse", max_memory=budget)
    finally:
        numba.set_num_threads(threads)
    assert budget < fs.DEFAULT_MAX_MEMORY
    for what in ("determinism", "degeneracy", "ei"):
        assert_close(
            getattr(streamed, what), getattr(whole, what), 1e-12, what=f"{norm} {what}, {budget} B"
        )
