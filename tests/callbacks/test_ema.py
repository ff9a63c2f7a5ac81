"""EMA beside the fine-tuning policies: the exact average, validation and checkpoints on it, lrs untouched,
combinations that cannot hold refused."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging
from tinymodels import ForeignModule, LRRecorder, flat_params, trainer
from torch.optim import lr_scheduler as S

from lt_finetune.callbacks import EMA, LPFT, GradualUnfreeze, LayerwiseLR


class ParamsAfterStep(pl.Callback):
    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.params.append(flat_params(pl_module))


class ValModule(ForeignModule):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.validated: list[torch.Tensor] = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.validated.append(flat_params(self))

    def val_dataloader(self) -> Any:
        return self.train_dataloader()


def _policies() -> list[pl.Callback]:
    return [GradualUnfreeze(every_n_steps=3, warmup_steps=2), LayerwiseLR(decay=0.6)]


def _cosine(opt: torch.optim.Optimizer) -> S.LRScheduler:
    return S.CosineAnnealingLR(opt, T_max=12, eta_min=1e-3)


def test_average_is_the_exact_ema_and_lrs_are_untouched(tmp_path: Any) -> None:
    decay = 0.7
    plain_rec = LRRecorder()
    trainer(tmp_path / "plain", [*_policies(), plain_rec]).fit(ForeignModule(scheduler=_cosine))
    spy, rec = ParamsAfterStep(), LRRecorder()
    model = ForeignModule(scheduler=_cosine)
    trainer(tmp_path / "ema", [*_policies(), spy, rec, EMA(decay=decay, update_starting_at_step=2)]).fit(model)
    assert rec.lrs == plain_rec.lrs  # scheduler x factor x warm-up, step for step
    expected = spy.params[2].clone()  # the first update (0-based step 2) copies the weights
    for params in spy.params[3:]:
        expected = decay * expected + (1 - decay) * params
    # use_buffers averages BatchNorm statistics too; compare the parameters.
    assert torch.allclose(flat_params(model), expected, atol=1e-6)
    assert not torch.allclose(flat_params(model), spy.params[-1])


def test_validation_and_checkpoints_use_the_average(tmp_path: Any) -> None:
    spy = ParamsAfterStep()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    model = ValModule(scheduler=_cosine)
    fit = trainer(tmp_path, [*_policies(), spy, EMA(decay=0.5), ckpt], enable_checkpointing=True, max_epochs=2)
    fit.fit(model)
    assert torch.equal(model.validated[-1], flat_params(model))  # the last validation ran on the final average
    assert not torch.equal(model.validated[-1], spy.params[-1])
    saved = torch.load(tmp_path / "ckpt" / "epoch=1.ckpt", weights_only=False)
    averaged = torch.cat([saved["state_dict"][n].reshape(-1) for n, _ in model.named_parameters()])
    current = torch.cat([saved["current_model_state"][n].reshape(-1) for n, _ in model.named_parameters()])
    assert torch.equal(averaged, flat_params(model)) and torch.equal(current, spy.params[-1])


def test_two_averaging_callbacks_are_refused(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="average its weights once; found EMA, EMA"):
        trainer(tmp_path, [EMA(decay=0.5), EMA(decay=0.9)]).fit(ForeignModule())


@pytest.mark.parametrize("ours", [EMA, LPFT])
def test_lightning_swa_beside_the_policies_is_refused(tmp_path: Any, ours: type) -> None:
    callbacks = [LayerwiseLR(decay=0.5), StochasticWeightAveraging(swa_lrs=0.01)]
    callbacks.insert(0, EMA() if ours is EMA else LPFT(probe_steps=2))
    expected = "found EMA, StochasticWeightAveraging" if ours is EMA else "SWALR overwrites the learning rates"
    with pytest.raises(ValueError, match=expected):
        trainer(tmp_path, callbacks).fit(ForeignModule())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"Expected `decay` to be in \[0.0, 1.0\), got 1.0"):
        EMA(decay=1.0)
    with pytest.raises(ValueError, match="`update_every_n_steps` to be an int >= 1"):
        EMA(update_every_n_steps=0)
