"""LayerGroupLRMonitor: Lightning's LearningRateMonitor with one series per layer group."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor
from typing_extensions import override

from lt_finetune.optim import NO_DECAY_SUFFIX

__all__ = ["LayerGroupLRMonitor"]


class LayerGroupLRMonitor(LearningRateMonitor):
    """Log each layer group's learning rate once: the ``<group>/no_decay`` twins are left out.

    The optimizer contract gives every layer group a ``"<group>/no_decay"`` companion (norms and biases, no weight
    decay) whose learning rate is always the group's own, so Lightning's :class:`LearningRateMonitor` logs every
    series twice (40 for MobileNetV2). This subclass drops a twin's series when it equals its group's (momentum
    and weight-decay series of twins too, where logged); any twin whose value differs is kept. Lightning's
    ``LearningRateMonitor`` refuses param groups with equal names, so renaming the twins cannot do this. Arguments
    are ``LearningRateMonitor``'s.

    Example::

        >>> LayerGroupLRMonitor("step").logging_interval
        'step'
    """

    @override
    def _extract_stats(self, trainer: Any, interval: str) -> dict[str, float]:
        stats = super()._extract_stats(trainer, interval)
        kept = {}
        for key, value in stats.items():
            base, kind = key, ""  # keys: "lr-AdamW/layer1/no_decay", "...-momentum", "...-weight_decay"
            for suffix in ("-momentum", "-weight_decay"):
                if key.endswith(suffix):
                    base, kind = key[: -len(suffix)], suffix
            if base.endswith(NO_DECAY_SUFFIX) and stats.get(base[: -len(NO_DECAY_SUFFIX)] + kind) == value:
                continue
            kept[key] = value
        for key in set(stats) - set(kept):
            trainer.callback_metrics.pop(key, None)
        return kept
