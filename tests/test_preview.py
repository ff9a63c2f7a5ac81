"""The schedule preview computes, before training, exactly the lrs and trainable sets that training applies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tinymodels import ForeignModule, LRRecorder, trainer
from torch.optim import lr_scheduler as S

from lt_finetune import TransferModule
from lt_finetune.callbacks import FreezeBackbone, GradualUnfreeze, LayerwiseLR
from lt_finetune.preview import preview_schedule


@pytest.mark.parametrize(
    ("scheduler", "interval"),
    [(lambda o: S.OneCycleLR(o, max_lr=0.3, total_steps=12), "step"), (lambda o: S.StepLR(o, 1, 0.5), "epoch")],
    ids=["onecycle_step", "steplr_epoch"],
)
def test_preview_matches_training(tmp_path: Path, scheduler: Any, interval: str) -> None:
    def callbacks() -> list[Any]:
        return [
            FreezeBackbone(groups=["0"], unfreeze_at_step=6),
            GradualUnfreeze(every_n_steps=2, warmup_steps=3),
            LayerwiseLR(decay=0.5),
        ]

    model = ForeignModule(scheduler=scheduler, interval=interval)
    plan = preview_schedule(model, callbacks(), max_epochs=3, steps_per_epoch=4)
    # The preview works on copies: the model is untouched.
    assert all(p.requires_grad for p in model.parameters())
    recorder = LRRecorder()
    trainer(tmp_path, [*callbacks(), recorder], max_epochs=3).fit(model)
    assert plan.steps == len(recorder.lrs) == 12
    for step in range(12):
        for group in plan.groups:
            assert plan.lrs[step][group] == pytest.approx(recorder.lrs[step][group], rel=1e-12, abs=1e-15), (
                step,
                group,
            )
        trained = {n.split(".")[1] if n.startswith("backbone.") else "head" for n in recorder.trainable[step]}
        assert plan.trainable[step] == trained


def test_preview_of_transfer_module_default_schedule(tmp_path: Path) -> None:
    data = torch.utils.data.TensorDataset(torch.randn(24, 3, 32, 32), torch.randint(0, 3, (24,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)

    def callbacks() -> list[Any]:
        return [GradualUnfreeze(every_n_epochs=1, groups_per_stage=3), LayerwiseLR(decay=0.7)]

    model = TransferModule("resnet18", num_classes=3, warmup_fraction=0.2)
    plan = preview_schedule(model, callbacks(), max_epochs=2, steps_per_epoch=6)
    recorder = LRRecorder()
    trainer(tmp_path, [*callbacks(), recorder], max_epochs=2).fit(model, loader)
    assert len(recorder.lrs) == plan.steps == 12
    for step in range(12):
        assert plan.lrs[step] == pytest.approx(recorder.lrs[step], rel=1e-9, abs=1e-15)
    assert "layer4.1" not in plan.trainable[5] and "layer4.1" in plan.trainable[6]


def test_table_and_png(tmp_path: Path) -> None:
    plan = preview_schedule(
        ForeignModule(scheduler=lambda o: S.CosineAnnealingLR(o, 12)),
        [GradualUnfreeze(every_n_epochs=1), LayerwiseLR(decay=0.5)],
        max_epochs=3,
        steps_per_epoch=4,
    )
    table = plan.table()
    lines = table.splitlines()
    assert lines[0].split()[0] == "group" and "step 4 (ep 1)" in lines[0]
    assert lines[1].split()[0] == "0" and lines[1].split()[1] == "-"  # bottom group frozen at step 0
    assert lines[5].split()[:2] == ["head", "1.00e-01"]
    png = tmp_path / "plan.png"
    plan.plot(str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_preview_errors() -> None:
    with pytest.raises(ValueError, match="at least one lt_finetune callback"):
        preview_schedule(ForeignModule(), [], max_epochs=1, steps_per_epoch=1)
    with pytest.raises(ValueError, match="positive `max_epochs` and `steps_per_epoch`"):
        preview_schedule(ForeignModule(), [LayerwiseLR()], max_epochs=0, steps_per_epoch=1)
