"""GradualUnfreeze: stages by epoch, by step and by explicit schedule; warm-up; argument errors."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
from tinymodels import ForeignModule, LRRecorder, trainer

from lt_finetune.callbacks import GradualUnfreeze

NAMES = ["0", "1", "3", "5"]


def test_policy_is_a_function_of_progress() -> None:
    by_epoch = GradualUnfreeze(every_n_epochs=2, groups_per_stage=2)
    assert by_epoch.frozen_groups(NAMES, epoch=0, step=0) == set(NAMES)
    assert by_epoch.frozen_groups(NAMES, epoch=1, step=99) == set(NAMES)
    assert by_epoch.frozen_groups(NAMES, epoch=2, step=0) == {"0", "1"}
    assert by_epoch.frozen_groups(NAMES, epoch=4, step=0) == set()
    by_step = GradualUnfreeze(every_n_steps=5)
    assert by_step.frozen_groups(NAMES, epoch=0, step=4) == set(NAMES)
    assert by_step.frozen_groups(NAMES, epoch=0, step=5) == {"0", "1", "3"}
    assert by_step.frozen_groups(NAMES, epoch=9, step=100) == set()


def test_explicit_schedule_from_yaml_like_keys(tmp_path: Any) -> None:
    model = ForeignModule()
    recorder = LRRecorder()
    callback = GradualUnfreeze(schedule={"1": ["5", "[13]"]})  # type: ignore[dict-item]
    trainer(tmp_path, [callback, recorder], max_epochs=2).fit(model)
    assert recorder.trainable[3] == {"head.weight", "head.bias"}
    assert recorder.trainable[4] == {"head.weight", "head.bias"} | {
        f"backbone.{i}.{k}" for i in (1, 3, 5) for k in ("weight", "bias")
    }
    assert callback.unfrozen_at == {"1": 4, "3": 4, "5": 4}


def test_warmup_ramps_newly_unfrozen_groups(tmp_path: Any) -> None:
    model = ForeignModule()
    recorder = LRRecorder()
    trainer(tmp_path, [GradualUnfreeze(every_n_epochs=1, warmup_steps=4), recorder], max_epochs=2).fit(model)
    assert [round(lrs["5"] / lrs["head"], 6) for lrs in recorder.lrs] == [0, 0, 0, 0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of `every_n_epochs` and `every_n_steps`"),
        ({"every_n_epochs": 1, "every_n_steps": 5}, "exactly one of `every_n_epochs` and `every_n_steps`"),
        ({"every_n_epochs": 0}, "`every_n_epochs` to be an int >= 1, got 0"),
        ({"every_n_steps": -3}, "`every_n_steps` to be an int >= 1, got -3"),
        ({"every_n_epochs": 1, "groups_per_stage": 0}, "`groups_per_stage` to be an int >= 1"),
        ({"every_n_epochs": 1, "warmup_steps": -1}, "`warmup_steps` to be an int >= 0"),
        ({"schedule": {-1: ["x"]}}, "`schedule` epochs to be non-negative, got -1"),
        ({"schedule": {1: []}}, r"`schedule\[1\]` to be a non-empty list"),
        ({"schedule": {"first": ["x"]}}, "`schedule` keys to be epochs"),
        ({"schedule": {1: ["x"]}, "every_n_epochs": 1}, "either `schedule` or `every_n_epochs`"),
    ],
)
def test_argument_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradualUnfreeze(**kwargs)


def test_schedule_pattern_matching_nothing_lists_the_groups(tmp_path: Any) -> None:
    with pytest.raises(
        ValueError, match=r"GradualUnfreeze\(schedule=\['blocks\.\*'\]\) pattern 'blocks\.\*' matched no"
    ):
        trainer(tmp_path, [GradualUnfreeze(schedule={1: ["blocks.*"]})]).fit(ForeignModule())


class _BNProbe(pl.Callback):
    def __init__(self) -> None:
        self.bn_training: list[bool] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.bn_training.append(pl_module.backbone[1].training)


@pytest.mark.parametrize(("bn_mode", "trains"), [("eval", False), ("train", True)])
def test_bn_mode_of_frozen_groups(tmp_path: Any, bn_mode: str, trains: bool) -> None:
    """The BatchNorm layer sits in group "1", frozen for the whole of this 1-epoch run."""
    model = ForeignModule()
    recorder, probe = LRRecorder(), _BNProbe()
    callback = GradualUnfreeze(every_n_epochs=1, bn_mode=bn_mode)  # type: ignore[arg-type]
    trainer(tmp_path, [callback, recorder, probe], max_epochs=1).fit(model)
    assert probe.bn_training == [trains] * 4
    assert ("backbone.1.weight" in recorder.trainable[0]) is trains
    assert repr(callback).endswith(f"warmup_steps=0, bn_mode={bn_mode!r})")
