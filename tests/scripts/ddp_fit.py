"""Fit the tiny foreign module under 2-process CPU DDP with lt_finetune callbacks; each rank saves its parameters.

Usage: python ddp_fit.py OUT_DIR [--no-sync]. ``--no-sync`` disables lt_finetune's gradient averaging for
parameters DDP does not manage, to show that the test detects the drift it prevents.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from torch.optim import lr_scheduler as S
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tinymodels import ForeignModule, tiny_data

from lt_finetune.callbacks import (
    FreezeBackbone,
    GradualUnfreeze,
    LayerwiseLR,
    _finetune,
)


class Module(ForeignModule):
    def train_dataloader(self) -> DataLoader:
        # Per-rank data differs (Lightning adds a DistributedSampler), so unsynchronised gradients diverge.
        return tiny_data(n=128, batch_size=16)


def main() -> None:
    out = sys.argv[1]
    if "--no-sync" in sys.argv:
        _finetune._Coordinator.sync_gradients = lambda self, trainer: None  # type: ignore[method-assign]
    model = Module(scheduler=lambda o: S.CosineAnnealingLR(o, T_max=12), optimizer="adamw")
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    callbacks: list[Any] = [
        FreezeBackbone(groups=["0"]),  # never unfrozen: must not move
        GradualUnfreeze(every_n_steps=2),
        LayerwiseLR(decay=0.5),
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=3,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(model)
    frozen_moved = max(
        (p.detach() - initial[n]).abs().max().item() for n, p in model.named_parameters() if n.startswith("backbone.0.")
    )
    others_moved = min(
        (p.detach() - initial[n]).abs().max().item()
        for n, p in model.named_parameters()
        if not n.startswith("backbone.0.")
    )
    torch.save(
        {
            "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
            "frozen_moved": frozen_moved,
            "others_moved": others_moved,
            "steps": trainer.global_step,
        },
        os.path.join(out, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main()
