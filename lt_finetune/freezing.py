"""Freezing and unfreezing parameters, and what a frozen BatchNorm layer does. Pure: no Trainer needed.

A frozen parameter has ``requires_grad=False``: autograd builds no graph for it, and a frozen prefix of the
network (the input side) gets no backward pass at all. BatchNorm layers carry state besides their
parameters, so freezing them needs a policy (``bn_mode``):

- ``"eval"`` (the default): frozen BatchNorm layers run in eval mode, with their running statistics and
  affine parameters untouched. The frozen part then computes exactly the function it was pretrained to
  compute, and since nothing in it trains, the backward pass stops at its output: the full speed-up of
  freezing. Lightning's ``model.train()`` calls put them back in train mode, so the policy is re-applied
  before every training step.
- ``"train"``: BatchNorm layers stay out of freezing: affine parameters train and statistics update, as
  fastai does. The backward pass then runs through the whole frozen part (slower), in exchange for
  adapting the normalisation to the new data.
- ``"batch_stats"``: frozen BatchNorm layers normalise with the statistics of each training batch but do not
  update their running statistics, and their affine parameters stay frozen.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

BNMode = Literal["eval", "train", "batch_stats"]
BN_MODES: tuple[str, ...] = ("eval", "train", "batch_stats")

__all__ = ["BN_MODES", "BNMode", "batchnorm_layers", "freeze", "set_bn_mode", "unfreeze"]


def freeze(params: Iterable[nn.Parameter]) -> int:
    """Set ``requires_grad=False``; returns how many scalars changed state."""
    changed = 0
    for p in params:
        if p.requires_grad:
            p.requires_grad_(False)
            changed += p.numel()
    return changed


def unfreeze(params: Iterable[nn.Parameter]) -> int:
    """Set ``requires_grad=True``; returns how many scalars changed state."""
    changed = 0
    for p in params:
        if not p.requires_grad:
            p.requires_grad_(True)
            changed += p.numel()
    return changed


def batchnorm_layers(model: nn.Module, param_ids: set[int] | None = None) -> list[_BatchNorm]:
    """BatchNorm layers of ``model``; with ``param_ids``, only those whose affine weight is among them."""
    layers = []
    for module in model.modules():
        if not isinstance(module, _BatchNorm):
            continue
        if param_ids is None or (module.weight is not None and id(module.weight) in param_ids):
            layers.append(module)
    return layers


def set_bn_mode(layers: Sequence[_BatchNorm], mode: str | None, training: bool = True) -> None:
    """Apply a frozen-BatchNorm policy to ``layers``; ``None`` restores ordinary behaviour in ``training`` mode.

    Only the module flags are touched (``training``, ``track_running_stats``), never the running buffers,
    so the call is cheap enough to repeat before every step.
    """
    for layer in layers:
        if mode == "eval":
            layer.training = False
            layer.track_running_stats = True
        elif mode == "batch_stats":
            # Running buffers are kept (for evaluation), but with the flag off a training forward pass
            # normalises with batch statistics and leaves the buffers alone.
            layer.track_running_stats = False
        elif mode == "train":
            layer.track_running_stats = True
        else:
            layer.training = training
            layer.track_running_stats = True
