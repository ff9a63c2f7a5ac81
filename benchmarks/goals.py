"""The goals the benchmarks test, and how a measurement becomes a verdict.

Each section of the report checks its numbers against the constants here; the goals table at the top of
``docs/benchmarks.md`` lists every :class:`Goal` the sections produced, in section order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from benchmarks.markdown import table

#: Step time with lt_finetune's callbacks / the same trainable set frozen by hand (section 1).
OVERHEAD_GOAL = 1.01
#: Freezing speed-up kept by lt_finetune, as a fraction of freezing by hand (section 2).
SPEEDUP_GOAL = 0.95
#: DDP step time with the backbone unfrozen after wrapping / plain DDP (section 3).
DDP_GOAL = 1.05
#: Memory of training with a frozen backbone / full fine-tuning (section 4).
MEMORY_GOAL = 0.6
#: Test accuracy of the best lt_finetune recipe at the main labelled-set size (section 5).
ACCURACY_GOAL = 0.975
#: Accuracy gain of the best lt_finetune recipe over full fine-tuning with few labels (section 5).
FEW_LABEL_MARGIN = 0.02
#: Out-of-distribution accuracy gain of the best lt_finetune technique over full fine-tuning (section 7).
OOD_MARGIN = 0.03
#: Gain of the best lt_finetune recipe over full fine-tuning at 10 labels per class and equal steps (section 8).
EQUAL_STEPS_FEW_MARGIN = 0.03


class Goal(NamedTuple):
    """One row of the goals table: what is tested, the target, the measured value, whether it is met."""

    name: str
    target: str
    measured: str
    met: bool


def at_most(name: str, value: float, limit: float, fmt: str = ".3f") -> Goal:
    """The goal ``value <= limit``; ``fmt`` formats the measured value."""
    return Goal(name, f"<= {limit}", f"{value:{fmt}}", value <= limit)


def at_least(name: str, value: float, limit: float, fmt: str = ".3f", limit_fmt: str = "") -> Goal:
    """The goal ``value >= limit``; ``fmt`` and ``limit_fmt`` format the measured value and the target."""
    return Goal(name, f">= {limit:{limit_fmt}}", f"{value:{fmt}}", value >= limit)


def verdict(ok: bool) -> str:
    """The verdict cell of a table."""
    return "**met**" if ok else "**not met**"


def goals_table(goals: Sequence[Goal]) -> list[str]:
    """The goals table at the top of the page, one row per goal in the order the sections produced them."""
    return table(
        ["goal", "target", "measured", "verdict"], [[g.name, g.target, g.measured, verdict(g.met)] for g in goals]
    )
