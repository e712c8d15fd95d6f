"""EI inside a training loop: :class:`Tracker` evaluates the model's weights every few steps.

The tracker plans the network once (:func:`foresight_sparse.plan`) and then, every
``every`` steps, evaluates the weights where they live, without copying the model. It leaves
the training untouched: the model's parameters, buffers, gradients and train/eval modes, and
the random number generators of torch (CPU and CUDA), NumPy and Python's :mod:`random` are
the same after a step as before it, so a seeded run gives the same weights with or without
a tracker.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from .exceptions import Opt, OptionError
from .history import History
from .norms import lin_norm
from .plans import Plan
from .results import Report
from .settings import Settings

__all__ = ["Tracker", "preserved_rng"]


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the torch (CPU and every initialised CUDA device), NumPy and :mod:`random`
    generator states on exit, whatever ran inside."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    np_state = np.random.get_state()  # noqa: NPY002 - the global generator is what we keep
    py_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)


class Tracker:
    """Evaluate a network's EI every ``every`` training steps and keep the results.

    Parameters
    ----------
    model : torch.nn.Module
        The network being trained. It is planned once, here; afterwards only its weights
        are read.
    input : torch.Tensor, tuple or dict
        An example input (one sample is enough: only shapes matter), as for
        :func:`foresight_sparse.plan`.
    every : int, default 100
        :meth:`step` evaluates when ``step % every == 0``.
    norm, device, engine, backend, legacy, max_memory, layers, measure, convention, skipped
        As for :func:`foresight_sparse.plan`, with the same defaults
        (:class:`~foresight_sparse.settings.Settings`). The reductions run on the CPU
        unless ``device`` says otherwise: pass ``device='cuda'`` to read the weights of a
        model training on the GPU where they are.

    Attributes
    ----------
    plan : Plan
        The plan every evaluation reuses.
    history : History
        One network record and one record per layer for each evaluated step.
    every : int
    last : Report or None
        The latest evaluation.

    Examples
    --------
    >>> tracker = Tracker(model, torch.zeros(1, 3, 32, 32), every=100)  # doctest: +SKIP
    >>> for step, (x, y) in enumerate(loader):                          # doctest: +SKIP
    ...     loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
    ...     tracker.step(step)
    >>> tracker.history.plot("ei.png")                                  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        input,
        every: int = 100,
        norm=lin_norm,
        device="cpu",
        *,
        engine: str = "auto",
        backend: str = "auto",
        legacy: bool = False,
        max_memory=None,
        layers="seed",
        measure="ei",
        convention: str = "seed",
        skipped: str = "warn",
    ):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise OptionError(
                Opt("every", every),
                " must be a positive int: the tracker evaluates when step % every == 0",
            )
        settings = Settings.make(
            norm=norm,
            device=device,
            engine=engine,
            backend=backend,
            legacy=legacy,
            max_memory=max_memory,
            layers=layers,
            measure=measure,
            convention=convention,
            skipped=skipped,
        )
        self._start(model, input, every, settings)

    @classmethod
    def from_settings(cls, model: nn.Module, input, settings: Settings, every: int = 100):
        """A tracker of ``model`` under options already checked into ``settings``."""
        tracker = cls.__new__(cls)
        tracker._start(model, input, every, settings)
        return tracker

    def _start(self, model: nn.Module, input, every: int, settings: Settings) -> None:
        self.model = model
        self.every = every
        with preserved_rng():  # a real forward pass (the trace's fallback) may draw numbers
            self.plan: Plan = Plan.build(model, settings, input)
        self.history = History(
            meta={
                "model": type(model).__name__,
                "engine": settings.engine,
                "device": str(settings.device),
                **settings.metadata(),
            }
        )
        self.last: Report | None = None

    def step(self, step: int, *, epoch: int | None = None) -> Report | None:
        """Evaluate the current weights if ``step % every == 0``.

        Parameters
        ----------
        step : int
            The training step (any counter: batches, optimizer steps, samples).
        epoch : int, optional
            Recorded with the results.

        Returns
        -------
        Report or None
            The evaluation, or None when this step is skipped.
        """
        if step % self.every:
            return None
        return self.record(step, epoch=epoch)

    def record(self, step: int, *, epoch: int | None = None, label: str | None = None) -> Report:
        """Evaluate the current weights now, whatever the step, and add them to
        :attr:`history`.

        Parameters
        ----------
        step : int
            Recorded with the results.
        epoch : int, optional
            Recorded with the results.
        label : str, optional
            Names the evaluation in the history; default ``"step=<step>"``.

        Returns
        -------
        Report
        """
        # No autograd graph is recorded, so the gradients and the graph of a pending
        # backward pass are left alone; the plan reads the parameters in place.
        with preserved_rng(), torch.no_grad():
            rep = self.plan.report()
        self.history.add_report(
            rep, label if label is not None else f"step={step}", step=step, epoch=epoch
        )
        self.last = rep
        return rep

    def __repr__(self) -> str:
        return (
            f"<Tracker of {type(self.model).__name__} every {self.every} steps: "
            f"{len(self.history.labels)} evaluations>"
        )
