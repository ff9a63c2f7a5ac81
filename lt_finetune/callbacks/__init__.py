"""Fine-tuning callbacks: drop them into any Lightning ``Trainer``. Write your own with
:class:`lt_finetune.policy.FinetunePolicy`."""

from lt_finetune.callbacks.bss import BSS
from lt_finetune.callbacks.cached_probe import CachedProbe
from lt_finetune.callbacks.domain_adapt import DomainAdapt
from lt_finetune.callbacks.freeze_backbone import FreezeBackbone
from lt_finetune.callbacks.gradual_unfreeze import GradualUnfreeze
from lt_finetune.callbacks.l2sp import L2SP
from lt_finetune.callbacks.layerwise_lr import LayerwiseLR
from lt_finetune.callbacks.lora import LoRA
from lt_finetune.callbacks.lp_ft import LPFT
from lt_finetune.callbacks.slim_checkpoint import SlimCheckpoint
from lt_finetune.callbacks.weight_averaging import EMA

__all__ = [
    "BSS",
    "EMA",
    "L2SP",
    "LPFT",
    "CachedProbe",
    "DomainAdapt",
    "FreezeBackbone",
    "GradualUnfreeze",
    "LayerwiseLR",
    "LoRA",
    "SlimCheckpoint",
]
