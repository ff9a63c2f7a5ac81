"""DomainAdapt under a Trainer: every method trains on TransferModule and on a foreign module, the ramp follows the
trainer's step, AdaBN restores the source statistics, the selection score is logged and monitorable, bf16 works,
bad input fails before the first step, and 2-process DDP keeps the replicas (discriminator included) identical."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tinymodels import DomainModule, ForeignModule, TermsModule, flat_params, trainer
from torch import nn
from torch.utils.data import TensorDataset

from lt_finetune import TransferModule
from lt_finetune.callbacks import DomainAdapt, FreezeBackbone, GradualUnfreeze, LayerwiseLR
from lt_finetune.data import DomainAdaptDataModule
from lt_finetune.domain import dann_coefficient

SCRIPT = Path(__file__).parents[1] / "scripts" / "ddp_domain_fit.py"


def _model() -> TransferModule:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())
    return TransferModule(backbone, num_classes=3, input_size=(3, 10, 10), lr=1e-2)  # type: ignore[arg-type]


def _data(target_labels: bool = True, **kwargs: Any) -> DomainAdaptDataModule:
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(40, 3, 10, 10, generator=g)
    ys = torch.randint(0, 3, (40,), generator=g)
    xt = torch.randn(24, 3, 10, 10, generator=g) * 2 + 1  # another domain
    target = TensorDataset(xt, torch.randint(0, 3, (24,), generator=g)) if target_labels else TensorDataset(xt)
    return DomainAdaptDataModule(TensorDataset(xs, ys), target, batch_size=8, **kwargs)


class _Coefficients(pl.Callback):
    def __init__(self, callback: DomainAdapt) -> None:
        self.callback = callback
        self.seen: list[tuple[int, float]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        self.seen.append((trainer.global_step, self.callback.coefficient))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "dann"},
        {"method": "cdan", "entropy": True},
        {"method": "mcc"},
        {"method": "mmd"},
        {"method": "coral"},
    ],
    ids=["dann", "cdan_e", "mcc", "mmd", "coral"],
)
def test_every_method_trains_and_logs_the_label_free_score(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    callback = DomainAdapt(hidden=16, adabn=True, **kwargs)
    fit = trainer(tmp_path, [callback], max_epochs=2, num_sanity_val_steps=0)
    model = _model()
    fit.fit(model, _data())
    m = fit.callback_metrics
    assert torch.isfinite(m["train/loss_domain"]) and float(m["train/loss_domain"]) != 0.0
    assert 0.0 <= float(m["val/da_score"]) <= 1.0
    im = float(m["val/target_im"]) / math.log(3)
    assert float(m["val/da_score"]) == pytest.approx(0.5 * (float(m["val/source_acc"]) + im), rel=1e-5)
    assert "val/target_acc" in m and "val/target_snd" in m
    names = [g["name"] for g in fit.optimizers[0].param_groups]
    assert ("discriminator" in names) == (kwargs["method"] in ("dann", "cdan"))
    assert model.loss_terms == {}  # removed at teardown
    fit.test(model, _data())
    assert "test/target_acc" in fit.callback_metrics


def test_reversal_coefficient_follows_the_ramp_over_the_trainers_steps(tmp_path: Path) -> None:
    callback = DomainAdapt(method="dann", hidden=8, gamma=5.0)
    probe = _Coefficients(callback)
    trainer(tmp_path, [callback, probe], max_epochs=2, num_sanity_val_steps=0).fit(_model(), _data())
    total = 2 * 5  # 36 source items in batches of 8, 2 epochs
    assert [s for s, _ in probe.seen] == list(range(total))
    assert [c for _, c in probe.seen] == [dann_coefficient(s / total, 5.0) for s in range(total)]


def test_adabn_evaluates_with_target_statistics_and_restores_the_source_ones(tmp_path: Path) -> None:
    model = _model()
    trainer(tmp_path, [DomainAdapt(method="none")], max_epochs=1).fit(model, _data(stream_target=False))
    bn = model.backbone[1]
    source_stats = bn.running_mean.clone()
    results = {}
    for adabn in (False, True):
        fit = trainer(tmp_path, [DomainAdapt(method="none", adabn=adabn)])
        results[adabn] = fit.validate(model, _data(), verbose=False)[0]
        assert torch.equal(bn.running_mean, source_stats)  # evaluation on target left the model as it was
    assert results[True]["val/source_acc"] == results[False]["val/source_acc"]  # source evaluated with source stats
    assert results[True]["val/target_im"] != results[False]["val/target_im"]


def test_model_checkpoint_monitors_the_selection_score(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/da_score", mode="max")
    fit = trainer(tmp_path, [DomainAdapt(method="mmd"), ckpt], max_epochs=2, enable_checkpointing=True)
    fit.fit(_model(), _data(target_labels=False))
    assert ckpt.best_model_score is not None and Path(ckpt.best_model_path).exists()
    assert "val/target_acc" not in fit.callback_metrics  # unlabelled target: nothing to report


def test_bf16_mixed_on_cpu(tmp_path: Path) -> None:
    for method in ("dann", "cdan", "mmd", "coral", "mcc"):
        fit = trainer(tmp_path, [DomainAdapt(method=method, hidden=8)], max_epochs=1, precision="bf16-mixed")  # type: ignore[arg-type]
        fit.fit(_model(), _data())
        assert torch.isfinite(fit.callback_metrics["train/loss_domain"]), method


def test_composes_with_freezing_and_layerwise_lr(tmp_path: Path) -> None:
    callbacks = [
        FreezeBackbone(groups=["0"]),
        GradualUnfreeze(every_n_steps=2),
        LayerwiseLR(decay=0.5, multipliers={"head": 2.0}),
        DomainAdapt(method="cdan", hidden=8),
    ]
    model = _model()
    start = flat_params(model.backbone[0])
    fit = trainer(tmp_path, callbacks, max_epochs=1, num_sanity_val_steps=0)
    fit.fit(model, _data())
    groups = {g["name"]: g for g in fit.optimizers[0].param_groups}
    assert [n for n in groups if n.startswith("discriminator")] == ["discriminator", "discriminator/no_decay"]
    assert groups["head"]["lr"] == pytest.approx(2 * groups["discriminator"]["lr"])
    assert torch.equal(flat_params(model.backbone[0]), start)  # frozen by FreezeBackbone despite the domain loss
    assert "extra_modules.discriminator.discriminator.net.0.weight" in model.state_dict()


def test_foreign_module_through_the_mixin(tmp_path: Path) -> None:
    model = DomainModule()
    callback = DomainAdapt(method="dann", hidden=8)
    trainer(tmp_path, [callback], max_epochs=1).fit(model)
    assert model.extra_modules.discriminator.in_features == 16  # found from the head's nn.Linear


def test_bad_input_is_refused_before_the_first_step(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Expected `method` to be one of \['dann', 'cdan'"):
        DomainAdapt(method="adda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`entropy` to be False unless method='cdan'"):
        DomainAdapt(method="dann", entropy=True)
    # No target data in the training batches.
    model = _model()
    before = flat_params(model)
    with pytest.raises(ValueError, match="found no target data in the training batches"):
        trainer(tmp_path, [DomainAdapt(method="mmd")]).fit(model, _data(stream_target=False))
    assert torch.equal(flat_params(model), before)
    # A module without the loss-term hook.
    with pytest.raises(TypeError, match=r"must inherit lt_finetune\.loss_terms\.LossTermsMixin"):
        trainer(tmp_path, [DomainAdapt(method="dann")]).fit(ForeignModule())
    # A module whose feature size cannot be found, and one that contradicts `in_features`.
    headless = TermsModule()
    headless.head = nn.Sequential(nn.ReLU())  # type: ignore[assignment]
    with pytest.raises(ValueError, match="cannot tell the feature size of TermsModule"):
        trainer(tmp_path, [DomainAdapt(method="dann")]).fit(headless)
    with pytest.raises(ValueError, match=r"in_features=32\) does not match TransferModule, whose features have 8"):
        trainer(tmp_path, [DomainAdapt(method="dann", in_features=32)]).fit(_model(), _data())


def test_the_target_stream_carries_no_labels() -> None:
    data = _data()
    data.setup("fit")
    batch, *_ = next(iter(data.train_dataloader()))
    assert isinstance(batch["target"], torch.Tensor)  # inputs only
    assert data.target_dataloader("val") is not None and data.val_dataloader() is not None


@pytest.mark.ddp
def test_ddp_replicas_stay_identical_discriminator_included(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["steps"] == r1["steps"] > 0
    assert (r0["params"] - r1["params"]).abs().max().item() <= 1e-6
    assert r0["discriminator_moved"] > 0.0
    assert torch.equal(r0["discriminator"], r1["discriminator"])
    assert r0["coefficients"] == r1["coefficients"] and r0["coefficients"][-1] > 0.0
