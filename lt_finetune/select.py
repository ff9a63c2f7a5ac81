"""Transferability scores: how well a pretrained model's features (or predictions) suit target labels, before training.

Pure functions of tensors, in float64, vectorised; no Trainer. Higher is better for every score. No single score
wins across tasks (large studies of these scores agree on that), so several are offered:

- :func:`logme`: LogME (You et al., 2021): the mean over classes of the maximised log evidence of a Bayesian
  linear model from features to the one-hot labels, per sample.
- :func:`h_score`: H-score (Bao et al., 2019): ``tr(cov(f)^-1 cov(E[f | y]))``, how well class-conditional
  means separate relative to the feature covariance; ``shrinkage="ledoit_wolf"`` gives the regularised H-score
  (Ibrahim et al., 2022), which still ranks with fewer images than features.
- :func:`leep`: LEEP (Nguyen et al., 2020): log expected empirical prediction of the source model's soft
  predictions over its own label set, through the empirical conditional ``P(y | z)``.
- :func:`nce`: NCE (Tran et al., 2019): the negative conditional entropy ``-H(Y | Z)`` of the target labels given
  the source model's hard predictions.

Features are ``[N, D]`` (pooled backbone features), labels ``[N]`` integers in ``0..C-1``, source predictions
``[N, Z]`` probabilities over the source label set (e.g. ImageNet's 1000 classes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LogMEFit", "h_score", "ledoit_wolf_shrinkage", "leep", "logme", "logme_fit", "nce"]


def _check(features: Tensor, labels: Tensor, name: str = "features") -> tuple[Tensor, Tensor, int]:
    if features.ndim != 2:
        raise ValueError(f"Expected `{name}` to be a 2-D tensor [N, D], got shape {list(features.shape)}.")
    if labels.ndim != 1 or len(labels) != len(features):
        raise ValueError(
            f"Expected `labels` to be a 1-D tensor with one label per row of `{name}` ({len(features)}), "
            f"got shape {list(labels.shape)}."
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"Expected `labels` to hold integer class indices, got dtype {labels.dtype}.")
    if len(labels) < 2:
        raise ValueError(f"Expected at least 2 samples, got {len(labels)}.")
    if int(labels.min()) < 0:
        raise ValueError(f"Expected `labels` to be >= 0, got {int(labels.min())}.")
    return features.detach().to(torch.float64), labels.detach().long(), int(labels.max()) + 1


@dataclass(frozen=True)
class LogMEFit:
    """LogME's per-class results: the score is ``evidence.mean()``; ``alpha`` and ``beta`` are the maximisers."""

    evidence: Tensor  # [C] log evidence per sample
    alpha: Tensor  # [C] prior precision
    beta: Tensor  # [C] noise precision


def logme_fit(features: Tensor, labels: Tensor, max_iter: int = 100, tol: float = 1e-6) -> LogMEFit:
    """Maximise the log evidence of a Bayesian linear model per class (LogME's fixed-point iteration).

    For class ``c`` the target is ``t = 1[labels == c]``; with prior ``w ~ N(0, 1/alpha)`` and noise precision
    ``beta``, MacKay's updates ``gamma = sum(beta s / (alpha + beta s))``, ``alpha = gamma / |m|^2``,
    ``beta = (N - gamma) / |t - F m|^2`` run to convergence on the eigenvalues ``s`` of ``F^T F``; all classes are
    solved at once.
    """
    f, y, classes = _check(features, labels)
    n = len(f)
    targets = torch.nn.functional.one_hot(y, classes).to(torch.float64)  # [N, C]
    s, v = torch.linalg.eigh(f.T @ f)  # F^T F = V diag(s) V^T
    s = s.clamp_min(0.0)
    projected = v.T @ (f.T @ targets)  # [D, C]: V^T F^T t
    alpha = torch.ones(classes, dtype=torch.float64)
    beta = torch.ones(classes, dtype=torch.float64)
    for _ in range(max_iter):
        denom = alpha[None, :] + beta[None, :] * s[:, None]  # [D, C]
        gamma = (beta[None, :] * s[:, None] / denom).sum(0)
        m = v @ (beta[None, :] * projected / denom)  # [D, C] posterior means
        m_sq = (m * m).sum(0)
        residual = ((targets - f @ m) ** 2).sum(0)
        new_alpha = gamma / m_sq.clamp_min(1e-12)
        new_beta = (n - gamma) / residual.clamp_min(1e-12)
        done = torch.all((new_alpha / alpha - 1).abs() < tol) and torch.all((new_beta / beta - 1).abs() < tol)
        alpha, beta = new_alpha, new_beta
        if done:
            break
    evidence = _log_evidence(f, targets, s, v, alpha, beta)
    return LogMEFit(evidence=evidence / n, alpha=alpha, beta=beta)


def _log_evidence(f: Tensor, targets: Tensor, s: Tensor, v: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    n, d = f.shape
    denom = alpha[None, :] + beta[None, :] * s[:, None]
    m = v @ (beta[None, :] * (v.T @ (f.T @ targets)) / denom)
    residual = ((targets - f @ m) ** 2).sum(0)
    return (
        d / 2 * alpha.log()
        + n / 2 * beta.log()
        - 0.5 * denom.log().sum(0)
        - beta / 2 * residual
        - alpha / 2 * (m * m).sum(0)
        - n / 2 * math.log(2 * math.pi)
    )


def logme(features: Tensor, labels: Tensor) -> float:
    """LogME score of ``features`` ``[N, D]`` for ``labels`` ``[N]``: mean per-sample maximised log evidence.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> labels = torch.arange(200) % 2
        >>> separable = torch.randn(200, 8, generator=g) + 3.0 * labels[:, None]
        >>> logme(separable, labels) > logme(torch.randn(200, 8, generator=g), labels)
        True
    """
    return float(logme_fit(features, labels).evidence.mean())


def h_score(features: Tensor, labels: Tensor, shrinkage: float | str | None = None) -> float:
    """H-score: ``tr(pinv(cov(f)) cov(E[f | y]))`` (the covariance of the class-conditional means, per sample).

    With ``N - 1 <= D`` images the sample covariance is singular and the plain score is ``C - 1`` whatever the
    features: it cannot rank. ``shrinkage`` gives the regularised H-score of Ibrahim et al. (2022),
    ``tr(inv((1 - a) cov + a mu I) (1 - a) cov(E[f | y]))`` with ``mu = tr(cov) / D``: ``"ledoit_wolf"`` picks
    ``a`` by the Ledoit-Wolf estimate (defined for any ``N``), a number in ``[0, 1)`` sets it.

    Example::

        >>> round(h_score(torch.tensor([[0.0], [2.0], [10.0], [12.0]]), torch.tensor([0, 0, 1, 1])), 4)  # 25 / 26
        0.9615
        >>> round(h_score(torch.tensor([[0.0], [2.0], [10.0], [12.0]]), torch.tensor([0, 0, 1, 1]), 0.5), 4)  # half
        0.4808
    """
    f, y, classes = _check(features, labels)
    f = f - f.mean(0, keepdim=True)
    n, d = f.shape
    cov = f.T @ f / n
    means = torch.zeros(classes, d, dtype=torch.float64).index_add_(0, y, f)
    counts = torch.bincount(y, minlength=classes).to(torch.float64)
    means = means / counts.clamp_min(1.0)[:, None]
    weights = counts / n
    between = (means * weights[:, None]).T @ means  # cov of E[f | y] over the samples (f is centred)
    if isinstance(shrinkage, str) and shrinkage != "ledoit_wolf":
        raise ValueError(f"Expected `shrinkage` to be None, 'ledoit_wolf' or a number in [0, 1), got {shrinkage!r}.")
    a = 0.0 if shrinkage is None else _ledoit_wolf(f, cov) if shrinkage == "ledoit_wolf" else float(shrinkage)
    if not 0.0 <= a < 1.0:
        raise ValueError(f"Expected `shrinkage` to be in [0, 1), got {a}.")
    mu = float(torch.trace(cov)) / d
    regularised = (1.0 - a) * cov + a * mu * torch.eye(d, dtype=torch.float64)
    if a == 0.0 or mu == 0.0:  # singular: the pseudo-inverse ignores the null directions
        return float(torch.trace(torch.linalg.pinv(regularised, hermitian=True) @ between))
    return float((1.0 - a) * torch.trace(torch.linalg.solve(regularised, between)))


def ledoit_wolf_shrinkage(features: Tensor) -> float:
    """The Ledoit-Wolf (2004) shrinkage intensity of the covariance of ``features`` ``[N, D]`` toward ``mu I``.

    The same estimate as scikit-learn's ``ledoit_wolf_shrinkage`` (features centred here), in ``[0, 1]``.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> scales = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])  # far from mu I: little shrinkage with many samples
        >>> few, many = torch.randn(10, 5, generator=g) * scales, torch.randn(2000, 5, generator=g) * scales
        >>> round(ledoit_wolf_shrinkage(few), 2), round(ledoit_wolf_shrinkage(many), 3)
        (0.39, 0.002)
    """
    x = features.detach().to(torch.float64)
    x = x - x.mean(0, keepdim=True)
    return _ledoit_wolf(x, x.T @ x / len(x))


def _ledoit_wolf(x: Tensor, cov: Tensor) -> float:
    """Ledoit-Wolf intensity of centred ``x`` ``[N, D]`` whose covariance ``x^T x / N`` is ``cov`` (not recomputed)."""
    n, d = x.shape
    x2 = x * x
    trace = float(torch.trace(cov))
    mu = trace / d
    beta_ = float((x2.T @ x2).sum())
    delta_ = float((cov**2).sum())
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * trace + d * mu**2) / d
    beta = min(beta, delta)
    return 0.0 if beta == 0.0 else beta / delta


def _joint(source_probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    p, y, classes = _check(source_probs, labels, name="source_probs")
    if (p < 0).any() or not torch.allclose(p.sum(1), torch.ones(len(p), dtype=p.dtype), atol=1e-4):
        raise ValueError("Expected `source_probs` to be probabilities: non-negative rows that sum to 1 (softmax).")
    joint = torch.zeros(classes, p.shape[1], dtype=torch.float64).index_add_(0, y, p) / len(p)  # P(y, z)
    return p, y, joint


def leep(source_probs: Tensor, labels: Tensor) -> float:
    """LEEP: ``mean_i log sum_z P(y_i | z) theta_z(x_i)``, with ``P(y | z)`` the empirical conditional.

    Example::

        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.1, 0.9]])
        >>> round(leep(probs, torch.tensor([0, 0, 1, 1])), 4)  # (log 0.78 + log 0.71) / 2
        -0.2955
    """
    p, y, joint = _joint(source_probs, labels)
    conditional = joint / joint.sum(0, keepdim=True).clamp_min(1e-300)  # P(y | z)
    expected = (p * conditional[y]).sum(1)  # sum_z P(y_i | z) theta_z(x_i)
    return float(expected.clamp_min(1e-300).log().mean())


def nce(source_probs: Tensor, labels: Tensor) -> float:
    """NCE: ``-H(Y | Z)`` with ``Z`` the source model's hard predictions ``argmax theta(x)``.

    Example::

        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.6, 0.4]])
        >>> round(nce(probs, torch.tensor([0, 0, 1, 1])), 4)  # 0.5 log(2/3) + 0.25 log(1/3)
        -0.4774
    """
    p = _check(source_probs, labels, name="source_probs")[0]
    hard = torch.nn.functional.one_hot(p.argmax(1), p.shape[1]).to(torch.float64)
    _, _, joint = _joint(hard, labels)
    marginal = joint.sum(0, keepdim=True)
    mask = joint > 0
    return float((joint[mask] * (joint / marginal.clamp_min(1e-300))[mask].log()).sum())
