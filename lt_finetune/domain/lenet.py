"""The digit LeNet of the DANN and Transfer-Learning-Library digit experiments, as a backbone for small images."""

from __future__ import annotations

from torch import nn

__all__ = ["DigitLeNet"]


class DigitLeNet(nn.Sequential):
    """``[B, 3, 28, 28] -> [B, 500]`` features: conv 20 and 50 (5x5) with max pooling, then a 500-unit layer.

    Trained from scratch (there are no pretrained weights); the classifier (dropout, then a linear layer) is the
    task head, e.g. ``TransferModule(DigitLeNet(), num_classes=10, drop_rate=0.5, input_size=(3, 28, 28))``. From
    YAML: ``backbone: {class_path: lt_finetune.domain.DigitLeNet}``. A module backbone is not saved in the
    checkpoint's hyper-parameters: load with ``TransferModule.load_from_checkpoint(path, backbone=DigitLeNet())``.

    Args:
        batchnorm: Add BatchNorm after each layer (LeNet-BN, for AdaBN).

    Example::

        >>> import torch
        >>> DigitLeNet()(torch.zeros(2, 3, 28, 28)).shape
        torch.Size([2, 500])
    """

    def __init__(self, batchnorm: bool = False) -> None:
        def norm(channels: int, dims: int) -> nn.Module:
            if not batchnorm:
                return nn.Identity()
            return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)

        super().__init__(
            nn.Conv2d(3, 20, 5), norm(20, 2), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(20, 50, 5), norm(50, 2), nn.Dropout2d(0.5), nn.MaxPool2d(2), nn.ReLU(),
            nn.Flatten(), nn.Linear(50 * 4 * 4, 500), norm(500, 1), nn.ReLU(),
        )  # fmt: skip
