"""Fit a foreign module with DomainAdapt(method="dann") under 2-process CPU DDP; each rank saves its parameters.

Usage: python ddp_domain_fit.py OUT_DIR
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tinymodels import DomainModule

from lt_finetune.callbacks import DomainAdapt, GradualUnfreeze, LayerwiseLR


class Coefficients(pl.Callback):
    def __init__(self, callback: DomainAdapt) -> None:
        self.callback = callback
        self.seen: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        self.seen.append(self.callback.coefficient)


def main() -> None:
    out = sys.argv[1]
    model = DomainModule(optimizer="adamw")
    domain = DomainAdapt(method="dann", hidden=8)
    probe = Coefficients(domain)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        callbacks=[domain, GradualUnfreeze(every_n_steps=2), LayerwiseLR(decay=0.5), probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    torch.manual_seed(trainer.global_rank)  # different initial draws must not matter: DDP broadcasts rank 0's
    trainer.fit(model)
    disc = model.extra_modules.discriminator
    torch.manual_seed(0)
    torch.save(
        {
            "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
            "discriminator": torch.cat([p.detach().reshape(-1) for p in disc.parameters()]),
            "discriminator_moved": float(disc.net[-1].weight.grad.abs().sum())
            if disc.net[-1].weight.grad is not None
            else 1.0,
            "coefficients": probe.seen,
            "steps": trainer.global_step,
        },
        os.path.join(out, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main()
