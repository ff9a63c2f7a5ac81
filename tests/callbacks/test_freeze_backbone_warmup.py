"""FreezeBackbone(warmup_steps=...): the unfrozen backbone's learning rates ramp up instead of jumping."""

from __future__ import annotations

from typing import Any

import pytest
from tinymodels import ForeignModule, LRRecorder, trainer

from lt_finetune.callbacks import FreezeBackbone


@pytest.mark.parametrize(("kwargs", "first"), [({"unfreeze_at_epoch": 1}, 4), ({"unfreeze_at_step": 2}, 2)])
def test_warmup_ramps_the_unfrozen_groups_only(tmp_path: Any, kwargs: dict[str, int], first: int) -> None:
    recorder = LRRecorder()
    callback = FreezeBackbone(warmup_steps=3, **kwargs)
    trainer(tmp_path, [callback, recorder], max_epochs=2).fit(ForeignModule())
    ramp = [round(lrs["5"] / lrs["head"], 6) for lrs in recorder.lrs]
    assert ramp == [0.0] * first + [round(1 / 3, 6), round(2 / 3, 6), 1.0] + [1.0] * (5 - first)
    assert callback.state_dict() == {"unfrozen_at_step": first}  # runtime counters only


def test_named_groups_warm_up_and_the_others_keep_their_rate(tmp_path: Any) -> None:
    recorder = LRRecorder()
    callback = FreezeBackbone(groups=["5"], unfreeze_at_step=2, warmup_steps=2)
    trainer(tmp_path, [callback, recorder], max_epochs=1).fit(ForeignModule())
    assert [round(lrs["5"] / lrs["head"], 6) for lrs in recorder.lrs] == [0.0, 0.0, 0.5, 1.0]
    assert {round(lrs["0"] / lrs["head"], 6) for lrs in recorder.lrs} == {1.0}


def test_warmup_steps_is_checked() -> None:
    with pytest.raises(ValueError, match="Expected `warmup_steps` to be an int >= 0, got -1"):
        FreezeBackbone(warmup_steps=-1)
