"""LPFT: the linear-probe-then-fine-tune preset (Kumar et al., ICLR 2022) in one line."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from typing_extensions import override

from lt_finetune.callbacks.weight_averaging import check_weight_averaging
from lt_finetune.policy import FinetunePolicy
from lt_finetune.validation import check_float, check_int, check_optional_int

__all__ = ["LPFT"]


class LPFT(FinetunePolicy):
    """Train the head on the frozen backbone, then everything at a lower rate, warmed up.

    Phase 1 (linear probe) lasts ``probe_epochs`` epochs (or ``probe_steps`` steps): the backbone is frozen and
    the head trains at the scheduler's rate. Phase 2 (fine-tuning) trains every group at ``finetune_lr_factor``
    times the scheduler's rate, ramped linearly over ``warmup_steps`` steps (``f/W, 2f/W, ..., f``) from the
    step the backbone is unfrozen. Kumar et al. show that fine-tuning from a trained head, gently, distorts the
    pretrained features less than full fine-tuning: about +1 % in distribution and +10 % out of distribution.

    The factors multiply whatever the scheduler computes, like every policy's (see ``lt_finetune.optim``), so
    the warm-up runs *through* the scheduler: combine it with a cosine schedule, ``LayerwiseLR`` or anything
    else. The step the backbone was unfrozen at is saved, so a resumed run continues the same ramp.

    Args:
        backbone: Attribute path of the pretrained part on the LightningModule.
        probe_epochs: Epochs of linear probing; ``None`` when ``probe_steps`` is given.
        probe_steps: Optimizer steps of linear probing (instead of epochs).
        finetune_lr_factor: Factor on every group's rate in the fine-tuning phase, in ``(0, 1]``.
        warmup_steps: Steps of linear warm-up of the fine-tuning phase (0: none).
        bn_mode: What the BatchNorm layers of the frozen backbone do during the probe (see ``FreezeBackbone``).

    Raises:
        TypeError: For arguments of the wrong type.
        ValueError: For both or neither of ``probe_epochs`` and ``probe_steps``, or values out of range.

    Example::

        >>> from lt_finetune.callbacks import LPFT
        >>> LPFT(probe_epochs=1, finetune_lr_factor=0.1, warmup_steps=50)  # doctest: +NORMALIZE_WHITESPACE
        LPFT(backbone='backbone', probe_epochs=1, probe_steps=None, finetune_lr_factor=0.1, warmup_steps=50,
             bn_mode='eval')
        >>> lpft = LPFT(probe_steps=10, finetune_lr_factor=0.5, warmup_steps=4)
        >>> [lpft.lr_factor("head", ["stem"], 0, s) for s in (9, 10, 11, 13, 20)]
        [1.0, 0.125, 0.25, 0.5, 0.5]
    """

    def __init__(
        self,
        backbone: str = "backbone",
        probe_epochs: int | None = 1,
        probe_steps: int | None = None,
        finetune_lr_factor: float = 0.1,
        warmup_steps: int = 0,
        bn_mode: Literal["eval", "train", "batch_stats"] = "eval",
    ) -> None:
        super().__init__(backbone, bn_mode)
        if probe_steps is not None and probe_epochs == 1:
            probe_epochs = None  # the default yields to an explicit step count
        if (probe_epochs is None) == (probe_steps is None):
            raise ValueError(
                f"Expected exactly one of `probe_epochs` and `probe_steps`, got ({probe_epochs}, {probe_steps})."
            )
        self.probe_epochs = check_optional_int("probe_epochs", probe_epochs, 0)
        self.probe_steps = check_optional_int("probe_steps", probe_steps, 0)
        self.finetune_lr_factor = check_float("finetune_lr_factor", finetune_lr_factor, 0.0, 1.0, low_open=True)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.unfrozen_at_step: int | None = None

    @override
    def config(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "probe_epochs": self.probe_epochs,
            "probe_steps": self.probe_steps,
            "finetune_lr_factor": self.finetune_lr_factor,
            "warmup_steps": self.warmup_steps,
            "bn_mode": self.bn_mode,
        }

    def probing(self, epoch: int, step: int) -> bool:
        """Whether ``(epoch, step)`` lies in the linear-probe phase."""
        if self.probe_steps is not None:
            return step < self.probe_steps
        return epoch < (self.probe_epochs or 0)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_weight_averaging(trainer.callbacks)  # type: ignore[attr-defined]
        super().setup(trainer, pl_module, stage)

    @override
    def reset(self) -> None:
        self.unfrozen_at_step = None

    @override
    def frozen_groups(self, names: Sequence[str], epoch: int, step: int) -> set[str]:
        return set(names) if self.probing(epoch, step) else set()

    @override
    def lr_factor(self, layer: str, names: Sequence[str], epoch: int, step: int) -> float:
        if self.probing(epoch, step):
            return 1.0
        if self.warmup_steps == 0:
            return self.finetune_lr_factor
        if self.unfrozen_at_step is not None:
            start = self.unfrozen_at_step
        elif self.probe_steps is not None:
            start = self.probe_steps
        else:
            start = step  # asked at the unfreezing step itself, before on_unfrozen records it
        return self.finetune_lr_factor * min(1.0, (step - start + 1) / self.warmup_steps)

    @override
    def on_unfrozen(self, layers: Sequence[str], epoch: int, step: int) -> None:
        if self.unfrozen_at_step is None:
            self.unfrozen_at_step = step

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"unfrozen_at_step": self.unfrozen_at_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.unfrozen_at_step = state_dict.get("unfrozen_at_step")
