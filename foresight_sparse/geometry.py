"""Pure index math of sliding-window layers: shapes in, index arrays out.

Nothing here reads a module. A 2-d sliding-window layer (a convolution or a pooling) is
separable in its index structure: input row ``ih`` feeds output row ``oh`` through kernel row
``kh`` exactly when the H axis maps ``(oh, kh)`` to ``ih``, and likewise for W. So each axis is
described once, by an :class:`Axis`, and the 2-d connectivity is the product of two 1-d ones.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = ["PADDING_MODES", "Axis", "AxisPairs", "AxisClasses", "conv_output_size"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def conv_output_size(size: int, kernel: int, stride: int, dilation: int, pad: int,
                     ceil_mode: bool = False) -> int:
    """Output length of a sliding window over ``size`` inputs with ``pad`` total padding."""
    span = size + pad - dilation * (kernel - 1) - 1
    if ceil_mode:
        return -(-span // stride) + 1
    return span // stride + 1


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
    """

    size_in: int
    size_out: int
    kernel: int
    stride: int = 1
    dilation: int = 1
    pad_before: int = 0
    pad_after: int = 0
    mode: str = "zeros"

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
        else:  # pragma: no cover - callers validate the mode
            raise ValueError(f"unknown padding mode {self.mode!r}")
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
        """
        start = np.arange(self.size_out, dtype=np.int64) * self.stride - self.pad_before
        end_padded = np.minimum(start + self.kernel, self.size_in + self.pad_after)
        with_pad = end_padded - start
        valid = np.minimum(start + self.kernel, self.size_in) - np.maximum(start, 0)
        return with_pad, np.maximum(valid, 0)


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
    def from_axis(cls, axis: Axis) -> AxisClasses:
        taps = axis.taps()
        pairs = axis.pairs()
        profile = pairs.tap_matrix(axis.kernel)
        key = np.concatenate([profile, pairs.counts[:, None].astype(np.float64)], axis=1)
        first, in_index, in_mult = _unique_rows(key)
        out_key = np.where(taps >= 0, in_index[np.maximum(taps, 0)], -1)
        out_first, out_index, out_mult = _unique_rows(out_key)
        return cls(np.ascontiguousarray(profile[first]), pairs.counts[first].astype(np.int64),
                   in_mult, out_key[out_first], out_mult, out_index)


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
def _cached_pairs(axis: Axis) -> AxisPairs:
    return _read_only(AxisPairs.from_taps(axis.taps(), axis.size_in))


@functools.lru_cache(maxsize=512)
def _cached_classes(axis: Axis) -> AxisClasses:
    return _read_only(AxisClasses.from_axis(axis))
