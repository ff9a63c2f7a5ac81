"""Markdown building blocks of the report: tables, number formats, the provenance line under each heading."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.common import mean_std


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table followed by a blank line."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def ms(seconds: float) -> str:
    """Seconds as milliseconds, one decimal."""
    return f"{seconds * 1000:.1f}"


def mib(n: float) -> str:
    """Bytes as whole MiB."""
    return f"{n / 2**20:.0f}"


def mean_pm_std(values: Sequence[float]) -> str:
    """``mean ± std`` of accuracies, three decimals."""
    mean, std = mean_std(values)
    return f"{mean:.3f} ± {std:.3f}"


def meta_line(result: dict[str, Any]) -> str:
    """The italic line naming the command, settings, start and wall time of a section's run."""
    meta = result["meta"]
    line = (
        f"*Produced by `{meta['command']}` ({meta['mode']} settings) on {meta['started']}; "
        f"section wall time {meta['wall_s']:.0f} s"
    )
    for earlier in meta.get("earlier", []):
        line += (
            f"; the other recipes' rows by `{earlier['command']}` on {earlier['started']} "
            f"({earlier['wall_s']:.0f} s), same protocol"
        )
    return line + ".*"
