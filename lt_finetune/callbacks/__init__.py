"""Fine-tuning callbacks: drop them into any Lightning ``Trainer``. Write your own with
:class:`lt_finetune.policy.FinetunePolicy`."""

from lt_finetune.callbacks.freeze_backbone import FreezeBackbone
from lt_finetune.callbacks.gradual_unfreeze import GradualUnfreeze
from lt_finetune.callbacks.layerwise_lr import LayerwiseLR

__all__ = ["FreezeBackbone", "GradualUnfreeze", "LayerwiseLR"]
