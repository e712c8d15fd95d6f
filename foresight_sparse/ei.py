"""Drop-in replacement for the old ``foresight.ei`` module.

``import foresight_sparse.ei as ei`` offers the same twelve names with the same signatures
and defaults, and returns the same numbers, without ever building a dense matrix. New
options are keyword-only and default to the drop-in behaviour. Where the old module was
wrong this one is right (see the migration guide): Conv2d honours dilation, groups, string
padding and padding modes; AvgPool2d connects each output within its own channel with
PyTorch's divisor (``legacy=True`` restores the old cross-channel matrices); and
``ei = degeneracy - determinism``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import torch
from torch import nn

from . import connectivity as _conn
from .analysis import report as _report
from .entropy import H
from .norms import lin_norm, sig_norm, soft_norm
from .tracing import get_shapes

__all__ = [
    "H",
    "soft_norm",
    "lin_norm",
    "sig_norm",
    "linear_create_matrix",
    "conv2d_create_matrix",
    "avgpool2d_create_matrix",
    "VALID_MODULES",
    "get_shapes",
    "determinism",
    "degeneracy",
    "ei",
]


def linear_create_matrix(
    module: nn.Linear, in_shape, out_shape, *, layout: Any = torch.sparse_coo, max_memory=None
):
    """Connectivity matrix of an ``nn.Linear`` layer: the weight transposed.

    Parameters
    ----------
    module : torch.nn.Linear
        The layer (its bias is ignored).
    in_shape, out_shape : tuple of int
        The traced input and output shapes; their last dimensions must match the layer.
    layout : torch.layout or str, default torch.sparse_coo
        ``torch.sparse_coo`` (coalesced), ``torch.sparse_csr`` or ``'scipy'``
        (a ``scipy.sparse.csr_array``).
    max_memory : int or str, optional
        Refuse, with the byte estimate, a matrix larger than this (default: half of the
        memory available now).

    Returns
    -------
    torch.Tensor or scipy.sparse.csr_array
        Shape ``(in_features, out_features)``, on the weight's device.
    """
    return _conn.linear(module, in_shape, out_shape).to_sparse(layout, max_memory=max_memory)


def conv2d_create_matrix(
    module: nn.Conv2d, in_shape, out_shape, *, layout: Any = torch.sparse_coo, max_memory=None
):
    """Connectivity matrix of an ``nn.Conv2d`` layer, built sparse.

    Row ``(c, h, w)`` of the input, column ``(c, h, w)`` of the output (flattened, batch
    dropped); the entry is the weight joining them, i.e. the transposed Jacobian of the
    bias-free layer. Honours stride, padding (int, tuple, ``'same'``, ``'valid'``),
    dilation, groups and every ``padding_mode`` (reflect, replicate and circular padding
    sum the taps that land on the same input).

    Parameters
    ----------
    module : torch.nn.Conv2d
        The layer.
    in_shape, out_shape : tuple of int
        Traced ``(N, C, H, W)`` (or ``(C, H, W)``) shapes.
    layout : torch.layout or str, default torch.sparse_coo
        ``torch.sparse_coo`` (coalesced), ``torch.sparse_csr`` or ``'scipy'``.
    max_memory : int or str, optional
        Refuse, with the byte estimate, a matrix larger than this (default: half of the
        memory available now).

    Returns
    -------
    torch.Tensor or scipy.sparse.csr_array
        Shape ``(C_in*H*W, C_out*H_out*W_out)``, on the weight's device.
    """
    return _conn.conv2d(module, in_shape, out_shape).to_sparse(layout, max_memory=max_memory)


def avgpool2d_create_matrix(
    module: nn.AvgPool2d,
    in_shape,
    out_shape,
    *,
    layout: Any = torch.sparse_coo,
    legacy: bool = False,
    max_memory=None,
):
    """Connectivity matrix of an ``nn.AvgPool2d`` layer, built sparse.

    Each output connects to its window in its own channel, with the divisor PyTorch uses
    for it (``padding``, ``ceil_mode``, ``count_include_pad``, ``divisor_override``).

    Parameters
    ----------
    module : torch.nn.AvgPool2d
        The layer.
    in_shape, out_shape : tuple of int
        Traced ``(N, C, H, W)`` (or ``(C, H, W)``) shapes.
    layout : torch.layout or str, default torch.sparse_coo
        ``torch.sparse_coo`` (coalesced), ``torch.sparse_csr`` or ``'scipy'``.
    legacy : bool, default False
        Reproduce the old module exactly: every output connects to its window in *all*
        input channels with entry ``1/(kh*kw)``; padding is refused.
    max_memory : int or str, optional
        Refuse, with the byte estimate, a matrix larger than this.

    Returns
    -------
    torch.Tensor or scipy.sparse.csr_array
        Shape ``(C*H*W, C*H_out*W_out)``.
    """
    return _conn.avgpool2d(module, in_shape, out_shape, legacy=legacy).to_sparse(
        layout, max_memory=max_memory
    )


_DROP_IN = {
    _conn.linear: linear_create_matrix,
    _conn.conv2d: conv2d_create_matrix,
    _conn.avgpool2d: avgpool2d_create_matrix,
}


class _ValidModules(MutableMapping):
    """``{module type: create_matrix function}``: a live view of the builder registry.

    Reading gives the drop-in ``*_create_matrix`` function of a type. Assigning a function
    ``fn(module, in_shape, out_shape)`` that returns a dense or sparse matrix registers it
    for that type (as with the old module); assigning one of this module's
    ``*_create_matrix`` functions reuses the matching sparse builder.
    """

    def __getitem__(self, key: type) -> Callable:
        if key in _conn.EXTENDED:  # built in, but not a type the old module counted
            raise KeyError(key)
        adapter = _conn.REGISTRY[key]
        if adapter in _DROP_IN:
            return _DROP_IN[adapter]
        return getattr(adapter, "create_matrix", None) or _generic_create_matrix(adapter)

    def __setitem__(self, key: type, fn: Callable) -> None:
        for adapter, drop_in in _DROP_IN.items():
            if fn is drop_in:
                _conn.register(key, adapter)
                return

        def adapter(module, in_shape, out_shape, *, legacy=False, label=None):
            matrix = fn(module, in_shape, out_shape)
            return _conn.ExplicitMatrix(label or type(module).__name__, matrix)

        adapter.create_matrix = fn
        _conn.register(key, adapter)

    def __delitem__(self, key: type) -> None:
        if key in _conn.EXTENDED:
            raise KeyError(key)
        _conn.unregister(key)

    def __iter__(self) -> Iterator[type]:
        return iter([t for t in _conn.REGISTRY if t not in _conn.EXTENDED])

    def __len__(self) -> int:
        return len(_conn.REGISTRY) - len(_conn.EXTENDED)

    def __repr__(self) -> str:
        return "VALID_MODULES(" + ", ".join(t.__name__ for t in self) + ")"


def _generic_create_matrix(adapter):
    import warnings

    def create_matrix(module, in_shape, out_shape, *, layout=torch.sparse_coo, max_memory=None):
        # A user's matrix goes through torch's sparse CSR conversion, whose "beta state"
        # notice is torch's, not news to the caller: keep it inside the library.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Sparse CSR tensor support is in beta", category=UserWarning
            )
            conn = adapter(module, in_shape, out_shape)
            return conn.to_sparse(layout, max_memory=max_memory)

    return create_matrix


#: The supported module types and their connectivity builders: a view of the entries of
#: :data:`~foresight_sparse.connectivity.registry.REGISTRY` the old module's functions count (its
#: three types and the user's); assigning to it registers a builder.
VALID_MODULES: MutableMapping = _ValidModules()


_PARAMETERS = """\
Parameters
    ----------
    model : torch.nn.Module
        A feed-forward network.
    input : torch.Tensor, optional
        An example input, needed unless ``shapes`` is given.
    shapes : dict, optional
        ``{module: (in_shape, out_shape)}`` from :func:`get_shapes`.
    norm : Norm, str, callable or None, default lin_norm
        Row normalisation: ``lin_norm``, ``soft_norm``, ``sig_norm`` (or their names
        ``'lin'``, ``'soft'``, ``'sig'``), ``None`` for raw weights, or any row-wise
        callable.
    device : str or torch.device, default 'cpu'
        Where the computation runs (``'cpu'`` or ``'cuda'``).
    engine : {'auto', 'implicit', 'sparse', 'dense'}, default 'auto'
        Keyword-only. See :func:`foresight_sparse.analysis.report`.
    legacy : bool, default False
        Keyword-only. Use the old module's cross-channel AvgPool2d matrices.
    max_memory : int or str, optional
        Keyword-only. Working-memory budget of the engines (default 2 GiB).
"""


def _with_parameters(fn):
    """Fill the shared ``{parameters}`` section of the three drop-in functions' docstrings."""
    fn.__doc__ = fn.__doc__.replace("{parameters}", _PARAMETERS.strip())
    return fn


@_with_parameters
def determinism(
    model: nn.Module,
    input=None,
    shapes=None,
    norm=lin_norm,
    device="cpu",
    *,
    engine: str = "auto",
    legacy: bool = False,
    max_memory=None,
) -> float:
    r"""Determinism of ``model``: the mean entropy of every neuron's normalised out-weights.

    .. math:: \text{determinism} = \frac{1}{N} \sum_{\text{layers}} \sum_r H(P_{r,:})

    where ``N`` counts every row (input neuron) of every layer, all-zero rows included.

    {parameters}

    Returns
    -------
    float
        Bits.
    """
    return _report(
        model,
        input,
        shapes,
        norm,
        device,
        engine=engine,
        legacy=legacy,
        max_memory=max_memory,
        layers="seed",
    ).determinism


@_with_parameters
def degeneracy(
    model: nn.Module,
    input=None,
    shapes=None,
    norm=lin_norm,
    device="cpu",
    *,
    engine: str = "auto",
    legacy: bool = False,
    max_memory=None,
) -> float:
    r"""Degeneracy of ``model``: the entropy of the pooled, normalised in-weights.

    .. math:: \text{degeneracy} = H\left(v / \textstyle\sum v\right)

    where ``v`` concatenates every layer's column sums of ``P``.

    {parameters}

    Returns
    -------
    float
        Bits.
    """
    return _report(
        model,
        input,
        shapes,
        norm,
        device,
        engine=engine,
        legacy=legacy,
        max_memory=max_memory,
        layers="seed",
    ).degeneracy


@_with_parameters
def ei(
    model: nn.Module,
    input=None,
    shapes=None,
    norm=lin_norm,
    device="cpu",
    *,
    engine: str = "auto",
    legacy: bool = False,
    max_memory=None,
) -> float:
    r"""Effective information of ``model``: ``degeneracy - determinism``.

    .. math:: \text{EI} = H\left(\langle P \rangle\right) - \langle H(P_{r,:}) \rangle

    (the old module's docstring states the difference the other way round; its code, and
    this function, compute degeneracy minus determinism). Both parts come from one pass,
    each layer built once.

    {parameters}

    Returns
    -------
    float
        Bits.
    """
    return _report(
        model,
        input,
        shapes,
        norm,
        device,
        engine=engine,
        legacy=legacy,
        max_memory=max_memory,
        layers="seed",
    ).ei
