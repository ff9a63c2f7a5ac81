"""TransferModule: real pretrained weights on real data, the optimizer contract, checkpoints, tasks."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torchmetrics.classification import Accuracy, F1Score

from lt_finetune import TransferModule
from lt_finetune.data import AnimalMNISTDataModule
from lt_finetune.groups import layer_groups
from lt_finetune.module import WarmupCosine


def _trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("logger", False)
    return pl.Trainer(
        accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False, **kwargs
    )


def test_short_fit_on_real_data_learns_and_reloads_offline(
    tmp_path: Path, mobilenet_v2_weights: Path, animal_mnist: None
) -> None:
    pl.seed_everything(0)
    weights = tmp_path / "mobilenet_v2.pth"
    shutil.copyfile(mobilenet_v2_weights, weights)
    # Batch 50 divides every split: one input shape for training and one for evaluation (each new shape
    # costs a one-off kernel set-up of several seconds on CPU).
    data = AnimalMNISTDataModule(image_size=48, train_per_class=30, val_per_class=10, test_per_class=10, batch_size=50)
    model = TransferModule("torchvision/mobilenet_v2", num_classes=10, pretrained=str(weights), lr=1e-3)
    trainer = _trainer(tmp_path, max_epochs=2, enable_checkpointing=True)
    before = trainer.validate(model, data, verbose=False)[0]
    trainer.fit(model, data)
    after = trainer.validate(model, data, verbose=False)[0]
    assert after["val/loss"] < before["val/loss"]
    assert after["val/acc"] > 0.3  # chance is 0.1
    assert set(after) >= {"val/acc", "val/f1", "val/top5"}

    # The checkpoint reloads without the weights file (the weights come from the checkpoint).
    weights.unlink()
    ckpt = trainer.checkpoint_callback.best_model_path  # type: ignore[union-attr]
    assert torch.load(ckpt, weights_only=False)["hyper_parameters"]["pretrained"] == str(weights)
    reloaded = TransferModule.load_from_checkpoint(ckpt)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    reloaded.eval()
    assert torch.allclose(model(x), reloaded(x))
    probs = torch.cat(trainer.predict(model, data.predict_dataloader()))  # type: ignore[arg-type]
    assert probs.shape == (100, 10) and torch.allclose(probs.sum(1), torch.ones(100), atol=1e-5)


def test_optimizer_contract() -> None:
    model = TransferModule("resnet18", num_classes=3, lr=3e-4, weight_decay=0.1)
    optimizer, scheduler = model.build_optimizer(total_steps=100)
    assert isinstance(optimizer, torch.optim.AdamW)
    names = [g["name"] for g in optimizer.param_groups]
    expected = [name for g in layer_groups(model.backbone) for name in (g.name, f"{g.name}/no_decay")]
    assert names == [*expected, "head", "head/no_decay"]
    assert all(g["lr"] == pytest.approx(3e-4 * WarmupCosine(5, 100)(0)) for g in optimizer.param_groups)
    for g in optimizer.param_groups:
        assert g["layer_group"] == g["name"].removesuffix("/no_decay")
        assert g["weight_decay"] == (0.0 if g["name"].endswith("/no_decay") else 0.1)
        if g["name"].endswith("/no_decay"):
            assert all(p.ndim <= 1 for p in g["params"])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)


def test_user_optimizer_and_scheduler_factories() -> None:
    model = TransferModule(
        "resnet18",
        num_classes=3,
        optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1, weight_decay=1e-4),
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10),
    )
    optimizer, scheduler = model.build_optimizer(10)
    assert isinstance(optimizer, torch.optim.SGD) and isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    decay = [g for g in optimizer.param_groups if not g["name"].endswith("/no_decay")]
    assert all(g["weight_decay"] == 1e-4 for g in decay)  # the factory's own default is kept


def test_warmup_cosine_shape() -> None:
    f = WarmupCosine(warmup_steps=4, total_steps=14)
    values = [f(s) for s in range(15)]
    assert values[:4] == [0.2, 0.4, 0.6, 0.8] and values[4] == 1.0
    assert values[9] == pytest.approx(0.5) and values[14] == pytest.approx(0.0)


@pytest.mark.parametrize("task", ["multilabel", "binary"])
def test_other_tasks_train_and_predict(tmp_path: Path, task: str) -> None:
    n_out = 4 if task == "multilabel" else 1
    y = torch.randint(0, 2, (16, n_out)).float() if task == "multilabel" else torch.randint(0, 2, (16,))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32), y), batch_size=8)
    model = TransferModule(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), num_classes=n_out, task=task)  # type: ignore[arg-type]
    trainer = _trainer(tmp_path, max_epochs=1, enable_checkpointing=False)
    trainer.fit(model, data, data)
    assert "val/acc" in trainer.callback_metrics
    probs = torch.cat(trainer.predict(model, data))  # type: ignore[arg-type]
    assert probs.shape == ((16, 4) if task == "multilabel" else (16, 1)) and 0 <= probs.min() and probs.max() <= 1


def test_soft_targets_from_mixup() -> None:
    model = TransferModule(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), num_classes=3, input_size=(3, 16, 16))  # type: ignore[arg-type]
    logits = torch.randn(4, 3)
    hard = torch.tensor([0, 1, 2, 1])
    soft = torch.nn.functional.one_hot(hard, 3).float()
    assert torch.allclose(model._loss(logits, soft), torch.nn.functional.cross_entropy(logits, hard))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "regression"}, "`task` to be one of"),
        ({"num_classes": 0}, "`num_classes` to be an int >= 1"),
        ({"num_classes": 3, "task": "binary"}, "1 or 2 for task='binary'"),
        ({"drop_rate": 1.0}, r"`drop_rate` to be in \[0.0, 1.0\)"),
        ({"lr": 0.0}, r"`lr` to be in \(0.0, inf\)"),
        ({"schedule": "linear"}, r"`schedule` to be one of \['cosine', 'constant'\]"),
    ],
)
def test_argument_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TransferModule("resnet18", **kwargs)


def test_metrics_logged_during_fit_equal_torchmetrics_standalone(tmp_path: Path) -> None:
    """A first validation batch of one class once made top-5 accuracy report plain accuracy (merged states)."""
    torch.manual_seed(0)
    classes = 10
    # The backbone is the identity on 10 channels and the head is the identity: the logits are the inputs.
    backbone = nn.Conv2d(classes, classes, 1, bias=False)
    model = TransferModule(backbone, num_classes=classes, input_size=(classes, 1, 1), lr=1e-12, schedule="constant")
    with torch.no_grad():
        backbone.weight.copy_(torch.eye(classes).view(classes, classes, 1, 1))
        model.head[1].weight.copy_(torch.eye(classes))
        model.head[1].bias.zero_()
    y = torch.arange(classes).repeat_interleave(8)  # sorted by class: the first batch is all class 0
    logits = torch.randn(len(y), classes)
    logits[:8, 0] = -10.0  # class 0 is never in the top 5 of its own images
    x = logits.view(-1, classes, 1, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = _trainer(tmp_path, max_epochs=1, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(model, loader, loader)
    model.eval()
    with torch.no_grad():
        final = model(x)
    expected = {
        "val/acc": Accuracy(task="multiclass", num_classes=classes)(final, y),
        "val/top5": Accuracy(task="multiclass", num_classes=classes, top_k=5)(final, y),
        "val/f1": F1Score(task="multiclass", num_classes=classes, average="macro")(final, y),
    }
    assert expected["val/acc"] != expected["val/top5"]
    for name, value in expected.items():
        assert float(trainer.callback_metrics[name]) == pytest.approx(float(value), abs=1e-6), name


def test_targets_are_range_checked_on_every_cpu_batch_and_the_first_accelerator_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On an accelerator the check reads the targets' range back (a device sync), so only the first batches pay it.
    import lt_finetune.module as module

    checked: list[str] = []
    monkeypatch.setattr(module, "_check_targets", lambda target, num_classes: checked.append(target.device.type))
    model = TransferModule(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), num_classes=3, input_size=(3, 16, 16))  # type: ignore[arg-type]
    for device in ["cpu"] * 20 + ["meta"] * 20:  # "meta" stands in for an accelerator: no data, no sync
        model._loss(torch.zeros(4, 3, device=device), torch.zeros(4, dtype=torch.long, device=device))
    assert checked.count("cpu") == 20 and checked.count("meta") == module._TARGET_CHECKS < 20
