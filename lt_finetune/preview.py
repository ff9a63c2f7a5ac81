"""Preview a fine-tuning plan before training: which groups train, and each group's learning rate, at every step.

The preview runs the same code as training (the callbacks' policies, the coordinator, the optimizer split and
the scheduler wrapping) on copies of the model and callbacks, stepping the schedulers without computing any
gradient. ``ReduceLROnPlateau`` depends on metrics that only training produces: it is held at its start.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from lt_finetune.coordinator import Coordinator
from lt_finetune.optim import LAYER_GROUP, detach_lr_scaling
from lt_finetune.policy import FinetunePolicy

__all__ = ["SchedulePlan", "preview_schedule"]


@dataclass
class SchedulePlan:
    """The computed plan. ``lrs[step][group]`` is the applied lr (0 while frozen); ``trainable[step]`` the groups
    with trainable parameters; groups are ordered input side first, ``"head"`` last."""

    groups: list[str]
    steps_per_epoch: int
    lrs: list[dict[str, float]] = field(default_factory=list)
    trainable: list[set[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """Number of optimizer steps planned."""
        return len(self.lrs)

    def milestones(self) -> list[int]:
        """Steps worth a column: the first, each epoch start, each change of the trainable set, the last."""
        marks = {0, self.steps - 1} | set(range(0, self.steps, self.steps_per_epoch))
        marks |= {s for s in range(1, self.steps) if self.trainable[s] != self.trainable[s - 1]}
        return sorted(m for m in marks if 0 <= m < self.steps)

    def table(self, max_columns: int = 8) -> str:
        """A compact text table: one row per group, one column per milestone step; ``-`` marks frozen."""
        marks = self.milestones()
        if len(marks) > max_columns:
            keep = {marks[0], marks[-1]}
            changes = [m for m in marks if m > 0 and self.trainable[m] != self.trainable[m - 1]]
            keep |= set(changes[: max_columns - 2])
            marks = sorted(keep | set(marks[:: max(1, len(marks) // (max_columns - len(keep) + 1))]))[:max_columns]
        header = ["group", *[f"step {m} (ep {m // self.steps_per_epoch})" for m in marks]]
        rows = [header]
        for group in self.groups:
            cells = [group]
            for m in marks:
                cells.append(f"{self.lrs[m][group]:.2e}" if group in self.trainable[m] else "-")
            rows.append(cells)
        widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
            for r in rows
        ]
        summary = f"{self.steps} steps ({self.steps_per_epoch} per epoch); '-' = frozen."
        return "\n".join([*lines, summary, *self.notes])

    def plot(self, path: str) -> None:
        """Write a PNG: lr per group over steps (top) and the trainable map with frozen spans shaded (bottom)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = range(self.steps)
        fig, (top, bottom) = plt.subplots(
            2, 1, figsize=(10, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]}, constrained_layout=True
        )
        cmap = plt.get_cmap("viridis")
        n = len(self.groups)
        for i, group in enumerate(self.groups):
            color = "crimson" if group == "head" else cmap(i / max(n - 2, 1))
            values = [self.lrs[s][group] if group in self.trainable[s] else math.nan for s in steps]
            label = group if (group == "head" or i in (0, n - 2) or n <= 8) else None
            top.plot(steps, values, color=color, lw=1.6 if group == "head" else 1.0, label=label)
        top.set_ylabel("learning rate")
        top.set_title("Learning rate per layer group (gaps: frozen)")
        top.legend(fontsize=8, loc="upper right", ncol=2)
        grid = torch.tensor([[1.0 if g in self.trainable[s] else 0.0 for s in steps] for g in self.groups])
        bottom.imshow(grid.numpy(), aspect="auto", cmap="Greys_r", vmin=-0.3, vmax=1.0, interpolation="nearest")
        bottom.set_yticks(range(n))
        bottom.set_yticklabels(
            self.groups if n <= 24 else [g if i % max(n // 24, 1) == 0 else "" for i, g in enumerate(self.groups)],
            fontsize=7,
        )
        bottom.set_xlabel("optimizer step")
        bottom.set_title("Trainable (white) and frozen (shaded) groups")
        for epoch_start in range(self.steps_per_epoch, self.steps, self.steps_per_epoch):
            for axis in (top, bottom):
                axis.axvline(epoch_start - 0.5, color="grey", lw=0.5, ls=":")
        fig.savefig(path, dpi=110)
        plt.close(fig)


def preview_schedule(
    model: pl.LightningModule,
    callbacks: Sequence[pl.Callback],
    *,
    max_epochs: int,
    steps_per_epoch: int,
) -> SchedulePlan:
    """Compute the fine-tuning plan of ``callbacks`` on ``model`` without training.

    Args:
        model: A ``TransferModule`` (its optimizer is built for the planned number of steps) or any
            LightningModule whose ``configure_optimizers`` works without a Trainer.
        callbacks: The trainer's callbacks; those that are not lt_finetune callbacks are ignored.
        max_epochs: Epochs to plan.
        steps_per_epoch: Optimizer steps per epoch (batches / ``accumulate_grad_batches``).

    Returns:
        The plan; ``plan.table()`` prints it and ``plan.plot(path)`` draws it.

    Raises:
        ValueError: For non-positive sizes, or when no lt_finetune callback is given.
    """
    if max_epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"Expected positive `max_epochs` and `steps_per_epoch`, got {max_epochs}, {steps_per_epoch}.")
    ours = [c for c in callbacks if isinstance(c, FinetunePolicy)]
    if not ours:
        raise ValueError("Expected at least one lt_finetune callback (FreezeBackbone, GradualUnfreeze, LayerwiseLR).")
    model = copy.deepcopy(model)
    ours = copy.deepcopy(ours)
    total = max_epochs * steps_per_epoch
    coordinator = Coordinator(model, ours[0].backbone, ours, type(ours[0]).__name__)
    coordinator.apply(0, 0, training=False)
    optimizer, schedulers = _optimizer_and_schedulers(model, total)
    coordinator.attach_optimizer(optimizer, [s for s, _ in schedulers])
    plan = SchedulePlan(groups=list(coordinator.order), steps_per_epoch=steps_per_epoch)
    if any(isinstance(s, ReduceLROnPlateau) for s, _ in schedulers):
        plan.notes.append("ReduceLROnPlateau depends on training metrics: the preview holds it at its start value.")
    try:
        for step in range(total):
            epoch = step // steps_per_epoch
            coordinator.apply(epoch, step, training=False)
            lrs: dict[str, float] = {}
            for group in optimizer.param_groups:
                lrs.setdefault(group[LAYER_GROUP], float(group["lr"]))
            plan.lrs.append(lrs)
            plan.trainable.append(
                {name for name, params in coordinator.params.items() if any(p.requires_grad for p in params)}
            )
            coordinator.progress = (epoch, step + 1)
            optimizer.step()  # no gradients: a no-op that keeps the schedulers' call-order check quiet
            last_of_epoch = (step + 1) % steps_per_epoch == 0
            for scheduler, interval in schedulers:
                if isinstance(scheduler, ReduceLROnPlateau):
                    continue
                if interval == "step" or last_of_epoch:
                    scheduler.step()
    finally:
        detach_lr_scaling(optimizer, [s for s, _ in schedulers])
    return plan


def _optimizer_and_schedulers(
    model: pl.LightningModule, total: int
) -> tuple[torch.optim.Optimizer, list[tuple[Any, str]]]:
    build = getattr(model, "build_optimizer", None)
    if callable(build):
        optimizer, scheduler = build(total)
        return optimizer, ([] if scheduler is None else [(scheduler, "step")])
    conf = model.configure_optimizers()
    if isinstance(conf, torch.optim.Optimizer):
        return conf, []
    if isinstance(conf, dict):
        sched = conf.get("lr_scheduler")
        if sched is None:
            return conf["optimizer"], []
        if isinstance(sched, dict):
            return conf["optimizer"], [(sched["scheduler"], sched.get("interval", "epoch"))]
        return conf["optimizer"], [(sched, "epoch")]
    if isinstance(conf, (list, tuple)) and len(conf) == 2 and isinstance(conf[0], (list, tuple)):
        optimizers, scheds = conf
        if len(optimizers) == 1:
            return optimizers[0], [
                (s["scheduler"], s.get("interval", "epoch")) if isinstance(s, dict) else (s, "epoch") for s in scheds
            ]
    raise ValueError(
        "preview_schedule needs one optimizer from configure_optimizers (an optimizer, a dict with 'optimizer' and "
        f"'lr_scheduler', or ([optimizer], [schedulers])), got {type(conf).__name__}."
    )
