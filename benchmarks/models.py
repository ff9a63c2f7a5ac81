"""LightningModules of the comparisons: the same TransferModule frozen by hand, and the anchors' conventions.

Everything here is written the way a user of plain Lightning (or of the anchor libraries) would write it, so
the comparison isolates what lt_finetune's callbacks add.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from lt_finetune import TransferModule
from lt_finetune.module import WarmupCosine


class HandFrozenModule(TransferModule):
    """TransferModule with some backbone layer groups frozen by hand, the plain-PyTorch way.

    Their parameters get ``requires_grad=False`` once, and their BatchNorm layers are kept in eval mode by
    overriding ``train()`` (Lightning calls ``model.train()`` at the start of fitting and after validation).

    Args:
        frozen_groups: Names of the backbone's layer groups to freeze (``None``: the whole backbone).
        **kwargs: Passed to :class:`~lt_finetune.TransferModule`.
    """

    def __init__(self, frozen_groups: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        groups = self.layer_groups()
        names = [g.name for g in groups] if frozen_groups is None else list(frozen_groups)
        frozen_ids: set[int] = set()
        for group in groups:
            if group.name in names:
                for p in group.params:
                    p.requires_grad_(False)
                    frozen_ids.add(id(p))
        self._frozen_bn = [
            m
            for m in self.backbone.modules()
            if isinstance(m, _BatchNorm) and m.weight is not None and id(m.weight) in frozen_ids
        ]
        self.train(self.training)

    @override
    def train(self, mode: bool = True) -> HandFrozenModule:
        super().train(mode)
        for module in getattr(self, "_frozen_bn", ()):
            module.eval()
        return self


class TrainableOnlyModule(TransferModule):
    """TransferModule with the optimizer the anchors' docs ask for: only parameters that require grad.

    Lightning's ``BackboneFinetuning`` adds a param group when it unfreezes the backbone, and finetuning-scheduler
    adds one per phase, so the optimizer starts with the trainable parameters only (``filter(lambda p:
    p.requires_grad, ...)`` in their examples). Same AdamW, weight decay rule (none on 1-D parameters) and
    per-step warm-up + cosine ``LambdaLR`` as TransferModule.

    ``BackboneFinetuning`` cannot run with that schedule: the group it adds is unknown to ``LambdaLR``, whose
    ``step`` then fails (torch >= 2.10 zips groups and rates with ``strict=True``). With ``step_gamma`` the
    schedule is an epoch-wise ``StepLR(step_size=1, gamma=step_gamma)`` instead, which reads the rates from the
    param groups and so accepts new ones.

    Args:
        step_gamma: Use ``StepLR`` with this factor per epoch instead of the per-step cosine.
        **kwargs: Passed to :class:`~lt_finetune.TransferModule`.
    """

    def __init__(self, step_gamma: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step_gamma = step_gamma

    @override
    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in trainable if p.ndim > 1]
        no_decay = [p for p in trainable if p.ndim <= 1]
        wd = float(self.hparams["weight_decay"])
        groups: list[dict[str, Any]] = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(
            groups,
            lr=float(self.hparams["lr"]),
            weight_decay=wd,
        )
        if self.step_gamma is not None:
            step = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=self.step_gamma)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": step, "interval": "epoch"}}
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = round(float(self.hparams["warmup_fraction"]) * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def group_names(model: TransferModule) -> list[str]:
    """The backbone's layer group names, input side first."""
    return [g.name for g in model.layer_groups()]


def fts_schedule(
    model: TransferModule, phases: Sequence[Sequence[str]], lr: float, max_epochs: int
) -> dict[int, dict[str, Any]]:
    """An explicit finetuning-scheduler schedule: phase 0 the head, then the given backbone groups, one epoch each.

    Args:
        model: The module (parameter names are read from it).
        phases: Backbone layer group names thawed by each phase after the head's phase 0.
        lr: Learning rate of every phase's new param group.
        max_epochs: The run's epochs; finetuning-scheduler raises ``max_epochs`` to the last transition epoch, so
            transition epochs are capped at it.
    """
    by_group = {g.name: [f"backbone.{n}" for n in g.param_names] for g in model.layer_groups()}
    head = [f"head.{n}" for n, _ in model.head.named_parameters()]
    schedule: dict[int, dict[str, Any]] = {0: {"params": head, "max_transition_epoch": min(1, max_epochs)}}
    for i, groups in enumerate(phases, start=1):
        # The last phase's transition epoch only satisfies ``epoch_transitions_only``: training goes on to max_epochs.
        schedule[i] = {
            "params": [n for g in groups for n in by_group[g]],
            "lr": lr,
            "max_transition_epoch": min(i + 1, max_epochs),
        }
    return schedule


def trainable_count(model: nn.Module) -> int:
    """Number of parameters (scalars) that require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
