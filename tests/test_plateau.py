"""ReduceLROnPlateau with TransferModule: stepped every epoch on a named metric, from Python and from YAML."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.utils.data import DataLoader, TensorDataset

from lt_finetune import TransferModule

# An abs threshold of 1e3 counts every epoch after the first as a plateau: the rate halves at each epoch end.
ALWAYS_PLATEAU = partial(ReduceLROnPlateau, patience=0, factor=0.5, threshold=1e3, threshold_mode="abs")


def _loader(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)), 8)


class _LogsEpoch(TransferModule):
    """Also logs ``epoch_index``, a metric that rises every epoch."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.log("epoch_index", float(self.current_epoch), on_step=False, on_epoch=True)
        return super().training_step(batch, batch_idx)


def _model(cls: type[TransferModule] = TransferModule, **kwargs: Any) -> TransferModule:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    return cls(backbone, num_classes=3, input_size=(3, 8, 8), lr=0.01, **kwargs)


class _EpochLRs(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[-1]["lr"])


def _fit(model: TransferModule, *, val: bool = True, epochs: int = 4) -> tuple[pl.Trainer, list[float]]:
    recorder = _EpochLRs()
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[recorder],
    )  # fmt: skip
    trainer.fit(model, _loader(24, 0), _loader(16, 1) if val else None)
    return trainer, recorder.lrs


def test_plateau_watches_val_loss_by_default_and_lowers_the_rate() -> None:
    trainer, lrs = _fit(_model(scheduler=ALWAYS_PLATEAU))
    (config,) = trainer.lr_scheduler_configs
    assert (config.monitor, config.interval, config.reduce_on_plateau) == ("val/loss", "epoch", True)
    assert lrs == pytest.approx([0.01, 0.01, 0.005, 0.0025])


def test_plateau_keeps_the_rate_while_the_metric_improves() -> None:
    patient = partial(ReduceLROnPlateau, patience=0, factor=0.5, threshold=0.0, threshold_mode="abs", mode="max")
    _, lrs = _fit(_model(_LogsEpoch, scheduler=patient, scheduler_monitor="epoch_index"), val=False, epochs=3)
    assert lrs == [0.01, 0.01, 0.01]  # the logged epoch index rises every epoch: never a plateau


def test_plateau_can_watch_a_training_metric_without_validation() -> None:
    trainer, lrs = _fit(_model(scheduler=ALWAYS_PLATEAU, scheduler_monitor="train/loss"), val=False, epochs=3)
    assert trainer.lr_scheduler_configs[0].monitor == "train/loss"
    assert lrs == pytest.approx([0.01, 0.01, 0.005])


def test_a_metric_that_is_never_logged_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"watches 'val/loss', which was not logged by the end of epoch 0.*train/loss"):
        _fit(_model(scheduler=ALWAYS_PLATEAU), val=False)
    with pytest.raises(ValueError, match=r"watches 'val/acc5'.*Set `scheduler_monitor`"):
        _fit(_model(scheduler=ALWAYS_PLATEAU, scheduler_monitor="val/acc5"))


def test_a_monitor_without_a_plateau_scheduler_is_refused() -> None:
    with pytest.raises(ValueError, match=r"scheduler is a StepLR, which watches none; remove `scheduler_monitor`"):
        _fit(_model(scheduler=partial(StepLR, step_size=1), scheduler_monitor="val/loss"))
    with pytest.raises(TypeError, match="scheduler_monitor"):
        _model(scheduler_monitor="")


def test_plateau_from_yaml(tmp_path: Path, animal_mnist: None) -> None:
    from lt_finetune.cli import main

    config = tmp_path / "plateau.yaml"
    config.write_text(
        f"""
model:
  backbone: test_resnet  # timm's tiny test network
  scheduler:
    class_path: torch.optim.lr_scheduler.ReduceLROnPlateau
    init_args: {{patience: 0, factor: 0.5, threshold: 1000.0, threshold_mode: abs}}
  scheduler_monitor: val/loss
data:
  class_path: lt_finetune.data.AnimalMNISTDataModule
  init_args: {{image_size: 16, train_per_class: 2, val_per_class: 1, test_per_class: 1, batch_size: 10}}
trainer:
  max_epochs: 3
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  default_root_dir: {tmp_path}
"""
    )
    assert main(["fit", "--config", str(config)]) == 0
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, weights_only=False)
    # Written at the validation end of epoch 2, before that epoch's scheduler step: halved once, after epoch 1.
    assert state["lr_schedulers"][0]["_last_lr"][-1] == pytest.approx(0.001 * 0.5)
