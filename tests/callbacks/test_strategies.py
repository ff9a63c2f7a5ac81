"""Strategies the callbacks cannot vouch for are refused with a message that says what to do."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from lightning.pytorch.strategies import FSDPStrategy

from lt_finetune.callbacks._finetune import _check_strategy


class DeepSpeedStrategy:  # stands in for Lightning's, which needs the deepspeed package to be built
    pass


def _trainer(strategy: Any) -> Any:
    return SimpleNamespace(strategy=strategy)


def test_fsdp_needs_original_parameters() -> None:
    with pytest.raises(ValueError, match=r"use_orig_params=True: pass strategy=FSDPStrategy\(use_orig_params=True\)"):
        _check_strategy(_trainer(FSDPStrategy(use_orig_params=False)), "FreezeBackbone")
    _check_strategy(_trainer(FSDPStrategy(use_orig_params=True)), "FreezeBackbone")  # accepted


def test_deepspeed_is_refused() -> None:
    with pytest.raises(ValueError, match="GradualUnfreeze does not support DeepSpeed"):
        _check_strategy(_trainer(DeepSpeedStrategy()), "GradualUnfreeze")
