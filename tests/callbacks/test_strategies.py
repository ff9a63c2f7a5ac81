"""Strategies the callbacks cannot vouch for are refused with a message that says what to do."""

from __future__ import annotations

import pytest
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from lt_finetune.policy import check_strategy


class _DeepSpeed(DeepSpeedStrategy):
    """Detected by type: Lightning's class needs the deepspeed package to be built, a subclass skips that."""

    def __init__(self) -> None:
        pass


class _NamedLikeDeepSpeed:  # a class-name match is not enough: strategies are detected by type
    pass


def test_fsdp_needs_original_parameters() -> None:
    with pytest.raises(ValueError, match=r"use_orig_params=True: pass strategy=FSDPStrategy\(use_orig_params=True\)"):
        check_strategy(FSDPStrategy(use_orig_params=False), "FreezeBackbone")
    check_strategy(FSDPStrategy(use_orig_params=True), "FreezeBackbone")  # accepted


def test_deepspeed_is_refused() -> None:
    with pytest.raises(ValueError, match="GradualUnfreeze does not support DeepSpeed"):
        check_strategy(_DeepSpeed(), "GradualUnfreeze")
    _NamedLikeDeepSpeed.__name__ = "DeepSpeedStrategy"
    check_strategy(_NamedLikeDeepSpeed(), "GradualUnfreeze")  # type: ignore[arg-type]
