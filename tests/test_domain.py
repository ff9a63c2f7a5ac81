"""The domain-adaptation building blocks, without a Trainer: reversal, discriminators, losses, AdaBN, selection."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lt_finetune.domain import (
    ConditionalDomainDiscriminator,
    DomainDiscriminator,
    GradientReversal,
    coral_loss,
    dann_coefficient,
    domain_adversarial_loss,
    entropy_weights,
    gradient_reversal,
    information_maximization,
    mcc_loss,
    mmd_loss,
    multilinear_map,
    selection_score,
    soft_neighborhood_density,
    target_batchnorm,
)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_gradient_reversal_flips_and_scales_the_gradient_only() -> None:
    x = _randn(5, 3).requires_grad_()
    w = _randn(3, seed=1)
    y = gradient_reversal(x, 0.3)
    assert torch.equal(y, x)
    (y @ w).sum().backward()
    assert torch.allclose(x.grad, -0.3 * w.expand(5, 3))
    layer = GradientReversal(2.0)
    z = _randn(2, 3).requires_grad_()
    layer(z).sum().backward()
    assert torch.equal(z.grad, torch.full((2, 3), -2.0))


def test_dann_ramp() -> None:
    assert dann_coefficient(0.0) == 0.0
    assert dann_coefficient(0.25) == pytest.approx(2 / (1 + math.exp(-2.5)) - 1)
    assert dann_coefficient(2.0) == dann_coefficient(1.0)  # clipped
    values = [dann_coefficient(p / 10) for p in range(11)]
    assert values == sorted(values) and values[-1] < 1.0


def test_discriminator_outputs_logits_and_refuses_wrong_feature_sizes() -> None:
    d = DomainDiscriminator(6, hidden=4)
    assert d(_randn(3, 6)).shape == (3,)
    with pytest.raises(ValueError, match=r"expects inputs of shape \[B, 6\], got \[3, 5\]"):
        d(_randn(3, 5))


def test_conditional_discriminator_multilinear_and_randomized() -> None:
    f, p = _randn(4, 3), torch.softmax(_randn(4, 2, seed=1), 1)
    small = ConditionalDomainDiscriminator(3, 2, hidden=4)
    h = small.condition(f, p)
    assert not small.randomized and torch.allclose(h.view(4, 2, 3), p[:, :, None] * f[:, None, :])
    assert torch.allclose(multilinear_map(f, p), h)
    big = ConditionalDomainDiscriminator(3, 2, hidden=4, max_multilinear=4, randomized_dim=16, seed=3)
    again = ConditionalDomainDiscriminator(3, 2, hidden=4, max_multilinear=4, randomized_dim=16, seed=3)
    assert big.randomized and big.condition(f, p).shape == (4, 16)
    assert torch.equal(big.condition(f, p), again.condition(f, p))  # same random map on every rank and resume
    assert "r_features" in big.state_dict()
    with pytest.raises(ValueError, match="class probabilities"):
        small(f, torch.softmax(_randn(4, 5), 1))


def test_adversarial_loss_is_bce_with_logits_in_float32() -> None:
    s, t = _randn(6).bfloat16(), _randn(4, seed=1).bfloat16()
    loss = domain_adversarial_loss(s, t)
    expected = 0.5 * (
        nn.functional.binary_cross_entropy_with_logits(s.float(), torch.ones(6))
        + nn.functional.binary_cross_entropy_with_logits(t.float(), torch.zeros(4))
    )
    assert loss.dtype == torch.float32 and torch.allclose(loss, expected)
    # Saturated logits stay finite (a sigmoid + BCE would give inf/NaN here).
    assert torch.isfinite(domain_adversarial_loss(torch.full((2,), -200.0), torch.full((2,), 200.0)))
    w = entropy_weights(torch.softmax(_randn(6, 3), 1))
    assert w.mean().item() == pytest.approx(1.0) and not w.requires_grad


def test_mmd() -> None:
    x = _randn(64, 5)
    assert mmd_loss(x, x).abs().item() < 1e-6
    near, far = mmd_loss(x, _randn(48, 5, seed=1)), mmd_loss(x, _randn(48, 5, seed=1) + 2)
    assert 0 <= near.item() < far.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = mmd_loss(x.bfloat16(), (_randn(48, 5, seed=1) + 2).bfloat16())
    assert half.dtype == torch.float32 and half.item() == pytest.approx(far.item(), rel=0.05)
    with pytest.raises(ValueError, match=r"\[N, D\] and \[M, D\]"):
        mmd_loss(x, _randn(8, 4))


def test_coral_matches_the_paper_formula() -> None:
    s, t = _randn(100, 4), _randn(80, 4, seed=1) * 2
    cs, ct = torch.cov(s.T), torch.cov(t.T)
    assert coral_loss(s, t).item() == pytest.approx(((cs - ct) ** 2).sum().item() / (4 * 16), rel=1e-5)
    assert coral_loss(s, s + 5).abs().item() < 1e-6  # a shift of the mean does not change covariances
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert coral_loss(s.bfloat16(), t.bfloat16()).dtype == torch.float32


def test_mcc_penalises_confusion_and_has_gradients() -> None:
    assert mcc_loss(torch.eye(5) * 100).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.zeros(8, 4, requires_grad=True)
    loss = mcc_loss(logits)
    assert loss.item() == pytest.approx(3 / 4, rel=1e-5)  # uniform predictions: each row spreads 3/4 off-diagonal
    loss.backward()
    assert logits.grad is not None


def test_label_free_scores() -> None:
    c = 4
    confident_diverse = torch.eye(c).repeat(3, 1) * 20
    collapsed = torch.zeros(12, c)
    collapsed[:, 0] = 20
    assert information_maximization(confident_diverse).item() == pytest.approx(math.log(c), rel=1e-4)
    assert information_maximization(collapsed).item() == pytest.approx(0.0, abs=1e-4)
    assert selection_score(0.8, confident_diverse) == pytest.approx(0.9, rel=1e-4)
    assert selection_score(0.8, collapsed) == pytest.approx(0.4, abs=1e-4)
    # SND is the mean entropy over neighbours: in [0, log(N - 1)], at its maximum when every prediction is alike
    # (it rewards collapse, which is why the selection rule uses information maximization).
    random = soft_neighborhood_density(_randn(12, c)).item()
    assert 0 < random < soft_neighborhood_density(collapsed).item() == pytest.approx(math.log(11), rel=1e-4)


def test_adabn_uses_exact_target_statistics_then_restores_the_source_ones() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.9))
    net.train()
    net(_randn(32, 3))  # source statistics
    before = (net[1].running_mean.clone(), net[1].running_var.clone(), net[1].momentum)
    net.eval()
    target = [_randn(16, 3, seed=1) * 3 + 1, (_randn(16, 3, seed=2) * 3 + 1, torch.zeros(16))]
    with target_batchnorm(net, target) as used:
        assert used == 2
        hidden = [net[0](target[0]), net[0](target[1][0])]
        # The plain average over the batches (momentum=None), not a running average dominated by the last batch.
        assert torch.allclose(net[1].running_mean, torch.cat(hidden).mean(0), atol=1e-5)
        assert torch.allclose(net[1].running_var, (hidden[0].var(0) + hidden[1].var(0)) / 2, atol=1e-4)
        assert not net.training and not net[2].training  # dropout stays off
    assert torch.equal(net[1].running_mean, before[0]) and torch.equal(net[1].running_var, before[1])
    assert net[1].momentum == before[2] and not net[1].training
