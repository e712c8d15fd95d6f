"""A PyTorch Lightning callback that logs EI while a LightningModule trains.

Needs Lightning (``pip install 'foresight-sparse[lightning]'``); this module imports
``lightning`` (or, failing that, the older ``pytorch_lightning``) and nothing else imports
this module, so the rest of the library works without it.
"""

from __future__ import annotations

from typing import Any

from ..exceptions import MissingDependencyError, MissingInputError, Opt, OptionError
from ..history import History
from ..norms import lin_norm
from ..results import Report
from ..settings import Settings
from ..tracking import Tracker

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning import Callback
    except ImportError:
        raise MissingDependencyError(
            "foresight_sparse.integrations.lightning needs PyTorch Lightning: "
            "pip install 'foresight-sparse[lightning]'"
        ) from None

__all__ = ["EICallback"]


class EICallback(Callback):
    """Log determinism, degeneracy and EI of the LightningModule every N steps or epochs.

    The module is planned on the first evaluation (:class:`~foresight_sparse.Tracker`);
    each evaluation then reads its current weights, leaving the
    model, its gradients and the random generators as they were. The figures go to the
    trainer's loggers (at the global step; per epoch through
    :meth:`LightningModule.log_dict`, so the epoch figures can also be monitored, e.g. by
    ``ModelCheckpoint(monitor="ei")``), under the keys
    ``ei``, ``determinism`` and ``degeneracy`` (network totals) and, with ``per_layer=True``,
    ``ei/<layer>``, ``determinism/<layer>`` and ``degeneracy/<layer>`` for each counted
    layer (``determinism/<layer>`` is the layer's mean row entropy), each after ``prefix``.
    Only the global-zero process computes and logs.

    Parameters
    ----------
    input : torch.Tensor, tuple or dict, optional
        An example input; by default the module's ``example_input_array``.
    every_n_steps : int, optional
        Evaluate at the end of a training batch when ``trainer.global_step`` (optimizer
        steps so far) is a multiple of it.
    every_n_epochs : int, optional
        Evaluate at the end of every ``every_n_epochs``-th training epoch. When neither is
        given, once per epoch.
    norm, device, engine, backend, legacy, max_memory, layers, measure, convention, skipped
        As for :func:`foresight_sparse.plan`, with the same defaults, checked when the
        callback is made (:class:`~foresight_sparse.settings.Settings`). A measure's or
        convention's numeric quantities (``sensitivity``, ``effectiveness``,
        ``gamma_alpha``, ...) are logged under their own names too; a value the measure
        does not have (None) is not logged. Pass ``device='cuda'`` to evaluate the
        weights of a module training on the GPU where they are.
    per_layer : bool, default True
        Log each layer's figures too, not only the network totals.
    prefix : str, default ''
        Put before every key, e.g. ``"ei_stats/"``.

    Attributes
    ----------
    tracker : Tracker or None
        Created on the first evaluation; :attr:`history` holds every evaluation so far.

    Examples
    --------
    >>> from foresight_sparse.integrations.lightning import EICallback   # doctest: +SKIP
    >>> trainer = lightning.Trainer(callbacks=[EICallback(torch.zeros(1, 3, 32, 32),
    ...                                                   every_n_steps=100)])  # doctest: +SKIP
    """

    def __init__(
        self,
        input=None,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
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
        per_layer: bool = True,
        prefix: str = "",
    ):
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise OptionError(Opt(name), f"={value!r} must be a positive int or None")
        if every_n_steps is None and every_n_epochs is None:
            every_n_epochs = 1
        self.input = input
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        # checked here, before training starts; the tracker plans with them on first use
        self.settings = Settings.make(
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
        self.per_layer = per_layer
        self.prefix = prefix
        self.tracker: Tracker | None = None
        self._last_step: int | None = None

    @property
    def history(self) -> History:
        """Every evaluation so far (step, epoch, each layer; empty before the first), ready
        for :meth:`~foresight_sparse.history.History.to_csv` and
        :meth:`~foresight_sparse.history.History.plot`."""
        return self.tracker.history if self.tracker is not None else History()

    def _evaluate(self, trainer, pl_module) -> Report | None:
        step = int(trainer.global_step)
        if not trainer.is_global_zero or step == self._last_step:
            return None
        if self.tracker is None:
            example = (
                self.input
                if self.input is not None
                else getattr(pl_module, "example_input_array", None)
            )
            if example is None:
                raise MissingInputError(
                    "EICallback needs an example input: pass EICallback(input=...) or set "
                    "the LightningModule's example_input_array"
                )
            self.tracker = Tracker.from_settings(pl_module, example, self.settings, every=1)
        self._last_step = step
        return self.tracker.record(step, epoch=int(trainer.current_epoch))

    def metrics(self, report: Report) -> dict[str, float]:
        """The keys and values logged for ``report``."""
        p = self.prefix
        out = _numbers(
            p,
            "",
            {
                "ei": report.ei,
                "determinism": report.determinism,
                "degeneracy": report.degeneracy,
                **report.extra,
            },
        )
        if self.per_layer:
            for lay in report.layers:
                values = {
                    "ei": lay.ei,
                    "determinism": lay.mean_row_entropy,
                    "degeneracy": lay.degeneracy,
                    **lay.extra,
                }
                out.update(_numbers(p, f"/{lay.name or lay.type}", values))
        return out

    def on_train_batch_end(
        self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.every_n_steps is None or trainer.global_step % self.every_n_steps:
            return
        rep = self._evaluate(trainer, pl_module)
        if rep is not None:
            # Straight to the loggers: log_dict's step metrics would only reach them on the
            # trainer's log_every_n_steps grid, which need not meet this one.
            metrics = self.metrics(rep)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.every_n_epochs is None or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        rep = self._evaluate(trainer, pl_module)
        if rep is None and self.tracker is not None and trainer.is_global_zero:
            rep = self.tracker.last  # evaluated at this very step already
        if rep is not None:
            pl_module.log_dict(self.metrics(rep), on_step=False, on_epoch=True, rank_zero_only=True)


def _numbers(prefix: str, suffix: str, values: dict) -> dict[str, float]:
    """The loggable values (numbers, not None, flags or words) under their metric keys."""
    return {
        f"{prefix}{k}{suffix}": float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
