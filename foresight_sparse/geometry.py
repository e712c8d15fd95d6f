"""Pure index math of sliding-window layers: shapes in, index arrays out.

Nothing here reads a module. A 2-d sliding-window layer (a convolution or a pooling) is
separable in its index structure: input row ``ih`` feeds output row ``oh`` through kernel row
``kh`` exactly when the H axis maps ``(oh, kh)`` to ``ih``, and likewise for W. So each axis is
described once, by an :class:`Axis`, and the 2-d connectivity is the product of two 1-d ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PADDING_MODES", "Axis", "AxisPairs", "conv_output_size"]

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
        """The axis connectivity grouped by input, as :class:`AxisPairs`."""
        return AxisPairs.from_taps(self.taps(), self.size_in)

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
