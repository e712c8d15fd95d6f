"""The perturbation EI of Mattsson, Michaud and Hoel (Entropy 2020), as a plan measure.

For a layer ``L`` with input neurons ``A``, output neurons ``B`` and activation ``act``:

- ``ei_parts`` is the sum over pairs of the plug-in mutual information ``I(x_A; y_B)`` in
  bits, ``x`` uniform noise on the input range, ``y = act(L(x))``;
- ``sensitivity`` is the same sum with only ``A`` perturbed and every other input 0;
- ``degeneracy = sensitivity - ei_parts``.

:class:`Perturbation` is the :class:`~foresight_sparse.measures.Measure` a plan runs
(``measure="perturbation"``); :func:`perturb_layer`, :func:`ei_parts`,
:func:`sensitivity` and :func:`pairwise_mi` evaluate one module without a plan. See
``docs/perturbation.rst`` for the estimator, its cost and how it differs from deep-ei.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..budget import parse_bytes
from ..exceptions import ShapeMismatchError
from ..measures import Measure, MeasureLayer
from . import activations
from .activations import RANGES, activation_range, is_activation
from .estimator import (
    MAX_SAMPLES,
    LayerPerturbation,
    bin_indices,
    check_settings,
    ei_parts,
    histogram_form,
    noise,
    pairwise_mi,
    perturb_layer,
    sensitivity,
)

__all__ = [
    "Perturbation",
    "LayerPerturbation",
    "perturb_layer",
    "ei_parts",
    "sensitivity",
    "pairwise_mi",
    "noise",
    "bin_indices",
    "histogram_form",
    "RANGES",
    "activation_range",
    "is_activation",
]


class Perturbation(Measure):
    """The perturbation measures of every counted layer (deep-ei's ``ei_parts`` and
    ``sensitivity``), as a plan measure.

    Parameters
    ----------
    in_range, out_range : (float, float), optional
        Ranges binned for every layer; by default each layer's come from the activation
        before it and its own activation (:data:`RANGES`).
    in_bins, out_bins : int, default 64
        Equal bins over each range.
    samples : int, optional
        Samples of ``ei_parts``; None (default) doubles from 10 000 until deep-ei's
        convergence rule meets ``threshold``, at most ``max_samples``.
    threshold : float, default 0.05
        The convergence threshold.
    max_samples : int, default 1 280 000
        Cap of the automatic sample count; a layer that reaches it reports
        ``converged=False``.
    sensitivity_samples : int, default 500
        Samples of the single-input perturbation.
    batch_size : int, optional
        Samples per forward pass (default: what 256 MiB holds).
    seed : int, default 0
        Seed of the noise.
    device : torch.device or str, optional
        Where to compute; None (default) is the plan's device.

    Notes
    -----
    Each layer's row holds ``determinism`` None, ``degeneracy = sensitivity - ei_parts``,
    ``ei = ei_parts`` and the :attr:`columns`: ``ei_parts``, ``sensitivity``,
    ``samples`` (behind ``ei_parts``), ``converged`` and ``unconnected_bias`` (the
    expected plug-in MI of the pairs the layer does not connect, which deep-ei's
    all-pairs sum would include; see ``docs/perturbation.rst``). The network's values are
    the sums over layers (``samples`` the total, ``converged`` whether all did).
    """

    name: ClassVar[str] = "perturbation"
    columns: ClassVar[tuple[str, ...]] = (
        "ei_parts",
        "sensitivity",
        "samples",
        "converged",
        "unconnected_bias",
    )

    def __init__(
        self,
        *,
        in_range: tuple[float, float] | None = None,
        in_bins: int = 64,
        out_range: tuple[float, float] | None = None,
        out_bins: int = 64,
        samples: int | None = None,
        threshold: float = 0.05,
        max_samples: int = MAX_SAMPLES,
        sensitivity_samples: int = 500,
        batch_size: int | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
    ):
        check_settings(
            in_range=in_range,
            out_range=out_range,
            in_bins=in_bins,
            out_bins=out_bins,
            samples=samples,
            threshold=threshold,
            max_samples=max_samples,
            sensitivity_samples=sensitivity_samples,
            batch_size=batch_size,
        )
        self.in_range = None if in_range is None else (float(in_range[0]), float(in_range[1]))
        self.out_range = None if out_range is None else (float(out_range[0]), float(out_range[1]))
        self.in_bins = int(in_bins)
        self.out_bins = int(out_bins)
        self.samples = None if samples is None else int(samples)
        self.threshold = float(threshold)
        self.max_samples = int(max_samples)
        self.sensitivity_samples = int(sensitivity_samples)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.seed = int(seed)
        self.device = None if device is None else str(torch.device(device))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"Perturbation({args})"

    def settings(self) -> dict[str, Any]:
        """The settings as JSON-ready data."""
        return {
            "in_range": None if self.in_range is None else list(self.in_range),
            "in_bins": self.in_bins,
            "out_range": None if self.out_range is None else list(self.out_range),
            "out_bins": self.out_bins,
            "samples": self.samples,
            "threshold": self.threshold,
            "max_samples": self.max_samples,
            "sensitivity_samples": self.sensitivity_samples,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "device": self.device,
        }

    def check(self, layer: MeasureLayer) -> None:
        """Refuse a layer whose ranges are unknown or whose connectivity does not have one
        row per input neuron, and NaN/Inf weights (each error names the layer and fix)."""
        activations.resolve(layer.before, layer.after, self.in_range, self.out_range, layer.label)
        layer.conn.check_finite()
        n_in = _prod(layer.in_shape[1:])
        n_out = _prod(layer.out_shape[1:])
        if layer.conn.n_rows != n_in or layer.conn.n_cols != n_out:
            raise ShapeMismatchError(
                f"{layer.label}: its connectivity is {layer.conn.n_rows} x "
                f"{layer.conn.n_cols} but the layer maps input {tuple(layer.in_shape)} to "
                f"output {tuple(layer.out_shape)} ({n_in} -> {n_out} neurons); the "
                "perturbation needs one row per input neuron. Trace the model with a batch "
                "of one sample and one vector per Linear"
            )

    def layer(self, layer: MeasureLayer) -> dict[str, Any]:
        """The layer's values: see the class notes."""
        result = perturb_layer(
            layer.module,
            tuple(layer.in_shape[1:]),
            before=layer.before,
            activation=layer.after,
            in_range=self.in_range,
            in_bins=self.in_bins,
            out_range=self.out_range,
            out_bins=self.out_bins,
            samples=self.samples,
            threshold=self.threshold,
            max_samples=self.max_samples,
            sensitivity_samples=self.sensitivity_samples,
            batch_size=self.batch_size,
            device=self.device if self.device is not None else layer.device,
            seed=self.seed,
            max_memory=parse_bytes(layer.max_memory),
            conn=layer.conn,
            label=layer.label,
        )
        return {
            "determinism": None,
            "degeneracy": result.degeneracy,
            "ei": result.ei_parts,
            "ei_parts": result.ei_parts,
            "sensitivity": result.sensitivity,
            "samples": result.samples,
            "converged": result.converged,
            "unconnected_bias": result.unconnected_bias,
        }

    def network(self, layers: list[dict[str, Any]]) -> dict[str, Any]:
        """Sums over layers; ``samples`` the total, ``converged`` whether every layer did."""
        parts = sum(row["ei_parts"] for row in layers)
        sens = sum(row["sensitivity"] for row in layers)
        return {
            "determinism": None,
            "degeneracy": sens - parts,
            "ei": parts,
            "ei_parts": parts,
            "sensitivity": sens,
            "samples": sum(row["samples"] for row in layers),
            "converged": all(row["converged"] for row in layers),
            "unconnected_bias": sum(row["unconnected_bias"] for row in layers),
        }


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
