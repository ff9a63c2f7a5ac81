"""Predict on a folder of new images with PredictionWriter, under 2-process CPU DDP or in one process.

Usage: python ddp_predict.py IMAGES_ROOT OUT_CSV {ddp,single}. IMAGES_ROOT holds ``train/<class>/`` and ``new/``
(see ``tests/image_folders.py``); the model is built from a fixed seed, so both modes predict with one model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl

from lt_finetune import TransferModule
from lt_finetune.data import ImageFolderDataModule
from lt_finetune.inference import PredictionWriter


def main(root: Path, output: Path, mode: str) -> None:
    pl.seed_everything(0)
    data = ImageFolderDataModule(
        str(root / "train"), val_dir=str(root / "val"), predict_dir=str(root / "new"), image_size=32, batch_size=2
    )
    model = TransferModule("resnet18", num_classes=3)
    ddp = {"devices": 2, "strategy": "ddp"} if mode == "ddp" else {"devices": 1}
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[PredictionWriter(str(output))], **ddp
    )
    trainer.predict(model, datamodule=data, return_predictions=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
