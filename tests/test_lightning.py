"""EICallback logs the expected keys through a real (tiny, CPU) Lightning Trainer."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import foresight_sparse
from foresight_sparse.integrations.lightning import EICallback


class TinyModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 5),
        )
        self.example_input_array = torch.zeros(1, 3, 8, 8)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(32, 3, 8, 8, generator=gen), torch.randint(0, 5, (32,), generator=gen)
    )
    return torch.utils.data.DataLoader(data, batch_size=4)


def _fit(tmp_path, callback, **kwargs):
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    module = TinyModule()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path, name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        **kwargs,
    )
    trainer.fit(module, _loader())
    with open(trainer.logger.log_dir + "/metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return module, rows


LAYERS = ["net.0", "net.2", "net.4"]
KEYS = {"ei", "determinism", "degeneracy"} | {
    f"{k}/{name}" for k in ("ei", "determinism", "degeneracy") for name in LAYERS
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_logs_every_n_steps(tmp_path):
    callback = EICallback(every_n_steps=2)  # the module's example_input_array
    module, rows = _fit(tmp_path, callback, max_steps=6)
    logged = [r for r in rows if r.get("ei")]
    assert KEYS <= set(rows[0])
    assert [int(r["step"]) for r in logged] == [2, 4, 6]
    assert callback.history.series()["step"] == [2, 4, 6]
    # The last evaluation is of the final weights: report() of them agrees.
    ref = foresight_sparse.report(module, torch.zeros(1, 3, 8, 8))
    last = logged[-1]
    assert abs(float(last["ei"]) - ref.ei) <= 1e-6  # logged as float32 by Lightning
    assert abs(callback.history.series()["ei"][-1] - ref.ei) <= 1e-12 * max(1.0, abs(ref.ei))
    assert abs(float(last["ei/net.4"]) - ref.layers[2].ei) <= 1e-6


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_logs_every_epoch_with_prefix(tmp_path):
    callback = EICallback(torch.zeros(1, 3, 8, 8), prefix="info/", per_layer=False)
    _, rows = _fit(tmp_path, callback, max_epochs=2, limit_train_batches=3)
    logged = [r for r in rows if r.get("info/ei")]
    assert len(logged) == 2
    assert {"info/ei", "info/determinism", "info/degeneracy", "epoch"} <= set(rows[0])
    assert not any(k.startswith("info/ei/") for k in rows[0])
    assert callback.history.series()["epoch"] == [0, 1]


def test_needs_an_input_and_valid_intervals():
    with pytest.raises(ValueError, match="every_n_steps"):
        EICallback(every_n_steps=0)
    callback = EICallback()

    class Trainer:
        global_step = 0
        current_epoch = 0
        is_global_zero = True

    module = TinyModule()
    module.example_input_array = None
    with pytest.raises(foresight_sparse.MissingInputError, match="example input"):
        callback.on_train_epoch_end(Trainer(), module)
