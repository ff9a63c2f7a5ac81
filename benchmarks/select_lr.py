"""Pick learning rates (and the other free choices) of the accuracy section on validation data, never on test.

Seed 0's 2,000 training images (200 per class) are split into 150 per class for training and 50 per class for
validation; each candidate trains for the protocol's epochs and is scored on the validation part after the last
epoch. One seed, a small grid: cheap, and noisy to about one point, which the report says.

Then the lt_finetune recipes that have no grid of their own are scored at the chosen values, and the best
lt_finetune recipe on validation becomes ``pick``, the recipe the data-efficiency plot follows.

Usage: ``python -m benchmarks.select_lr`` (writes ``benchmarks/lr_table.json``; a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.accuracy import carve_validation, datamodule, train_recipe
from benchmarks.common import SETTINGS, quiet, weights_path, write_selection
from benchmarks.recipes import DEFAULT_HPARAMS, LR_TABLE, RECIPES

#: key -> (recipe that evaluates it, candidates). ``backbone_finetuning`` reuses the chosen ``full`` lr.
GRID: dict[str, tuple[str, list[dict[str, float]]]] = {
    "full": ("full", [{"lr": 5e-4}, {"lr": 1e-3}, {"lr": 2e-3}]),
    "linear_probe": ("linear_probe", [{"lr": 3e-3}, {"lr": 1e-2}, {"lr": 3e-2}]),
    "scratch": ("scratch", [{"lr": 1e-3}, {"lr": 3e-3}]),
    "layerwise_lr": ("layerwise_lr", [{"lr": lr, "decay": d} for lr in (2e-3, 4e-3) for d in (0.7, 0.85)]),
    "backbone_finetuning": ("backbone_finetuning", [{"gamma": 0.5}, {"gamma": 0.8}]),
}
SEED = 0
VAL_PER_CLASS = 50


def main(argv: list[str] | None = None) -> None:
    """Run the grid and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny settings, to check that it runs")
    parser.add_argument("--out", type=Path, default=None, help=f"output JSON (default {LR_TABLE}; smoke: /tmp)")
    args = parser.parse_args(argv)
    quiet()
    settings = SETTINGS["smoke" if args.smoke else "default"]
    out = args.out or (Path("/tmp/lt_finetune_lr_table_smoke.json") if args.smoke else LR_TABLE)
    weights = weights_path()
    dm = datamodule(settings.main_per_class, SEED)
    carve_validation(dm, VAL_PER_CLASS, SEED)
    val_loader = dm.val_dataloader()
    start = time.perf_counter()
    chosen: dict[str, dict[str, float]] = {k: dict(v) for k, v in DEFAULT_HPARAMS.items()}
    trials: list[dict[str, Any]] = []
    scores: dict[str, float] = {}

    def score(recipe: str, hp: dict[str, float], key: str) -> float:
        table = {**chosen, key: hp}
        result = train_recipe(recipe, table, dm, val_loader, settings, SEED, False, weights)
        trials.append(
            {"key": key, "recipe": recipe, "hparams": hp, "val_acc": result["final"], "wall_s": result["wall_s"]}
        )
        print(f"  {recipe:<22} {hp} val acc {result['final']:.3f} ({result['wall_s']:.0f} s)", flush=True)
        return float(result["final"])

    for key, (recipe, candidates) in GRID.items():
        if not RECIPES[recipe].available():
            continue
        best: tuple[float, dict[str, float]] | None = None
        for candidate in candidates:
            hp = {"lr": chosen["full"]["lr"], **candidate} if key == "backbone_finetuning" else dict(candidate)
            acc = score(recipe, hp, key)
            if best is None or acc > best[0]:  # ties keep the earlier (smaller) value
                best = (acc, hp)
        assert best is not None
        chosen[key] = best[1]
        scores[recipe] = best[0]
    for name, entry in RECIPES.items():
        if entry.family == "lt_finetune" and name not in scores and entry.available():
            scores[name] = score(name, chosen[entry.hparams], entry.hparams)
    ours = {n: s for n, s in scores.items() if RECIPES[n].family == "lt_finetune"}
    best_ours = max(ours, key=lambda n: ours[n])
    protocol = (
        f"seed {SEED}: the {settings.main_per_class}/class training images split into "
        f"{settings.main_per_class - VAL_PER_CLASS}/class train + {VAL_PER_CLASS}/class validation; "
        f"{settings.epochs} epochs; validation accuracy after the last epoch; test split never used"
    )
    command = "python -m benchmarks.select_lr" + (" --smoke" if args.smoke else "")
    write_selection(out, command, protocol, chosen, scores, trials, start, pick=best_ours)
    print(f"wrote {out}; pick: {best_ours}", file=sys.stderr)


if __name__ == "__main__":
    main()
