"""LayerGroupLRMonitor: one learning-rate series per layer group, where LearningRateMonitor logs the twins too."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lt_finetune import TransferModule
from lt_finetune.monitor import LayerGroupLRMonitor


def _logged_columns(tmp_path: Path, monitor: pl.Callback) -> list[str]:
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(TransferModule("resnet18", num_classes=3), DataLoader(data, batch_size=4))
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        return [c for c in next(csv.reader(f)) if c.startswith("lr-")]


@pytest.mark.parametrize("log_momentum", [False, True])
def test_twins_are_logged_once_with_their_group(tmp_path: Path, log_momentum: bool) -> None:
    groups = [g["name"] for g in TransferModule("resnet18", num_classes=3).param_groups()]
    assert any(name.endswith("/no_decay") for name in groups)
    plain = _logged_columns(tmp_path / "plain", LearningRateMonitor("step", log_momentum=log_momentum))
    ours = _logged_columns(tmp_path / "ours", LayerGroupLRMonitor("step", log_momentum=log_momentum))
    assert {c for c in plain if "/no_decay" in c}  # what the issue saw: every twin logged beside its group
    assert sorted(ours) == sorted(c for c in plain if "/no_decay" not in c)
    expected = {f"lr-AdamW/{name}" for name in groups if not name.endswith("/no_decay")}
    assert {c for c in ours if not c.endswith("-momentum")} == expected
