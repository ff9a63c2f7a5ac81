"""lt_finetune: transfer learning with PyTorch Lightning that stays correct."""

__version__ = "0.1.0"
