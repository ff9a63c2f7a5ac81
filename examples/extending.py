"""A fine-tuning policy and a loss term written against lt_finetune's public names only.

Both pass the same contract test as the library's own callbacks (``tests/callbacks/test_contract.py``); see
``docs/extending.md`` for the walk-through. Use them like any callback::

    trainer = pl.Trainer(callbacks=[ThawAfterSteps(steps=100, head_factor=10.0), FeatureNormPenalty(weight=1e-3)])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lt_finetune.loss_terms import LossTermsMixin, StepOutputs
from lt_finetune.policy import FinetunePolicy
from lt_finetune.validation import check_float, check_int


class ThawAfterSteps(FinetunePolicy):
    """Keep the input-side group frozen for ``steps`` optimizer steps, and train the head ``head_factor`` faster.

    Runtime state: the step at which the input-side group was unfrozen (saved in checkpoints).
    """

    def __init__(self, backbone: str = "backbone", steps: int = 4, head_factor: float = 2.0) -> None:
        super().__init__(backbone, bn_mode="eval")
        self.steps = check_int("steps", steps, 0)
        self.head_factor = check_float("head_factor", head_factor, 0.0, low_open=True)
        self.thawed_at: int | None = None

    @override
    def config(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "steps": self.steps, "head_factor": self.head_factor}

    @override
    def reset(self) -> None:
        self.thawed_at = None

    @override
    def frozen_groups(self, names: Sequence[str], epoch: int, step: int) -> set[str]:
        return {names[0]} if step < self.steps else set()

    @override
    def lr_factor(self, layer: str, names: Sequence[str], epoch: int, step: int) -> float:
        return self.head_factor if layer == "head" else 1.0

    @override
    def on_unfrozen(self, layers: Sequence[str], epoch: int, step: int) -> None:
        if self.thawed_at is None:
            self.thawed_at = step

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"thawed_at": self.thawed_at}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.thawed_at = state_dict.get("thawed_at")


class FeatureNormPenalty(pl.Callback):
    """Add ``weight * mean(||features||^2)`` to the training loss, as the loss term ``feature_norm``."""

    def __init__(self, weight: float = 1e-3) -> None:
        self.weight = check_float("weight", weight, 0.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight!r})"

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(weight=self.weight)

    def term(self, outputs: StepOutputs) -> torch.Tensor:
        """The loss term: computed in full precision, whatever the autocast region."""
        return self.weight * outputs.features.float().pow(2).sum(dim=1).mean()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, LossTermsMixin):
            raise TypeError(
                f"{type(self).__name__} adds a loss term: {type(pl_module).__name__} must inherit "
                "lt_finetune.loss_terms.LossTermsMixin and return self.apply_loss_terms(loss, outputs) from "
                "training_step (TransferModule does)."
            )
        pl_module.add_loss_term("feature_norm", self.term)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and isinstance(pl_module, LossTermsMixin):
            pl_module.remove_loss_term("feature_norm")
