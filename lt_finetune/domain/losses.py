"""Domain-alignment losses as pure functions: adversarial (DANN, CDAN/CDAN+E), MK-MMD, CORAL and MCC.

Every function computes its statistics in float32 whatever the autocast region (covariances and kernel sums lose
too much in bf16), and takes logits, never probabilities, where a cross-entropy is involved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lt_finetune.validation import check_float, check_int

__all__ = [
    "coral_loss",
    "domain_adversarial_loss",
    "entropy",
    "entropy_weights",
    "mcc_loss",
    "mmd_loss",
    "multilinear_map",
]


def entropy(probabilities: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-sample entropy ``-sum p log p`` of probabilities ``[B, C]`` (float32)."""
    p = probabilities.float()
    return -(p * torch.log(p + eps)).sum(dim=1)


def entropy_weights(probabilities: Tensor) -> Tensor:
    """CDAN+E's sample weights ``1 + exp(-H(p))``, normalised to mean 1 (no gradient flows through them)."""
    w = 1.0 + torch.exp(-entropy(probabilities.detach()))
    return w / w.mean()


def domain_adversarial_loss(
    source_logits: Tensor,
    target_logits: Tensor,
    source_weights: Tensor | None = None,
    target_weights: Tensor | None = None,
) -> Tensor:
    """Binary cross-entropy of a domain discriminator's logits: source is 1, target is 0; each domain weighs half.

    Example::

        >>> round(domain_adversarial_loss(torch.zeros(4), torch.zeros(2)).item(), 4)  # log 2: a discriminator at chance
        0.6931
    """
    losses = []
    for logits, label, weights in ((source_logits, 1.0, source_weights), (target_logits, 0.0, target_weights)):
        logits = logits.float().reshape(-1)
        per_sample = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label), reduction="none")
        losses.append((per_sample * weights.float()).mean() if weights is not None else per_sample.mean())
    return 0.5 * (losses[0] + losses[1])


def multilinear_map(features: Tensor, probabilities: Tensor) -> Tensor:
    """CDAN's multilinear conditioning: the flattened outer product ``f ⊗ g``, shape ``[B, D * C]``.

    Example::

        >>> multilinear_map(torch.ones(2, 3), torch.tensor([[1.0, 0.0], [0.5, 0.5]])).shape
        torch.Size([2, 6])
    """
    return torch.bmm(probabilities.unsqueeze(2), features.unsqueeze(1)).flatten(1)


def _gaussian_kernels(x: Tensor, num_kernels: int, kernel_mul: float) -> Tensor:
    """Sum of Gaussian kernels with bandwidths ``base * kernel_mul**k`` around the mean pairwise distance."""
    distances = torch.cdist(x, x).pow(2)
    n = x.shape[0]
    base = distances.detach().sum() / max(n * n - n, 1)
    base = base.clamp_min(1e-8) / (kernel_mul ** (num_kernels // 2))
    return sum(torch.exp(-distances / (base * kernel_mul**k)) for k in range(num_kernels))  # type: ignore[return-value]


def mmd_loss(source: Tensor, target: Tensor, num_kernels: int = 5, kernel_mul: float = 2.0) -> Tensor:
    """Multi-kernel maximum mean discrepancy (DAN, Long et al. 2015) between two feature batches (biased estimate).

    A family of ``num_kernels`` Gaussian kernels whose bandwidths are spaced by ``kernel_mul`` around the mean
    pairwise squared distance of the joint batch; the batches may differ in size.

    Example::

        >>> x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
        >>> mmd_loss(x, x).item() < 1e-6 < mmd_loss(x, x + 3).item()
        True
    """
    check_int("num_kernels", num_kernels, 1)
    check_float("kernel_mul", kernel_mul, 1.0, low_open=True)
    _check_pair(source, target)
    s, t = source.float(), target.float()
    with torch.autocast(device_type=s.device.type, enabled=False):
        k = _gaussian_kernels(torch.cat([s, t]), num_kernels, kernel_mul)
        n = s.shape[0]
        return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def coral_loss(source: Tensor, target: Tensor) -> Tensor:
    """Deep CORAL (Sun & Saenko, 2016): ``||C_s - C_t||_F^2 / (4 d^2)`` for feature covariances ``C`` of size d x d.

    The ``1 / (4 d^2)`` scaling of the paper makes the value small (of the order of the squared covariance entries):
    pick its weight accordingly (``DomainAdapt`` uses a larger default for CORAL than for the other methods).

    Example::

        >>> x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
        >>> coral_loss(x, x).item() == 0.0 < coral_loss(x, 3 * x).item()
        True
    """
    _check_pair(source, target)
    with torch.autocast(device_type=source.device.type, enabled=False):
        d = source.shape[1]
        return (_covariance(source.float()) - _covariance(target.float())).pow(2).sum() / (4 * d * d)


def _covariance(x: Tensor) -> Tensor:
    centred = x - x.mean(dim=0, keepdim=True)
    return centred.T @ centred / max(x.shape[0] - 1, 1)


def mcc_loss(logits: Tensor, temperature: float = 2.5) -> Tensor:
    """Minimum class confusion (Jin et al., 2020) of unlabelled logits ``[B, C]``.

    Softmax at ``temperature``; samples weighted by ``1 + exp(-entropy)`` (normalised to sum to ``B``); the class
    confusion matrix ``P^T W P`` is row-normalised, and the loss is its off-diagonal mass divided by ``C``.

    Example::

        >>> confident = torch.eye(4) * 50
        >>> round(mcc_loss(confident).item(), 4), mcc_loss(torch.zeros(4, 4)).item() > 0.5
        (0.0, True)
    """
    check_float("temperature", temperature, 0.0, low_open=True)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        p = torch.softmax(logits.float() / temperature, dim=1)
        b, c = p.shape
        w = 1.0 + torch.exp(-entropy(p.detach()))
        w = (b * w / w.sum()).unsqueeze(1)
        confusion = (p * w).T @ p
        confusion = confusion / confusion.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return (confusion.sum() - confusion.trace()) / c


def _check_pair(source: Tensor, target: Tensor) -> None:
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(
            f"Expected source and target features of shapes [N, D] and [M, D], got {list(source.shape)} and "
            f"{list(target.shape)}."
        )
    if source.shape[0] < 2 or target.shape[0] < 2:
        raise ValueError(
            f"Expected at least 2 samples per domain to compare statistics, got {source.shape[0]} source and "
            f"{target.shape[0]} target samples."
        )
