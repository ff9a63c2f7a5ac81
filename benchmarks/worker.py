"""Runs that need a fresh process: 2-process CPU DDP (Lightning re-launches this script for rank 1), peak-memory
probes and the Fashion-MNIST scale runs. The section drivers call it as a subprocess; it writes one JSON file.

Usage::

    python -m benchmarks.worker ddp-overhead OUT.json --repeats 5 --warmup 3 --steps 10
    python -m benchmarks.worker memory OUT.json --config ours_frozen --steps 6
    python -m benchmarks.worker scale OUT.json --size 8000 --devices 2 --recipe layerwise_lr
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from benchmarks.common import (
    BACKBONE,
    StepTimer,
    make_trainer,
    quiet,
    reset_peak_rss,
    scratch_dir,
    vm_status,
    weights_path,
)
from lt_finetune import FreezeBackbone, TransferModule
from lt_finetune.data.animal_mnist import AnimalMNISTDataModule


def _ddp_trainer(callbacks: list[Callback], devices: int, **kwargs: Any) -> pl.Trainer:
    strategy = "ddp" if devices > 1 else "auto"
    return make_trainer(scratch_dir(), callbacks, devices=devices, strategy=strategy, **kwargs)


def _replica_gap(model: torch.nn.Module) -> float:
    """Largest parameter difference between this rank and rank 0 (0.0 when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0.0
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    gap = (flat - reference).abs().max()
    dist.all_reduce(gap, op=dist.ReduceOp.MAX)
    return float(gap)


def ddp_overhead(args: argparse.Namespace) -> dict[str, Any] | None:
    """Section 3: our unfreezing under DDP vs plain DDP with the same parameters trainable from the start."""
    weights = weights_path()
    # 400 per class: each of the 2 ranks sees 2,000 images, 32 batches of 64.
    dm = AnimalMNISTDataModule(train_per_class=400, val_per_class=1, test_per_class=200, seed=0)
    dm.setup("fit")
    kwargs = {"backbone": BACKBONE, "num_classes": 10, "pretrained": weights, "lr": 1e-3}
    skip = 1 + args.warmup  # FreezeBackbone(unfreeze_at_step=1) unfreezes after the first step
    raw: dict[str, list[list[float]]] = {"ours": [], "plain": []}
    gaps: dict[str, list[float]] = {"ours": [], "plain": []}
    for _ in range(args.repeats):
        for name in ("ours", "plain"):
            pl.seed_everything(0, verbose=False)
            model = TransferModule(**kwargs)  # type: ignore[arg-type]
            callbacks: list[Callback] = [FreezeBackbone(unfreeze_at_step=1)] if name == "ours" else []
            timer = StepTimer()
            trainer = _ddp_trainer([timer, *callbacks], 2, max_epochs=1, limit_train_batches=skip + args.steps + 1)
            trainer.fit(model, datamodule=dm)
            raw[name].append(timer.step_times(skip))
            gaps[name].append(_replica_gap(model))
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            if trainable != sum(p.numel() for p in model.parameters()):
                raise RuntimeError(f"{name}: expected every parameter trainable after unfreezing, got {trainable}")
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return {
        "raw_step_times": raw,
        "replica_max_abs_diff": gaps,
        "world_size": 2,
        "threads_per_process": torch.get_num_threads(),
    }


def memory(args: argparse.Namespace) -> dict[str, Any]:
    """Section 4: peak RSS while training one configuration for a few steps, in this fresh process."""
    from benchmarks.configs import CONFIGS

    dm = AnimalMNISTDataModule(train_per_class=200, val_per_class=1, test_per_class=200, seed=0)
    dm.setup("fit")
    pl.seed_everything(0, verbose=False)
    root = scratch_dir()
    model, callbacks = CONFIGS[args.config].build(weights_path(), root)
    trainer = make_trainer(root, callbacks, max_epochs=1, limit_train_batches=args.steps)
    gc.collect()
    before = vm_status()
    reset = reset_peak_rss()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, datamodule=dm)
    after = vm_status()
    return {
        "config": args.config,
        "rss_before": before["VmRSS"],
        "peak_rss": after["VmHWM"],
        "peak_reset": reset,
        "cuda_peak": torch.cuda.max_memory_allocated() if cuda else None,
        "steps": args.steps,
    }


class _EpochTimer(Callback):
    def __init__(self) -> None:
        self.start = self.end = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end = time.perf_counter()


def scale(args: argparse.Namespace) -> dict[str, Any] | None:
    """Section 6: one epoch of a recipe on ``size`` Fashion-MNIST images with ``devices`` processes."""
    from benchmarks.recipes import build, load_hparams
    from benchmarks.scale import fashion_datamodule

    dm = fashion_datamodule(args.size, seed=0)
    pl.seed_everything(0, verbose=False)
    root = scratch_dir()
    model, callbacks = build(args.recipe, load_hparams(), weights_path(), 10, root, epochs=1)
    timer, epoch = StepTimer(), _EpochTimer()
    limit = args.limit_batches
    trainer = _ddp_trainer([timer, epoch, *callbacks], args.devices, max_epochs=1, limit_train_batches=limit)
    trainer.fit(model, datamodule=dm)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    steps = timer.step_times(args.warmup)
    images = args.size if limit is None else min(args.size, limit * 64 * args.devices)
    return {
        "size": args.size,
        "devices": args.devices,
        "recipe": args.recipe,
        "epoch_s": epoch.end - epoch.start,
        "steps_per_rank": len(timer.step_times(0)),
        "median_step_s": float(torch.tensor(steps).median()) if steps else None,
        "images": images,  # trained in the epoch, all ranks together
        "threads_per_process": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    """Parse the sub-command, run it, write the JSON (rank 0 only)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=["ddp-overhead", "memory", "scale"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--config", default="plain_full")
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--recipe", default="layerwise_lr")
    parser.add_argument("--limit-batches", type=int, default=None)
    args = parser.parse_args(argv)
    quiet()
    task = {"ddp-overhead": ddp_overhead, "memory": memory, "scale": scale}[args.task]
    result = task(args)
    if result is not None:
        args.out.write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
