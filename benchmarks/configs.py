"""Training configurations for the timing and memory sections: the same model, trainable set, data and seed, set up
through lt_finetune, by hand in plain Lightning, or through an anchor library.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BackboneFinetuning, Callback

from benchmarks.common import BACKBONE, fts_available
from benchmarks.models import HandFrozenModule, TrainableOnlyModule, fts_schedule, group_names
from benchmarks.recipes import TOP_GROUPS
from lt_finetune import FreezeBackbone, GradualUnfreeze, LayerwiseLR, TransferModule

Built = tuple[pl.LightningModule, list[Callback]]
LR = 1e-3  # step time does not depend on the learning rate


@dataclass(frozen=True)
class Config:
    """One way to set up a training run whose steps are timed or whose memory is measured."""

    name: str
    label: str
    build: Callable[[str, str], Built]  # (weights, scratch folder) -> module, callbacks
    warmup_extra: int = 0  # steps before the measured state is reached (e.g. until unfreezing)
    requires: Callable[[], bool] | None = None

    def available(self) -> bool:
        """Whether its optional dependencies are installed."""
        return self.requires is None or self.requires()


def _kwargs(weights: str) -> dict[str, Any]:
    return {"backbone": BACKBONE, "num_classes": 10, "pretrained": weights, "lr": LR, "weight_decay": 0.05}


def _plain_full(weights: str, root: str) -> Built:
    return TransferModule(**_kwargs(weights)), []


def _hand_frozen(weights: str, root: str) -> Built:
    return HandFrozenModule(frozen_groups=None, **_kwargs(weights)), []


def _hand_partial(weights: str, root: str) -> Built:
    probe = TransferModule(backbone=BACKBONE, num_classes=10)
    return HandFrozenModule(frozen_groups=group_names(probe)[:-TOP_GROUPS], **_kwargs(weights)), []


def _ours_frozen(weights: str, root: str) -> Built:
    return TransferModule(**_kwargs(weights)), [FreezeBackbone()]


def _ours_partial(weights: str, root: str) -> Built:
    model = TransferModule(**_kwargs(weights))
    return model, [GradualUnfreeze(schedule={0: group_names(model)[-TOP_GROUPS:]})]


def _ours_full(weights: str, root: str) -> Built:
    return TransferModule(**_kwargs(weights)), [FreezeBackbone(unfreeze_at_step=1)]


def _ours_layerwise(weights: str, root: str) -> Built:
    return TransferModule(**_kwargs(weights)), [LayerwiseLR(decay=0.8)]


def _bf_frozen(weights: str, root: str) -> Built:
    model = TrainableOnlyModule(step_gamma=0.6, **_kwargs(weights))
    return model, [BackboneFinetuning(unfreeze_backbone_at_epoch=1)]


def _fts_phase0(weights: str, root: str) -> Built:
    import logging

    from finetuning_scheduler import FinetuningScheduler

    model = TrainableOnlyModule(**_kwargs(weights))
    names = group_names(model)
    schedule = fts_schedule(model, [names[-TOP_GROUPS:], names[:-TOP_GROUPS]], LR, max_epochs=1)
    fts = FinetuningScheduler(
        ft_schedule=schedule,
        max_depth=0,  # only phase 0 is timed; deeper phases would otherwise extend the run
        epoch_transitions_only=True,
        restore_best=False,
        apply_lambdas_new_pgs=True,
        logging_level=logging.ERROR,
        log_dir=root,
    )
    return model, [fts]


CONFIGS: dict[str, Config] = {
    c.name: c
    for c in (
        Config("plain_full", "full fine-tuning, plain Lightning", _plain_full),
        Config("hand_frozen", "backbone frozen by hand (BatchNorm in eval)", _hand_frozen),
        Config("ours_frozen", "FreezeBackbone()", _ours_frozen),
        Config("hand_partial", f"bottom groups frozen by hand, top {TOP_GROUPS} trainable", _hand_partial),
        Config("ours_partial", f"GradualUnfreeze stage with the top {TOP_GROUPS} groups trainable", _ours_partial),
        Config("ours_full", "FreezeBackbone(unfreeze_at_step=1), after unfreezing", _ours_full, warmup_extra=1),
        Config("ours_layerwise", "LayerwiseLR(decay=0.8)", _ours_layerwise),
        Config("bf_frozen", "BackboneFinetuning, frozen phase", _bf_frozen),
        Config("fts_phase0", "finetuning-scheduler, phase 0", _fts_phase0, requires=fts_available),
    )
}
