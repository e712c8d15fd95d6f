"""The adapters of the built-in layer types: read a module and its traced shapes, check
them against PyTorch's shape rules (:mod:`foresight_sparse.geometry`), and return its
:class:`~foresight_sparse.connectivity.Connectivity`."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..exceptions import Opt, ShapeMismatchError, UnknownNameError, UnsupportedLayerError
from ..geometry import (
    PADDING_MODES,
    Axis,
    conv_output_size,
    conv_padding,
    conv_transpose_output_size,
    ntuple,
    pool_output_size,
    shape_tuple,
)
from .fully_connected import FullyConnected
from .registry import _builtin
from .stencil import Stencil

__all__ = [
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


def _dims(shape, label: str, what: str, module) -> tuple[int, ...]:
    # a malformed shape (not a sequence of ints) is a shape error naming the layer, not a
    # bare TypeError/ValueError from len() or int()
    try:
        return shape_tuple(shape)
    except TypeError:
        raise ShapeMismatchError(
            f"{label}: the {what} shape of {type(module).__name__} must be a tuple of ints, "
            f"got {shape!r}. Pass shapes traced from this model (get_shapes)"
        ) from None


@_builtin(nn.Linear, extended=False)
def linear(
    module: nn.Linear, in_shape, out_shape, *, legacy: bool = False, label: str | None = None
) -> FullyConnected:
    """Adapter for ``nn.Linear``: the weight transposed (bias ignored).

    Only the last dimension of the shapes is checked: extra leading dimensions share the
    same weights and do not add neurons, as in the old module.
    """
    label = label or "Linear"
    weight = module.weight
    in_shape = _dims(in_shape, label, "input", module)
    out_shape = _dims(out_shape, label, "output", module)
    if (
        not in_shape
        or not out_shape
        or in_shape[-1] != weight.shape[1]
        or out_shape[-1] != weight.shape[0]
    ):
        raise ShapeMismatchError(
            f"{label}: Linear({weight.shape[1]}, {weight.shape[0]}) cannot map input "
            f"{tuple(in_shape)} to output {tuple(out_shape)}; the last dimensions must be "
            f"{weight.shape[1]} and {weight.shape[0]}. Were the shapes traced from another "
            "model?"
        )
    return FullyConnected(label, weight)


def _spatial(shape, nd: int, label: str, what: str, module) -> tuple[int, ...]:
    """``(C, *spatial)`` of a batched ``(N, C, ...)`` or unbatched ``(C, ...)`` shape."""
    dims = _dims(shape, label, what, module)
    if len(dims) not in (nd + 1, nd + 2):
        names = ("L",) if nd == 1 else ("H", "W") if nd == 2 else ("D", "H", "W")
        unbatched = ", ".join(("C", *names))
        raise ShapeMismatchError(
            f"{label}: {type(module).__name__} needs a {nd + 2}-d (N, {unbatched}) or "
            f"{nd + 1}-d ({unbatched}) {what} shape, got {tuple(shape)}. Pass shapes traced "
            f"from this model (get_shapes) or an input of shape (1, {unbatched})"
        )
    return dims[-(nd + 1) :]


def _shape_error(label, what: str, in_shape, expected, out_shape) -> ShapeMismatchError:
    return ShapeMismatchError(
        f"{label}: {what} maps input {tuple(in_shape)} to (N, {', '.join(map(str, expected))})"
        f", but the shapes say output {tuple(out_shape)}. Pass shapes traced from this "
        "model (get_shapes)"
    )


def _conv(module, in_shape, out_shape, nd: int, label: str) -> Stencil:
    """A convolution over ``nd`` spatial axes (see :func:`conv2d`)."""
    c_in, *size = _spatial(in_shape, nd, label, "input", module)
    c_out, *osize = _spatial(out_shape, nd, label, "output", module)
    kernel = ntuple(module.kernel_size, nd)
    stride = ntuple(module.stride, nd)
    dilation = ntuple(module.dilation, nd)
    mode = module.padding_mode
    if mode not in PADDING_MODES:
        raise UnsupportedLayerError(
            f"{label}: padding_mode {mode!r} is not supported; "
            f"supported modes are {', '.join(PADDING_MODES)}"
        )
    try:
        pads = conv_padding(module.padding, kernel, dilation)
    except UnknownNameError as exc:
        raise UnsupportedLayerError(f"{label}: ", *exc.parts, param=exc.param) from None
    expected = tuple(
        conv_output_size(n, k, s, d, pb + pa)
        for n, k, s, d, (pb, pa) in zip(size, kernel, stride, dilation, pads)
    )
    if c_in != module.in_channels or c_out != module.out_channels or tuple(osize) != expected:
        raise _shape_error(
            label,
            f"{type(module).__name__}({module.in_channels}, {module.out_channels}, "
            f"kernel_size={kernel}, stride={stride}, padding={module.padding}, "
            f"dilation={dilation})",
            in_shape,
            (module.out_channels, *expected),
            out_shape,
        )
    axes = [
        Axis(n, o, k, s, d, pb, pa, mode)
        for n, o, k, s, d, (pb, pa) in zip(size, osize, kernel, stride, dilation, pads)
    ]
    return Stencil.from_axes(
        label, module.weight, (c_in, c_out), module.groups, axes, weight_name="weight"
    )


@_builtin(nn.Conv2d, extended=False)
def conv2d(
    module: nn.Conv2d, in_shape, out_shape, *, legacy: bool = False, label: str | None = None
) -> Stencil:
    """Adapter for ``nn.Conv2d``: the transposed Jacobian of the bias-free layer.

    Honours stride, int/tuple/``'same'``/``'valid'`` padding, dilation, groups and every
    ``padding_mode`` (non-zero modes sum the taps that land on the same input).
    """
    return _conv(module, in_shape, out_shape, 2, label or "Conv2d")


@_builtin(nn.Conv1d)
def conv1d(
    module: nn.Conv1d, in_shape, out_shape, *, legacy: bool = False, label: str | None = None
) -> Stencil:
    """Adapter for ``nn.Conv1d``: as :func:`conv2d`, over one axis (counted under
    ``layers="all"``)."""
    return _conv(module, in_shape, out_shape, 1, label or "Conv1d")


@_builtin(nn.Conv3d)
def conv3d(
    module: nn.Conv3d, in_shape, out_shape, *, legacy: bool = False, label: str | None = None
) -> Stencil:
    """Adapter for ``nn.Conv3d``: as :func:`conv2d`, over three axes (counted under
    ``layers="all"``)."""
    return _conv(module, in_shape, out_shape, 3, label or "Conv3d")


def _conv_transpose(module, in_shape, out_shape, nd: int, label: str) -> Stencil:
    """A transposed convolution: input ``i`` writes output ``i * stride - padding +
    k * dilation`` with ``weight[ci, co_local, k]``."""
    c_in, *size = _spatial(in_shape, nd, label, "input", module)
    c_out, *osize = _spatial(out_shape, nd, label, "output", module)
    kernel = ntuple(module.kernel_size, nd)
    stride = ntuple(module.stride, nd)
    dilation = ntuple(module.dilation, nd)
    padding = ntuple(module.padding, nd)
    if module.padding_mode != "zeros":  # pragma: no cover - torch refuses other modes
        raise UnsupportedLayerError(
            f"{label}: padding_mode {module.padding_mode!r}; "
            "transposed convolutions support only 'zeros'"
        )
    base = tuple(
        conv_transpose_output_size(n, k, s, d, p)
        for n, k, s, d, p in zip(size, kernel, stride, dilation, padding)
    )
    # output_padding (or forward's output_size) adds up to max(stride, dilation) - 1
    fits = all(b <= o < b + max(s, d) for b, o, s, d in zip(base, osize, stride, dilation))
    if c_in != module.in_channels or c_out != module.out_channels or not fits:
        expected = tuple(b + op for b, op in zip(base, ntuple(module.output_padding, nd)))
        raise _shape_error(
            label,
            f"{type(module).__name__}({module.in_channels}, {module.out_channels}, "
            f"kernel_size={kernel}, stride={stride}, padding={padding}, "
            f"output_padding={module.output_padding}, dilation={dilation})",
            in_shape,
            (module.out_channels, *expected),
            out_shape,
        )
    axes = [
        Axis(n, o, k, s, d, p, 0, "zeros", "transposed")
        for n, o, k, s, d, p in zip(size, osize, kernel, stride, dilation, padding)
    ]
    return Stencil.from_axes(
        label,
        module.weight,
        (c_in, c_out),
        module.groups,
        axes,
        transposed=True,
        weight_name="weight",
    )


@_builtin(nn.ConvTranspose1d)
def conv_transpose1d(
    module: nn.ConvTranspose1d,
    in_shape,
    out_shape,
    *,
    legacy: bool = False,
    label: str | None = None,
) -> Stencil:
    """Adapter for ``nn.ConvTranspose1d`` (stride, padding, output_padding, dilation,
    groups): ``A[(ci, i), (co, o)] = weight[ci, co_local, k]`` where ``o = i * stride -
    padding + k * dilation``."""
    return _conv_transpose(module, in_shape, out_shape, 1, label or "ConvTranspose1d")


@_builtin(nn.ConvTranspose2d)
def conv_transpose2d(
    module: nn.ConvTranspose2d,
    in_shape,
    out_shape,
    *,
    legacy: bool = False,
    label: str | None = None,
) -> Stencil:
    """Adapter for ``nn.ConvTranspose2d``; see :func:`conv_transpose1d`."""
    return _conv_transpose(module, in_shape, out_shape, 2, label or "ConvTranspose2d")


@_builtin(nn.ConvTranspose3d)
def conv_transpose3d(
    module: nn.ConvTranspose3d,
    in_shape,
    out_shape,
    *,
    legacy: bool = False,
    label: str | None = None,
) -> Stencil:
    """Adapter for ``nn.ConvTranspose3d``; see :func:`conv_transpose1d`."""
    return _conv_transpose(module, in_shape, out_shape, 3, label or "ConvTranspose3d")


def _avgpool(module, in_shape, out_shape, nd: int, label: str, legacy: bool = False):
    """An average pool over ``nd`` axes, per channel, with PyTorch's divisors."""
    c_in, *size = _spatial(in_shape, nd, label, "input", module)
    c_out, *osize = _spatial(out_shape, nd, label, "output", module)
    kernel = ntuple(module.kernel_size, nd)
    stride = ntuple(module.stride if module.stride not in (None, ()) else module.kernel_size, nd)
    pads = ntuple(module.padding, nd)
    expected = tuple(
        pool_output_size(n, k, s, p, module.ceil_mode)
        for n, k, s, p in zip(size, kernel, stride, pads)
    )
    if c_out != c_in or tuple(osize) != expected:
        raise _shape_error(
            label,
            f"{type(module).__name__}(kernel_size={kernel}, stride={stride}, "
            f"padding={pads}, ceil_mode={module.ceil_mode})",
            in_shape,
            (c_in, *expected),
            out_shape,
        )
    if legacy:
        if any(pads):
            raise UnsupportedLayerError(
                f"{label}: ",
                Opt("legacy", True),
                " reproduces the old module, which refuses AvgPool2d "
                f"padding (got padding={module.padding}, input {tuple(in_shape)}); use ",
                Opt("legacy", False),
                " for the true pooling connectivity",
            )
        axes = [Axis(n, o, k, s) for n, o, k, s in zip(size, osize, kernel, stride)]
        weight = torch.full((c_in, c_in) + kernel, 1.0 / math.prod(kernel), dtype=torch.float64)
        return Stencil(
            label,
            weight,
            (c_in, *size),
            (c_in, *osize),
            1,
            *axes,
            values_dtype=torch.get_default_dtype(),
        )
    axes = [Axis(n, o, k, s, 1, p, p) for n, o, k, s, p in zip(size, osize, kernel, stride, pads)]
    override = getattr(module, "divisor_override", None)
    if override:
        scales = [np.full(osize[0], 1.0 / override)] + [None] * (nd - 1)
    else:
        pick = 0 if module.count_include_pad else 1
        scales = [1.0 / a.window_lengths()[pick] for a in axes]
    weight = torch.ones((c_in, 1) + kernel, dtype=torch.float64)
    return Stencil.from_axes(
        label, weight, (c_in, c_in), c_in, axes, scales, values_dtype=torch.get_default_dtype()
    )


@_builtin(nn.AvgPool2d, extended=False)
def avgpool2d(
    module: nn.AvgPool2d, in_shape, out_shape, *, legacy: bool = False, label: str | None = None
) -> Stencil:
    """Adapter for ``nn.AvgPool2d``.

    By default each output connects to its window in its own channel with the divisor
    PyTorch uses (``padding``, ``ceil_mode``, ``count_include_pad`` and
    ``divisor_override`` honoured). ``legacy=True`` reproduces the old module: every output
    connects to the window in *all* input channels with entry ``1 / (kh * kw)``, and
    padding is refused.
    """
    return _avgpool(module, in_shape, out_shape, 2, label or "AvgPool2d", legacy)


@_builtin(nn.AvgPool1d)
def avgpool1d(
    module: nn.AvgPool1d, in_shape, out_shape, *, legacy: bool = False, label: str | None = None
) -> Stencil:
    """Adapter for ``nn.AvgPool1d``: per channel, PyTorch's divisors (``legacy`` is an
    AvgPool2d option and is ignored)."""
    return _avgpool(module, in_shape, out_shape, 1, label or "AvgPool1d")


@_builtin(nn.AvgPool3d)
def avgpool3d(
    module: nn.AvgPool3d, in_shape, out_shape, *, legacy: bool = False, label: str | None = None
) -> Stencil:
    """Adapter for ``nn.AvgPool3d``: per channel, PyTorch's divisors (``padding``,
    ``ceil_mode``, ``count_include_pad``, ``divisor_override``)."""
    return _avgpool(module, in_shape, out_shape, 3, label or "AvgPool3d")


def _adaptive(module, in_shape, out_shape, nd: int, label: str) -> Stencil:
    """An adaptive average pool: output ``o`` averages inputs ``floor(o * In / Out)`` to
    ``ceil((o + 1) * In / Out) - 1`` of its channel, entry ``1 / window length``."""
    c_in, *size = _spatial(in_shape, nd, label, "input", module)
    c_out, *osize = _spatial(out_shape, nd, label, "output", module)
    wanted = module.output_size
    wanted = (wanted,) * nd if not isinstance(wanted, (tuple, list)) else tuple(wanted)
    ok = len(wanted) == nd and all(w is None or w == o for w, o in zip(wanted, osize))
    if c_out != c_in or not ok or any(o < 1 for o in osize):
        expected = tuple(n if w is None else w for n, w in zip(size, wanted))
        raise _shape_error(
            label,
            f"{type(module).__name__}(output_size={module.output_size})",
            in_shape,
            (c_in, *expected),
            out_shape,
        )
    axes = []
    for n, o in zip(size, osize):
        lengths = Axis(n, o, 1, kind="adaptive").window_lengths()[0]
        axes.append(Axis(n, o, int(lengths.max(initial=1)), kind="adaptive"))
    scales = [1.0 / a.window_lengths()[0] for a in axes]
    weight = torch.ones((c_in, 1) + tuple(a.kernel for a in axes), dtype=torch.float64)
    return Stencil.from_axes(
        label, weight, (c_in, c_in), c_in, axes, scales, values_dtype=torch.get_default_dtype()
    )


@_builtin(nn.AdaptiveAvgPool1d)
def adaptive_avgpool1d(
    module: nn.AdaptiveAvgPool1d,
    in_shape,
    out_shape,
    *,
    legacy: bool = False,
    label: str | None = None,
) -> Stencil:
    """Adapter for ``nn.AdaptiveAvgPool1d``: PyTorch's windows ``floor(i * In / Out)`` to
    ``ceil((i + 1) * In / Out)`` (they may overlap), entry ``1 / window length``."""
    return _adaptive(module, in_shape, out_shape, 1, label or "AdaptiveAvgPool1d")


@_builtin(nn.AdaptiveAvgPool2d)
def adaptive_avgpool2d(
    module: nn.AdaptiveAvgPool2d,
    in_shape,
    out_shape,
    *,
    legacy: bool = False,
    label: str | None = None,
) -> Stencil:
    """Adapter for ``nn.AdaptiveAvgPool2d``; see :func:`adaptive_avgpool1d`."""
    return _adaptive(module, in_shape, out_shape, 2, label or "AdaptiveAvgPool2d")


@_builtin(nn.AdaptiveAvgPool3d)
def adaptive_avgpool3d(
    module: nn.AdaptiveAvgPool3d,
    in_shape,
    out_shape,
    *,
    legacy: bool = False,
    label: str | None = None,
) -> Stencil:
    """Adapter for ``nn.AdaptiveAvgPool3d``; see :func:`adaptive_avgpool1d`."""
    return _adaptive(module, in_shape, out_shape, 3, label or "AdaptiveAvgPool3d")
