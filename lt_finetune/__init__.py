"""lt_finetune: transfer learning with PyTorch Lightning that stays correct."""

from lt_finetune._version import __version__
from lt_finetune.backbones import backbone_data_config, create_backbone
from lt_finetune.callbacks import FreezeBackbone, GradualUnfreeze, LayerwiseLR
from lt_finetune.extras import add_trainable_module
from lt_finetune.groups import LayerGroup, format_groups, layer_groups
from lt_finetune.loss_terms import LossTermsMixin, StepOutputs
from lt_finetune.module import TransferModule
from lt_finetune.policy import FinetunePolicy
from lt_finetune.snapshot import pretrained_snapshot

__all__ = [
    "FinetunePolicy",
    "FreezeBackbone",
    "GradualUnfreeze",
    "LayerGroup",
    "LayerwiseLR",
    "LossTermsMixin",
    "StepOutputs",
    "TransferModule",
    "__version__",
    "add_trainable_module",
    "backbone_data_config",
    "create_backbone",
    "format_groups",
    "layer_groups",
    "pretrained_snapshot",
]
