"""Write ``docs/benchmarks.md`` and its plots from the JSON files under ``benchmarks/results/``.

``python -m benchmarks.report`` regenerates the report without re-running anything. The page is assembled here;
the goals live in ``goals.py``, the fixed text in ``prose.py``, the sections in ``report_cost.py`` (1-4, 6) and
``report_accuracy.py`` (5, 8-10), ``select_validation.py`` (11), the figures in ``plots.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, REPORT, RESULTS_DIR, load_result
from benchmarks.goals import Goal, goals_table
from benchmarks.markdown import table
from benchmarks.prose import ANCHOR_NOTES, HOW_TO_RUN, INTRO
from benchmarks.report_accuracy import accuracy_section, few_equal_section, few_tuned_section, main_techniques_section
from benchmarks.report_cost import ddp_section, memory_section, overhead_section, scale_section, speedup_section
from benchmarks.report_techniques import techniques_section
from benchmarks.select_validation import benchmarks_section, load_for_report


def write_report(results_dir: Path = RESULTS_DIR, out: Path = REPORT) -> list[str]:
    """Write the Markdown report and its plots (next to it, under ``<out stem>/``); returns the plot paths."""
    images = out.parent / out.stem
    run = load_result(results_dir, "run")
    sections = (
        "speed", "ddp", "memory", "accuracy", "scale", "techniques", "few_equal", "main_techniques", "few_tuned",
    )  # fmt: skip
    results = {name: load_result(results_dir, name) for name in sections}
    goals: list[Goal] = []
    plots: list[str] = []
    body: list[str] = []
    speed = results["speed"]
    if speed and speed["data"]["overhead_pairs"]:
        body += overhead_section(speed, goals)
    if speed and speed["data"]["speedup_rows"]:
        body += speedup_section(speed, goals)
    if results["ddp"]:
        body += ddp_section(results["ddp"], goals)
    if results["memory"]:
        body += memory_section(results["memory"], goals)
    if results["accuracy"]:
        body += accuracy_section(results["accuracy"], goals, images, plots)
    if results["scale"]:
        body += scale_section(results["scale"], images, plots)
    if results["techniques"]:
        body += techniques_section(results["techniques"], goals, images, plots)
    if results["few_equal"]:
        body += few_equal_section(results["few_equal"], goals)
    if results["main_techniques"]:
        body += main_techniques_section(results["main_techniques"], goals)
    if results["few_tuned"]:
        body += few_tuned_section(results["few_tuned"], goals)
    selection = load_for_report(results_dir)
    if selection:
        body += benchmarks_section(selection)
    meta = run["meta"] if run else {}
    lines = list(INTRO)
    if meta:
        lines += [
            f"Latest run: `{meta['command']}` ({meta['mode']} settings), started {meta['started']}, total wall time "
            f"**{meta['wall_s'] / 60:.1f} min**, sections {meta['sections']}; the other sections keep the results of "
            "the run each names. Load average before / after: "
            f"{meta.get('load_before')} / {meta.get('load_after')} (the machine was shared with other work).",
            "",
        ]
    lines += ["## Goals", ""]
    lines += goals_table(goals)
    lines += HOW_TO_RUN
    lines += _machine(meta)
    lines += body
    lines += ANCHOR_NOTES
    if meta.get("notes"):
        lines += ["## Setup notes from this run", "", *[f"- {n}" for n in meta["notes"]], ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    return plots


def _machine(meta: dict[str, Any]) -> list[str]:
    """The machine and library versions recorded by the run, or nothing for a page without a run record."""
    machine, versions = meta.get("machine", {}), meta.get("versions", {})
    if not machine:
        return []
    lines = ["## Machine and versions", ""]
    lines += table(
        ["item", "value"],
        [
            ["CPU", machine["cpu_model"]],
            ["cores (nproc)", machine["nproc"]],
            ["RAM", f"{machine['ram_gib']} GiB"],
            ["GPU", machine["gpu"] or "none (CPU only)"],
            ["torch threads", machine["torch_threads"]],
            ["OS", machine["os"]],
            ["Python", machine["python"]],
        ]
        + [[k, v] for k, v in versions.items()],
    )
    return lines


def main(argv: list[str] | None = None) -> None:
    """Rebuild the report from stored results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    for plot in write_report(args.results_dir, args.out):
        print(f"wrote {Path(plot).relative_to(REPO) if Path(plot).is_relative_to(REPO) else plot}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
