"""Every torch LR scheduler, through freezing, unfreezing, warm-up and layer-wise scaling: each group's applied lr
at every step equals scheduler value x layer-wise multiplier x warm-up factor (0 while frozen), where the scheduler
value comes from the same scheduler stepped alone on a one-group reference optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from tinymodels import ForeignModule, LRRecorder, trainer
from torch.optim import lr_scheduler as S

from lt_finetune.callbacks import FreezeBackbone, GradualUnfreeze, LayerwiseLR
from lt_finetune.groups import layer_groups

STEPS_PER_EPOCH = 4
EPOCHS = 3
TOTAL = STEPS_PER_EPOCH * EPOCHS


def _lambda(step: int) -> float:
    return 1.0 / (1.0 + 0.3 * step)


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "StepLR": lambda o: S.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, milestones=[2, 5, 9], gamma=0.3),
    "ExponentialLR": lambda o: S.ExponentialLR(o, gamma=0.85),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=TOTAL, eta_min=1e-3),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=5, eta_min=1e-3),
    "LambdaLR": lambda o: S.LambdaLR(o, _lambda),
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=0.2, total_steps=TOTAL),
    "LinearLR": lambda o: S.LinearLR(o, start_factor=0.2, total_iters=6),
    "SequentialLR": lambda o: S.SequentialLR(
        o, [S.LinearLR(o, start_factor=0.1, total_iters=3), S.CosineAnnealingLR(o, T_max=TOTAL - 3)], milestones=[3]
    ),
    "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=TOTAL, power=2.0),
    "ReduceLROnPlateau": lambda o: S.ReduceLROnPlateau(o, mode="max", factor=0.5, patience=0),
}


def _reference_lrs(factory: Callable[[torch.optim.Optimizer], Any], losses: list[float]) -> list[float]:
    """The scheduler's own values, stepped alone on a single-group optimizer."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = factory(opt)
    values = []
    for step in range(TOTAL):
        values.append(opt.param_groups[0]["lr"])
        opt.step()
        if isinstance(sched, S.ReduceLROnPlateau):
            sched.step(losses[step])
        else:
            sched.step()
    return values


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_through_unfreezing_and_layerwise_scaling(tmp_path: Any, name: str) -> None:
    factory = SCHEDULERS[name]
    model = ForeignModule(scheduler=factory, interval="step")
    names = [g.name for g in layer_groups(model.backbone)]
    recorder = LRRecorder()
    callbacks = [GradualUnfreeze(every_n_steps=3, warmup_steps=2), LayerwiseLR(decay=0.5), recorder]
    trainer(tmp_path, callbacks, max_epochs=EPOCHS).fit(model)
    assert len(recorder.lrs) == TOTAL

    # ReduceLROnPlateau (mode="max" on the loss) reacts to the logged metric: replay the same values.
    nominal = _reference_lrs(factory, recorder.losses)
    unfrozen_at: dict[str, int] = {}
    for step, applied in enumerate(recorder.lrs):
        stage = step // 3
        trainable = set(names[len(names) - min(stage, len(names)) :])
        for group in trainable:
            unfrozen_at.setdefault(group, step)
        for i, group in enumerate(names):
            if group in trainable:
                warmup = min(1.0, (step - unfrozen_at[group] + 1) / 2)
                expected = nominal[step] * 0.5 ** (len(names) - i) * warmup
            else:
                expected = 0.0
            assert applied[group] == pytest.approx(expected, rel=1e-9, abs=1e-12), (name, step, group)
        assert applied["head"] == pytest.approx(nominal[step], rel=1e-9), (name, step)
    # Frozen parameters have no gradient to step with; the trainable set followed the schedule.
    assert recorder.trainable[0] == {"head.weight", "head.bias"}
    last_stage_groups = names[len(names) - (TOTAL - 1) // 3 :]
    expected_last = {"head.weight", "head.bias"} | {
        f"backbone.{n}.{k}" for n in last_stage_groups for k in ("weight", "bias")
    }
    assert recorder.trainable[-1] == expected_last


@pytest.mark.parametrize("name", ["LambdaLR", "OneCycleLR", "CosineAnnealingLR", "ReduceLROnPlateau"])
def test_freeze_then_unfreeze_with_epoch_interval(tmp_path: Any, name: str) -> None:
    """Epoch-interval schedulers through FreezeBackbone's unfreezing: the backbone joins at the scheduler's value."""
    factory = SCHEDULERS[name] if name != "OneCycleLR" else (lambda o: S.OneCycleLR(o, max_lr=0.2, total_steps=EPOCHS))
    model = ForeignModule(scheduler=factory, interval="epoch")
    recorder = LRRecorder()
    trainer(tmp_path, [FreezeBackbone(unfreeze_at_epoch=1), LayerwiseLR(decay=0.5), recorder], max_epochs=EPOCHS).fit(
        model
    )
    names = [g.name for g in layer_groups(model.backbone)]
    param = torch.nn.Parameter(torch.zeros(1))
    ref_opt = torch.optim.SGD([param], lr=0.1)
    ref = factory(ref_opt)
    for epoch in range(EPOCHS):
        for step in range(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH):
            nominal = ref_opt.param_groups[0]["lr"]
            assert recorder.lrs[step]["head"] == pytest.approx(nominal, rel=1e-9)
            for i, group in enumerate(names):
                expected = 0.0 if epoch < 1 else nominal * 0.5 ** (len(names) - i)
                assert recorder.lrs[step][group] == pytest.approx(expected, rel=1e-9, abs=1e-12), (epoch, group)
        ref_opt.step()
        if isinstance(ref, S.ReduceLROnPlateau):
            ref.step(recorder.losses[(epoch + 1) * STEPS_PER_EPOCH - 1])
        else:
            ref.step()
