"""Regularisers for fine-tuning, as pure functions: L2-SP (Li et al. 2018) and BSS (Chen et al. 2019).

The callbacks :class:`~lt_finetune.callbacks.L2SP` and :class:`~lt_finetune.callbacks.BSS` register these as loss
terms; the functions work on plain tensors, without a Trainer.

Example::

    >>> import torch
    >>> w = {"weight": torch.tensor([1.0, 2.0])}
    >>> w0 = {"weight": torch.tensor([0.0, 2.0])}
    >>> l2sp_penalty(w, w0)
    tensor(1.)
    >>> bss_penalty(torch.eye(3) * torch.tensor([3.0, 2.0, 1.0]), k=2)  # 1**2 + 2**2
    tensor(5.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from lt_finetune.extras import EXTRA_MODULES

__all__ = ["bss_penalty", "head_parameters", "l2sp_penalty", "squared_norm"]


def l2sp_penalty(params: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> Tensor:
    """``sum ||w - w0||^2`` over the tensors of ``params``, each compared with ``reference`` of the same name.

    Computed in float32 (the step may run under autocast).

    Raises:
        KeyError: If ``reference`` lacks a name of ``params``, naming it.
        ValueError: If ``params`` is empty.
    """
    if not params:
        raise ValueError("Expected at least one parameter for the L2-SP penalty, got none.")
    total: Tensor | None = None
    for name, w in params.items():
        if name not in reference:
            raise KeyError(f"The pretrained reference has no tensor {name!r}; it has {sorted(reference)[:5]}...")
        term = (w.float() - reference[name].to(w.device, torch.float32)).pow(2).sum()
        total = term if total is None else total + term
    assert total is not None
    return total


def squared_norm(params: Iterable[Tensor]) -> Tensor:
    """``sum ||w||^2`` over ``params`` (float32); zero for no parameters."""
    terms = [p.float().pow(2).sum() for p in params]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def bss_penalty(features: Tensor, k: int = 1) -> Tensor:
    """Batch Spectral Shrinkage: the sum of the ``k`` smallest squared singular values of ``features`` ``[B, D]``.

    Raises:
        ValueError: If ``features`` is not 2-D, or ``k`` exceeds ``min(B, D)``.
    """
    if features.ndim != 2:
        raise ValueError(f"Expected `features` of shape [batch, dim], got {list(features.shape)}.")
    rank = min(features.shape)
    if not 1 <= k <= rank:
        raise ValueError(
            f"Expected `k` in [1, min(batch, dim)] = [1, {rank}] for features of shape {list(features.shape)}, got "
            f"{k}. Use a larger batch or a smaller k."
        )
    singular = torch.linalg.svdvals(features.float())  # descending
    return singular[-k:].pow(2).sum()


def head_parameters(pl_module: nn.Module, backbone: str) -> dict[str, nn.Parameter]:
    """The head: every parameter of ``pl_module`` outside the sub-module ``backbone`` and the extra modules."""
    skip = (backbone + ".", EXTRA_MODULES + ".")
    return {name: p for name, p in pl_module.named_parameters() if not name.startswith(skip)}
