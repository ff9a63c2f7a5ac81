"""LayerwiseLR: lower learning rates for earlier layers (discriminative fine-tuning, layer-wise decay)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from typing_extensions import override

from lt_finetune.callbacks._finetune import _LayerGroupCallback
from lt_finetune.groups import HEAD, match_groups

__all__ = ["LayerwiseLR"]


class LayerwiseLR(_LayerGroupCallback):
    """Scale each layer group's learning rate by ``decay ** (its distance from the head)``.

    The head keeps the scheduler's rate; the top backbone group gets ``decay`` times it, the one below
    ``decay ** 2`` and so on (ULMFiT uses ``1 / 2.6``, BEiT and MAE ``0.65``-``0.75``). ``multipliers``
    overrides the factor of the groups it names. The factor multiplies whatever the scheduler computes, at
    every step and for every torch scheduler (see ``lt_finetune.optim``); nothing is frozen.

    Args:
        backbone: Attribute path of the pretrained part on the LightningModule.
        decay: Per-group decay, in ``(0, 1]``.
        multipliers: Explicit factors by group name or regular expression (full match), ``"head"`` included;
            the first matching entry wins, and groups no entry matches keep the decay rule.

    Example::

        >>> from lt_finetune.callbacks import LayerwiseLR
        >>> LayerwiseLR(decay=0.7)
        LayerwiseLR(backbone='backbone', decay=0.7, multipliers=None)
    """

    def __init__(
        self, backbone: str = "backbone", decay: float = 0.5, multipliers: Mapping[str, float] | None = None
    ) -> None:
        super().__init__(backbone)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
            raise ValueError(f"Expected `decay` to be in (0, 1], got {decay!r}.")
        if multipliers is not None:
            for key, value in multipliers.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise ValueError(f"Expected `multipliers[{key!r}]` to be a non-negative number, got {value!r}.")
        self.decay = float(decay)
        self.multipliers = dict(multipliers) if multipliers is not None else None
        self.factors: dict[str, float] = {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backbone={self.backbone!r}, decay={self.decay!r}, multipliers={self.multipliers!r})"
        )

    @override
    def validate(self, names: Sequence[str]) -> None:
        self.factors = layerwise_factors(names, self.decay, self.multipliers, owner=type(self).__name__)

    @override
    def lr_factor(self, layer: str, names: Sequence[str], epoch: int, step: int) -> float:
        if not self.factors:
            self.validate(names)
        return self.factors.get(layer, 1.0)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"factors": dict(self.factors)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Factors follow from the arguments and the model (``setup`` recomputes them); restored for inspection.
        self.factors = dict(state_dict.get("factors", {}))


def layerwise_factors(
    names: Sequence[str], decay: float, multipliers: Mapping[str, float] | None = None, owner: str = "LayerwiseLR"
) -> dict[str, float]:
    """``{group: factor}`` for backbone groups ``names`` (input side first) and ``"head"``.

    Example::

        >>> layerwise_factors(["stem", "layer1", "layer2"], 0.5)
        {'stem': 0.125, 'layer1': 0.25, 'layer2': 0.5, 'head': 1.0}
    """
    all_names = [*names, HEAD]
    factors = {name: decay ** (len(names) - i) for i, name in enumerate(names)}
    factors[HEAD] = 1.0
    if multipliers:
        claimed: set[str] = set()
        for pattern, value in multipliers.items():
            for name in match_groups([pattern], all_names, argument="multipliers", owner=owner):
                if name not in claimed:
                    factors[name] = float(value)
                    claimed.add(name)
    return factors
