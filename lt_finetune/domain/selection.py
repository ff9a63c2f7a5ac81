"""Label-free scores of a model on unlabelled target data, and the model-selection rule that uses them.

Unsupervised domain adaptation has no target labels, so hyper-parameters and checkpoints must be chosen without
them. DomainBed and Musgrave et al. ("Benchmarking Validation Methods for Unsupervised Domain Adaptation", 2021)
show that picking with target test labels inflates results and that no label-free score is reliable alone. The rule
here combines what is available:

``selection_score = (source validation accuracy + information_maximization(target) / log C) / 2``

Source accuracy guards against a model that forgot the task; information maximization (confident and diverse
target predictions, in [0, 1] after division by ``log C``) rewards alignment and penalises the collapse of target
predictions onto a few classes. Soft neighbourhood density is logged beside it, for reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lt_finetune.domain.losses import entropy

__all__ = ["information_maximization", "selection_score", "soft_neighborhood_density"]


def information_maximization(logits: Tensor) -> Tensor:
    """``H(mean p) - mean H(p)`` of target logits ``[N, C]``: in ``[0, log C]``, higher is better.

    Example::

        >>> confident_and_diverse = torch.eye(3) * 30
        >>> round(information_maximization(confident_and_diverse).item(), 4) == round(math.log(3), 4)
        True
        >>> information_maximization(torch.zeros(5, 3)).item()  # uncertain: 0
        0.0
    """
    p = torch.softmax(logits.float(), dim=1)
    marginal = p.mean(dim=0, keepdim=True)
    return (entropy(marginal).squeeze(0) - entropy(p).mean()).clamp_min(0.0)


def soft_neighborhood_density(logits: Tensor, temperature: float = 0.05) -> Tensor:
    """Soft neighbourhood density (Saito et al., 2021) of target logits ``[N, C]``: higher is better.

    The mean entropy of each sample's softmax over its cosine similarities to the other samples' class-probability
    vectors, at ``temperature``: high when the predictions form dense clusters.
    """
    p = torch.nn.functional.normalize(torch.softmax(logits.float(), dim=1), dim=1)
    similarity = p @ p.T
    similarity.fill_diagonal_(-math.inf)
    neighbours = torch.softmax(similarity / temperature, dim=1)
    return entropy(neighbours).mean()


def selection_score(source_accuracy: float, target_logits: Tensor) -> float:
    """The documented model-selection rule: ``(source_accuracy + IM / log C) / 2``, in [0, 1], higher is better.

    Example::

        >>> round(selection_score(0.9, torch.eye(3) * 30), 4)
        0.95
    """
    c = target_logits.shape[1]
    im = float(information_maximization(target_logits)) / math.log(c) if c > 1 else 0.0
    return 0.5 * (float(source_accuracy) + im)
