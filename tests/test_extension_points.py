"""The extension points later techniques build on: loss terms, extra trainable modules, the pretrained snapshot
and batches beyond ``(x, y)``, on TransferModule and on a foreign LightningModule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from extending import FeatureNormPenalty
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import CombinedLoader
from tinymodels import ForeignModule, TermsModule, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lt_finetune import TransferModule
from lt_finetune.callbacks import FreezeBackbone, LayerwiseLR
from lt_finetune.extras import add_trainable_module, remove_trainable_module, trainable_modules
from lt_finetune.loss_terms import StepOutputs, split_batch
from lt_finetune.snapshot import CHECKPOINT_KEY, pretrained_snapshot


def _tiny_transfer(**kwargs: Any) -> TransferModule:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())
    return TransferModule(backbone, num_classes=3, input_size=(3, 12, 12), **kwargs)  # type: ignore[arg-type]


def _images(n: int = 32, seed: int = 0, labels: bool = True) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 12, 12, generator=g)
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=g)) if labels else TensorDataset(x)


class _Discriminate(pl.Callback):
    """A domain-classifier loss on source vs target features, through an extra trainable module."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        torch.manual_seed(1)
        self.discriminator = add_trainable_module(pl_module, "discriminator", nn.Linear(8, 1))
        pl_module.add_loss_term("domain", self.term)

    def term(self, out: StepOutputs) -> torch.Tensor:
        target = out.streams["target"]
        self.seen.append((len(out.features), len(target.features)))
        logits = self.discriminator(torch.cat([out.features, target.features])).squeeze(-1)
        labels = torch.cat([torch.ones(len(out.features)), torch.zeros(len(target.features))])
        return nn.functional.binary_cross_entropy_with_logits(logits.float(), labels)

    def teardown(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        pl_module.remove_loss_term("domain")


def _combined(batch_source: int = 8, batch_target: int = 4) -> CombinedLoader:
    source = DataLoader(_images(32), batch_size=batch_source)
    target = DataLoader(_images(12, seed=1, labels=False), batch_size=batch_target)
    return CombinedLoader({"source": source, "target": target}, "max_size_cycle")


def test_loss_terms_are_added_and_logged_each_under_its_name(tmp_path: Path) -> None:
    model = _tiny_transfer()
    fit = trainer(tmp_path, [FeatureNormPenalty(weight=0.1)], max_epochs=1)
    fit.fit(model, DataLoader(_images(), batch_size=8))
    metrics = fit.callback_metrics
    assert float(metrics["train/loss_feature_norm"]) > 0
    total = float(metrics["train/loss_task"]) + float(metrics["train/loss_feature_norm"])
    assert float(metrics["train/loss_epoch"]) == pytest.approx(total, rel=1e-5)
    assert model.loss_terms == {}  # the callback removed its term in teardown


def test_loss_term_under_bf16_autocast(tmp_path: Path) -> None:
    model = _tiny_transfer()
    fit = trainer(tmp_path, [FeatureNormPenalty(weight=0.1)], max_epochs=1, precision="bf16-mixed")
    fit.fit(model, DataLoader(_images(), batch_size=8))
    assert torch.isfinite(fit.callback_metrics["train/loss_feature_norm"])


def test_a_module_without_the_mixin_is_told_what_to_add(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"must inherit lt_finetune\.loss_terms\.LossTermsMixin"):
        trainer(tmp_path, [FeatureNormPenalty()]).fit(ForeignModule())


def test_foreign_module_gets_loss_terms_through_the_mixin(tmp_path: Path) -> None:
    with_term, without = TermsModule(), TermsModule()
    trainer(tmp_path, [FeatureNormPenalty(weight=1.0)], max_epochs=1).fit(with_term)
    trainer(tmp_path, [], max_epochs=1).fit(without)
    norm = [m.backbone(torch.randn(64, 8, generator=torch.Generator().manual_seed(0))).pow(2).sum(1).mean()
            for m in (with_term, without)]  # fmt: skip
    assert with_term.loss_term_calls == 4 and norm[0] < norm[1]  # the penalty shrank the features


def test_combined_loader_streams_extra_module_and_its_param_group(tmp_path: Path) -> None:
    model = _tiny_transfer(weight_decay=0.0)
    callback = _Discriminate()
    fit = trainer(tmp_path, [callback, LayerwiseLR(decay=0.5, multipliers={"head": 3.0})], max_epochs=1)
    fit.fit(model, train_dataloaders=_combined())
    # Every step saw the labelled batch and the target batch, through one forward pass.
    assert callback.seen == [(8, 4)] * 4
    groups = {g["name"]: g for g in fit.optimizers[0].param_groups}
    assert list(groups)[-2:] == ["head", "discriminator"] and groups["discriminator"]["layer_group"] == "discriminator"
    # LayerwiseLR's head multiplier is not applied to the discriminator.
    assert groups["head"]["lr"] == pytest.approx(3 * groups["discriminator"]["lr"])
    assert list(trainable_modules(model)) == ["discriminator"]
    assert any(k.startswith("extra_modules.discriminator.") for k in model.state_dict())


def test_extra_module_is_trained_saved_and_optional_when_loading(tmp_path: Path) -> None:
    model = _tiny_transfer()
    callback = _Discriminate()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    fit = trainer(tmp_path, [callback, ckpt], max_epochs=1, enable_checkpointing=True)
    torch.manual_seed(1)  # the discriminator's initial weights, as _Discriminate draws them
    start = nn.Linear(8, 1).weight.detach().clone()
    fit.fit(model, train_dataloaders=_combined())
    assert not torch.equal(callback.discriminator.weight.detach(), start)  # trained through the loss term
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(state["extra_modules.discriminator.weight"], callback.discriminator.weight.detach())
    # For inference the discriminator is not needed: the checkpoint loads into a plain model.
    plain = _tiny_transfer()
    plain.load_state_dict(model.state_dict(), strict=False)
    reloaded = TransferModule.load_from_checkpoint(tmp_path / "last.ckpt", backbone=plain.backbone)
    assert trainable_modules(reloaded) == {}
    x = torch.randn(2, 3, 12, 12)
    assert torch.allclose(reloaded.eval()(x), model.eval()(x))


def test_extra_modules_in_a_foreign_optimizer(tmp_path: Path) -> None:
    model = TermsModule()
    add_trainable_module(model, "adapter", nn.Linear(16, 16))
    model.add_loss_term("adapter", lambda out: model.extra_modules.adapter(out.features).pow(2).mean())
    fit = trainer(tmp_path, [FreezeBackbone(unfreeze_at_epoch=1)], max_epochs=2)
    fit.fit(model)
    assert [g["layer_group"] for g in fit.optimizers[0].param_groups] == ["0", "1", "3", "5", "head", "adapter"]
    assert remove_trainable_module(model, "adapter") is not None and trainable_modules(model) == {}


def test_extra_module_names_are_checked() -> None:
    model = ForeignModule()
    with pytest.raises(ValueError, match="identifier other than 'head'"):
        add_trainable_module(model, "head", nn.Linear(2, 2))
    first = add_trainable_module(model, "d", nn.Linear(2, 2))
    assert add_trainable_module(model, "d", nn.Linear(2, 2)) is first  # a second fit keeps what was learned
    with pytest.raises(ValueError, match="already has an extra module 'd' of type Linear"):
        add_trainable_module(model, "d", nn.Conv1d(2, 2, 1))


class _UsesSnapshot(pl.Callback):
    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        self.snapshot = pretrained_snapshot(pl_module)


def test_pretrained_snapshot_survives_resume(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    first = ForeignModule()
    theta0 = {n: p.detach().clone() for n, p in first.backbone.named_parameters()}
    user = _UsesSnapshot()
    trainer(tmp_path, [user, FreezeBackbone(unfreeze_at_step=1), ckpt], enable_checkpointing=True).fit(first)
    assert all(torch.equal(user.snapshot[n], theta0[n]) for n in theta0)
    saved = torch.load(tmp_path / "ckpt" / "step=6.ckpt", weights_only=False)
    assert set(saved[CHECKPOINT_KEY]["backbone"]) == set(theta0)
    # Resume into a model whose weights differ from θ₀: the snapshot is the checkpoint's, not the resume-time one.
    resumed = ForeignModule()
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)
    again = _UsesSnapshot()
    trainer(tmp_path, [again, FreezeBackbone(unfreeze_at_step=1)]).fit(
        resumed, ckpt_path=tmp_path / "ckpt" / "step=6.ckpt"
    )
    assert again.snapshot is pretrained_snapshot(resumed)
    assert all(torch.equal(again.snapshot[n], theta0[n]) for n in theta0)


def test_snapshot_stays_on_the_cpu_with_one_device_copy_on_request() -> None:
    model = ForeignModule()
    snapshot = pretrained_snapshot(model)
    assert all(t.device.type == "cpu" for t in snapshot.values())
    assert snapshot.to("meta") is snapshot.to("meta")  # cached per device
    assert repr(snapshot) == "PretrainedSnapshot(8 tensors, 720 values)"


def test_three_tuple_batches_train(tmp_path: Path) -> None:
    model = _tiny_transfer()
    data = _images()
    indexed = TensorDataset(*data.tensors, torch.arange(len(data)))
    trainer(tmp_path, [], max_epochs=1).fit(model, DataLoader(indexed, batch_size=8))
    x, y, streams = split_batch((torch.zeros(2), torch.ones(2), torch.arange(2)))
    assert streams == {} and torch.equal(y, torch.ones(2))
    with pytest.raises(ValueError, match="labelled stream under 'source'"):
        split_batch({"labelled": (x, y)})
