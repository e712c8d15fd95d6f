"""The dense reference implementation: the test oracle of foresight-sparse.

Every quantity here is computed in the most direct way the definitions allow: each layer's
connectivity matrix is built as a dense ``(inputs, outputs)`` tensor, normalised row by row,
and reduced with plain tensor operations. Convolution and pooling matrices are obtained by
pushing the identity basis through the layer, so they are the exact transposed Jacobian of the
bias-free layer by construction, whatever its stride, padding, dilation or groups.

This module shares no code with the rest of the package on purpose, so that a bug in the
production engines cannot hide by also being in the oracle. Its cost grows with the product of
the number of input and output neurons of every layer (a VGG-16 layer at 224x224 would need tens
of terabytes), so use it only on the small networks of the test suite, never on real networks.

The public names mirror those of the original ``foresight.ei`` module. Two deliberate
differences from that module: Conv2d matrices are the true connectivity (the original ignored
dilation, groups, string padding and ``padding_mode``), and AvgPool2d matrices are per channel
with PyTorch's divisor unless ``legacy=True`` asks for the original all-channel matrix.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from foresight_sparse.exceptions import (
    MissingInputError,
    NoSupportedLayersError,
    Opt,
    ShapeMismatchError,
    UnknownNameError,
    UnsupportedLayerError,
)

__all__ = [
    "H",
    "soft_norm",
    "lin_norm",
    "sig_norm",
    "linear_create_matrix",
    "conv2d_create_matrix",
    "avgpool2d_create_matrix",
    "convnd_create_matrix",
    "conv_transposend_create_matrix",
    "avgpoolnd_create_matrix",
    "adaptive_avgpoolnd_create_matrix",
    "VALID_MODULES",
    "ALL_MODULES",
    "get_shapes",
    "determinism",
    "degeneracy",
    "ei",
]

Shape = tuple[int, ...]
Shapes = Mapping[nn.Module, tuple[Shape, Shape]]
Norm = Callable[[torch.Tensor], torch.Tensor]

# How many identity basis vectors are pushed through a layer at once; bounds the size of the
# temporary batch, not of the (dense) result.
_BASIS_CHUNK = 2048


# --------------------------------------------------------------------------------------------
# Entropy and row norms
# --------------------------------------------------------------------------------------------


def H(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Shannon entropy, in bits, of the distributions laid out along one axis of `x`.

    Parameters
    ----------
    x : torch.Tensor
        Probabilities. They are not checked to sum to one.
    dim : int, default 0
        The axis along which each distribution lies.

    Returns
    -------
    torch.Tensor
        ``-sum(x * log2(x))`` along `dim`, one order lower than `x`. A term that is NaN, as
        ``0 * log2(0)`` and ``p * log2(p)`` for negative ``p`` are, counts as zero.
    """
    terms = x * torch.log2(x)
    terms = torch.where(torch.isnan(terms), torch.zeros_like(terms), terms)
    return -terms.sum(dim=dim)


def soft_norm(W: torch.Tensor) -> torch.Tensor:
    """Turn each row of `W` into a distribution with a softmax.

    Parameters
    ----------
    W : torch.Tensor
        A 2-d connectivity matrix, one row per input neuron.

    Returns
    -------
    torch.Tensor
        The row-wise softmax of `W`. The softmax runs over the whole row, so an absent
        connection (a zero entry) still weighs ``exp(0) = 1``.
    """
    return F.softmax(W, dim=1)


def lin_norm(W: torch.Tensor) -> torch.Tensor:
    """Turn each row of `W` into a distribution by clipping negatives and dividing by the sum.

    Parameters
    ----------
    W : torch.Tensor
        A 2-d connectivity matrix, one row per input neuron.

    Returns
    -------
    torch.Tensor
        ``relu(W)`` with each row divided by its sum. A row with no positive entry stays all
        zero rather than becoming NaN.
    """
    positive = F.relu(W)
    sums = positive.sum(dim=1, keepdim=True)
    sums = torch.where(sums == 0, torch.ones_like(sums), sums)
    return positive / sums


def sig_norm(W: torch.Tensor) -> torch.Tensor:
    """Turn each row of `W` into a distribution with a logistic map and a division by the sum.

    Parameters
    ----------
    W : torch.Tensor
        A 2-d connectivity matrix, one row per input neuron.

    Returns
    -------
    torch.Tensor
        ``sigmoid(W)`` with each row divided by its sum. An absent connection (a zero entry)
        weighs ``sigmoid(0) = 1/2`` before the division.
    """
    squashed = torch.sigmoid(W)
    return squashed / squashed.sum(dim=1, keepdim=True)


# --------------------------------------------------------------------------------------------
# Connectivity matrices
# --------------------------------------------------------------------------------------------


def _describe(module: nn.Module, in_shape: Shape, out_shape: Shape) -> str:
    """Name a layer and the shapes it was given, for error messages."""
    return f"{module!r} with input shape {tuple(in_shape)} and output shape {tuple(out_shape)}"


def _image_shape(module: nn.Module, in_shape: Shape, out_shape: Shape) -> tuple[Shape, Shape]:
    """Drop the batch dimension of 4-d (or accept unbatched 3-d) image shapes."""
    if len(in_shape) not in (3, 4) or len(out_shape) not in (3, 4):
        raise ShapeMismatchError(
            f"{_describe(module, in_shape, out_shape)}: expected (N, C, H, W) or (C, H, W) "
            "shapes; pass the shapes recorded by get_shapes()."
        )
    return tuple(in_shape[-3:]), tuple(out_shape[-3:])


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    """Expand an int into an (h, w) pair; pass a 2-tuple through."""
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def _push_basis(
    layer: Callable[[torch.Tensor], torch.Tensor], image: Shape, dtype: torch.dtype
) -> torch.Tensor:
    """Apply a linear, bias-free `layer` to every unit input; stack the flattened responses.

    Row ``r`` of the result is the layer's output for the input that is one at flat position
    ``r`` and zero elsewhere, i.e. ``result[r, c] = d out_flat[c] / d in_flat[r]``.
    """
    n_in = math.prod(image)
    rows = []
    for start in range(0, n_in, _BASIS_CHUNK):
        stop = min(start + _BASIS_CHUNK, n_in)
        basis = torch.zeros(stop - start, n_in, dtype=dtype)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1
        response = layer(basis.reshape(stop - start, *image))
        rows.append(response.reshape(stop - start, -1))
    return torch.cat(rows, dim=0)


def linear_create_matrix(
    module: nn.Linear, in_shape: Shape, out_shape: Shape, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Connectivity matrix of an ``nn.Linear`` layer.

    Parameters
    ----------
    module : nn.Linear
        The layer. Its bias is ignored.
    in_shape, out_shape : tuple of int
        The shapes of the layer's input and output; only the last dimension is used.
    dtype : torch.dtype, default torch.float64
        The dtype of the returned matrix.

    Returns
    -------
    torch.Tensor
        The transposed weight, shape ``(in_features, out_features)``: row ``r`` holds the
        out-weights of input neuron ``r``.

    Raises
    ------
    ShapeMismatchError
        If the shapes' last dimensions are not the layer's feature counts.
    """
    if in_shape[-1] != module.in_features or out_shape[-1] != module.out_features:
        raise ShapeMismatchError(
            f"{_describe(module, in_shape, out_shape)}: the last dimensions must be "
            f"in_features={module.in_features} and out_features={module.out_features}; "
            "pass the shapes recorded by get_shapes()."
        )
    with torch.no_grad():
        return module.weight.detach().to(device="cpu", dtype=dtype).t().clone()


def conv2d_create_matrix(
    module: nn.Conv2d, in_shape: Shape, out_shape: Shape, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Connectivity matrix of an ``nn.Conv2d`` layer: its exact transposed Jacobian.

    Parameters
    ----------
    module : nn.Conv2d
        The layer. Stride, integer, tuple, ``'same'`` and ``'valid'`` padding, dilation, groups
        and every ``padding_mode`` are honoured; the bias is ignored.
    in_shape, out_shape : tuple of int
        ``(N, C, H, W)`` or ``(C, H, W)`` shapes of the layer's input and output.
    dtype : torch.dtype, default torch.float64
        The dtype in which the matrix is computed and returned.

    Returns
    -------
    torch.Tensor
        Dense matrix of shape ``(C_in*H_in*W_in, C_out*H_out*W_out)`` with
        ``A[r, c] = d out_flat[c] / d in_flat[r]`` for the bias-free layer; neurons are flattened
        in (C, H, W) order. With reflect, replicate or circular padding an input reaches an
        output through several taps, and the entry is the sum of those taps' weights.

    Raises
    ------
    ShapeMismatchError
        If the channel counts or the output size do not match what the layer produces.
    """
    in_image, out_image = _image_shape(module, in_shape, out_shape)
    if in_image[0] != module.in_channels or out_image[0] != module.out_channels:
        raise ShapeMismatchError(
            f"{_describe(module, in_shape, out_shape)}: the layer maps {module.in_channels} "
            f"channels to {module.out_channels}; pass the shapes recorded by get_shapes()."
        )
    with torch.no_grad():
        weight = module.weight.detach().to(device="cpu", dtype=dtype)

        def layer(x: torch.Tensor) -> torch.Tensor:
            if module.padding_mode == "zeros":
                with warnings.catch_warnings():
                    # PyTorch notes that 'same' with an even kernel copies the input; harmless.
                    warnings.filterwarnings("ignore", message="Using padding='same'")
                    return F.conv2d(
                        x,
                        weight,
                        None,
                        module.stride,
                        module.padding,
                        module.dilation,
                        module.groups,
                    )
            # The module pads explicitly in these modes (its padding may be asymmetric for
            # 'same'), then convolves without padding; do exactly the same.
            padded = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            return F.conv2d(padded, weight, None, module.stride, 0, module.dilation, module.groups)

        produced = layer(torch.zeros(1, *in_image, dtype=dtype)).shape[1:]
        if tuple(produced) != out_image:
            raise ShapeMismatchError(
                f"{_describe(module, in_shape, out_shape)}: this input gives an output of shape "
                f"{tuple(produced)}; pass the shapes recorded by get_shapes()."
            )
        return _push_basis(layer, in_image, dtype)


def avgpool2d_create_matrix(
    module: nn.AvgPool2d,
    in_shape: Shape,
    out_shape: Shape,
    *,
    legacy: bool = False,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Connectivity matrix of an ``nn.AvgPool2d`` layer.

    Parameters
    ----------
    module : nn.AvgPool2d
        The layer.
    in_shape, out_shape : tuple of int
        ``(N, C, H, W)`` or ``(C, H, W)`` shapes of the layer's input and output.
    legacy : bool, default False
        If False, the true connectivity: each output is connected to its window in its own
        channel only, with weight ``1 / divisor`` where the divisor is the one PyTorch uses for
        that output (``padding``, ``ceil_mode``, ``count_include_pad`` and ``divisor_override``
        all honoured). If True, the original ``foresight.ei`` matrix: every output
        ``(c, h, w)`` is connected to the ``k_h x k_w`` window starting at
        ``(h * s_h, w * s_w)`` in *every* input channel, with weight ``1 / (k_h * k_w)``
        (windows clipped at the input border, padding refused).
    dtype : torch.dtype, default torch.float64
        The dtype of the returned matrix.

    Returns
    -------
    torch.Tensor
        Dense matrix of shape ``(C*H_in*W_in, C*H_out*W_out)``, neurons flattened in (C, H, W)
        order.

    Raises
    ------
    UnsupportedLayerError
        If `legacy` is True and the layer has non-zero padding.
    ShapeMismatchError
        If the channel counts or the output size do not match what the layer produces.
    """
    in_image, out_image = _image_shape(module, in_shape, out_shape)
    if legacy and any(p != 0 for p in _pair(module.padding)):
        raise UnsupportedLayerError(
            f"{_describe(module, in_shape, out_shape)}: the legacy AvgPool2d matrix does not "
            f"support padding={module.padding}; use ",
            Opt("legacy", False),
            " for the true connectivity.",
        )
    if in_image[0] != out_image[0]:
        raise ShapeMismatchError(
            f"{_describe(module, in_shape, out_shape)}: pooling keeps the number of channels; "
            "pass the shapes recorded by get_shapes()."
        )

    def layer(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(
            x,
            module.kernel_size,
            module.stride,
            module.padding,
            module.ceil_mode,
            module.count_include_pad,
            module.divisor_override,
        )

    produced = layer(torch.zeros(1, *in_image, dtype=dtype)).shape[1:]
    if tuple(produced) != out_image:
        raise ShapeMismatchError(
            f"{_describe(module, in_shape, out_shape)}: this input gives an output of shape "
            f"{tuple(produced)}; pass the shapes recorded by get_shapes()."
        )
    if not legacy:
        return _push_basis(layer, in_image, dtype)
    return _legacy_avgpool2d_matrix(module, in_image, out_image, dtype)


def _legacy_avgpool2d_matrix(
    module: nn.AvgPool2d, in_image: Shape, out_image: Shape, dtype: torch.dtype
) -> torch.Tensor:
    """The original module's AvgPool2d matrix, built output by output."""
    k_h, k_w = _pair(module.kernel_size)
    # nn.AvgPool2d already replaces stride=None by the kernel size; F.avg_pool2d also reads an
    # empty stride that way, so accept both here.
    s_h, s_w = _pair(module.stride) if module.stride not in (None, (), []) else (k_h, k_w)
    channels, in_h, in_w = in_image
    out_c, out_h, out_w = out_image
    weight = 1.0 / (k_h * k_w)

    # Indexed as [input c, h, w, output c, h, w] so that the final reshape gives (rows, cols).
    A = torch.zeros(channels, in_h, in_w, out_c, out_h, out_w, dtype=dtype)
    for c in range(out_c):
        for h in range(out_h):
            for w in range(out_w):
                top, left = h * s_h, w * s_w
                # Slicing clips a window that hangs over the border, as the original did.
                A[:, top : top + k_h, left : left + k_w, c, h, w] = weight
    return A.reshape(channels * in_h * in_w, out_c * out_h * out_w)


# --------------------------------------------------------------------------------------------
# The layers beyond the old module's three (counted with layers="all")
# --------------------------------------------------------------------------------------------
#
# Written from PyTorch's index formulas, output by output, with no reference to the
# production builders or their geometry: an input-output pair gets every tap that joins them
# added to its entry.


def _channels_and_sizes(module: nn.Module, shape: Shape, nd: int) -> tuple[int, Shape]:
    if len(shape) not in (nd + 1, nd + 2):
        raise ShapeMismatchError(
            f"{module!r} with shape {tuple(shape)}: expected {nd + 2}-d (N, C, ...) or "
            f"{nd + 1}-d (C, ...) shapes; pass the shapes recorded by get_shapes()."
        )
    return shape[-nd - 1], tuple(shape[-nd:])


def _tuple(value, nd: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * nd
    value = tuple(value)
    return value * nd if len(value) == 1 else value


def _flat(channel: int, pos: tuple[int, ...], sizes: Shape) -> int:
    index = channel
    for p, n in zip(pos, sizes):
        index = index * n + p
    return index


def _padded_index(x: int, n: int, before: int, after: int, mode: str) -> int | None:
    """The real input that padded position ``x`` reads (``None``: a zero)."""
    if 0 <= x < n:
        return x
    if x < -before or x >= n + after:
        return None
    if mode == "zeros":
        return None
    if mode == "reflect":
        return -x if x < 0 else 2 * (n - 1) - x
    if mode == "replicate":
        return 0 if x < 0 else n - 1
    return x % n  # circular


def _new_matrix(c_in: int, sizes: Shape, c_out: int, out_sizes: Shape, dtype) -> torch.Tensor:
    return torch.zeros(c_in * math.prod(sizes), c_out * math.prod(out_sizes), dtype=dtype)


def convnd_create_matrix(
    module: nn.Module, in_shape: Shape, out_shape: Shape, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Connectivity matrix of an ``nn.Conv1d``/``Conv2d``/``Conv3d`` layer, tap by tap.

    Output ``o`` of channel ``co`` reads, through tap ``k``, padded input position
    ``o * stride + k * dilation - pad_before`` of each input channel of its group; the
    padding mode maps a position in the padding onto a real input (or onto a zero).
    """
    nd = module.weight.dim() - 2
    c_in, sizes = _channels_and_sizes(module, in_shape, nd)
    c_out, out_sizes = _channels_and_sizes(module, out_shape, nd)
    stride, dilation = _tuple(module.stride, nd), _tuple(module.dilation, nd)
    # torch's own (last axis first, before/after) padding list, read back in axis order
    rev = list(module._reversed_padding_repeated_twice)
    pads = [(rev[2 * (nd - 1 - a)], rev[2 * (nd - 1 - a) + 1]) for a in range(nd)]
    weight = module.weight.detach().to("cpu", dtype)
    kernel = tuple(weight.shape[2:])
    cin_g, cout_g = c_in // module.groups, c_out // module.groups
    A = _new_matrix(c_in, sizes, c_out, out_sizes, dtype)
    for co in range(c_out):
        g = co // cout_g
        for o in itertools.product(*(range(n) for n in out_sizes)):
            col = _flat(co, o, out_sizes)
            for k in itertools.product(*(range(n) for n in kernel)):
                x = []
                for a in range(nd):
                    x.append(
                        _padded_index(
                            o[a] * stride[a] + k[a] * dilation[a] - pads[a][0],
                            sizes[a],
                            pads[a][0],
                            pads[a][1],
                            module.padding_mode,
                        )
                    )
                if any(v is None for v in x):
                    continue
                for ci_l in range(cin_g):
                    A[_flat(g * cin_g + ci_l, tuple(x), sizes), col] += weight[(co, ci_l, *k)]
    return A


def conv_transposend_create_matrix(
    module: nn.Module, in_shape: Shape, out_shape: Shape, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Connectivity matrix of an ``nn.ConvTranspose1d/2d/3d`` layer: input ``i`` of channel
    ``ci`` adds ``weight[ci, co_local, k]`` to output ``i * stride - padding + k * dilation``
    of each output channel of its group (weight layout ``(C_in, C_out/groups, *K)``)."""
    nd = module.weight.dim() - 2
    c_in, sizes = _channels_and_sizes(module, in_shape, nd)
    c_out, out_sizes = _channels_and_sizes(module, out_shape, nd)
    stride, dilation = _tuple(module.stride, nd), _tuple(module.dilation, nd)
    padding = _tuple(module.padding, nd)
    weight = module.weight.detach().to("cpu", dtype)
    kernel = tuple(weight.shape[2:])
    cin_g, cout_g = c_in // module.groups, c_out // module.groups
    A = _new_matrix(c_in, sizes, c_out, out_sizes, dtype)
    for ci in range(c_in):
        g = ci // cin_g
        for i in itertools.product(*(range(n) for n in sizes)):
            row = _flat(ci, i, sizes)
            for k in itertools.product(*(range(n) for n in kernel)):
                o = tuple(i[a] * stride[a] - padding[a] + k[a] * dilation[a] for a in range(nd))
                if any(not 0 <= o[a] < out_sizes[a] for a in range(nd)):
                    continue
                for co_l in range(cout_g):
                    A[row, _flat(g * cout_g + co_l, o, out_sizes)] += weight[(ci, co_l, *k)]
    return A


def avgpoolnd_create_matrix(
    module: nn.Module, in_shape: Shape, out_shape: Shape, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Connectivity matrix of an ``nn.AvgPool1d``/``AvgPool3d`` (or 2d) layer, per channel.

    PyTorch's kernel: the window of output ``o`` starts at ``o * stride - padding`` and ends
    at ``min(start + kernel, size + padding)``; the divisor is ``divisor_override``, or the
    product of those window lengths (``count_include_pad``), or of the lengths clipped to
    the input.
    """
    nd = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(module)]
    channels, sizes = _channels_and_sizes(module, in_shape, nd)
    _, out_sizes = _channels_and_sizes(module, out_shape, nd)
    kernel = _tuple(module.kernel_size, nd)
    stride = _tuple(module.stride if module.stride not in (None, (), []) else kernel, nd)
    padding = _tuple(module.padding, nd)
    override = getattr(module, "divisor_override", None)
    A = _new_matrix(channels, sizes, channels, out_sizes, dtype)
    for o in itertools.product(*(range(n) for n in out_sizes)):
        ranges, padded, clipped = [], 1, 1
        for a in range(nd):
            start = o[a] * stride[a] - padding[a]
            end = min(start + kernel[a], sizes[a] + padding[a])
            padded *= end - start
            start, end = max(start, 0), min(end, sizes[a])
            clipped *= end - start
            ranges.append(range(start, end))
        divisor = override or (padded if module.count_include_pad else clipped)
        for c in range(channels):
            col = _flat(c, o, out_sizes)
            for x in itertools.product(*ranges):
                A[_flat(c, x, sizes), col] = 1.0 / divisor
    return A


def adaptive_avgpoolnd_create_matrix(
    module: nn.Module, in_shape: Shape, out_shape: Shape, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Connectivity matrix of an ``nn.AdaptiveAvgPool1d/2d/3d`` layer, per channel: output
    ``o`` averages, along each axis, inputs ``floor(o * In / Out)`` up to
    ``ceil((o + 1) * In / Out)`` (exclusive)."""
    nd = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}[type(module)]
    channels, sizes = _channels_and_sizes(module, in_shape, nd)
    _, out_sizes = _channels_and_sizes(module, out_shape, nd)
    A = _new_matrix(channels, sizes, channels, out_sizes, dtype)
    for o in itertools.product(*(range(n) for n in out_sizes)):
        ranges = [
            range(
                math.floor(o[a] * sizes[a] / out_sizes[a]),
                math.ceil((o[a] + 1) * sizes[a] / out_sizes[a]),
            )
            for a in range(nd)
        ]
        count = math.prod(len(r) for r in ranges)
        for c in range(channels):
            col = _flat(c, o, out_sizes)
            for x in itertools.product(*ranges):
                A[_flat(c, x, sizes), col] = 1.0 / count
    return A


VALID_MODULES: dict[type[nn.Module], Callable[..., torch.Tensor]] = {
    nn.Linear: linear_create_matrix,
    nn.Conv2d: conv2d_create_matrix,
    nn.AvgPool2d: avgpool2d_create_matrix,
}
"""The supported layer types (matched exactly, not by subclass) and their matrix builders."""

ALL_MODULES: dict[type[nn.Module], Callable[..., torch.Tensor]] = {
    **VALID_MODULES,
    nn.Conv1d: convnd_create_matrix,
    nn.Conv3d: convnd_create_matrix,
    nn.ConvTranspose1d: conv_transposend_create_matrix,
    nn.ConvTranspose2d: conv_transposend_create_matrix,
    nn.ConvTranspose3d: conv_transposend_create_matrix,
    nn.AvgPool1d: avgpoolnd_create_matrix,
    nn.AvgPool3d: avgpoolnd_create_matrix,
    nn.AdaptiveAvgPool1d: adaptive_avgpoolnd_create_matrix,
    nn.AdaptiveAvgPool2d: adaptive_avgpoolnd_create_matrix,
    nn.AdaptiveAvgPool3d: adaptive_avgpoolnd_create_matrix,
}
"""Every layer type ``layers="all"`` counts (matched exactly) and its matrix builder."""


def _modules_for(layers: str) -> dict[type[nn.Module], Callable[..., torch.Tensor]]:
    if layers == "seed":
        return VALID_MODULES
    if layers == "all":
        return ALL_MODULES
    raise UnknownNameError(Opt("layers", layers), ": the reference knows 'seed' and 'all'")


# --------------------------------------------------------------------------------------------
# Tracing and the measures
# --------------------------------------------------------------------------------------------


def get_shapes(
    model: nn.Module, input: torch.Tensor, *, layers: str = "seed"
) -> dict[nn.Module, tuple[Shape, Shape]]:
    """Record the input and output shape of every supported layer of `model`.

    Parameters
    ----------
    model : nn.Module
        A feed-forward network.
    input : torch.Tensor
        A valid input for `model`; it is passed through once, without gradients.

    Returns
    -------
    dict
        ``{module: (in_shape, out_shape)}`` for every module whose type is a key of
        `VALID_MODULES` (`ALL_MODULES` for ``layers="all"``), in the order the forward pass
        first reaches them. A module called more
        than once keeps its first position and its last shapes.
    """
    shapes: dict[nn.Module, tuple[Shape, Shape]] = {}

    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        shapes[module] = (tuple(args[0].shape), tuple(output.shape))

    handles = [
        module.register_forward_hook(record)
        for module in model.modules()
        if type(module) in _modules_for(layers)
    ]
    try:
        with torch.no_grad():
            model(input)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _measures(
    model: nn.Module,
    input: torch.Tensor | None,
    shapes: Shapes | None,
    norm: Norm | None,
    legacy: bool,
    dtype: torch.dtype,
    layers: str = "seed",
) -> tuple[float, float]:
    """Determinism and degeneracy of `model`, from one dense matrix per layer."""
    if shapes is None:
        if input is None:
            raise MissingInputError(
                "Neither `input` nor `shapes` was given: pass an input tensor for the model, "
                "or the shapes recorded by get_shapes().",
                param="input",
            )
        shapes = get_shapes(model, input, layers=layers)
    if not shapes:
        raise NoSupportedLayersError(
            f"{type(model).__name__} has no layer of a supported type "
            f"({', '.join(t.__name__ for t in VALID_MODULES)}), or the forward pass reached none."
        )

    entropy_sum = 0.0
    n_rows = 0
    column_sums = []
    for module, (in_shape, out_shape) in shapes.items():
        builder = _modules_for(layers).get(type(module))
        if builder is None:
            raise UnsupportedLayerError(
                f"{module!r} is not a supported layer type; supported: "
                f"{', '.join(t.__name__ for t in VALID_MODULES)}."
            )
        if builder is avgpool2d_create_matrix:
            A = builder(module, in_shape, out_shape, legacy=legacy, dtype=dtype)
        else:
            A = builder(module, in_shape, out_shape, dtype=dtype)
        P = norm(A) if norm else A
        entropy_sum += H(P, dim=1).sum().item()
        n_rows += P.shape[0]
        column_sums.append(P.sum(dim=0))

    in_weights = torch.cat(column_sums)
    # A zero total (e.g. every weight negative under lin_norm) gives 0/0 = NaN everywhere,
    # which H counts as zero: the degeneracy is then 0, as in the original module.
    degeneracy_value = H(in_weights / in_weights.sum()).item()
    return entropy_sum / n_rows, degeneracy_value


def determinism(
    model: nn.Module,
    input: torch.Tensor | None = None,
    shapes: Shapes | None = None,
    norm: Norm | None = lin_norm,
    device: str | torch.device = "cpu",
    *,
    legacy: bool = False,
    dtype: torch.dtype = torch.float64,
    layers: str = "seed",
) -> float:
    """Determinism of `model`: the mean entropy of the normalised out-weights of its neurons.

    Parameters
    ----------
    model : nn.Module
        A feed-forward network.
    input : torch.Tensor, optional
        An input for `model`, used to record the layer shapes when `shapes` is not given.
    shapes : dict, optional
        ``{module: (in_shape, out_shape)}`` as returned by `get_shapes`; takes precedence over
        `input`.
    norm : callable or None, default lin_norm
        Row normalisation applied to each layer's matrix; None (or any falsy value) uses the
        raw matrix.
    device : str or torch.device, default 'cpu'
        Accepted for compatibility with the original signature; the reference always computes
        on the CPU.
    legacy : bool, default False
        Use the original all-channel AvgPool2d matrix (see `avgpool2d_create_matrix`).
    dtype : torch.dtype, default torch.float64
        The dtype of the matrices and of the reductions.
    layers : {'seed', 'all'}, default 'seed'
        Count the original module's types (`VALID_MODULES`) or every type of
        `ALL_MODULES`, matched exactly.

    Returns
    -------
    float
        ``sum_layers sum_rows H(P[r, :]) / total number of rows``, in bits; all-zero rows count
        in the denominator.

    Raises
    ------
    MissingInputError
        If neither `input` nor `shapes` is given.
    NoSupportedLayersError
        If no supported layer is found.
    """
    return _measures(model, input, shapes, norm, legacy, dtype, layers)[0]


def degeneracy(
    model: nn.Module,
    input: torch.Tensor | None = None,
    shapes: Shapes | None = None,
    norm: Norm | None = lin_norm,
    device: str | torch.device = "cpu",
    *,
    legacy: bool = False,
    dtype: torch.dtype = torch.float64,
    layers: str = "seed",
) -> float:
    """Degeneracy of `model`: the entropy of the normalised in-weights of all its neurons.

    Parameters
    ----------
    model, input, shapes, norm, device, legacy, dtype, layers
        As for `determinism`.

    Returns
    -------
    float
        ``H(v / sum(v))`` in bits, where ``v`` concatenates every layer's column sums
        ``P.sum(0)``. It is 0 when ``v`` sums to zero.

    Raises
    ------
    MissingInputError
        If neither `input` nor `shapes` is given.
    NoSupportedLayersError
        If no supported layer is found.
    """
    return _measures(model, input, shapes, norm, legacy, dtype, layers)[1]


def ei(
    model: nn.Module,
    input: torch.Tensor | None = None,
    shapes: Shapes | None = None,
    norm: Norm | None = lin_norm,
    device: str | torch.device = "cpu",
    *,
    legacy: bool = False,
    dtype: torch.dtype = torch.float64,
    layers: str = "seed",
) -> float:
    """Effective information of `model`: its degeneracy minus its determinism.

    Parameters
    ----------
    model, input, shapes, norm, device, legacy, dtype, layers
        As for `determinism`.

    Returns
    -------
    float
        ``degeneracy - determinism`` in bits (the original module's docstring states the
        difference the other way round; its code, and this function, subtract determinism).

    Raises
    ------
    MissingInputError
        If neither `input` nor `shapes` is given.
    NoSupportedLayersError
        If no supported layer is found.
    """
    det, deg = _measures(model, input, shapes, norm, legacy, dtype, layers)
    return deg - det
