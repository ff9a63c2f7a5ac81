"""L2SP: keep the backbone close to its pretrained weights (Li, Grandvalet and Davoine, ICML 2018)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lt_finetune.callbacks._loss_term import LossTermCallback
from lt_finetune.coordinator import resolve_backbone
from lt_finetune.loss_terms import StepOutputs
from lt_finetune.regularizers import head_parameters, l2sp_penalty, squared_norm
from lt_finetune.snapshot import pretrained_snapshot
from lt_finetune.validation import check_float

__all__ = ["L2SP"]


class L2SP(LossTermCallback):
    """Add ``alpha/2 * ||w - w0||^2`` over the backbone and ``beta/2 * ||w_head||^2`` over the head to the loss.

    ``w0`` is the pretrained snapshot θ₀ (:func:`lt_finetune.snapshot.pretrained_snapshot`): taken at the start of
    the first fit, saved in every checkpoint and restored on resume, so a resumed run is pulled towards the
    pretrained weights, never towards the weights it resumed from. Parameters frozen at a step (by
    ``FreezeBackbone``, ``GradualUnfreeze``, ...) are left out of that step's penalty: they cannot move.
    The head is every parameter outside the backbone and the extra modules (a domain discriminator is not
    penalised). Under DDP every replica computes the same penalty on identical weights, so the averaged gradient
    is the penalty's gradient.

    The decay towards zero of the optimizer fights the pull towards ``w0``: Li et al. replace weight decay by this
    penalty, so give the model ``weight_decay=0`` (a positive one is logged once at fit start).

    Args:
        backbone: Attribute path of the pretrained part on the LightningModule.
        alpha: Strength of the pull towards the pretrained weights (the paper uses 0.01-0.1).
        beta: Weight decay of the head (the paper uses 0.01).

    Raises:
        TypeError: For arguments of the wrong type.
        ValueError: For negative strengths; at fit start, for a module that does not take loss terms.

    Example::

        >>> from lt_finetune.callbacks import L2SP
        >>> L2SP(alpha=0.01, beta=0.01)
        L2SP(backbone='backbone', alpha=0.01, beta=0.01)
    """

    term_name = "l2sp"

    def __init__(self, backbone: str = "backbone", alpha: float = 0.01, beta: float = 0.01) -> None:
        super().__init__()
        if not isinstance(backbone, str) or not backbone:
            raise TypeError(f"Expected `backbone` to be a non-empty attribute path string, got {backbone!r}.")
        self.backbone = backbone
        self.alpha = check_float("alpha", alpha, 0.0)
        self.beta = check_float("beta", beta, 0.0)

    @override
    def config(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "alpha": self.alpha, "beta": self.beta}

    @override
    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        resolve_backbone(pl_module, self.backbone, type(self).__name__)
        pretrained_snapshot(pl_module, self.backbone)  # pins θ₀ now, if nothing asked for it before

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        decayed = [
            g.get("name", str(i))
            for opt in trainer.optimizers
            for i, g in enumerate(opt.param_groups)
            if g.get("weight_decay", 0.0) > 0 and not str(g.get("name", "")).startswith("head")
        ]
        if decayed:
            rank_zero_info(
                f"lt_finetune: {self!r} with weight decay on {len(decayed)} backbone param groups: the decay pulls "
                "the weights towards 0, L2-SP towards the pretrained ones. Set weight_decay=0 to follow Li et al."
            )

    def backbone_parameters(self, pl_module: nn.Module) -> dict[str, nn.Parameter]:
        """The backbone's trainable parameters, by name relative to the backbone."""
        module = resolve_backbone(pl_module, self.backbone, type(self).__name__)
        return {name: p for name, p in module.named_parameters() if p.requires_grad}

    def penalty(self, pl_module: nn.Module) -> Tensor:
        """The L2-SP penalty of ``pl_module``'s current weights (what the loss term adds)."""
        snapshot = pretrained_snapshot(pl_module, self.backbone)
        params = self.backbone_parameters(pl_module)
        device = next(iter(pl_module.parameters())).device
        total = torch.zeros((), device=device)
        if params and self.alpha > 0:
            total = total + 0.5 * self.alpha * l2sp_penalty(params, snapshot.to(device))
        if self.beta > 0:
            head = [p for p in head_parameters(pl_module, self.backbone).values() if p.requires_grad]
            total = total + 0.5 * self.beta * squared_norm(head).to(device)
        return total

    @override
    def term(self, outputs: StepOutputs) -> Tensor:
        if self._module is None:
            raise RuntimeError("L2SP's loss term was called outside a fit.")
        return self.penalty(self._module)
