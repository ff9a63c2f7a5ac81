"""FreezeBackbone: train the head on a frozen pretrained backbone, optionally unfreezing it later."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from typing_extensions import override

from lt_finetune.groups import match_groups
from lt_finetune.policy import FinetunePolicy
from lt_finetune.validation import check_int, check_names, check_optional_int

__all__ = ["FreezeBackbone"]


class FreezeBackbone(FinetunePolicy):
    """Freeze the backbone (or some of its layer groups) from the start; optionally unfreeze it all later.

    With ``unfreeze_at_epoch`` (or ``unfreeze_at_step``) this is the linear-probe-then-fine-tune recipe
    (LP-FT): the head first learns on fixed features, then everything trains together.

    The optimizer is not rebuilt: every layer group has its param group from the first step (see
    ``lt_finetune.optim``), frozen groups get learning rate 0 and no gradient. If the optimizer is not
    split by layer group, it is split at fit start (logged once). Under DDP, parameters that were frozen when
    DDP wrapped the model have their gradients averaged by lt_finetune after they are unfrozen.

    Args:
        backbone: Attribute path of the pretrained part on the LightningModule; the head is everything
            trainable outside it.
        groups: Names or regular expressions (full match) of the layer groups to freeze; ``None`` freezes the
            whole backbone.
        unfreeze_at_epoch: Epoch at whose start everything becomes trainable; ``None`` keeps it frozen.
        unfreeze_at_step: Global step from which everything becomes trainable (instead of an epoch).
        warmup_steps: After unfreezing, ramp the unfrozen groups' learning rates linearly over this many steps
            (``1/W, 2/W, ..., 1`` times their value, as ``GradualUnfreeze``); ``0`` switches them on at full rate.
        bn_mode: What frozen BatchNorm layers do. ``"eval"`` (default) keeps them in eval mode with their
            statistics untouched: the frozen part computes the function it was pretrained for and needs no
            backward pass, which is what makes freezing fast. ``"train"`` keeps BatchNorm trainable and
            updating (as fastai does; backward then runs through the whole backbone); ``"batch_stats"``
            normalises with batch statistics without updating them. See ``lt_finetune.freezing``.

    Raises:
        TypeError: For arguments of the wrong type.
        ValueError: For negative epochs or steps, both unfreeze arguments, an unknown ``bn_mode``; at fit start,
            for a pattern matching no group, a missing backbone or an unsupported strategy.

    Example::

        >>> from lt_finetune.callbacks import FreezeBackbone
        >>> FreezeBackbone(unfreeze_at_epoch=1)  # doctest: +NORMALIZE_WHITESPACE
        FreezeBackbone(backbone='backbone', groups=None, unfreeze_at_epoch=1, unfreeze_at_step=None,
                       warmup_steps=0, bn_mode='eval')
    """

    def __init__(
        self,
        backbone: str = "backbone",
        groups: Sequence[str] | None = None,
        unfreeze_at_epoch: int | None = None,
        unfreeze_at_step: int | None = None,
        warmup_steps: int = 0,
        bn_mode: Literal["eval", "train", "batch_stats"] = "eval",
    ) -> None:
        super().__init__(backbone, bn_mode)
        if unfreeze_at_epoch is not None and unfreeze_at_step is not None:
            raise ValueError(
                "Expected at most one of `unfreeze_at_epoch` and `unfreeze_at_step`, got both "
                f"({unfreeze_at_epoch}, {unfreeze_at_step})."
            )
        self.groups = check_names("groups", groups, allow_none=True)
        self.unfreeze_at_epoch = check_optional_int("unfreeze_at_epoch", unfreeze_at_epoch, 0)
        self.unfreeze_at_step = check_optional_int("unfreeze_at_step", unfreeze_at_step, 0)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self._selected: list[str] = []
        self.unfrozen_at_step: int | None = None

    @override
    def config(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "groups": self.groups,
            "unfreeze_at_epoch": self.unfreeze_at_epoch,
            "unfreeze_at_step": self.unfreeze_at_step,
            "warmup_steps": self.warmup_steps,
            "bn_mode": self.bn_mode,
        }

    @override
    def validate(self, names: Sequence[str], extras: Sequence[str]) -> None:
        if self.groups is None:
            self._selected = list(names)
        else:
            self._selected = match_groups(self.groups, names, argument="groups", owner=type(self).__name__)

    @override
    def reset(self) -> None:
        self.unfrozen_at_step = None

    @override
    def frozen_groups(self, names: Sequence[str], epoch: int, step: int) -> set[str]:
        if self.unfreeze_at_epoch is not None and epoch >= self.unfreeze_at_epoch:
            return set()
        if self.unfreeze_at_step is not None and step >= self.unfreeze_at_step:
            return set()
        return set(self._selected or (names if self.groups is None else ()))

    @override
    def lr_factor(self, layer: str, names: Sequence[str], epoch: int, step: int) -> float:
        if self.warmup_steps == 0 or self.unfrozen_at_step is None or layer not in self._selected:
            return 1.0
        return min(1.0, (step - self.unfrozen_at_step + 1) / self.warmup_steps)

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
