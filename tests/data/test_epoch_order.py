"""Training order is a function of (seed, epoch): a run resumed at an epoch boundary sees the same batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lt_finetune.data import AnimalMNISTDataModule
from lt_finetune.data._common import EpochShuffleSampler


def test_sampler_order_depends_on_seed_and_epoch_only() -> None:
    a, b = EpochShuffleSampler(50, seed=3), EpochShuffleSampler(50, seed=3)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(EpochShuffleSampler(50, seed=4)) != first


class _Recorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 10)
        self.seen: list[list[int]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.seen.append([self.current_epoch, *y.tolist()])
        return torch.nn.functional.cross_entropy(self.layer(x.mean(dim=(2, 3))), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root: Path, ckpt: str | None = None) -> _Recorder:
    model = _Recorder()
    data = AnimalMNISTDataModule(image_size=8, train_per_class=3, val_per_class=1, test_per_class=1, batch_size=8)
    trainer = pl.Trainer(
        max_epochs=3, default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, filename="{epoch}")],
    )  # fmt: skip
    trainer.fit(model, data, ckpt_path=ckpt)
    return model


def test_resumed_run_sees_the_same_batches(tmp_path: Path, animal_mnist: None) -> None:
    full = _fit(tmp_path / "full")
    resumed = _fit(tmp_path / "resumed", ckpt=str(tmp_path / "full" / "ckpt" / "epoch=0.ckpt"))
    later = [row for row in full.seen if row[0] >= 1]
    assert resumed.seen == later and len(later) == 8  # 30 images, batch 8: 4 batches per epoch
    epochs = {e: [r[1:] for r in full.seen if r[0] == e] for e in range(3)}
    assert epochs[0] != epochs[1]  # shuffled anew every epoch
