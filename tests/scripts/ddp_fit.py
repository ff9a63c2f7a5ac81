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
from tinymodels import TermsModule, tiny_data
from torch import nn

from lt_finetune.callbacks import FreezeBackbone, GradualUnfreeze, LayerwiseLR
from lt_finetune.coordinator import Coordinator
from lt_finetune.extras import add_trainable_module


class Module(TermsModule):
    def train_dataloader(self) -> DataLoader:
        # Per-rank data differs (Lightning adds a DistributedSampler), so unsynchronised gradients diverge.
        return tiny_data(n=128, batch_size=16)


class Discriminate(pl.Callback):
    """An extra trainable module with a loss term, added at setup: DDP must register it like any parameter."""

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        torch.manual_seed(1)
        disc = add_trainable_module(pl_module, "discriminator", nn.Linear(16, 1))
        pl_module.add_loss_term("domain", lambda out: disc(out.features).pow(2).mean())


def main() -> None:
    out = sys.argv[1]
    if "--no-sync" in sys.argv:
        Coordinator.sync_gradients = lambda self, step: None  # type: ignore[method-assign]
    model = Module(scheduler=lambda o: S.CosineAnnealingLR(o, T_max=12), optimizer="adamw")
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    callbacks: list[Any] = [
        Discriminate(),
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
        if not n.startswith("backbone.0.") and n in initial
    )
    torch.manual_seed(1)
    disc_initial = nn.Linear(16, 1).weight.detach()
    disc_moved = (model.extra_modules.discriminator.weight.detach() - disc_initial).abs().max().item()
    torch.save(
        {
            "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
            "frozen_moved": frozen_moved,
            "others_moved": others_moved,
            "discriminator_moved": disc_moved,
            "names": [n for n, _ in model.named_parameters()],
            "steps": trainer.global_step,
        },
        os.path.join(out, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main()
