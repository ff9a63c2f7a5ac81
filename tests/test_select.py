"""Transferability scores against their definitions: hand-worked cases, a direct evidence computation for LogME
and the reference fixed-point iteration of its authors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lt_finetune.select import h_score, leep, logme, logme_fit, nce


def _data(n: int = 300, d: int = 16, classes: int = 3, shift: float = 2.0, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, d, generator=g) * shift
    return torch.randn(n, d, generator=g) + centres[labels], labels


def _direct_log_evidence(f: torch.Tensor, t: torch.Tensor, alpha: float, beta: float) -> float:
    """Log evidence of y = F w + noise, w ~ N(0, I/alpha), noise ~ N(0, 1/beta), by the textbook formula."""
    n, d = f.shape
    a = alpha * torch.eye(d, dtype=torch.float64) + beta * f.T @ f
    m = beta * torch.linalg.solve(a, f.T @ t)
    residual = float(((t - f @ m) ** 2).sum())
    return (
        d / 2 * math.log(alpha)
        + n / 2 * math.log(beta)
        - beta / 2 * residual
        - alpha / 2 * float(m @ m)
        - 0.5 * float(torch.logdet(a))
        - n / 2 * math.log(2 * math.pi)
    )


def test_logme_is_the_maximised_evidence() -> None:
    features, labels = _data()
    fit = logme_fit(features, labels)
    f = features.to(torch.float64)
    for c in range(3):
        t = (labels == c).to(torch.float64)
        alpha, beta = float(fit.alpha[c]), float(fit.beta[c])
        best = _direct_log_evidence(f, t, alpha, beta)
        assert float(fit.evidence[c]) * len(f) == pytest.approx(best, rel=1e-8)
        for a_scale, b_scale in ((1.1, 1.0), (0.9, 1.0), (1.0, 1.1), (1.0, 0.9)):
            assert _direct_log_evidence(f, t, alpha * a_scale, beta * b_scale) < best


def _reference_logme(f: np.ndarray, y: np.ndarray) -> float:
    # The authors' published fixed-point iteration (LogME.py, each_evidence), transcribed.
    f = f.astype(np.float64)
    fh = f
    f = f.transpose()
    d, n = f.shape
    v, s, vh = np.linalg.svd(f @ fh, full_matrices=True)
    evidences = []
    for c in range(int(y.max()) + 1):
        y_ = (y == c).astype(np.float64)
        alpha, beta, lam = 1.0, 1.0, 1.0
        tmp = vh @ (f @ y_)
        for _ in range(11):
            gamma = (s / (s + lam)).sum()
            m = v @ (tmp * beta / (alpha + beta * s))
            alpha_de = (m * m).sum()
            alpha = gamma / (alpha_de + 1e-5)
            beta_de = ((y_ - fh @ m) ** 2).sum()
            beta = (n - gamma) / (beta_de + 1e-5)
            new_lam = alpha / beta
            if np.abs(new_lam - lam) / lam < 0.01:
                break
            lam = new_lam
        evidence = (
            d / 2.0 * np.log(alpha)
            + n / 2.0 * np.log(beta)
            - 0.5 * np.sum(np.log(alpha + beta * s))
            - beta / 2.0 * beta_de
            - alpha / 2.0 * alpha_de
            - n / 2.0 * np.log(2 * np.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


@pytest.mark.parametrize("seed", [0, 1])
def test_logme_agrees_with_the_reference_iteration(seed: int) -> None:
    features, labels = _data(seed=seed)
    # The reference stops at a 1% change of alpha/beta; ours runs to convergence: agreement to that tolerance.
    assert logme(features, labels) == pytest.approx(_reference_logme(features.numpy(), labels.numpy()), abs=2e-3)


def test_scores_rank_separable_features_above_noise() -> None:
    good, labels = _data(shift=3.0)
    noise, _ = _data(shift=0.0, seed=5)
    assert logme(good, labels) > logme(noise, labels)
    assert h_score(good, labels) > h_score(noise, labels)


def test_h_score_hand_case_and_invariance() -> None:
    f = torch.tensor([[0.0], [2.0], [10.0], [12.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert h_score(f, y) == pytest.approx(25 / 26)
    assert h_score(3 * f + 7, y) == pytest.approx(25 / 26)  # affine-invariant


def test_leep_and_nce_hand_cases() -> None:
    y = torch.tensor([0, 0, 1, 1])
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.1, 0.9]])
    assert leep(probs, y) == pytest.approx((math.log(0.78) + math.log(0.71)) / 2)
    assert nce(probs, y) == pytest.approx(0.0)  # hard predictions determine the label
    mixed = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.6, 0.4]])
    assert nce(mixed, y) == pytest.approx(0.5 * math.log(2 / 3) + 0.25 * math.log(1 / 3))
    # A source model that knows nothing: uniform predictions give LEEP = log of the label prior.
    assert leep(torch.full((4, 2), 0.5), y) == pytest.approx(math.log(0.5))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: logme(torch.zeros(4), torch.zeros(4).long()), ValueError, "2-D tensor"),
        (lambda: logme(torch.zeros(4, 2), torch.zeros(3).long()), ValueError, "one label per row"),
        (lambda: h_score(torch.zeros(4, 2), torch.zeros(4)), TypeError, "integer class indices"),
        (lambda: leep(torch.ones(4, 2), torch.zeros(4).long()), ValueError, "probabilities"),
    ],
)
def test_bad_inputs(call: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()  # type: ignore[operator]
