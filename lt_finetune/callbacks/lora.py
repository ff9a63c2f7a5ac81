"""LoRA: train low-rank adapters (Hugging Face ``peft``) on a frozen backbone, plus the head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lt_finetune.coordinator import resolve_backbone
from lt_finetune.freezing import freeze
from lt_finetune.groups import layer_groups
from lt_finetune.lora import (
    LoraLayout,
    inject_lora,
    lora_layout,
    lora_parameters,
    require_peft,
    resolve_lora_targets,
    save_lora,
    unload_lora,
)
from lt_finetune.policy import FinetunePolicy, human_count
from lt_finetune.validation import check_float, check_int, check_names

__all__ = ["LoRA"]


class LoRA(FinetunePolicy):
    """Wrap layers of the backbone in LoRA adapters (Hu et al., 2021) with ``peft``; train the adapters and the head.

    At setup (before the optimizer is built and DDP wraps the model) the chosen layers get rank-``r`` adapters
    ``W + (alpha / r) B A`` and every other backbone parameter is frozen; the head and extra modules train as
    usual. An adapter belongs to the layer group of the layer it wraps, so ``LayerwiseLR`` decays its learning rate
    with depth, and other policies compose: a group that ``FreezeBackbone``, ``GradualUnfreeze`` or ``LPFT`` holds
    frozen has its adapters frozen, and unfreezing it trains its adapters; its pretrained weights never train.
    The optimizer is not touched (adapters have their layer group's param group from the first step).

    The adapters stay in the model after the fit: checkpoints record their layout, so
    ``TransferModule.load_from_checkpoint`` re-creates them before loading the weights; a resumed fit continues
    exactly. :func:`lt_finetune.lora.merge_lora` folds them into the weights (``lt-finetune export`` does so).

    List LoRA before the other fine-tuning callbacks: the layer groups they address are computed once, after the
    adapters are in place. Needs ``pip install "lt_finetune[peft]"``.

    Args:
        backbone: Attribute path of the pretrained part on the LightningModule.
        target_modules: Layers to wrap, as module paths relative to the backbone, suffixes (``"qkv"`` selects every
            ``*.qkv``) or regular expressions (full match); ``None`` picks a default per architecture family:
            attention projections for ViT-like models, every convolution but the first (and linear layers) for
            CNNs, every linear layer otherwise (``lt-finetune groups <backbone>`` prints it; see
            :func:`lt_finetune.lora.default_lora_targets`).
        r: Rank of the adapters.
        alpha: Scale numerator: the update is multiplied by ``alpha / r`` (peft's ``lora_alpha``).
        dropout: Dropout on the adapters' input during training.

    Raises:
        TypeError: For arguments of the wrong type.
        ValueError: For ``r < 1``, ``alpha <= 0`` or ``dropout`` outside ``[0, 1)``; at setup, for a target pattern
            that matches no layer, a backbone that already has other adapters, or LoRA listed after another
            fine-tuning callback.
        ImportError: At setup, without ``peft``.

    Example::

        >>> from lt_finetune.callbacks import LoRA
        >>> LoRA(target_modules=["qkv", "proj"], r=4)
        LoRA(backbone='backbone', target_modules=['qkv', 'proj'], r=4, alpha=16.0, dropout=0.0)
    """

    def __init__(
        self,
        backbone: str = "backbone",
        target_modules: Sequence[str] | None = None,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(backbone)
        self.target_modules = check_names("target_modules", target_modules, allow_none=True)
        self.r = check_int("r", r, 1)
        self.alpha = check_float("alpha", alpha, 0.0, low_open=True)
        self.dropout = check_float("dropout", dropout, 0.0, 1.0, high_open=True)

    @override
    def config(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "target_modules": self.target_modules,
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
        }

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        owner = type(self).__name__
        self._check_callbacks(trainer)
        require_peft()
        module = resolve_backbone(pl_module, self.backbone, owner)
        layout = LoraLayout(tuple(resolve_lora_targets(module, self.target_modules)), self.r, self.alpha, self.dropout)
        present = lora_layout(module)
        if present is None:
            self._inject(module, layout)
        elif present != layout:  # a second fit of the same model keeps its adapters, if they are ours
            raise ValueError(
                f"{type(pl_module).__name__}.{self.backbone} already has LoRA adapters ({present.describe()}), not "
                f"those of {self!r} ({layout.describe()}). Merge them first (lt_finetune.lora.merge_lora) or build a "
                "fresh model."
            )
        super().setup(trainer, pl_module, stage)
        # The fit's coordinator (ours: LoRA comes first) addresses only the adapters of a backbone group, so a
        # policy that freezes and later unfreezes the group never makes its pretrained weights trainable.
        adapters = {id(p) for _, p in lora_parameters(module)}
        base = [p for p in module.parameters() if id(p) not in adapters]
        coordinator = self.coordinator
        if coordinator is not None:
            for name in coordinator.names:
                coordinator.params[name] = tuple(p for p in coordinator.params[name] if id(p) in adapters)
        freeze(base)  # again: the coordinator released what an earlier fit of this model had left frozen

    def _check_callbacks(self, trainer: pl.Trainer) -> None:
        callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]
        policies = [c for c in callbacks if isinstance(c, FinetunePolicy)]
        others = [c for c in policies if isinstance(c, LoRA) and c is not self]
        if others:
            raise ValueError(f"One LoRA callback per fit, got {[self, *others]}; merge their target_modules.")
        if policies[0] is not self:
            raise ValueError(
                f"{self!r} comes after {type(policies[0]).__name__} in the Trainer's callbacks; list LoRA first: the "
                "layer groups the other fine-tuning callbacks address are computed once, after the adapters are added."
            )

    def _inject(self, module: torch.nn.Module, layout: LoraLayout) -> None:
        before = [g.name for g in layer_groups(module)]
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        # Drawn from the run's seed (seed_everything), without consuming the global random stream.
        count = inject_lora(module, layout, seed=torch.initial_seed())
        after = [g.name for g in layer_groups(module)]
        if after != before:
            unload_lora(module)
            for name, p in module.named_parameters():
                p.requires_grad_(name in trainable)
            lost = [n for n in before if n not in after][:3]
            raise ValueError(
                f"{self!r}: wrapping {list(layout.targets)[:3]}... changes the layer groups of the backbone ({lost} "
                "would no longer be groups), so the fine-tuning callbacks would address other groups than "
                "`lt-finetune groups` shows. Leave the layers of the input stem out of target_modules."
            )
        rank_zero_info(
            f"lt_finetune: {self!r} wrapped {len(layout.targets)} layers ({human_count(count)} adapter parameters); "
            "the backbone's own weights are frozen."
        )

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        save_lora(pl_module, checkpoint, self.backbone)
