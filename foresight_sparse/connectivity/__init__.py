"""Layer connectivity: the registry from module type to builder, and the sparse matrices.

A builder (an *adapter*) reads a module and its traced shapes and returns a
:class:`Connectivity`: a description of the layer's connectivity matrix ``A`` (one row per
input neuron, one column per output neuron, ``A[r, c]`` the weight from input ``r`` to output
``c``) that can produce any block of rows as sparse index arrays, or the whole matrix as a
torch sparse tensor, without ever building it densely.

Three kinds cover the built-in layers and user extensions:

- :class:`Stencil`: sliding-window layers (Conv2d, AvgPool2d), described by a kernel and two
  :class:`~foresight_sparse.geometry.Axis` objects;
- :class:`FullyConnected`: Linear, the weight transposed;
- :class:`ExplicitMatrix`: a matrix a user-supplied ``create_matrix`` function returned.

The package is split by concern: ``base`` (the base class, blocks, the weight scan),
``stencil``, ``fully_connected``, ``explicit``, ``registry`` (the registry and ``layers=``)
and ``adapters`` (the built-in layer types). Every public name is importable from here.
"""

from __future__ import annotations

from .adapters import (
    adaptive_avgpool1d,
    adaptive_avgpool2d,
    adaptive_avgpool3d,
    avgpool1d,
    avgpool2d,
    avgpool3d,
    conv1d,
    conv2d,
    conv3d,
    conv_transpose1d,
    conv_transpose2d,
    conv_transpose3d,
    linear,
)
from .base import Block, Connectivity
from .explicit import ExplicitMatrix
from .fully_connected import FullyConnected
from .registry import (
    EXTENDED,
    LAYER_SETS,
    REGISTRY,
    SEED_TYPES,
    LayerSelection,
    connectivity,
    register,
    unregister,
)
from .stencil import Stencil

__all__ = [
    "Block",
    "Connectivity",
    "Stencil",
    "FullyConnected",
    "ExplicitMatrix",
    "REGISTRY",
    "SEED_TYPES",
    "EXTENDED",
    "LAYER_SETS",
    "LayerSelection",
    "register",
    "unregister",
    "connectivity",
    "linear",
    "conv2d",
    "avgpool2d",
    "conv1d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "avgpool1d",
    "avgpool3d",
    "adaptive_avgpool1d",
    "adaptive_avgpool2d",
    "adaptive_avgpool3d",
]
