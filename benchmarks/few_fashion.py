"""Replicate section 8's best technique on a second dataset: BSS vs full fine-tuning, Fashion-MNIST, 10 per class.

Section 8 (Animal-MNIST, 10 labelled images per class at the optimizer steps of 200 per class, section 5's
hyper-parameters) measured BSS 2.8 points ahead of full fine-tuning, on every seed. This run repeats exactly that
protocol on Fashion-MNIST (10 training images per class drawn with the seed from the 60,000 training images, 200
test images per class from the 10,000 test images), with the same two recipes, the same hyper-parameters (nothing
chosen on this dataset) and the same seeds: does the gain carry over to data nothing was chosen on?

Usage: ``python -m benchmarks.few_fashion`` (about 8 minutes on 2 cores; needs Fashion-MNIST, ``make bench-setup``
as root). Writes ``benchmarks/results/few_fashion.json`` and ``docs/benchmarks/few_fashion.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from benchmarks.accuracy import NUM_CLASSES, Cycled, train_recipe
from benchmarks.common import (
    REPO,
    RESULTS_DIR,
    SETTINGS,
    fashion_mnist_files,
    library_versions,
    load_result,
    machine_info,
    quiet,
    weights_path,
)
from benchmarks.recipes import RECIPES, load_hparams, recipe_hparams
from benchmarks.select_validation import FashionMNISTDataModule

RECIPE_NAMES = ("full", "bss")
SEEDS = (0, 1, 2)
PER_CLASS, STEPS_OF, TEST_PER_CLASS = 10, 200, 200
PAGE = REPO / "docs" / "benchmarks" / "few_fashion.md"


def run(seeds: tuple[int, ...] = SEEDS, log: Any = print) -> dict[str, Any]:
    """Every recipe with every seed; test accuracy after the last epoch."""
    settings = SETTINGS["default"]
    hparams, weights = load_hparams(), weights_path()
    runs = []
    for seed in seeds:
        dm = FashionMNISTDataModule(
            image_size=64,
            train_per_class=PER_CLASS,
            val_per_class=1,
            test_per_class=TEST_PER_CLASS,
            batch_size=64,
            seed=seed,
            hflip=True,
        )
        dm.setup("fit")
        dm.train_dataset = Cycled(dm.train_dataset, STEPS_OF * NUM_CLASSES)
        test_loader = dm.test_dataloader()
        for name in RECIPE_NAMES:
            result = train_recipe(name, hparams, dm, test_loader, settings, seed, False, weights)
            runs.append({"recipe": name, "seed": seed, "final": result["final"], "wall_s": result["wall_s"]})
            log(f"  seed {seed} {name:<5} test acc {result['final']:.3f} ({result['wall_s']:.0f} s)")
    return {
        "recipes": {
            n: {"description": RECIPES[n].description, "hparams": dict(recipe_hparams(n, hparams))}
            for n in RECIPE_NAMES
        },
        "runs": runs,
        "protocol": {
            "per_class": PER_CLASS,
            "steps_of_per_class": STEPS_OF,
            "test_per_class": TEST_PER_CLASS,
            "epochs": settings.epochs,
            "seeds": list(seeds),
            "image_size": 64,
            "batch_size": 64,
        },
    }


def report(result: dict[str, Any]) -> str:
    """The page: one row per recipe, and BSS minus full per seed."""
    p = result["protocol"]
    acc = {n: [r["final"] for r in result["runs"] if r["recipe"] == n] for n in result["recipes"]}
    lines = [
        "# BSS at 10 labels per class on a second dataset (Fashion-MNIST)",
        "",
        f"{__doc__.split(chr(10) + chr(10))[1]}".replace("\n", " "),
        "",
        f"Produced by `python -m benchmarks.few_fashion` on {result['started']} in {result['wall_s'] / 60:.1f} min "
        "(2 CPU cores, shared with other work); "
        f"{p['per_class']} images per class cycled to the steps of {p['steps_of_per_class']}, {p['epochs']} epochs, "
        f"{p['image_size']} px, batch {p['batch_size']}, seeds {p['seeds']}; raw numbers in "
        "`benchmarks/results/few_fashion.json`.",
        "",
        "| recipe | what | hyper-parameters | test acc | per seed |",
        "|---|---|---|---|---|",
    ]
    for name, values in acc.items():
        info = result["recipes"][name]
        hp = ", ".join(f"{k}={v:g}" for k, v in info["hparams"].items())
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        per_seed = " ".join(f"{v:.3f}" for v in values)
        lines.append(
            f"| `{name}` | {info['description']} | {hp} | {statistics.mean(values):.3f} ± {spread:.3f} | {per_seed} |"
        )
    if "full" in acc and "bss" in acc:
        lines += ["", f"BSS minus full fine-tuning, seed by seed: {_deltas(acc)} on Fashion-MNIST."]
        stored = load_result(RESULTS_DIR, "few_equal")
        if stored is not None:
            runs = stored["data"]["runs"]
            animal = {n: [r["final"] for r in runs if r["recipe"] == n and r["seed"] in p["seeds"]] for n in acc}
            if all(len(animal[n]) == len(acc[n]) for n in acc):
                lines.append(f"The same on Animal-MNIST (section 8 of `docs/benchmarks.md`): {_deltas(animal)}.")
    return "\n".join(lines) + "\n"


def _deltas(acc: dict[str, list[float]]) -> str:
    deltas = [b - f for b, f in zip(acc["bss"], acc["full"], strict=True)]
    return f"{' '.join(f'{d:+.3f}' for d in deltas)} (mean {statistics.mean(deltas):+.3f})"


def main(argv: list[str] | None = None) -> int:
    """Run (or only rebuild the page) and write the result and the page."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="Only rebuild the page from the stored result.")
    args = parser.parse_args(argv)
    path = RESULTS_DIR / "few_fashion.json"
    if args.report:
        result = json.loads(path.read_text())
    else:
        if not fashion_mnist_files():
            print("Fashion-MNIST is missing: `make bench-setup` installs it as root")
            return 2
        quiet()
        started, start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
        result = {**run(), "started": started}
        result |= {"wall_s": time.perf_counter() - start, "machine": machine_info(), "versions": library_versions()}
        path.write_text(json.dumps(result, indent=1) + "\n")
    PAGE.write_text(report(result))
    print(f"Wrote {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
