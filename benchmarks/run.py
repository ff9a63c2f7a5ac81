"""Run the benchmark sections and write the report: ``python -m benchmarks.run [--full] [--sections 1,2,...]``.

Sections: 1 overhead, 2 freezing speed-up kept (1 and 2 share one timing run), 3 DDP, 4 memory, 5 accuracy,
6 scale, 7 fine-tuning techniques in and out of distribution (MNIST-5k to UCI digits), 8 few labels at equal
compute (Animal-MNIST), 9 the techniques and the anchors at the main size (Animal-MNIST, every seed), 10 few labels
at equal compute with the hyper-parameters chosen at that size (``python -m benchmarks.select_few`` first). Each
section's raw results go to ``<results-dir>/<section>.json``; the report is rebuilt from every result file there,
so a partial run keeps the other sections' last results (each table names its own run).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPORT,
    RESULTS_DIR,
    SETTINGS,
    Settings,
    library_versions,
    load_result,
    machine_info,
    missing_assets,
    quiet,
    save_result,
)

ALL_SECTIONS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)


def _log(message: str) -> None:
    print(message, flush=True)


def _section_runners(sections: set[int]) -> list[tuple[str, set[int], Callable[[Settings], dict[str, Any]]]]:
    from benchmarks import accuracy, ddp, memory, scale, speed, techniques

    runners: list[tuple[str, set[int], Callable[[Settings], dict[str, Any]]]] = []
    if sections & {1, 2}:
        runners.append(("speed", sections & {1, 2}, lambda s: speed.run(s, sections & {1, 2}, _log)))
    if 3 in sections:
        runners.append(("ddp", {3}, lambda s: ddp.run(s, _log)))
    if 4 in sections:
        runners.append(("memory", {4}, lambda s: memory.run(s, _log)))
    if 5 in sections:
        runners.append(("accuracy", {5}, lambda s: accuracy.run(s, _log)))
    if 6 in sections:
        runners.append(("scale", {6}, lambda s: scale.run(s, _log)))
    if 7 in sections:
        runners.append(("techniques", {7}, lambda s: techniques.run(s, _log)))
    if 8 in sections:
        runners.append(("few_equal", {8}, lambda s: accuracy.run_few_equal(s, _log)))
    if 9 in sections:
        runners.append(("main_techniques", {9}, lambda s: accuracy.run_main_techniques(s, _log)))
    if 10 in sections:
        runners.append(("few_tuned", {10}, lambda s: accuracy.run_few_tuned(s, _log)))
    return runners


def _parse_sections(text: str) -> set[int]:
    try:
        sections = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"Expected comma-separated section numbers, got {text!r}.") from None
    unknown = sections - set(ALL_SECTIONS)
    if unknown or not sections:
        raise argparse.ArgumentTypeError(f"Expected sections among {list(ALL_SECTIONS)}, got {text!r}.")
    return sections


def main(argv: list[str] | None = None) -> None:
    """Parse the options, report missing benchmark-only assets, run the sections, write the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--full", action="store_true", help="longer version: more repeats and seeds, 60k images, DDP scaling"
    )
    mode.add_argument(
        "--smoke", action="store_true", help="tiny settings to check that everything runs (results go to /tmp)"
    )
    parser.add_argument("--sections", type=_parse_sections, default=set(ALL_SECTIONS), help="e.g. 1,2,5 (default: all)")
    parser.add_argument("--seeds", type=str, default=None, help="override the accuracy seeds, e.g. 0,1,2")
    parser.add_argument(
        "--recipes",
        type=str,
        default=None,
        help="sections 8-10: run only these recipes (e.g. backbone_finetuning,fastai) and keep the stored runs of "
        "the others; the protocol and seeds must be those of the stored result",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"report path (default {REPORT.relative_to(Path.cwd()) if REPORT.is_relative_to(Path.cwd()) else REPORT})",
    )
    parser.add_argument(
        "--results-dir", type=Path, default=None, help="where the JSON results go (default benchmarks/results)"
    )
    args = parser.parse_args(argv)
    quiet()
    settings = SETTINGS["full" if args.full else "smoke" if args.smoke else "default"]
    if args.seeds:
        settings = replace(settings, seeds=tuple(int(s) for s in args.seeds.split(",")))
    only = [r for r in (args.recipes or "").split(",") if r]
    if only:
        extra = {**settings.extra, "few_equal_recipes": only, "main_technique_recipes": only, "few_tuned_recipes": only}
        settings = replace(settings, extra=extra)
    smoke_dir = Path("/tmp/lt_finetune_bench_smoke")
    results_dir = args.results_dir or (smoke_dir / "results" if args.smoke else RESULTS_DIR)
    out = args.out or (smoke_dir / "benchmarks.md" if args.smoke else REPORT)
    command = "python -m benchmarks.run" + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else "")
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    load_before = _load()
    start = time.perf_counter()
    notes = missing_assets()
    for note in notes:
        _log(f"missing: {note}")
    machine, versions = machine_info(), library_versions()
    for name, sections, runner in _section_runners(args.sections):
        _log(f"section {','.join(map(str, sorted(sections)))} ({name}) ...")
        section_start = time.perf_counter()
        data = runner(settings)
        wall = time.perf_counter() - section_start
        meta = {
            "command": command,
            "mode": settings.mode,
            "started": time.strftime("%Y-%m-%d %H:%M %Z"),
            "wall_s": wall,
            "settings": settings.to_dict(),
            "load": _load(),
        }
        if only and name in ("few_equal", "main_techniques", "few_tuned"):
            from benchmarks.accuracy import merge_runs

            stored = load_result(results_dir, name)
            if stored is not None:
                data = merge_runs(stored["data"], data)
                meta["earlier"] = [*stored["meta"].get("earlier", []), {**stored["meta"], "earlier": []}]
        save_result(results_dir, name, data, meta)
        _log(f"section {name} done in {wall:.0f} s")
    wall = time.perf_counter() - start
    run_meta = {
        "command": command,
        "mode": settings.mode,
        "started": started,
        "wall_s": wall,
        "sections": sorted(args.sections),
        "machine": machine,
        "versions": versions,
        "notes": notes,
        "load_before": load_before,
        "load_after": _load(),
    }
    save_result(results_dir, "run", {}, run_meta)
    from benchmarks.report import write_report

    plots = write_report(results_dir, out)
    _log(f"wrote {out} and {len(plots)} plot(s); total wall time {wall / 60:.1f} min")


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main()
