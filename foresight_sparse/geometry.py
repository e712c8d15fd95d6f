"""Pure index math of sliding-window layers: shapes in, index arrays out.

Nothing here reads a module. A sliding-window layer (a convolution, transposed convolution,
average or adaptive average pooling, in 1, 2 or 3 dimensions) is separable in its index
structure: input row ``ih`` feeds output row ``oh`` through kernel row ``kh`` exactly when the
H axis maps ``(oh, kh)`` to ``ih``, and likewise for every other axis. So each axis is
described once, by an :class:`Axis`, and the N-d connectivity is the product of 1-d ones.
Several axes read as one, row-major, make an :class:`AxisProduct`: the engines see every
layer as two such lanes (the leading axes, and the last axis).

PyTorch's shape rules live here too (:func:`conv_output_size`, :func:`pool_output_size`,
:func:`conv_transpose_output_size`, :func:`conv_padding`): the adapters check the traced
shapes against them.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import numpy as np

from .exceptions import OptionError, UnknownNameError

__all__ = [
    "PADDING_MODES",
    "AXIS_KINDS",
    "Axis",
    "AxisProduct",
    "AxisPairs",
    "AxisClasses",
    "conv_output_size",
    "conv_transpose_output_size",
    "pool_output_size",
    "conv_padding",
    "ntuple",
    "shape_tuple",
    "adaptive_windows",
]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

#: How an axis maps (output, tap) to an input: ``'window'`` (convolutions and pools),
#: ``'transposed'`` (transposed convolutions), ``'adaptive'`` (adaptive pools).
AXIS_KINDS = ("window", "transposed", "adaptive")


def adaptive_windows(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) of every window of an adaptive pool, PyTorch's rule:
    ``start = floor(i * In / Out)``, ``end = ceil((i + 1) * In / Out)`` (windows may
    overlap)."""
    i = np.arange(size_out, dtype=np.int64)
    return (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)


def conv_output_size(
    size: int, kernel: int, stride: int, dilation: int, pad: int, ceil_mode: bool = False
) -> int:
    """Output length of a sliding window over ``size`` inputs with ``pad`` total padding."""
    span = size + pad - dilation * (kernel - 1) - 1
    if ceil_mode:
        return -(-span // stride) + 1
    return span // stride + 1


def conv_transpose_output_size(
    size: int, kernel: int, stride: int, dilation: int, padding: int
) -> int:
    """Output length of a transposed convolution before ``output_padding`` (which adds up to
    ``max(stride, dilation) - 1``)."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + 1


def pool_output_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool) -> int:
    """Output length of an average pool with ``pad`` on each side, PyTorch's rule."""
    out = conv_output_size(size, kernel, stride, 1, 2 * pad, ceil_mode)
    # PyTorch drops a last window that would start inside the right padding.
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def ntuple(value, n: int) -> tuple[int, ...]:
    """A layer option (an int, or a tuple with one entry or one per axis) as ``n`` ints."""
    if isinstance(value, (tuple, list)):
        if len(value) == 1:
            return (int(value[0]),) * n
        return tuple(int(x) for x in value)
    return (int(value),) * n


def shape_tuple(shape) -> tuple[int, ...]:
    """``shape`` (a ``torch.Size``, tuple or list of ints) as a tuple of ints.

    Raises
    ------
    OptionError
        When ``shape`` is a string (a ``TypeError``: a shape is a sequence of ints).
    TypeError
        When an element is not an int.
    """
    if isinstance(shape, (str, bytes)):
        raise OptionError(
            f"a shape is a sequence of ints, not {type(shape).__name__}", param="shape"
        )
    return tuple(operator.index(d) for d in shape)


def conv_padding(padding, kernel, dilation) -> list[tuple[int, int]]:
    """``(before, after)`` padding of each axis of a convolution, from its ``padding``
    option: an int or tuple, ``'valid'``, or ``'same'`` (the odd element after, as PyTorch
    pads).

    Raises
    ------
    UnknownNameError
        For any other string (a ``ValueError``).
    """
    nd = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * nd
        if padding == "same":
            pads = []
            for d, k in zip(dilation, kernel):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
            return pads
        raise UnknownNameError(
            f"unknown padding {padding!r}; use 'same', 'valid', an int or a tuple",
            param="padding",
        )
    return [(p, p) for p in ntuple(padding, nd)]


@dataclass(frozen=True)
class Axis:
    """One spatial axis of a sliding-window layer.

    Parameters
    ----------
    size_in, size_out : int
        Input and output lengths along the axis.
    kernel, stride, dilation : int
        Window geometry.
    pad_before, pad_after : int
        Padding on each side (they differ for ``padding='same'`` with an even span).
    mode : str
        One of :data:`PADDING_MODES`. With ``'zeros'`` a tap landing in the padding connects
        to nothing; the other modes map it back onto a real input, as ``torch.nn.functional.pad``
        does.
    kind : str
        One of :data:`AXIS_KINDS`. ``'window'``: output ``o`` reads input
        ``o * stride + k * dilation - pad_before`` through tap ``k``. ``'transposed'``:
        input ``i`` writes output ``i * stride - pad_before + k * dilation`` through tap
        ``k`` (``pad_after`` unused; the output size carries ``output_padding``).
        ``'adaptive'``: output ``o`` reads inputs ``start_o + k`` below ``end_o``
        (:func:`adaptive_windows`; ``kernel`` is the widest window, stride and padding
        unused).
    """

    size_in: int
    size_out: int
    kernel: int
    stride: int = 1
    dilation: int = 1
    pad_before: int = 0
    pad_after: int = 0
    mode: str = "zeros"
    kind: str = "window"

    def taps(self) -> np.ndarray:
        """Input index of every ``(output, kernel tap)`` pair; ``-1`` where nothing connects.

        Returns
        -------
        numpy.ndarray
            int64 array of shape ``(size_out, kernel)``.
        """
        n = self.size_in
        o = np.arange(self.size_out, dtype=np.int64)[:, None]
        k = np.arange(self.kernel, dtype=np.int64)[None, :]
        if self.kind == "transposed":
            # o = i * stride - pad + k * dilation: one input per (o, k) at most
            y = o + self.pad_before - k * self.dilation
            i = y // self.stride
            ok = (y % self.stride == 0) & (i >= 0) & (i < n)
            return np.where(ok, i, -1).astype(np.int64)
        if self.kind == "adaptive":
            start, end = adaptive_windows(n, self.size_out)
            x = start[:, None] + k
            return np.where(x < end[:, None], x, -1).astype(np.int64)
        x = o * self.stride + k * self.dilation - self.pad_before
        # Positions past the padded extent exist only for ceil_mode windows: never connected.
        beyond = x >= n + self.pad_after
        inside = (x >= 0) & (x < n)
        if self.mode == "zeros":
            mapped = x
        elif self.mode == "reflect":
            mapped = np.where(x < 0, -x, np.where(x >= n, 2 * (n - 1) - x, x))
        elif self.mode == "replicate":
            mapped = np.clip(x, 0, n - 1)
        elif self.mode == "circular":
            mapped = np.mod(x, n)
        else:  # pragma: no cover - the adapters validate the mode
            raise UnknownNameError(
                f"unknown padding mode {self.mode!r}; valid modes are {', '.join(PADDING_MODES)}",
                param="mode",
            )
        if self.mode == "zeros":
            valid = inside
        else:
            valid = ~beyond & (mapped >= 0) & (mapped < n)
        return np.where(valid, mapped, -1).astype(np.int64)

    def pairs(self) -> AxisPairs:
        """The axis connectivity grouped by input, as :class:`AxisPairs` (cached per axis:
        its arrays are read-only and shared)."""
        return _cached_pairs(self)

    def classes(self) -> AxisClasses:
        """The axis compressed to :class:`AxisClasses` (cached per axis, read-only)."""
        return _cached_classes(self)

    def window_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Per output: the window length clipped to the padded input, and to the real input.

        These are the two divisors ``avg_pool2d`` chooses between (``count_include_pad``).
        For an adaptive axis both are the window's length.
        """
        if self.kind == "adaptive":
            start, end = adaptive_windows(self.size_in, self.size_out)
            return end - start, end - start
        start = np.arange(self.size_out, dtype=np.int64) * self.stride - self.pad_before
        end_padded = np.minimum(start + self.kernel, self.size_in + self.pad_after)
        with_pad = end_padded - start
        valid = np.minimum(start + self.kernel, self.size_in) - np.maximum(start, 0)
        return with_pad, np.maximum(valid, 0)


@dataclass(frozen=True)
class AxisProduct:
    """Several axes read as one: positions, outputs and taps flattened row-major (the first
    axis slowest), as a tensor's dimensions are.

    Input ``(i1, i2, ...)`` feeds output ``(o1, o2, ...)`` through tap ``(k1, k2, ...)``
    exactly when every axis maps ``(o_a, k_a)`` to ``i_a``; so the product has the same
    :meth:`taps`, :meth:`pairs` and :meth:`classes` interface as an :class:`Axis`, and a
    3-d layer is a 2-d one whose first axis is the product of its depth and height axes.
    """

    axes: tuple[Axis, ...]

    @property
    def size_in(self) -> int:
        return int(np.prod([a.size_in for a in self.axes], dtype=np.int64))

    @property
    def size_out(self) -> int:
        return int(np.prod([a.size_out for a in self.axes], dtype=np.int64))

    @property
    def kernel(self) -> int:
        return int(np.prod([a.kernel for a in self.axes], dtype=np.int64))

    @property
    def mode(self) -> str:
        """``'zeros'`` when every axis pads with zeros, else the first other mode."""
        return next((a.mode for a in self.axes if a.mode != "zeros"), "zeros")

    def taps(self) -> np.ndarray:
        """Flattened input of every flattened ``(output, tap)``; ``-1`` where any axis
        connects to nothing: shape ``(size_out, kernel)``."""
        taps = np.zeros((1, 1), dtype=np.int64)
        for a in self.axes:
            t = a.taps()
            flat = taps[:, None, :, None] * a.size_in + t[None, :, None, :]
            bad = (taps[:, None, :, None] < 0) | (t[None, :, None, :] < 0)
            taps = np.where(bad, -1, flat).reshape(taps.shape[0] * t.shape[0], -1)
        return taps

    def pairs(self) -> AxisPairs:
        return _cached_pairs(self)

    def classes(self) -> AxisClasses:
        return _cached_classes(self)


@dataclass(frozen=True)
class AxisPairs:
    """Axis connectivity grouped by input index, in CSR form.

    For input ``i``, the distinct outputs it feeds are ``out[ptr[i]:ptr[i+1]]`` in ascending
    order; pair ``p`` reaches output ``out[p]`` through the kernel taps
    ``tap[tap_ptr[p]:tap_ptr[p+1]]`` (more than one only for non-zero padding modes, where
    duplicate taps are summed).
    """

    ptr: np.ndarray
    out: np.ndarray
    tap_ptr: np.ndarray
    tap: np.ndarray

    @classmethod
    def from_taps(cls, taps: np.ndarray, size_in: int) -> AxisPairs:
        size_out, kernel = taps.shape
        o, k = np.nonzero(taps >= 0)
        i = taps[o, k]
        order = np.lexsort((k, o, i))  # sort by input, then output, then tap
        i, o, k = i[order], o[order], k[order]
        new_pair = np.ones(len(i), dtype=bool)
        new_pair[1:] = (i[1:] != i[:-1]) | (o[1:] != o[:-1])
        starts = np.flatnonzero(new_pair)
        tap_ptr = np.append(starts, len(i)).astype(np.int64)
        pair_in = i[starts]
        ptr = np.zeros(size_in + 1, dtype=np.int64)
        np.add.at(ptr, pair_in + 1, 1)
        return cls(np.cumsum(ptr), o[starts].astype(np.int64), tap_ptr, k.astype(np.int64))

    @property
    def counts(self) -> np.ndarray:
        """Number of distinct outputs each input feeds."""
        return np.diff(self.ptr)

    @property
    def single_tap(self) -> bool:
        """True when every pair has exactly one tap (no duplicate taps to sum)."""
        return len(self.tap) == len(self.out)

    def tap_matrix(self, kernel: int) -> np.ndarray:
        """Count of ``(output, tap k)`` pairs landing on each input: ``(size_in, kernel)``."""
        m = np.zeros((len(self.ptr) - 1, kernel), dtype=np.float64)
        pair_of_tap = np.repeat(np.arange(len(self.out)), np.diff(self.tap_ptr))
        input_of_pair = np.repeat(np.arange(len(self.ptr) - 1), self.counts)
        np.add.at(m, (input_of_pair[pair_of_tap], self.tap), 1.0)
        return m


@dataclass(frozen=True)
class AxisClasses:
    """An axis compressed to classes of positions that behave alike.

    Two inputs fall in one class when the same number of outputs reaches them through each
    kernel tap (equal rows of :meth:`AxisPairs.tap_matrix`) and they feed as many distinct
    outputs; away from the borders that is every input with the same offset modulo the
    stride. Two outputs fall in one class when they read inputs of the same classes through
    every tap. A quantity that depends on an input only through its row of the tap matrix
    (the implicit engine's ``Z`` and ``T``) is then constant over a class, and so is any
    convolution of it over an output class: a layer's interior collapses to one class per
    stride offset, and only the border positions stay apart.

    Attributes
    ----------
    in_profile : numpy.ndarray
        ``(n_in_classes, kernel)`` float64: the tap-matrix row of each input class.
    in_counts : numpy.ndarray
        Distinct outputs an input of each class feeds.
    in_mult : numpy.ndarray
        Number of inputs in each class.
    out_taps : numpy.ndarray
        ``(n_out_classes, kernel)`` int64: the input class each tap of an output of the class
        reads, ``-1`` where the tap connects to nothing.
    out_mult : numpy.ndarray
        Number of outputs in each class.
    out_index : numpy.ndarray
        The class of every output (length ``size_out``).
    """

    in_profile: np.ndarray
    in_counts: np.ndarray
    in_mult: np.ndarray
    out_taps: np.ndarray
    out_mult: np.ndarray
    out_index: np.ndarray

    @classmethod
    def from_axis(cls, axis: Axis | AxisProduct) -> AxisClasses:
        taps = axis.taps()
        pairs = axis.pairs()
        profile = pairs.tap_matrix(axis.kernel)
        key = np.concatenate([profile, pairs.counts[:, None].astype(np.float64)], axis=1)
        first, in_index, in_mult = _unique_rows(key)
        out_key = np.where(taps >= 0, in_index[np.maximum(taps, 0)], -1)
        out_first, out_index, out_mult = _unique_rows(out_key)
        return cls(
            np.ascontiguousarray(profile[first]),
            pairs.counts[first].astype(np.int64),
            in_mult,
            out_key[out_first],
            out_mult,
            out_index,
        )


def _unique_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct rows of ``a`` in order of first appearance: (index of each one's first row,
    class of every row, rows per class). A dict over the rows' bytes: axes are short, and
    this is several times faster than ``np.unique(axis=0)`` at their sizes."""
    seen: dict[bytes, int] = {}
    index = np.empty(len(a), dtype=np.int64)
    first = []
    for i, row in enumerate(np.ascontiguousarray(a)):
        k = seen.setdefault(row.tobytes(), len(seen))
        if k == len(first):
            first.append(i)
        index[i] = k
    return np.asarray(first, dtype=np.int64), index, np.bincount(index, minlength=len(first))


def _read_only(obj):
    for value in vars(obj).values():
        if isinstance(value, np.ndarray):
            value.setflags(write=False)
    return obj


# Networks repeat the same axes layer after layer; both are pure functions of the axis.
@functools.lru_cache(maxsize=512)
def _cached_pairs(axis: Axis | AxisProduct) -> AxisPairs:
    return _read_only(AxisPairs.from_taps(axis.taps(), axis.size_in))


@functools.lru_cache(maxsize=512)
def _cached_classes(axis: Axis | AxisProduct) -> AxisClasses:
    return _read_only(AxisClasses.from_axis(axis))
