"""A small fit on Animal-MNIST (flips on) that a test kills with SIGKILL and then resumes.

Usage::

    python killable_fit.py ROOT [--resume CKPT] [--workers N] [--hang-at STEP] [--slow-last-save-at STEP]

Checkpoints go to ``ROOT/ckpt`` every 2 steps (``last.ckpt`` beside them) through ``AtomicCheckpointIO``; a finished
fit writes ``ROOT/final.ckpt``. ``--hang-at STEP`` waits, once the checkpoint of step ``STEP - 1`` or earlier is on
disk, at the start of step ``STEP`` after touching ``ROOT/hanging``: the test kills the process there, mid-epoch.
``--slow-last-save-at STEP`` writes ``last.ckpt`` from step ``STEP`` on in two halves, touching ``ROOT/saving`` after
the first and then waiting: the test kills the process in the middle of that save.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path
from typing import IO, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lt_finetune import TransferModule
from lt_finetune.checkpoint_io import PARTIAL_SUFFIX, AtomicCheckpointIO
from lt_finetune.data import AnimalMNISTDataModule

DATA = {"image_size": 16, "train_per_class": 4, "val_per_class": 1, "test_per_class": 1, "batch_size": 8}
MAX_EPOCHS = 3  # 5 steps an epoch
_WAIT_S = 600  # longer than any test waits: the process only ends by the test's SIGKILL


def tiny_backbone() -> nn.Module:
    """The backbone of the fit; pass it to ``TransferModule.load_from_checkpoint(path, backbone=...)``."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU()
    )


class _HangAt(pl.Callback):
    def __init__(self, step: int, marker: Path) -> None:
        self.step = step
        self.marker = marker

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            self.marker.touch()
            time.sleep(_WAIT_S)


class _SlowLastSave(AtomicCheckpointIO):
    """Writes ``last.ckpt`` from step ``step`` on in two halves, with a wait between them."""

    def __init__(self, step: int, marker: Path) -> None:
        super().__init__()
        self.step = step
        self.marker = marker

    def _write(self, checkpoint: dict[str, Any], file: IO[bytes]) -> None:
        if not (str(file.name).endswith("last.ckpt" + PARTIAL_SUFFIX) and checkpoint["global_step"] >= self.step):
            super()._write(checkpoint, file)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        file.write(data[: len(data) // 2])
        file.flush()
        self.marker.touch()
        time.sleep(_WAIT_S)
        file.write(data[len(data) // 2 :])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--resume", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--hang-at", type=int, default=None)
    parser.add_argument("--slow-last-save-at", type=int, default=None)
    args = parser.parse_args()
    root: Path = args.root
    pl.seed_everything(0, verbose=False)
    data = AnimalMNISTDataModule(**DATA, hflip=True, num_workers=args.workers)
    model = TransferModule(tiny_backbone(), num_classes=10, input_size=(3, 16, 16), lr=0.01)
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_last=True, filename="{step}")
    ]
    if args.hang_at is not None:
        callbacks.append(_HangAt(args.hang_at, root / "hanging"))
    io_plugin = (
        AtomicCheckpointIO()
        if args.slow_last_save_at is None
        else _SlowLastSave(args.slow_last_save_at, root / "saving")
    )
    trainer = pl.Trainer(
        max_epochs=MAX_EPOCHS, accelerator="cpu", deterministic=True, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=root, callbacks=callbacks,
        plugins=[io_plugin],
    )  # fmt: skip
    trainer.fit(model, data, ckpt_path=args.resume)
    trainer.save_checkpoint(root / "final.ckpt")


if __name__ == "__main__":
    main()
