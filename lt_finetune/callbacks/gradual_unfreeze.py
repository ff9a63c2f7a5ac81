"""GradualUnfreeze: start with the head, unfreeze layer groups from the top down (ULMFiT)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from typing_extensions import override

from lt_finetune.groups import match_groups
from lt_finetune.policy import FinetunePolicy
from lt_finetune.validation import check_int, check_optional_int

__all__ = ["GradualUnfreeze"]


class GradualUnfreeze(FinetunePolicy):
    """Train the head first, then unfreeze the backbone's layer groups from the output side down.

    Stage ``s`` (``s = epoch // every_n_epochs`` or ``global_step // every_n_steps``) has the top
    ``s * groups_per_stage`` backbone groups trainable. Or follow an explicit ``schedule``
    ``{epoch: [group names or regexes]}``, e.g. in YAML::

        schedule:
          1: ["layer4.*"]
          3: ["layer3.*", "layer2.*"]

    Groups a schedule never names stay frozen. The optimizer keeps one param group per layer group from the
    first step (frozen ones at learning rate 0), so schedulers never see groups appear; see
    ``lt_finetune.optim``. Frozen BatchNorm layers follow ``bn_mode`` (eval mode by default, as in
    ``FreezeBackbone``).

    Args:
        backbone: Attribute path of the pretrained part on the LightningModule.
        every_n_epochs: Unfreeze the next groups every this many epochs.
        every_n_steps: Unfreeze the next groups every this many optimizer steps (instead of epochs).
        groups_per_stage: How many groups each stage unfreezes.
        schedule: Explicit epochs at which named groups are unfrozen; replaces ``every_n_*``.
        warmup_steps: Ramp a newly unfrozen group's learning rate linearly over this many steps (``1/W, 2/W,
            ..., 1`` times its value); ``0`` switches it on at full rate.
        bn_mode: What the BatchNorm layers of frozen groups do: ``"eval"``, ``"train"`` or ``"batch_stats"`` (see
            ``lt_finetune.freezing``).

    Example::

        >>> from lt_finetune.callbacks import GradualUnfreeze
        >>> callback = GradualUnfreeze(every_n_epochs=1, groups_per_stage=2)
        >>> sorted(callback.frozen_groups(["stem", "layer1", "layer2", "layer3"], epoch=1, step=0))
        ['layer1', 'stem']
    """

    def __init__(
        self,
        backbone: str = "backbone",
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        groups_per_stage: int = 1,
        schedule: Mapping[int, Sequence[str]] | None = None,
        warmup_steps: int = 0,
        bn_mode: Literal["eval", "train", "batch_stats"] = "eval",
    ) -> None:
        super().__init__(backbone, bn_mode)
        if schedule is None and (every_n_epochs is None) == (every_n_steps is None):
            raise ValueError(
                "Expected exactly one of `every_n_epochs` and `every_n_steps` (or a `schedule`), got "
                f"every_n_epochs={every_n_epochs!r}, every_n_steps={every_n_steps!r}."
            )
        if schedule is not None and (every_n_epochs is not None or every_n_steps is not None):
            raise ValueError("Expected either `schedule` or `every_n_epochs`/`every_n_steps`, got both.")
        check_optional_int("every_n_epochs", every_n_epochs, 1)
        check_optional_int("every_n_steps", every_n_steps, 1)
        check_int("groups_per_stage", groups_per_stage, 1)
        check_int("warmup_steps", warmup_steps, 0)
        parsed: dict[int, list[str]] | None = None
        if schedule is not None:
            parsed = {}
            for key, names in dict(schedule).items():
                try:
                    epoch = int(key)
                except (TypeError, ValueError):
                    raise ValueError(f"Expected `schedule` keys to be epochs (integers), got {key!r}.") from None
                if epoch < 0:
                    raise ValueError(f"Expected `schedule` epochs to be non-negative, got {epoch}.")
                if isinstance(names, str) or not names or not all(isinstance(n, str) for n in names):
                    raise ValueError(
                        f"Expected `schedule[{epoch}]` to be a non-empty list of group names or patterns, "
                        f"got {names!r}."
                    )
                parsed[epoch] = list(names)
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.groups_per_stage = groups_per_stage
        self.schedule = parsed
        self.warmup_steps = warmup_steps
        self._scheduled: dict[int, list[str]] = {}
        self.unfrozen_at: dict[str, int] = {}

    @override
    def config(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "every_n_epochs": self.every_n_epochs,
            "every_n_steps": self.every_n_steps,
            "groups_per_stage": self.groups_per_stage,
            "schedule": self.schedule,
            "warmup_steps": self.warmup_steps,
            "bn_mode": self.bn_mode,
        }

    @override
    def validate(self, names: Sequence[str], extras: Sequence[str]) -> None:
        if self.schedule is not None:
            self._scheduled = {
                epoch: match_groups(patterns, names, argument="schedule", owner=type(self).__name__)
                for epoch, patterns in self.schedule.items()
            }

    @override
    def reset(self) -> None:
        self.unfrozen_at = {}

    @override
    def frozen_groups(self, names: Sequence[str], epoch: int, step: int) -> set[str]:
        if self.schedule is not None:
            thawed = {n for e, group in self._scheduled.items() if e <= epoch for n in group}
            return {n for n in names if n not in thawed}
        stage = epoch // self.every_n_epochs if self.every_n_epochs else step // (self.every_n_steps or 1)
        keep_frozen = max(len(names) - stage * self.groups_per_stage, 0)
        return set(names[:keep_frozen])

    @override
    def lr_factor(self, layer: str, names: Sequence[str], epoch: int, step: int) -> float:
        if self.warmup_steps == 0 or layer not in self.unfrozen_at:
            return 1.0
        return min(1.0, (step - self.unfrozen_at[layer] + 1) / self.warmup_steps)

    @override
    def on_unfrozen(self, layers: Sequence[str], epoch: int, step: int) -> None:
        for layer in layers:
            self.unfrozen_at.setdefault(layer, step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"unfrozen_at": dict(self.unfrozen_at)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.unfrozen_at = dict(state_dict.get("unfrozen_at", {}))
