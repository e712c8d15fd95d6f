"""deep-ei's benchmark network and a topology graph that current networkx accepts."""

from __future__ import annotations

import torch
from torch import nn

#: deep-ei's example MLP: 100-30-30-30-10 with Sigmoid activations.
WIDTHS = (100, 30, 30, 30, 10)


def mlp(seed: int = 0) -> nn.Sequential:
    """The 100-30-30-30-10 Sigmoid MLP with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for n_in, n_out in zip(WIDTHS[:-1], WIDTHS[1:]):
        layers += [nn.Linear(n_in, n_out), nn.Sigmoid()]
    return nn.Sequential(*layers)


def topology(net: nn.Sequential):
    """deep-ei's topology graph of ``net`` without the ``None`` node that makes
    ``deep_ei.topology_of`` fail on current networkx: one node per Linear with deep-ei's
    ``input``/``output`` attributes, edges in forward order."""
    import networkx as nx

    graph = nx.DiGraph()
    linears = [(i, m) for i, m in enumerate(net) if isinstance(m, nn.Linear)]
    for k, (i, m) in enumerate(linears):
        before = net[i - 1] if i > 0 and not isinstance(net[i - 1], nn.Linear) else None
        after = net[i + 1] if i + 1 < len(net) and not isinstance(net[i + 1], nn.Linear) else None
        graph.add_node(
            m,
            input={"activation": before, "shape": (1, m.in_features)},
            output={"activation": after, "shape": (1, m.out_features)},
        )
        if k:
            graph.add_edge(linears[k - 1][1], m)
    return graph
