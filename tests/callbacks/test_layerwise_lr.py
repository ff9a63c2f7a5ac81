"""LayerwiseLR: factors, explicit multipliers and argument errors."""

from __future__ import annotations

from typing import Any

import pytest
from tinymodels import ForeignModule, LRRecorder, trainer

from lt_finetune.callbacks import LayerwiseLR
from lt_finetune.callbacks.layerwise_lr import layerwise_factors


def test_factors_decay_with_distance_from_the_head() -> None:
    assert layerwise_factors(["a", "b", "c"], 0.5) == {"a": 0.125, "b": 0.25, "c": 0.5, "head": 1.0}
    assert layerwise_factors(["a", "b", "c"], 1.0) == {"a": 1.0, "b": 1.0, "c": 1.0, "head": 1.0}


def test_multipliers_override_matching_groups_first_match_wins() -> None:
    factors = layerwise_factors(["stem", "blocks.0", "blocks.1"], 0.5, {"blocks.1": 0.9, "blocks.*": 0.3, "head": 2.0})
    assert factors == {"stem": 0.125, "blocks.0": 0.3, "blocks.1": 0.9, "head": 2.0}


def test_applied_in_training(tmp_path: Any) -> None:
    recorder = LRRecorder()
    trainer(tmp_path, [LayerwiseLR(decay=0.25, multipliers={"1": 0.0}), recorder], max_epochs=1).fit(ForeignModule())
    assert recorder.lrs[0] == pytest.approx(
        {"0": 0.1 * 0.25**4, "1": 0.0, "3": 0.1 * 0.25**2, "5": 0.1 * 0.25, "head": 0.1}
    )


@pytest.mark.parametrize("decay", [0, -0.5, 1.5])
def test_decay_out_of_range(decay: Any) -> None:
    with pytest.raises(ValueError, match=r"Expected `decay` to be in \(0.0, 1.0\]"):
        LayerwiseLR(decay=decay)


def test_decay_of_the_wrong_type() -> None:
    with pytest.raises(TypeError, match="Expected `decay` to be a float, got True of type bool"):
        LayerwiseLR(decay=True)


def test_negative_multiplier_and_unknown_pattern(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=r"`multipliers\['x'\]` to be in \[0.0, inf\), got -1"):
        LayerwiseLR(multipliers={"x": -1})
    with pytest.raises(
        ValueError, match=r"pattern 'stage9' matched no layer group; available: \['0', '1', '3', '5', 'head'\]"
    ):
        trainer(tmp_path, [LayerwiseLR(multipliers={"stage9": 0.1})]).fit(ForeignModule())
