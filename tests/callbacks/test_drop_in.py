"""The callbacks drop into existing Lightning projects: foreign optimizers, TransferModule, accumulation, logging."""

from __future__ import annotations

import csv
import logging
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from tinymodels import ForeignModule, LRRecorder, flat_params, tiny_data, trainer
from torch.optim import lr_scheduler as S

from lt_finetune import TransferModule
from lt_finetune.callbacks import FreezeBackbone, GradualUnfreeze, LayerwiseLR

ALL = [FreezeBackbone, GradualUnfreeze, LayerwiseLR]


def _make(cls: type) -> pl.Callback:
    return {
        FreezeBackbone: lambda: FreezeBackbone(unfreeze_at_epoch=1),
        GradualUnfreeze: lambda: GradualUnfreeze(every_n_epochs=1),
        LayerwiseLR: lambda: LayerwiseLR(decay=0.5),
    }[cls]()


@pytest.mark.parametrize(
    "scheduler", [None, lambda o: S.StepLR(o, step_size=2, gamma=0.5)], ids=["no_scheduler", "steplr"]
)
@pytest.mark.parametrize("cls", [*ALL, "all"], ids=["FreezeBackbone", "GradualUnfreeze", "LayerwiseLR", "all"])
def test_single_group_optimizer_is_split_and_keeps_its_hyperparameters(
    tmp_path: Any, cls: Any, scheduler: Any, caplog: pytest.LogCaptureFixture
) -> None:
    model = ForeignModule(scheduler=scheduler)
    callbacks = [_make(c) for c in ALL] if cls == "all" else [_make(cls)]
    before = flat_params(model)
    with caplog.at_level(logging.INFO):
        fit = trainer(tmp_path, callbacks, max_epochs=2)
        fit.fit(model)
    opt = fit.optimizers[0]
    assert type(opt) is torch.optim.SGD
    assert [g["layer_group"] for g in opt.param_groups] == ["0", "1", "3", "5", "head"]
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 1e-4 for g in opt.param_groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert [r.getMessage() for r in caplog.records].count(
        "lt_finetune: SGD: split param group 0 into 5 layer groups."
    ) == 1
    assert not torch.equal(before, flat_params(model))


def test_optimizer_over_trainable_params_only_gets_the_frozen_ones_added(tmp_path: Any) -> None:
    """BackboneFinetuning's documented pattern builds the optimizer from requires_grad parameters only."""
    model = ForeignModule(only_trainable=True, scheduler=lambda o: S.LambdaLR(o, lambda s: 0.9**s))
    recorder = LRRecorder()
    fit = trainer(tmp_path, [FreezeBackbone(unfreeze_at_epoch=1), recorder], max_epochs=2)
    fit.fit(model)
    groups = fit.optimizers[0].param_groups
    assert sorted(g["layer_group"] for g in groups) == sorted(["0", "1", "3", "5", "head"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # The added groups follow the scheduler like the original one.
    assert recorder.lrs[5]["0"] == pytest.approx(0.1 * 0.9**5)


def test_transfer_module_optimizer_is_used_as_is(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))
    model = TransferModule("resnet18", num_classes=3)
    with caplog.at_level(logging.INFO):
        fit = trainer(tmp_path, [GradualUnfreeze(every_n_steps=1), LayerwiseLR(decay=0.7)], max_epochs=1)
        fit.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    assert not any("split param group" in r.getMessage() for r in caplog.records)
    names = [g["name"] for g in fit.optimizers[0].param_groups]
    assert names[:2] == ["stem", "stem/no_decay"] and names[-2:] == ["head", "head/no_decay"]
    assert any("unfroze layer4.1" in r.getMessage() for r in caplog.records)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Any) -> None:
    model = ForeignModule(optimizer="adamw")
    recorder = LRRecorder()
    fit = trainer(tmp_path, [GradualUnfreeze(every_n_steps=2), recorder], max_epochs=2, accumulate_grad_batches=2)
    fit.fit(model)
    assert fit.global_step == 4 and len(recorder.trainable) == 4
    sizes = [len(t) for t in recorder.trainable]
    assert sizes == [2, 2, 4, 4]  # head, then head + the top group ("5": weight and bias) from step 2


class _TwoOptimizers(ForeignModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_a, opt_b = self.optimizers()  # type: ignore[misc]
        loss = torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.manual_backward(loss)
        opt_a.step()
        opt_b.step()

    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.backbone.parameters(), lr=0.1), torch.optim.SGD(self.head.parameters(), lr=0.1)]


class _ManualOne(_TwoOptimizers):
    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _AutoTwo(ForeignModule):
    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.backbone.parameters(), lr=0.1), torch.optim.SGD(self.head.parameters(), lr=0.1)]


def test_manual_optimization_and_multiple_optimizers_fail_fast(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="supports automatic optimization only"):
        trainer(tmp_path, [FreezeBackbone()]).fit(_ManualOne())
    with pytest.raises(ValueError, match="supports automatic optimization only"):
        trainer(tmp_path, [LayerwiseLR()]).fit(_TwoOptimizers())
    # Lightning itself refuses several optimizers under automatic optimization, before any step.
    with pytest.raises(RuntimeError, match="multiple optimizers is only supported with manual optimization"):
        trainer(tmp_path, [LayerwiseLR()]).fit(_AutoTwo())


def test_logs_lrs_under_group_names_and_transitions(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    model = ForeignModule(scheduler=lambda o: S.ExponentialLR(o, gamma=0.9))
    recorder = LRRecorder()
    logger = CSVLogger(tmp_path, name="logs")
    callbacks = [GradualUnfreeze(every_n_epochs=1), LayerwiseLR(decay=0.5), recorder, LearningRateMonitor("step")]
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, callbacks, max_epochs=3, logger=logger, log_every_n_steps=1).fit(model)
    messages = [r.getMessage() for r in caplog.records]
    assert "lt_finetune: epoch 1, step 4: unfroze 5 (272 params) at lr 0.0328; 323 trainable." in messages
    assert sum("unfroze" in m for m in messages) == 2  # one line per transition, not per callback or step
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    lr_rows = [r for r in rows if r.get("lr-SGD/head")]
    assert len(lr_rows) == 12
    for step, row in enumerate(lr_rows):
        for group in ("0", "5", "head"):
            assert float(row[f"lr-SGD/{group}"]) == pytest.approx(recorder.lrs[step][group], rel=1e-6, abs=1e-12)
    fractions = [float(r["finetune/trainable_fraction"]) for r in rows if r.get("finetune/trainable_fraction")]
    assert fractions == sorted(fractions) and len(fractions) == 3


def test_tiny_data_is_deterministic() -> None:
    a, b = next(iter(tiny_data())), next(iter(tiny_data()))
    assert torch.equal(a[0], b[0])
