"""Fit under 2-process CPU DDP with L2SP, BSS and EMA beside GradualUnfreeze and LPFT; each rank saves its state.

Usage: python ddp_regularizers.py OUT_DIR [--resume CKPT]. Checks what these callbacks hold under DDP: θ₀ (the same
pretrained start on every rank, also after resume), the penalties' gradients (averaged like any other) and the EMA
average (identical on every rank, saved by rank 0).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.optim import lr_scheduler as S
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tinymodels import TermsModule, tiny_data

from lt_finetune.callbacks import BSS, EMA, L2SP, LPFT, GradualUnfreeze
from lt_finetune.snapshot import pretrained_snapshot


class Module(TermsModule):
    def train_dataloader(self) -> DataLoader:
        return tiny_data(n=128, batch_size=16)  # per-rank data differs (DistributedSampler)


def main() -> None:
    out = sys.argv[1]
    resume = sys.argv[sys.argv.index("--resume") + 1] if "--resume" in sys.argv else None
    model = Module(scheduler=lambda o: S.CosineAnnealingLR(o, T_max=12), optimizer="adamw", lr=0.05)
    theta0 = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    if resume:
        with torch.no_grad():  # a snapshot taken from these weights would be wrong
            for p in model.backbone.parameters():
                p.add_(1.0)
    ema = EMA(decay=0.8)
    callbacks: list[Any] = [
        LPFT(probe_steps=2, finetune_lr_factor=0.5, warmup_steps=2),
        GradualUnfreeze(every_n_steps=2),
        L2SP(alpha=2.0, beta=0.01),
        BSS(weight=0.01),
        ema,
        ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), every_n_train_steps=4, save_top_k=-1, filename="{step}"),
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=3,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(model, ckpt_path=resume)
    snapshot = pretrained_snapshot(model)
    torch.save(
        {
            "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),  # the EMA average, at the end
            "theta0_exact": all(torch.equal(snapshot[n], theta0[n]) for n in theta0),
            "distance": sum(float((p.detach() - theta0[n]).pow(2).sum()) for n, p in model.backbone.named_parameters()),
            "steps": trainer.global_step,
        },
        os.path.join(out, f"rank{trainer.global_rank}{'_resumed' if resume else ''}.pt"),
    )


if __name__ == "__main__":
    main()
