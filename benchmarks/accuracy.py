"""Section 5: test accuracy at equal epochs on Animal-MNIST, for every registered recipe.

Protocol: ``train_per_class`` labelled images per class (the seed draws them), the fixed 200-per-class test split
of :class:`~lt_finetune.data.AnimalMNISTDataModule` (the same images for every seed), grayscale repeated to 3
channels, 64 px, ImageNet mean/std, horizontal flips only, batch 64, AdamW (weight decay 0.05, none on norms and
biases) with a per-step warm-up + cosine schedule, ImageNet MobileNetV2. Hyper-parameters come from
``benchmarks/lr_table.json`` (chosen on a validation split carved from the training images, never on test).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import Dataset, Subset

from benchmarks.common import EpochEval, Settings, accuracy, make_trainer, scratch_dir, weights_path
from benchmarks.recipes import LR_TABLE, RECIPES, build, load_hparams
from lt_finetune.data._common import stratified_split
from lt_finetune.data.animal_mnist import AnimalMNISTDataModule

NUM_CLASSES = 10
TEST_PER_CLASS = 200
#: The recipe the data-efficiency plot follows when lr_table.json names none.
FALLBACK_PICK = "layerwise_lr"


class Cycled(Dataset):
    """``dataset`` repeated to ``length`` items (item ``i`` is ``dataset[i % len(dataset)]``): with a shuffling
    loader, a small labelled set then gives as many optimizer steps per epoch as a large one (equal compute)."""

    def __init__(self, dataset: Any, length: int) -> None:
        self.dataset = dataset
        self.length = max(int(length), len(dataset))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index % len(self.dataset)]


def datamodule(per_class: int, seed: int, equal_steps_to: int | None = None) -> AnimalMNISTDataModule:
    """The protocol's datamodule: ``per_class`` training images per class drawn with ``seed``, fixed test split.

    With ``equal_steps_to``, the training images are cycled to ``equal_steps_to`` per class, so every size runs
    the optimizer steps of that size.
    """
    dm = AnimalMNISTDataModule(
        train_per_class=per_class, val_per_class=1, test_per_class=TEST_PER_CLASS, image_size=64, seed=seed, hflip=True
    )
    dm.setup("fit")
    if equal_steps_to is not None and equal_steps_to > per_class:
        dm.train_dataset = Cycled(dm.train_dataset, equal_steps_to * NUM_CLASSES)
    return dm


def carve_validation(dm: AnimalMNISTDataModule, val_per_class: int, seed: int = 0) -> None:
    """Split ``dm``'s training images into training and validation parts (in place); validation is not flipped."""
    train = dm.train_dataset
    assert train is not None
    targets = torch.as_tensor(train.targets)  # type: ignore[attr-defined]
    val_idx, train_idx = stratified_split(targets, NUM_CLASSES, [val_per_class, None], seed)
    plain = copy.copy(train)
    plain.hflip = False  # type: ignore[attr-defined]
    dm.train_dataset = Subset(train, train_idx.tolist())
    dm.val_dataset = Subset(plain, val_idx.tolist())


def train_recipe(
    name: str,
    hparams: Mapping[str, Mapping[str, float]],
    dm: AnimalMNISTDataModule,
    eval_loader: Any,
    settings: Settings,
    seed: int,
    every_epoch: bool,
    weights: str,
) -> dict[str, Any]:
    """Train one recipe with one seed; returns the evaluated accuracies per epoch and the wall time."""
    start = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    root = scratch_dir()
    steps = len(dm.train_dataloader())
    model, callbacks = build(name, hparams, weights, NUM_CLASSES, root, settings.epochs, steps)
    evaluator = EpochEval(eval_loader, every_epoch=every_epoch, limit_batches=settings.limit_test_batches)
    trainer = make_trainer(
        root, [*callbacks, evaluator], max_epochs=settings.epochs, limit_train_batches=settings.limit_train_batches
    )
    trainer.fit(model, datamodule=dm)
    history = evaluator.history
    # Scored after the fit, on the weights the fit ends with (the average, for EMA: it swaps them in at the end).
    final = accuracy(model, eval_loader, settings.limit_test_batches)
    return {"history": history, "final": final, "wall_s": time.perf_counter() - start}


def available_recipes(names: Sequence[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Recipes to run (all registered by default) and the skipped ones with the reason."""
    chosen = list(names) if names is not None else list(RECIPES)
    skipped = {n: "optional dependency not installed" for n in chosen if not RECIPES[n].available()}
    return [n for n in chosen if n not in skipped], skipped


def pick() -> str:
    """The lt_finetune recipe chosen on validation by ``select_lr`` (the data-efficiency plot follows it)."""
    if LR_TABLE.is_file():
        return str(json.loads(LR_TABLE.read_text()).get("pick", FALLBACK_PICK))
    return FALLBACK_PICK


def run(settings: Settings, log: Any = print) -> dict[str, Any]:
    """Every recipe at the main and the few-label size, then the data-efficiency sizes for three recipes."""
    weights = weights_path()
    hparams = load_hparams()
    recipes, skipped = available_recipes()
    our_pick = pick()
    plan: list[tuple[int, list[str]]] = [(settings.main_per_class, recipes), (settings.few_per_class, recipes)]
    efficiency = [n for n in ("scratch", "full", our_pick) if n in recipes]
    for size in settings.efficiency_per_class:
        if size not in (settings.main_per_class, settings.few_per_class):
            plan.append((size, efficiency))
    runs: list[dict[str, Any]] = []
    equal_steps = bool(settings.extra.get("equal_steps", True))
    for per_class, names in plan:
        for seed in settings.seeds:
            dm = datamodule(per_class, seed, settings.main_per_class if equal_steps else None)
            test_loader = dm.test_dataloader()
            # Per-epoch curves at the main size (first seed by default, every seed with --full).
            curve = per_class == settings.main_per_class and (settings.mode == "full" or seed == settings.seeds[0])
            for name in names:
                result = train_recipe(name, hparams, dm, test_loader, settings, seed, curve, weights)
                runs.append({"recipe": name, "per_class": per_class, "seed": seed, **result})
                acc, wall = result["final"], result["wall_s"]
                log(f"  {per_class:>3}/class seed {seed} {name:<22} test acc {acc:.3f} ({wall:.0f} s)")
    used = {RECIPES[n].hparams for n in recipes}
    return {
        "recipes": {
            n: {"label": RECIPES[n].label, "family": RECIPES[n].family, "description": RECIPES[n].description}
            for n in [*recipes, *skipped]
        },
        "hparams": {key: hparams[key] for key in sorted(used)},
        "hparams_source": LR_TABLE.name if LR_TABLE.is_file() else "DEFAULT_HPARAMS (lr_table.json missing)",
        "pick": our_pick,
        "skipped": skipped,
        "runs": runs,
        "protocol": {
            "main_per_class": settings.main_per_class,
            "few_per_class": settings.few_per_class,
            "efficiency_per_class": list(settings.efficiency_per_class),
            "test_per_class": TEST_PER_CLASS,
            "epochs": settings.epochs,
            "equal_steps": equal_steps,
            "seeds": list(settings.seeds),
            "image_size": 64,
            "batch_size": 64,
            "limit_train_batches": settings.limit_train_batches,
            "limit_test_batches": settings.limit_test_batches,
        },
    }


#: Recipes of the few-label, equal-compute run (section 8): the baseline and the techniques meant for few labels.
FEW_EQUAL_RECIPES = ("full", "linear_probe", "lpft", "l2sp")


def run_few_equal(settings: Settings, log: Any = print) -> dict[str, Any]:
    """Section 8: ``few_per_class`` labels per class at the optimizer steps of ``main_per_class`` (data cycled)."""
    weights = weights_path()
    hparams = load_hparams()
    names = list(settings.extra.get("few_equal_recipes", FEW_EQUAL_RECIPES))
    recipes, skipped = available_recipes(names)
    runs: list[dict[str, Any]] = []
    per_class = settings.few_per_class
    for seed in settings.seeds:
        dm = datamodule(per_class, seed, settings.main_per_class)
        test_loader = dm.test_dataloader()
        for name in recipes:
            result = train_recipe(name, hparams, dm, test_loader, settings, seed, False, weights)
            runs.append({"recipe": name, "per_class": per_class, "seed": seed, **result})
            log(f"  {per_class:>3}/class (equal steps) seed {seed} {name:<14} test acc {result['final']:.3f}")
    return {
        "recipes": {
            n: {"label": RECIPES[n].label, "family": RECIPES[n].family, "description": RECIPES[n].description}
            for n in [*recipes, *skipped]
        },
        "hparams": {key: hparams[key] for key in sorted({RECIPES[n].hparams for n in recipes})},
        "hparams_source": LR_TABLE.name if LR_TABLE.is_file() else "DEFAULT_HPARAMS (lr_table.json missing)",
        "pick": pick(),
        "skipped": skipped,
        "runs": runs,
        "protocol": {
            "few_per_class": per_class,
            "steps_of_per_class": settings.main_per_class,
            "test_per_class": TEST_PER_CLASS,
            "epochs": settings.epochs,
            "equal_steps": True,
            "seeds": list(settings.seeds),
            "limit_train_batches": settings.limit_train_batches,
        },
    }
