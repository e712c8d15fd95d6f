"""The perturbation EI of one layer: noise, bins, pair histograms, mutual information.

Everything here works on one module and its input shape; :class:`~foresight_sparse.
perturbation.Perturbation` runs it for each counted layer of a plan. The numeric forms
(numba on the CPU, torch elsewhere) are :class:`HistogramForm` objects chosen once per call
by :func:`histogram_form`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..budget import DEFAULT_MAX_MEMORY, check_budget, parse_bytes, row_blocks
from ..connectivity import Connectivity
from ..connectivity import connectivity as build_connectivity
from ..exceptions import (
    MeasureSettingsError,
    NonFiniteWeightsError,
    Opt,
    OptionError,
    ShapeMismatchError,
    UnknownNameError,
)
from . import _kernels
from .activations import resolve

__all__ = [
    "BLOCK",
    "AUTO_START",
    "LayerPerturbation",
    "HistogramForm",
    "NumbaForm",
    "TorchForm",
    "histogram_form",
    "noise",
    "bin_indices",
    "check_settings",
    "pairwise_mi",
    "ei_parts",
    "sensitivity",
    "perturb_layer",
]

#: Samples per noise block: sample ``s`` of a seed is drawn from block ``s // BLOCK`` by a
#: generator seeded with ``(seed, block)``, so every batching and every chunk of pairs sees
#: the same samples.
BLOCK = 500

#: Samples of the first estimate when ``samples=None`` (deep-ei's ``INTERVAL``); each
#: further estimate doubles the count.
AUTO_START = 10_000

#: Default cap on the sample count of the automatic convergence (10 000 * 2**7).
MAX_SAMPLES = 1_280_000

# working bytes per sample and neuron of a batch: the noise or output value, its float64
# copy while binned, and its bin
_BATCH_BYTES_PER_VALUE = 4 + 8 + 8 + 2
_BATCH_BUDGET = 256 << 20
# (sample, pair) flat indices the torch form holds at once
_TORCH_INDEX_ELEMENTS = 1 << 23
# unconnected pairs whose expected plug-in MI estimates the mean over all of them
_PROBE_PAIRS = 256


# --------------------------------------------------------------------------- settings


def check_settings(
    *,
    in_range=None,
    out_range=None,
    in_bins: int = 64,
    out_bins: int = 64,
    samples: int | None = None,
    threshold: float = 0.05,
    max_samples: int = MAX_SAMPLES,
    sensitivity_samples: int = 500,
    batch_size: int | None = None,
    label: str = "perturbation",
) -> None:
    """Refuse settings outside their domain.

    Raises
    ------
    MeasureSettingsError
        Naming the setting, its value and ``label``.
    """
    for name, value in (("in_range", in_range), ("out_range", out_range)):
        if value is None:
            continue
        try:
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError):
            raise MeasureSettingsError(
                f"{label}: {name}={value!r} is not a pair (low, high) of numbers", param=name
            ) from None
        if not (math.isfinite(lo) and math.isfinite(hi)) or not lo < hi:
            raise MeasureSettingsError(
                f"{label}: {name}={value!r} is empty, reversed or not finite; give "
                "(low, high) with low < high",
                param=name,
            )
    for name, value in (("in_bins", in_bins), ("out_bins", out_bins)):
        if not _is_int(value) or not 2 <= value <= 32767:
            raise MeasureSettingsError(
                f"{label}: {name}={value!r}; a histogram needs an integer number of bins "
                "from 2 to 32767",
                param=name,
            )
    for name, value in (
        ("samples", samples),
        ("max_samples", max_samples),
        ("sensitivity_samples", sensitivity_samples),
        ("batch_size", batch_size),
    ):
        if value is not None and (not _is_int(value) or value <= 0):
            raise MeasureSettingsError(
                f"{label}: {name}={value!r}; it must be a positive integer", param=name
            )
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold <= 0:
        raise MeasureSettingsError(
            f"{label}: threshold={threshold!r}; the convergence threshold must be a positive "
            "number (deep-ei's default is 0.05)",
            param="threshold",
        )


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# --------------------------------------------------------------------------- samples


def _block_seed(seed: int, stream: int, block: int) -> int:
    # a distinct 63-bit seed for every (seed, stream, block)
    h = (int(seed) * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + block) & (2**64 - 1)
    h ^= h >> 31
    return h & (2**63 - 1)


def noise(
    in_shape: Sequence[int],
    start: int,
    stop: int,
    *,
    in_range: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    stream: int = 0,
) -> torch.Tensor:
    """Samples ``start .. stop`` of the uniform noise the perturbation feeds a layer.

    Parameters
    ----------
    in_shape : sequence of int
        One sample's shape (no batch dimension).
    start, stop : int
        The sample indices; sample ``s`` is the same whatever range it is drawn in.
    in_range : (float, float)
        The interval the values are uniform on.
    seed : int
        The seed of the noise.
    device, dtype
        Where and in what the values are made (each device draws its own stream).
    stream : int
        0 for the joint noise of ``ei_parts``, 1 for the single-input noise of
        ``sensitivity``.

    Returns
    -------
    torch.Tensor
        Shape ``(stop - start, *in_shape)``.
    """
    device = torch.device(device)
    lo, hi = in_range
    gen = torch.Generator(device=device)
    x = torch.empty((max(stop - start, 0), *in_shape), device=device, dtype=dtype)
    for block in range(start // BLOCK, (stop - 1) // BLOCK + 1 if stop > start else 0):
        gen.manual_seed(_block_seed(seed, stream, block))
        b0 = block * BLOCK
        i0, i1 = max(start - b0, 0), min(stop - b0, BLOCK)
        dest = x[b0 + i0 - start : b0 + i1 - start]
        if i0 == 0 and i1 == BLOCK:  # a whole block: drawn in place, no copy
            torch.rand((BLOCK, *in_shape), generator=gen, out=dest)
        else:
            values = torch.rand((BLOCK, *in_shape), generator=gen, device=device, dtype=dtype)
            dest.copy_(values[i0:i1])
    return x.mul_(hi - lo).add_(lo)


def bin_indices(values: torch.Tensor, value_range: tuple[float, float], bins: int) -> torch.Tensor:
    """The bin of each value among ``bins`` equal bins over ``value_range``, as int16, -1
    for values outside it: ``numpy.histogram2d``'s bins (comparisons in float64 against
    ``numpy.linspace`` edges; the last bin holds the upper edge). Torch operations on the
    values' device (the numba form bins with a kernel that gives the same bins)."""
    lo, hi = float(value_range[0]), float(value_range[1])
    edges = torch.from_numpy(np.linspace(lo, hi, bins + 1)).to(values.device)
    v = values.to(torch.float64)
    k = ((v - lo) * (bins / (hi - lo))).nan_to_num_(0.0).floor_().clamp_(0, bins - 1)
    k = k.to(torch.int64)
    k -= (v < edges[k]).to(torch.int64)  # the guess is at most one bin off either way
    k += ((v >= edges[(k + 1).clamp_(max=bins)]) & (k < bins - 1)).to(torch.int64)
    k = torch.where((v >= lo) & (v <= hi), k, -1)  # NaN compares False: out of range
    return k.to(torch.int16)


def _edges(value_range, bins) -> np.ndarray:
    return np.linspace(float(value_range[0]), float(value_range[1]), bins + 1)


# --------------------------------------------------------------------------- forms


class HistogramForm:
    """How pair histograms are counted and turned into mutual information on one device.

    The histogram of a chunk of ``E`` pairs is a flat int32 array in the layout
    ``[input bin, pair, output bin]`` (see :mod:`foresight_sparse.perturbation._kernels`).
    """

    name = "form"

    def zeros(self, n_pairs: int, in_bins: int, out_bins: int, device) -> torch.Tensor:
        """An empty histogram of ``n_pairs`` pairs."""
        raise NotImplementedError

    def bins(self, values: torch.Tensor, value_range, bins: int) -> torch.Tensor:
        """:func:`bin_indices` of a 2-d tensor of values."""
        return bin_indices(values, value_range, bins)

    def accumulate(self, hist, xb, yb, rowptr, cols, out_bins) -> None:
        """Add samples: ``xb`` (samples, rows) and ``yb`` (samples, outputs) int16 bins,
        -1 out of range; row ``r``'s pairs are ``cols[rowptr[r]:rowptr[r + 1]]``."""
        raise NotImplementedError

    def mi(self, hist, n_pairs: int, in_bins: int, out_bins: int) -> np.ndarray:
        """The plug-in MI in bits of each pair, over the pair's own total (0 when empty)."""
        raise NotImplementedError

    def counts(self, hist, n_pairs: int, in_bins: int, out_bins: int) -> np.ndarray:
        """The counts as a ``(pairs, in_bins, out_bins)`` int64 array (for tests, probes)."""
        h = hist[: in_bins * n_pairs * out_bins].reshape(in_bins, n_pairs, out_bins)
        return h.permute(1, 0, 2).to(torch.int64).cpu().numpy()


class NumbaForm(HistogramForm):
    """Numba kernels over NumPy views of CPU tensors: ``prange`` over input neurons."""

    name = "numba"

    def zeros(self, n_pairs, in_bins, out_bins, device):
        return torch.zeros(in_bins * n_pairs * out_bins, dtype=torch.int32)

    def bins(self, values, value_range, bins):
        v = values.contiguous()
        out = np.empty(tuple(v.shape), dtype=np.int16)
        _kernels.bin_values(v.numpy(), _edges(value_range, bins), out)
        return torch.from_numpy(out)

    def accumulate(self, hist, xb, yb, rowptr, cols, out_bins):
        _kernels.pair_counts(
            hist.numpy(),
            np.ascontiguousarray(xb.cpu().numpy().T),
            np.ascontiguousarray(yb.cpu().numpy()),
            rowptr,
            cols,
            out_bins,
        )

    def mi(self, hist, n_pairs, in_bins, out_bins):
        out = np.empty(n_pairs, dtype=np.float64)
        if n_pairs:
            _kernels.pair_mi(hist.numpy(), n_pairs, in_bins, out_bins, out)
        return out


class TorchForm(HistogramForm):
    """Torch operations on any device: flat indices ``ia * E * ob + e * ob + jb`` counted
    with ``index_add_`` (one extra cell takes the samples out of range)."""

    name = "torch"

    def zeros(self, n_pairs, in_bins, out_bins, device):
        return torch.zeros(in_bins * n_pairs * out_bins + 1, dtype=torch.int32, device=device)

    def accumulate(self, hist, xb, yb, rowptr, cols, out_bins):
        device = hist.device
        n_pairs = len(cols)
        if n_pairs == 0:
            return
        counts = np.diff(rowptr)
        rows = torch.from_numpy(np.repeat(np.arange(len(counts)), counts)).to(device)
        cols_t = torch.from_numpy(cols).to(device)
        xb, yb = xb.to(device), yb.to(device)
        trash = hist.numel() - 1
        pair_off = torch.arange(n_pairs, device=device) * out_bins
        step = max(1, _TORCH_INDEX_ELEMENTS // n_pairs)
        for s0 in range(0, xb.shape[0], step):
            ia = xb[s0 : s0 + step][:, rows].to(torch.int64)
            jb = yb[s0 : s0 + step][:, cols_t].to(torch.int64)
            flat = ia * (n_pairs * out_bins) + pair_off + jb
            flat = torch.where((ia < 0) | (jb < 0), trash, flat).reshape(-1)
            hist.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))

    def mi(self, hist, n_pairs, in_bins, out_bins):
        h = hist[: in_bins * n_pairs * out_bins].view(in_bins, n_pairs, out_bins)
        out = []
        step = max(1, (1 << 22) // (in_bins * out_bins))
        for e0 in range(0, n_pairs, step):
            c = h[:, e0 : e0 + step].to(torch.float64)
            total = c.sum((0, 2))
            n_i = c.sum(2)
            n_j = c.sum(0)
            num = (
                torch.special.xlogy(c, c).sum((0, 2))
                - torch.special.xlogy(n_i, n_i).sum(0)
                - torch.special.xlogy(n_j, n_j).sum(1)
                + torch.special.xlogy(total, total)
            )
            out.append(torch.where(total > 0, num / (total.clamp(min=1) * math.log(2)), 0.0))
        if not out:
            return np.zeros(0)
        return torch.cat(out).cpu().numpy()


FORMS = {"numba": NumbaForm, "torch": TorchForm}


def histogram_form(device: torch.device | str, form: str = "auto") -> HistogramForm:
    """The form for ``device``: numba on the CPU, torch elsewhere (``form='auto'``); or
    the one named."""
    device = torch.device(device)
    if form == "auto":
        form = "numba" if device.type == "cpu" else "torch"
    if form not in FORMS or (form == "numba" and device.type != "cpu"):
        raise UnknownNameError(
            f"form={form!r} cannot run on {device}; valid forms are 'auto', 'torch' and "
            "'numba' (CPU only)",
            param="form",
        )
    return FORMS[form]()


# --------------------------------------------------------------------------- the layer


@dataclass
class LayerPerturbation:
    """The perturbation measures of one layer.

    Attributes
    ----------
    ei_parts : float or None
        Sum over the evaluated pairs of the plug-in MI ``I(x_A; y_B)`` in bits, all inputs
        perturbed together (None when not computed).
    sensitivity : float or None
        Sum over the pairs of ``I(x_A; y_B)`` with only ``A`` perturbed.
    samples : int
        Samples behind ``ei_parts``.
    converged : bool
        Whether the automatic sample count met the threshold (True for a fixed count).
    unconnected_bias : float
        Expected plug-in MI, in bits, summed over the pairs the layer does not connect
        (independent, true MI 0): what deep-ei's all-pairs ``ei_parts`` would add on top.
    pairs : int
        Connected pairs evaluated.
    unconnected : int
        Pairs not connected.
    in_range, out_range : (float, float)
        The ranges binned.
    history : list of (int, float)
        ``(samples, ei_parts)`` at each estimate of the automatic convergence.
    """

    ei_parts: float | None
    sensitivity: float | None
    samples: int
    converged: bool
    unconnected_bias: float
    pairs: int
    unconnected: int
    in_range: tuple[float, float]
    out_range: tuple[float, float]
    history: list[tuple[int, float]] = field(default_factory=list)

    @property
    def degeneracy(self) -> float | None:
        """``sensitivity - ei_parts`` (None unless both are computed)."""
        if self.ei_parts is None or self.sensitivity is None:
            return None
        return self.sensitivity - self.ei_parts


@dataclass
class _Context:
    label: str
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    activation: Callable | None
    in_range: tuple[float, float]
    out_range: tuple[float, float]
    in_bins: int
    out_bins: int
    seed: int
    device: torch.device
    dtype: torch.dtype
    form: HistogramForm
    batch: int
    budget: int
    bias: torch.Tensor  # L(0), flattened

    @property
    def n_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def n_out(self) -> int:
        return math.prod(self.out_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x)
        if self.activation is not None:
            y = self.activation(y)
        return y


def _context(
    module,
    in_shape,
    *,
    before,
    activation,
    in_range,
    out_range,
    in_bins,
    out_bins,
    batch_size,
    device,
    seed,
    max_memory,
    form,
    label,
) -> _Context:
    label = label or type(module).__name__
    check_settings(
        in_range=in_range,
        out_range=out_range,
        in_bins=in_bins,
        out_bins=out_bins,
        batch_size=batch_size,
        label=label,
    )
    in_shape = tuple(int(d) for d in in_shape)
    act, in_range, out_range = resolve(before, activation, in_range, out_range, label)
    device = torch.device(device)
    param = next(iter(module.parameters()), None)
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    if param is not None and param.device != device:
        import copy

        module = copy.deepcopy(module).to(device)  # the caller's module stays where it is
    for name, tensor in module.named_parameters():
        n_bad = int((~torch.isfinite(tensor.detach())).sum())
        if n_bad:
            raise NonFiniteWeightsError(
                f"{label}: {n_bad} of {tensor.numel()} values of {name} (shape "
                f"{tuple(tensor.shape)}) are NaN or infinite; the perturbation's outputs are "
                "undefined. Fix or reinitialise the weights"
            )
    with torch.no_grad():
        try:
            y0 = module(torch.zeros((1, *in_shape), device=device, dtype=dtype))
        except Exception as exc:
            raise ShapeMismatchError(
                f"{label}: the layer cannot take an input of shape (1, *{in_shape}): {exc}"
            ) from exc
    out_shape = tuple(y0.shape[1:])
    budget = parse_bytes(max_memory) if max_memory is not None else DEFAULT_MAX_MEMORY
    per_sample = _BATCH_BYTES_PER_VALUE * (math.prod(in_shape) + math.prod(out_shape))
    batch = batch_size or max(BLOCK, min(50_000, _BATCH_BUDGET // max(per_sample, 1)))
    return _Context(
        label=label,
        module=module,
        in_shape=in_shape,
        out_shape=out_shape,
        activation=act,
        in_range=in_range,
        out_range=out_range,
        in_bins=in_bins,
        out_bins=out_bins,
        seed=int(seed),
        device=device,
        dtype=dtype,
        form=histogram_form(device, form),
        batch=int(batch),
        budget=budget,
        bias=y0.reshape(-1).detach(),
    )


def _connectivity(ctx: _Context, conn: Connectivity | None) -> Connectivity:
    if conn is None:
        conn = build_connectivity(
            ctx.module, (1, *ctx.in_shape), (1, *ctx.out_shape), label=ctx.label
        )
    if conn.n_rows != ctx.n_in or conn.n_cols != ctx.n_out:
        raise ShapeMismatchError(
            f"{ctx.label}: its connectivity is {conn.n_rows} x {conn.n_cols} but the layer maps "
            f"{ctx.n_in} input neurons {ctx.in_shape} to {ctx.n_out} outputs {ctx.out_shape}; "
            "the perturbation needs one row per input neuron (a Linear applied to extra "
            "leading dimensions shares its weights: pass the shape of one vector)"
        )
    return conn


# a chunk of pairs: input rows r0 .. r1, CSR of their pairs (local row pointers)
_Chunk = tuple[int, int, np.ndarray, np.ndarray]


def _chunks(ctx: _Context, conn: Connectivity | None, pairs: str) -> list[_Chunk]:
    """The pairs in row blocks whose histograms fit the budget."""
    cell_bytes = ctx.in_bins * ctx.out_bins * 4
    if pairs == "all":
        counts = np.full(ctx.n_in, ctx.n_out, dtype=np.int64)
    else:
        counts = conn.row_counts(0, conn.n_rows)
    reserved = ctx.batch * _BATCH_BYTES_PER_VALUE * (ctx.n_in + ctx.n_out)
    reserved = min(reserved, ctx.budget // 2)
    if len(counts) and int(counts.max()) * cell_bytes + reserved > ctx.budget:
        check_budget(
            int(counts.max()) * cell_bytes + reserved,
            ctx.budget,
            f"{ctx.label}: the {ctx.in_bins} x {ctx.out_bins} histograms of the "
            f"{int(counts.max())} pairs of one input neuron and a batch of {ctx.batch} samples",
            ("raise ", Opt("max_memory"), ", or lower in_bins/out_bins or batch_size"),
        )
    out = []
    for r0, r1 in row_blocks(counts, cell_bytes, 0, ctx.budget, ctx.label, reserved):
        if pairs == "all":
            rowptr = np.arange(0, (r1 - r0 + 1) * ctx.n_out, ctx.n_out, dtype=np.int64)
            cols = np.tile(np.arange(ctx.n_out, dtype=np.int64), r1 - r0)
        else:
            blk = conn.block(r0, r1, dtype=torch.float32, device="cpu")
            rowptr = blk.rowptr.to(torch.int64).numpy().copy()
            cols = blk.cols.to(torch.int64).numpy().copy()
        out.append((r0, r1, rowptr, cols))
    return out


def _histograms(ctx: _Context, chunk: _Chunk, checkpoints: Sequence[int]) -> Iterator:
    """Stream samples through the layer and count the chunk's pairs; yield the histogram
    at each checkpoint (a running total: the same array, updated in place)."""
    r0, r1, rowptr, cols = chunk
    hist = ctx.form.zeros(len(cols), ctx.in_bins, ctx.out_bins, ctx.device)
    done = 0
    for target in checkpoints:
        while done < target:
            stop = done + ctx.batch
            if ctx.batch >= BLOCK:  # whole noise blocks: none is drawn twice
                stop = stop // BLOCK * BLOCK
            stop = min(target, stop)
            with torch.no_grad():
                x = noise(
                    ctx.in_shape,
                    done,
                    stop,
                    in_range=ctx.in_range,
                    seed=ctx.seed,
                    device=ctx.device,
                    dtype=ctx.dtype,
                )
                y = ctx.forward(x).reshape(stop - done, -1)
                xb = ctx.form.bins(x.reshape(stop - done, -1)[:, r0:r1], ctx.in_range, ctx.in_bins)
                yb = ctx.form.bins(y, ctx.out_range, ctx.out_bins)
            ctx.form.accumulate(hist, xb, yb, rowptr, cols, ctx.out_bins)
            done = stop
        yield hist


def _ei_at(ctx: _Context, chunks: list[_Chunk], checkpoints: Sequence[int]) -> list[float]:
    totals = [0.0] * len(checkpoints)
    for chunk in chunks:
        n_pairs = len(chunk[3])
        for k, hist in enumerate(_histograms(ctx, chunk, checkpoints)):
            totals[k] += float(ctx.form.mi(hist, n_pairs, ctx.in_bins, ctx.out_bins).sum())
    return totals


def _has_converged(prev: tuple[int, float], cur: tuple[int, float], threshold: float) -> bool:
    # deep-ei's rule: extrapolate the last change over as many samples again, relative to
    # the estimate (slope * samples_so_far * (MULTIPLIER - 1) / EI <= threshold), written
    # without the division, which fails at EI = 0
    (n0, e0), (n1, e1) = prev, cur
    return (e0 - e1) / (n1 - n0) * n1 <= threshold * e1


def _auto_checkpoints(max_samples: int) -> list[int]:
    out = [AUTO_START]
    while out[-1] * 2 <= max_samples:
        out.append(out[-1] * 2)
    return [n for n in out if n <= max_samples] or [max_samples]


def _parts(ctx, chunks, samples, threshold, max_samples) -> tuple[float, int, bool, list]:
    if samples is not None:
        (value,) = _ei_at(ctx, chunks, [samples])
        return value, samples, True, [(samples, value)]
    seq = _auto_checkpoints(max_samples)
    history: list[tuple[int, float]] = []
    if len(chunks) == 1:
        # one histogram: keep counting, stop at the first estimate that has converged
        n_pairs = len(chunks[0][3])
        for n, hist in zip(seq, _histograms(ctx, chunks[0], seq)):
            history.append((n, float(ctx.form.mi(hist, n_pairs, ctx.in_bins, ctx.out_bins).sum())))
            if len(history) > 1 and _has_converged(history[-2], history[-1], threshold):
                return history[-1][1], n, True, history
        return history[-1][1], history[-1][0], False, history
    # several chunks hold no histogram between estimates: each new estimate recounts from
    # the first sample (the total work stays below twice the final count)
    first = seq[:2]
    history = list(zip(first, _ei_at(ctx, chunks, first)))
    k = len(first)
    while True:
        if len(history) > 1 and _has_converged(history[-2], history[-1], threshold):
            return history[-1][1], history[-1][0], True, history
        if k >= len(seq):
            return history[-1][1], history[-1][0], False, history
        history.append((seq[k], _ei_at(ctx, chunks, [seq[k]])[0]))
        k += 1


def _unconnected_bias(ctx: _Context, conn: Connectivity, samples: int) -> tuple[float, int]:
    """Expected plug-in MI summed over unconnected pairs: their count times the mean, over
    up to 256 of them drawn at random, of the exact expectation given each pair's marginals."""
    unconnected = ctx.n_in * ctx.n_out - conn.nnz
    if unconnected <= 0:
        return 0.0, 0
    rng = np.random.default_rng([ctx.seed, 7])
    picked: dict[int, set[int]] = {}
    n_picked = 0
    for _ in range(_PROBE_PAIRS * 50):
        if n_picked == min(_PROBE_PAIRS, unconnected):
            break
        a = int(rng.integers(ctx.n_in))
        b = int(rng.integers(ctx.n_out))
        row = conn.block(a, a + 1, dtype=torch.float32, device="cpu").cols
        if b in picked.get(a, ()) or bool((row == b).any()):
            continue
        picked.setdefault(a, set()).add(b)
        n_picked += 1
    if not n_picked:
        return 0.0, unconnected
    # the probe pairs, CSR over rows a_min .. a_max
    rows = sorted(picked)
    r0, r1 = rows[0], rows[-1] + 1
    counts = np.zeros(r1 - r0, dtype=np.int64)
    cols = []
    for a in rows:
        counts[a - r0] = len(picked[a])
        cols.extend(sorted(picked[a]))
    rowptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    chunk = (r0, r1, rowptr, np.asarray(cols, dtype=np.int64))
    (hist,) = _histograms(ctx, chunk, [samples])
    table = ctx.form.counts(hist, n_picked, ctx.in_bins, ctx.out_bins)
    expected = [
        _kernels.expected_mi(t.sum(1), t.sum(0), int(t.sum())) if t.sum() else 0.0 for t in table
    ]
    return float(np.mean(expected)) * unconnected, unconnected


def _sensitivity(ctx: _Context, conn: Connectivity, samples: int) -> float:
    """Sum over connected pairs of ``I(u; act(J * u + b))``: one shared draw ``u``, one
    evaluation per distinct ``(J, b)``."""
    # every counted layer is affine: with only input A perturbed, y_B = act(J_AB u + b_B)
    u = noise((), 0, samples, in_range=ctx.in_range, seed=ctx.seed, device=ctx.device, stream=1)
    ub = ctx.form.bins(u[:, None], ctx.in_range, ctx.in_bins)[:, 0]
    bias_bits = ctx.bias.to(torch.float32).view(torch.int32).to(torch.int64).cpu()
    keys = []
    step = max(1, (64 << 20) // 24 // max(conn.max_row_nnz, 1))
    for r0 in range(0, conn.n_rows, step):
        blk = conn.block(r0, min(r0 + step, conn.n_rows), dtype=torch.float32, device="cpu")
        j = blk.vals
        keep = j != 0  # a pair of zero weight has a constant output: MI 0
        j_bits = j[keep].view(torch.int32).to(torch.int64)
        b_bits = bias_bits[blk.cols.to(torch.int64)[keep]] & 0xFFFFFFFF
        k, n = torch.unique((j_bits << 32) | b_bits, return_counts=True)
        keys.append((k, n))
    if not keys:
        return 0.0
    k = torch.cat([k for k, _ in keys])
    n = torch.cat([n for _, n in keys])
    k, inverse = torch.unique(k, return_inverse=True)
    mult = torch.zeros(len(k), dtype=torch.int64).index_add_(0, inverse, n)
    high = k >> 32
    low = k & 0xFFFFFFFF
    low = torch.where(low >= 2**31, low - 2**32, low)
    j = high.to(torch.int32).view(torch.float32).to(ctx.device)
    b = low.to(torch.int32).view(torch.float32).to(ctx.device)
    total = 0.0
    ib, ob = ctx.in_bins, ctx.out_bins
    step = max(1, min((32 << 20) // (samples * 12), (256 << 20) // (ib * ob * 4)))
    for e0 in range(0, len(j), step):
        je, be = j[e0 : e0 + step], b[e0 : e0 + step]
        y = je[None, :] * u[:, None] + be[None, :]
        if ctx.activation is not None:
            with torch.no_grad():
                y = ctx.activation(y)
        yb = ctx.form.bins(y, ctx.out_range, ob)
        n_pairs = len(je)
        xb = ub[:, None].expand(samples, n_pairs)  # pair e is row e with one entry
        rowptr = np.arange(n_pairs + 1, dtype=np.int64)
        cols = np.arange(n_pairs, dtype=np.int64)
        hist = ctx.form.zeros(n_pairs, ib, ob, ctx.device)
        ctx.form.accumulate(hist, xb, yb, rowptr, cols, ob)
        mi = ctx.form.mi(hist, n_pairs, ib, ob)
        total += float(np.dot(mi, mult[e0 : e0 + step].numpy().astype(np.float64)))
    return total


# --------------------------------------------------------------------------- public


def perturb_layer(
    module: nn.Module,
    in_shape: Sequence[int],
    *,
    before: nn.Module | None = None,
    activation: nn.Module | None = None,
    in_range: tuple[float, float] | None = None,
    in_bins: int = 64,
    out_range: tuple[float, float] | None = None,
    out_bins: int = 64,
    samples: int | None = None,
    threshold: float = 0.05,
    max_samples: int = MAX_SAMPLES,
    sensitivity_samples: int | None = 500,
    parts: bool = True,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    max_memory: int | str | None = None,
    conn: Connectivity | None = None,
    form: str = "auto",
    label: str | None = None,
) -> LayerPerturbation:
    """``ei_parts``, ``sensitivity`` and the unconnected-pair bias of one layer.

    Parameters
    ----------
    module : torch.nn.Module
        A layer with a registered connectivity builder (Linear, convolutions, average
        pools, ...), applied with its bias.
    in_shape : sequence of int
        One input sample's shape, without the batch dimension: ``(100,)``,
        ``(3, 32, 32)``.
    before, activation : torch.nn.Module, optional
        The module that runs before the layer (its range is the input range) and the
        layer's activation (applied to the outputs; its range is the output range). A
        module that is no activation (a batch norm, a pool) means none: identity and
        (-10, 10). See :data:`~foresight_sparse.perturbation.activations.RANGES`.
    in_range, out_range : (float, float), optional
        Override the ranges the activations imply.
    in_bins, out_bins : int, default 64
        Equal bins over each range (deep-ei's defaults).
    samples : int, optional
        Samples for ``ei_parts``; None doubles from 10 000 until deep-ei's convergence
        rule meets ``threshold`` or ``max_samples`` is reached.
    threshold : float, default 0.05
        Relative change that counts as converged.
    max_samples : int, default 1 280 000
        Cap of the automatic sample count (reported as not converged when reached).
    sensitivity_samples : int or None, default 500
        Samples of the single-input perturbation (deep-ei's default); None skips it.
    parts : bool, default True
        Compute ``ei_parts`` (False: sensitivity only).
    batch_size : int, optional
        Samples per forward pass (default: as many as 256 MiB of batch memory holds).
    device : torch.device or str, default 'cpu'
        Where the noise, forward passes and counts run (numba on the CPU, torch elsewhere).
    seed : int, default 0
        Seed of the noise; equal seeds give equal samples whatever the batching/chunking.
    max_memory : int or str, optional
        Budget of the pair histograms (default 2 GiB); more pairs are counted in chunks
        over the same samples.
    conn : Connectivity, optional
        The layer's connectivity, when already built.
    form : {'auto', 'numba', 'torch'}
        The counting form (``'auto'``: numba on the CPU, torch on other devices).
    label : str, optional
        How errors name the layer.

    Returns
    -------
    LayerPerturbation

    Raises
    ------
    MeasureSettingsError
        For settings outside their domain.
    NonFiniteWeightsError
        For NaN or infinite parameters.
    UnsupportedLayerError
        When a range is needed from an activation of unknown range, or the layer has no
        connectivity builder.
    MemoryBudgetError
        When the histograms of one input neuron's pairs exceed ``max_memory``.
    """
    check_settings(
        samples=samples,
        threshold=threshold,
        max_samples=max_samples,
        sensitivity_samples=sensitivity_samples,
        label=label or type(module).__name__,
    )
    ctx = _context(
        module,
        in_shape,
        before=before,
        activation=activation,
        in_range=in_range,
        out_range=out_range,
        in_bins=in_bins,
        out_bins=out_bins,
        batch_size=batch_size,
        device=device,
        seed=seed,
        max_memory=max_memory,
        form=form,
        label=label,
    )
    conn = _connectivity(ctx, conn)
    value, used, converged, history, bias, unconnected = None, 0, True, [], 0.0, 0
    if parts:
        chunks = _chunks(ctx, conn, "connected")
        value, used, converged, history = _parts(ctx, chunks, samples, threshold, max_samples)
        bias, unconnected = _unconnected_bias(ctx, conn, used)
    sens = None
    if sensitivity_samples is not None:
        sens = _sensitivity(ctx, conn, sensitivity_samples)
    return LayerPerturbation(
        ei_parts=value,
        sensitivity=sens,
        samples=used,
        converged=converged,
        unconnected_bias=bias,
        pairs=conn.nnz,
        unconnected=ctx.n_in * ctx.n_out - conn.nnz if parts else unconnected,
        in_range=ctx.in_range,
        out_range=ctx.out_range,
        history=history,
    )


def ei_parts(module: nn.Module, in_shape: Sequence[int], **options) -> LayerPerturbation:
    """``ei_parts`` of one layer (no sensitivity): :func:`perturb_layer` with
    ``sensitivity_samples=None``; the same keyword options."""
    return perturb_layer(module, in_shape, **{**options, "sensitivity_samples": None})


def sensitivity(
    module: nn.Module, in_shape: Sequence[int], *, samples: int = 500, **options
) -> float:
    """The sensitivity of one layer in bits: :func:`perturb_layer` with ``parts=False`` and
    ``sensitivity_samples=samples``; the same keyword options."""
    result = perturb_layer(
        module, in_shape, **{**options, "sensitivity_samples": samples, "parts": False}
    )
    return result.sensitivity


def pairwise_mi(
    module: nn.Module,
    in_shape: Sequence[int],
    samples: int,
    *,
    pairs: str = "connected",
    **options,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The plug-in MI of each pair on ``samples`` samples: ``(rows, cols, mi)``.

    ``pairs='connected'`` evaluates the pairs the connectivity connects, ``'all'`` every
    input-output pair (dense; small layers). Options as :func:`perturb_layer` (ranges,
    bins, activation, seed, batch_size, max_memory, form, device).
    """
    if pairs not in ("connected", "all"):
        raise UnknownNameError(
            f"pairs={pairs!r}; valid values are 'connected' and 'all'", param="pairs"
        )
    check_settings(samples=samples)
    conn = options.pop("conn", None)
    ctx = _context(
        module,
        in_shape,
        before=options.pop("before", None),
        activation=options.pop("activation", None),
        in_range=options.pop("in_range", None),
        out_range=options.pop("out_range", None),
        in_bins=options.pop("in_bins", 64),
        out_bins=options.pop("out_bins", 64),
        batch_size=options.pop("batch_size", None),
        device=options.pop("device", "cpu"),
        seed=options.pop("seed", 0),
        max_memory=options.pop("max_memory", None),
        form=options.pop("form", "auto"),
        label=options.pop("label", None),
    )
    if options:
        raise OptionError(
            f"pairwise_mi() got unexpected options {sorted(options)}", param=min(options)
        )
    if pairs == "connected":
        conn = _connectivity(ctx, conn)
    rows, cols, mis = [], [], []
    for chunk in _chunks(ctx, conn, pairs):
        r0, _, rowptr, c = chunk
        (hist,) = _histograms(ctx, chunk, [samples])
        mis.append(ctx.form.mi(hist, len(c), ctx.in_bins, ctx.out_bins))
        rows.append(r0 + np.repeat(np.arange(len(rowptr) - 1), np.diff(rowptr)))
        cols.append(c)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(mis)
