"""BSS: Batch Spectral Shrinkage against negative transfer (Chen, Wang, Fu, Long and Wang, NeurIPS 2019)."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from typing_extensions import override

from lt_finetune.callbacks._loss_term import LossTermCallback
from lt_finetune.loss_terms import StepOutputs
from lt_finetune.regularizers import bss_penalty
from lt_finetune.validation import check_float, check_int

__all__ = ["BSS"]


class BSS(LossTermCallback):
    """Add ``weight * sum of the k smallest squared singular values`` of the batch's feature matrix to the loss.

    Chen et al. observe that the feature directions with small singular values carry what does not transfer (and
    is fitted to the few target labels); shrinking them is a loss term on the step's pooled features
    (``StepOutputs.features``, ``[B, D]``), computed in float32 with ``torch.linalg.svdvals``. It holds no state.
    Under DDP each replica penalises its own batch, as in the paper's per-batch formulation.

    Args:
        weight: Trade-off ``eta`` (the paper and TLlib use 0.001).
        k: How many of the smallest singular values are shrunk (the paper uses 1).

    Raises:
        TypeError: For arguments of the wrong type.
        ValueError: For a negative weight or ``k < 1``; at fit start, for a module that does not take loss terms;
            at a step, for a batch smaller than ``k``.

    Example::

        >>> from lt_finetune.callbacks import BSS
        >>> BSS(weight=1e-3, k=1)
        BSS(weight=0.001, k=1)
    """

    term_name = "bss"

    def __init__(self, weight: float = 1e-3, k: int = 1) -> None:
        super().__init__()
        self.weight = check_float("weight", weight, 0.0)
        self.k = check_int("k", k, 1)

    @override
    def config(self) -> dict[str, Any]:
        return {"weight": self.weight, "k": self.k}

    @override
    def term(self, outputs: StepOutputs) -> Tensor:
        features = outputs.features
        if features.ndim > 2:
            features = features.flatten(1)
        return self.weight * bss_penalty(features, self.k)
