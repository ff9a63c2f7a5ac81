"""Choose the hyper-parameters of the 10-labels-per-class runs on validation data carved from the labelled images.

Section 8 runs every recipe at 10 labels per class with the hyper-parameters chosen at 200 per class (a rule fixed
before any test run). This script chooses them at 10 per class instead, never looking at test: seed 0's 10 labelled
images per class are split into two halves of 5 per class; each candidate trains on one half, cycled to the
optimizer steps of 200 per class as in section 8, and is scored on the other half; then the halves swap. The score
is the accuracy over all 100 labelled images, each predicted by the model that did not train on it (2-fold cross
validation). One image is one point of it: choices closer than a few points are ties, and ties keep the value of
section 5.

The grid, fixed before the runs: full fine-tuning's learning rate around section 5's (1e-3, 2e-3, 4e-3); at the
chosen rate, L2-SP's alpha (the paper's 0.01, then 0.1 and 1: more pull toward the pretrained weights for less
data) and BSS's weight (the paper's 1e-3, then 1e-2); EMA keeps its rule (decay 1 - 10/T) at the chosen rate.

Usage: ``python -m benchmarks.select_few`` (writes ``benchmarks/few_lr_table.json``; about 25 minutes on 2 cores),
then ``python -m benchmarks.run --sections 10`` runs the chosen recipes with 3 seeds on the test split.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from benchmarks.accuracy import NUM_CLASSES, Cycled, datamodule, train_recipe
from benchmarks.common import SETTINGS, quiet, weights_path, write_selection
from benchmarks.recipes import FEW_TABLE, load_hparams
from lt_finetune.data._common import stratified_split

SEED = 0
PER_CLASS = 10
#: recipe -> candidates, in order; the first candidate that is not beaten by more than ``TIE`` stays.
GRID: dict[str, list[dict[str, float]]] = {
    "full": [{"lr": 2e-3}, {"lr": 1e-3}, {"lr": 4e-3}],
    "l2sp": [{"alpha": 0.01}, {"alpha": 0.1}, {"alpha": 1.0}],
    "bss": [{"weight": 1e-3}, {"weight": 1e-2}],
}
#: Recipes that take the chosen rate and nothing else.
RATE_ONLY = ("ema",)
#: A candidate must beat the one kept by more than this (2 of the 100 validation images) to replace it.
TIE = 0.02


def fold_score(recipe: str, hparams: dict[str, dict[str, float]], settings: Any, weights: str) -> dict[str, Any]:
    """2-fold accuracy of ``recipe`` on seed 0's labelled images (5 + 5 per class, cycled to 200/class steps)."""
    dm = datamodule(PER_CLASS, SEED)
    labelled = dm.train_dataset
    assert labelled is not None
    targets = torch.as_tensor(labelled.targets)  # type: ignore[attr-defined]
    halves = stratified_split(targets, NUM_CLASSES, [PER_CLASS // 2, None], SEED)
    plain = copy.copy(labelled)
    plain.hflip = False  # type: ignore[attr-defined]
    correct, total, wall = 0.0, 0, 0.0
    for train_idx, val_idx in ((halves[0], halves[1]), (halves[1], halves[0])):
        dm.train_dataset = Cycled(Subset(labelled, train_idx.tolist()), settings.main_per_class * NUM_CLASSES)
        dm.val_dataset = Subset(plain, val_idx.tolist())
        result = train_recipe(recipe, hparams, dm, dm.val_dataloader(), settings, SEED, False, weights)
        correct += result["final"] * len(val_idx)
        total += len(val_idx)
        wall += result["wall_s"]
    return {"val_acc": correct / total, "wall_s": wall}


def main(argv: list[str] | None = None) -> None:
    """Run the grid and write ``few_lr_table.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny settings, to check that it runs")
    parser.add_argument("--out", type=Path, default=None, help=f"output JSON (default {FEW_TABLE.name}; smoke: tmp)")
    args = parser.parse_args(argv)
    quiet()
    settings = SETTINGS["smoke" if args.smoke else "default"]
    out = args.out or (Path("/tmp/lt_finetune_few_table_smoke.json") if args.smoke else FEW_TABLE)
    weights = weights_path()
    base = load_hparams()
    start = time.perf_counter()
    chosen: dict[str, dict[str, float]] = {}
    scores: dict[str, float] = {}
    trials: list[dict[str, Any]] = []

    def trial(recipe: str, hp: dict[str, float]) -> float:
        result = fold_score(recipe, {**base, recipe: hp}, settings, weights)
        trials.append({"recipe": recipe, "hparams": hp, **result})
        print(f"  {recipe:<6} {hp} 2-fold val acc {result['val_acc']:.3f} ({result['wall_s']:.0f} s)", flush=True)
        return float(result["val_acc"])

    rate = {"lr": float(base["full"]["lr"])}
    for recipe, candidates in GRID.items():
        kept: tuple[float, dict[str, float]] | None = None
        for candidate in candidates:
            hp = {**rate, **candidate}
            acc = trial(recipe, hp)
            if kept is None or acc > kept[0] + TIE:
                kept = (acc, hp)
        assert kept is not None
        chosen[recipe], scores[recipe] = kept[1], kept[0]
        if recipe == "full":
            rate = {"lr": kept[1]["lr"]}
    for recipe in RATE_ONLY:
        chosen[recipe] = dict(rate)
        scores[recipe] = trial(recipe, dict(rate))
    protocol = (
        f"seed {SEED}'s {PER_CLASS}/class labelled images in two halves of {PER_CLASS // 2}/class; train on one "
        f"(cycled to {settings.main_per_class}/class steps, {settings.epochs} epochs), score on the other, swap; "
        f"a candidate replaces the kept one only when better by more than {TIE:g}; test split never used"
    )
    command = "python -m benchmarks.select_few" + (" --smoke" if args.smoke else "")
    write_selection(out, command, protocol, chosen, scores, trials, start)
    print(f"wrote {out}; chosen: {chosen}", file=sys.stderr)


if __name__ == "__main__":
    main()
