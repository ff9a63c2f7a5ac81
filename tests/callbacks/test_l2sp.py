"""L2SP: the penalty's value, its pull towards θ₀ in a fit, θ₀ kept across resume, frozen groups left out."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tinymodels import ForeignModule, TermsModule, flat_params, trainer

from lt_finetune.callbacks import L2SP, FreezeBackbone
from lt_finetune.snapshot import pretrained_snapshot


def _distance(model: TermsModule, theta0: dict[str, torch.Tensor]) -> float:
    return sum(float((p.detach() - theta0[n]).pow(2).sum()) for n, p in model.backbone.named_parameters())


def test_penalty_is_alpha_half_distance_plus_beta_half_head_norm() -> None:
    model = TermsModule()
    theta0 = pretrained_snapshot(model)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.1)
    head = sum(float(p.pow(2).sum()) for p in model.head.parameters())
    expected = 0.5 * 0.3 * _distance(model, dict(theta0)) + 0.5 * 0.2 * head
    assert float(L2SP(alpha=0.3, beta=0.2).penalty(model)) == pytest.approx(expected, rel=1e-5)


def test_fit_stays_closer_to_the_pretrained_weights(tmp_path: Any) -> None:
    distances = {}
    for alpha in (0.0, 5.0):
        model = TermsModule(optimizer="adamw", lr=0.05)
        theta0 = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
        trainer(tmp_path / str(alpha), [L2SP(alpha=alpha, beta=0.0)]).fit(model)
        distances[alpha] = _distance(model, theta0)
    assert distances[5.0] < 0.5 * distances[0.0]


def test_resumed_fit_pulls_towards_the_pretrained_start_not_the_resume_point(tmp_path: Any) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    first = TermsModule()
    theta0 = {n: p.detach().clone() for n, p in first.backbone.named_parameters()}
    full = TermsModule()
    trainer(tmp_path / "full", [L2SP(alpha=1.0)], enable_checkpointing=False).fit(full)
    trainer(tmp_path / "a", [L2SP(alpha=1.0), ckpt], enable_checkpointing=True).fit(first)
    resumed = TermsModule()
    with torch.no_grad():  # weights unlike θ₀: a snapshot taken now would be wrong
        for p in resumed.backbone.parameters():
            p.mul_(-3.0)
    trainer(tmp_path / "b", [L2SP(alpha=1.0)]).fit(resumed, ckpt_path=tmp_path / "ckpt" / "step=4.ckpt")
    snapshot = pretrained_snapshot(resumed)
    assert all(torch.equal(snapshot[n], theta0[n]) for n in theta0)
    assert torch.equal(flat_params(resumed), flat_params(full))


def test_frozen_groups_are_left_out_of_the_penalty(tmp_path: Any) -> None:
    callback = L2SP(alpha=1.0)
    seen: list[set[str]] = []

    class Spy(TermsModule):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            seen.append(set(callback.backbone_parameters(self)))
            return super().training_step(batch, batch_idx)

    trainer(tmp_path, [FreezeBackbone(groups=["0"]), callback], max_epochs=1).fit(Spy())
    assert seen and all("0.weight" not in names and "3.weight" in names for names in seen)


def test_module_without_loss_terms_is_refused(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=r"ForeignModule does not take loss terms.*LossTermsMixin"):
        trainer(tmp_path, [L2SP()]).fit(ForeignModule())


def test_step_that_never_applies_the_terms_is_refused(tmp_path: Any) -> None:
    class Forgetful(TermsModule):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return ForeignModule.training_step(self, batch, batch_idx)

    with pytest.raises(ValueError, match=r"never applied.*Forgetful.training_step does not call apply_loss_terms"):
        trainer(tmp_path, [L2SP()]).fit(Forgetful())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"Expected `alpha` to be in \[0.0, inf\), got -1.0"):
        L2SP(alpha=-1.0)
    with pytest.raises(TypeError, match="`beta` to be a float"):
        L2SP(beta="0.1")  # type: ignore[arg-type]
