"""Fit the tiny foreign module under 2-process CPU DDP with lt_finetune callbacks; each rank saves its parameters.

Usage: python ddp_fit.py OUT_DIR [--no-sync] [--accumulate]. ``--no-sync`` disables lt_finetune's gradient averaging
for parameters DDP does not manage, to show that the test detects the drift it prevents; ``--accumulate`` trains
with ``accumulate_grad_batches=2`` (twice the epochs, the same optimizer steps).
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


class GradientsAfterBackward(pl.Callback):
    """After the last backward of each step (where a 16-bit grad scaler next unscales and checks for inf/nan),
    the largest difference between the ranks' gradients: zero when every gradient is already averaged there."""

    def __init__(self) -> None:
        self.largest = 0.0

    def on_after_backward(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if (trainer.fit_loop.epoch_loop.batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # not the step's last backward
        grads = [p.grad.reshape(-1) for p in pl_module.parameters() if p.grad is not None and p.requires_grad]
        flat = torch.cat(grads)
        gathered = [torch.zeros_like(flat) for _ in range(trainer.world_size)]
        torch.distributed.all_gather(gathered, flat)
        self.largest = max(self.largest, (gathered[0] - gathered[1]).abs().max().item())


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
        GradientsAfterBackward(),  # after the policies: sees what they left
    ]
    accumulate = 2 if "--accumulate" in sys.argv else 1
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=3 * accumulate,
        accumulate_grad_batches=accumulate,
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
            "grad_difference_after_backward": callbacks[-1].largest,
        },
        os.path.join(out, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main()
