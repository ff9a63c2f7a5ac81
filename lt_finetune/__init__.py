"""lt_finetune: transfer learning with PyTorch Lightning that stays correct."""

from lt_finetune.backbones import backbone_data_config, create_backbone
from lt_finetune.callbacks import FreezeBackbone, GradualUnfreeze, LayerwiseLR
from lt_finetune.groups import LayerGroup, format_groups, layer_groups
from lt_finetune.module import TransferModule

__version__ = "0.1.0"

__all__ = [
    "FreezeBackbone",
    "GradualUnfreeze",
    "LayerGroup",
    "LayerwiseLR",
    "TransferModule",
    "__version__",
    "backbone_data_config",
    "create_backbone",
    "format_groups",
    "layer_groups",
]
