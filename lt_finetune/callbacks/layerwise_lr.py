"""LayerwiseLR: lower learning rates for earlier layers (discriminative fine-tuning, layer-wise decay)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lt_finetune.groups import HEAD, match_groups
from lt_finetune.policy import FinetunePolicy
from lt_finetune.validation import check_float

__all__ = ["LayerwiseLR"]


class LayerwiseLR(FinetunePolicy):
    """Scale each layer group's learning rate by ``decay ** (its distance from the head)``.

    The head keeps the scheduler's rate; the top backbone group gets ``decay`` times it, the one below
    ``decay ** 2`` and so on (ULMFiT uses ``1 / 2.6``, BEiT and MAE ``0.65``-``0.75``). ``multipliers``
    overrides the factor of the groups it names. The factor multiplies whatever the scheduler computes, at
    every step and for every torch scheduler (see ``lt_finetune.optim``); nothing is frozen.

    Args:
        backbone: Attribute path of the pretrained part on the LightningModule.
        decay: Per-group decay, in ``(0, 1]``.
        multipliers: Explicit factors by group name or regular expression (full match), ``"head"`` and extra
            modules included; the first matching entry wins, and groups no entry matches keep the decay rule
            (extra modules such as a domain discriminator keep 1).

    Example::

        >>> from lt_finetune.callbacks import LayerwiseLR
        >>> LayerwiseLR(decay=0.7)
        LayerwiseLR(backbone='backbone', decay=0.7, multipliers=None)

    Raises:
        TypeError: For arguments of the wrong type.
        ValueError: For ``decay`` outside ``(0, 1]``, a negative multiplier; at fit start, for a ``multipliers``
            pattern that matches no group.
    """

    def __init__(
        self, backbone: str = "backbone", decay: float = 0.5, multipliers: Mapping[str, float] | None = None
    ) -> None:
        super().__init__(backbone)
        self.decay = check_float("decay", decay, 0.0, 1.0, low_open=True)
        if multipliers is not None:
            if not isinstance(multipliers, Mapping):
                raise TypeError(
                    f"Expected `multipliers` to be a mapping of group patterns to factors, got {multipliers!r}"
                )
            for key, value in multipliers.items():
                check_float(f"multipliers[{key!r}]", value, 0.0)
        self.multipliers = {k: float(v) for k, v in multipliers.items()} if multipliers is not None else None
        self._factors: dict[str, float] = {}

    @override
    def config(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "decay": self.decay, "multipliers": self.multipliers}

    @property
    def factors(self) -> dict[str, float]:
        """The factor of every group of the model being fitted (empty before the first fit)."""
        return dict(self._factors)

    @override
    def validate(self, names: Sequence[str], extras: Sequence[str]) -> None:
        self._factors = layerwise_factors(names, self.decay, self.multipliers, owner=type(self).__name__, extras=extras)

    @override
    def lr_factor(self, layer: str, names: Sequence[str], epoch: int, step: int) -> float:
        if not self._factors:
            self.validate(names, ())
        return self._factors.get(layer, 1.0)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The factors follow from the constructor's arguments and the model, never from a checkpoint: a run
        # resumed with other arguments trains with the new ones. Checkpoints of lt_finetune 0.1 carry factors.
        saved = state_dict.get("factors")
        if saved and self._factors and saved != self._factors:
            rank_zero_info(
                f"lt_finetune: {self!r} resumes with the factors of its arguments; the checkpoint's were written "
                "with other arguments."
            )


def layerwise_factors(
    names: Sequence[str],
    decay: float,
    multipliers: Mapping[str, float] | None = None,
    owner: str = "LayerwiseLR",
    extras: Sequence[str] = (),
) -> dict[str, float]:
    """``{group: factor}`` for backbone groups ``names`` (input side first), ``"head"`` and the ``extras``.

    The head gets 1, the backbone group ``k`` places below it ``decay ** k``; extra modules (a domain
    discriminator) get 1. ``multipliers`` override the groups they match, extras included.

    Example::

        >>> layerwise_factors(["stem", "layer1", "layer2"], 0.5)
        {'stem': 0.125, 'layer1': 0.25, 'layer2': 0.5, 'head': 1.0}
    """
    all_names = [*names, HEAD, *extras]
    factors = {name: decay ** (len(names) - i) for i, name in enumerate(names)}
    factors[HEAD] = 1.0
    factors.update(dict.fromkeys(extras, 1.0))
    if multipliers:
        claimed: set[str] = set()
        for pattern, value in multipliers.items():
            for name in match_groups([pattern], all_names, argument="multipliers", owner=owner):
                if name not in claimed:
                    factors[name] = float(value)
                    claimed.add(name)
    return factors
