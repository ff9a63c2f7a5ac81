"""Fit the tiny foreign module with LoRA under 2-process CPU DDP; each rank saves its parameters.

Usage: python ddp_lora.py OUT_DIR. GradualUnfreeze keeps the adapters of the lower groups frozen when DDP wraps the
model, so DDP does not manage them: lt_finetune averages their gradients once they train.
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

from lt_finetune.callbacks import GradualUnfreeze, LayerwiseLR, LoRA
from lt_finetune.lora import lora_parameters


class Module(TermsModule):
    def train_dataloader(self) -> DataLoader:
        # Per-rank data differs (Lightning adds a DistributedSampler), so unsynchronised gradients diverge.
        return tiny_data(n=128, batch_size=16)


def main() -> None:
    out = sys.argv[1]
    pl.seed_everything(0, verbose=False)
    model = Module(scheduler=lambda o: S.CosineAnnealingLR(o, T_max=12), optimizer="adamw")
    initial = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    callbacks: list[Any] = [LoRA(r=2, alpha=4.0), GradualUnfreeze(every_n_steps=2), LayerwiseLR(decay=0.5)]
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
        deterministic=True,
    )
    trainer.fit(model)
    adapters = dict(lora_parameters(model.backbone))
    base_moved = max(
        (p.detach() - initial[n.replace(".base_layer", "")]).abs().max().item()
        for n, p in model.backbone.named_parameters()
        if n not in adapters
    )
    # lora_B starts at zero: a B still zero never trained.
    adapters_moved = min(p.detach().abs().max().item() for n, p in adapters.items() if ".lora_B." in n)
    torch.save(
        {
            "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
            "base_moved": base_moved,
            "adapters_moved": adapters_moved,
            "steps": trainer.global_step,
        },
        os.path.join(out, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main()
