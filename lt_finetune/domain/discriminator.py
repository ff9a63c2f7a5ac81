"""Domain discriminators: MLPs that output one logit per sample (source vs target), for DANN and CDAN."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lt_finetune.domain.losses import multilinear_map
from lt_finetune.validation import check_float, check_int

__all__ = ["ConditionalDomainDiscriminator", "DomainDiscriminator"]


class DomainDiscriminator(nn.Module):
    """``Linear -> BatchNorm -> ReLU -> Dropout`` blocks, then one output logit per sample (no sigmoid).

    Logits, not probabilities, so the loss is ``binary_cross_entropy_with_logits``: safe under autocast.

    Args:
        in_features: Size of the inputs (the pooled features, or CDAN's conditioned features).
        hidden: Width of the hidden layers.
        num_layers: Number of hidden layers (>= 1).
        dropout: Dropout after each hidden layer (0 by default: dropout draws random numbers, and Lightning does not
            restore the random state on resume, so a resumed run would differ from an uninterrupted one).

    Example::

        >>> DomainDiscriminator(16, hidden=8)(torch.randn(4, 16)).shape
        torch.Size([4])
    """

    def __init__(self, in_features: int, hidden: int = 1024, num_layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, 1)
        check_int("hidden", hidden, 1)
        check_int("num_layers", num_layers, 1)
        check_float("dropout", dropout, 0.0, 1.0, high_open=True)
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects inputs of shape [B, {self.in_features}], got {list(x.shape)}; the "
                "feature size of the model does not match the discriminator (pass the right `in_features`)."
            )
        return self.net(x).squeeze(-1)


class ConditionalDomainDiscriminator(nn.Module):
    """CDAN's discriminator: conditions the features on the class predictions, then a :class:`DomainDiscriminator`.

    The multilinear map ``features ⊗ probabilities`` has ``num_features * num_classes`` entries; above
    ``max_multilinear`` it is replaced by the randomized map ``(R_f f) ⊙ (R_g g) / sqrt(randomized_dim)`` with fixed
    random matrices (buffers drawn from ``seed``, so every DDP rank and every resumed run has the same ones).

    Example::

        >>> d = ConditionalDomainDiscriminator(6, 3, hidden=8)
        >>> d(torch.randn(4, 6), torch.softmax(torch.randn(4, 3), 1)).shape, d.randomized
        (torch.Size([4]), False)
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        hidden: int = 1024,
        num_layers: int = 2,
        dropout: float = 0.0,
        max_multilinear: int = 4096,
        randomized_dim: int = 1024,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.num_features = check_int("num_features", num_features, 1)
        self.num_classes = check_int("num_classes", num_classes, 1)
        check_int("max_multilinear", max_multilinear, 1)
        check_int("randomized_dim", randomized_dim, 1)
        self.randomized = num_features * num_classes > max_multilinear
        if self.randomized:
            g = torch.Generator().manual_seed(seed)
            self.register_buffer("r_features", torch.randn(num_features, randomized_dim, generator=g))
            self.register_buffer("r_classes", torch.randn(num_classes, randomized_dim, generator=g))
            width = randomized_dim
        else:
            width = num_features * num_classes
        self.discriminator = DomainDiscriminator(width, hidden, num_layers, dropout)

    def condition(self, features: Tensor, probabilities: Tensor) -> Tensor:
        """The conditioned features ``[B, width]`` the discriminator sees."""
        if features.shape[1:] != (self.num_features,) or probabilities.shape[1:] != (self.num_classes,):
            raise ValueError(
                f"{type(self).__name__} expects features [B, {self.num_features}] and class probabilities "
                f"[B, {self.num_classes}], got {list(features.shape)} and {list(probabilities.shape)}; the model does "
                "not match the discriminator (pass the right `in_features`)."
            )
        if not self.randomized:
            return multilinear_map(features, probabilities)
        r_features, r_classes = self.get_buffer("r_features"), self.get_buffer("r_classes")
        return (features @ r_features) * (probabilities @ r_classes) / float(r_features.shape[1]) ** 0.5

    def forward(self, features: Tensor, probabilities: Tensor) -> Tensor:
        return self.discriminator(self.condition(features, probabilities))
