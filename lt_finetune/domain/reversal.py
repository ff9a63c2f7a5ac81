"""Gradient reversal (Ganin & Lempitsky, 2015) and DANN's ramp of its coefficient over training progress."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lt_finetune.validation import check_float

__all__ = ["GradientReversal", "dann_coefficient", "gradient_reversal"]


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, coefficient: float) -> Tensor:
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.coefficient * grad, None


def gradient_reversal(x: Tensor, coefficient: float = 1.0) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``-coefficient`` in the backward pass.

    Example::

        >>> x = torch.ones(3, requires_grad=True)
        >>> gradient_reversal(x, 0.5).sum().backward()
        >>> x.grad
        tensor([-0.5000, -0.5000, -0.5000])
    """
    return _ReverseGradient.apply(x, float(coefficient))


class GradientReversal(nn.Module):
    """:func:`gradient_reversal` as a module; ``coefficient`` is plain data, set it as training progresses."""

    def __init__(self, coefficient: float = 1.0) -> None:
        super().__init__()
        self.coefficient = check_float("coefficient", coefficient, 0.0)

    def forward(self, x: Tensor) -> Tensor:
        return gradient_reversal(x, self.coefficient)

    def extra_repr(self) -> str:
        return f"coefficient={self.coefficient}"


def dann_coefficient(progress: float, gamma: float = 10.0, high: float = 1.0) -> float:
    """DANN's ramp ``high * (2 / (1 + exp(-gamma * p)) - 1)`` for training progress ``p`` in [0, 1].

    Starts at 0, so the discriminator's noisy early gradients do not reach the features, and approaches ``high``.
    ``p`` is clipped to [0, 1].

    Example::

        >>> dann_coefficient(0.0), round(dann_coefficient(0.5), 4), round(dann_coefficient(1.0), 4)
        (0.0, 0.9866, 0.9999)
    """
    p = min(max(float(progress), 0.0), 1.0)
    return float(high) * (2.0 / (1.0 + math.exp(-float(gamma) * p)) - 1.0)
