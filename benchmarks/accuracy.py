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
from benchmarks.recipes import FEW_TABLE, LR_TABLE, RECIPES, build, load_hparams
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


#: Recipes of the few-label, equal-compute run (section 8): the baseline, the techniques and the anchors.
FEW_EQUAL_RECIPES = (
    "full", "linear_probe", "lpft", "l2sp", "bss", "ema", "backbone_finetuning", "finetuning_scheduler", "fastai",
)  # fmt: skip
#: Recipes of the main-size run of the techniques (section 9): the baseline, section 5's best lt_finetune recipe,
#: the techniques, and the anchors, every one with the same seeds in one run.
MAIN_TECHNIQUE_RECIPES = (
    "full", "gradual_unfreeze", "lpft", "l2sp", "bss", "ema", "backbone_finetuning", "finetuning_scheduler", "fastai",
)  # fmt: skip
#: fastai's `fine_tune` is not a registered recipe (it is not a Lightning run): what the tables say of it.
FASTAI = {
    "label": "fastai fine_tune",
    "family": "anchor",
    "description": "fine_tune(epochs-1, freeze_epochs=1), base_lr 2e-3 (documented defaults), on unflipped tensors",
}


def run_few_equal(settings: Settings, log: Any = print) -> dict[str, Any]:
    """Section 8: ``few_per_class`` labels per class at the optimizer steps of ``main_per_class`` (data cycled)."""
    names = list(settings.extra.get("few_equal_recipes", FEW_EQUAL_RECIPES))
    return _run_one_size(settings, settings.few_per_class, settings.main_per_class, names, log)


def run_main_techniques(settings: Settings, log: Any = print) -> dict[str, Any]:
    """Section 9: the techniques and the anchors at ``main_per_class`` labels per class, every seed."""
    names = list(settings.extra.get("main_technique_recipes", MAIN_TECHNIQUE_RECIPES))
    return _run_one_size(settings, settings.main_per_class, None, names, log)


def run_few_tuned(settings: Settings, log: Any = print) -> dict[str, Any]:
    """Section 10: section 8's protocol with the hyper-parameters chosen at ``few_per_class`` on validation data
    carved from the labelled images (``few_lr_table.json``, written by ``python -m benchmarks.select_few``)."""
    if not FEW_TABLE.is_file():
        raise FileNotFoundError(f"{FEW_TABLE.name} is missing: run `python -m benchmarks.select_few` first")
    table = json.loads(FEW_TABLE.read_text())
    names = list(settings.extra.get("few_tuned_recipes", table["chosen"]))
    # The chosen entries, one per recipe, over the section-5 table (a recipe's own entry wins over its key's).
    hparams = {**load_hparams(), **{name: dict(value) for name, value in table["chosen"].items()}}
    result = _run_one_size(
        settings, settings.few_per_class, settings.main_per_class, names, log, hparams, FEW_TABLE.name
    )
    return {**result, "selection": {k: table[k] for k in ("command", "protocol", "validation_scores", "trials")}}


def _run_one_size(
    settings: Settings,
    per_class: int,
    steps_of: int | None,
    names: list[str],
    log: Any,
    hparams: dict[str, dict[str, float]] | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Every recipe of ``names`` (those installed) with every seed at one labelled-set size; with ``steps_of``, the
    training images are cycled to the optimizer steps of that size. Hyper-parameters from ``hparams`` (default:
    the section-5 table, :func:`load_hparams`)."""
    from benchmarks.techniques import fastai_available

    weights = weights_path()
    hparams = load_hparams() if hparams is None else hparams
    fastai = "fastai" in names
    recipes, skipped = available_recipes([n for n in names if n != "fastai"])
    if fastai and not fastai_available():
        fastai, skipped = False, {**skipped, "fastai": "optional dependency not installed (make bench-setup)"}
    runs: list[dict[str, Any]] = []
    what = f"{per_class:>3}/class" + (" (equal steps)" if steps_of else "")
    for seed in settings.seeds:
        dm = datamodule(per_class, seed, steps_of)
        test_loader = dm.test_dataloader()
        for name in [*recipes, *(["fastai"] if fastai else [])]:
            if name == "fastai":
                result = _fastai_run(dm, test_loader, settings, seed)
            else:
                result = train_recipe(name, hparams, dm, test_loader, settings, seed, False, weights)
            runs.append({"recipe": name, "per_class": per_class, "seed": seed, **result})
            log(f"  {what} seed {seed} {name:<20} test acc {result['final']:.3f} ({result['wall_s']:.0f} s)")
    described = {
        n: {"label": RECIPES[n].label, "family": RECIPES[n].family, "description": RECIPES[n].description}
        for n in [*recipes, *skipped]
        if n in RECIPES
    }
    return {
        "recipes": {**described, **({"fastai": FASTAI} if "fastai" in names else {})},
        "hparams": {
            **{key: hparams[key] for key in sorted({RECIPES[n].hparams for n in recipes})},
            **{n: hparams[n] for n in recipes if n in hparams},
        },
        "hparams_source": source
        or (LR_TABLE.name if LR_TABLE.is_file() else "DEFAULT_HPARAMS (lr_table.json missing)"),
        "pick": pick(),
        "skipped": skipped,
        "runs": runs,
        "protocol": {
            "per_class": per_class,
            "few_per_class": per_class,
            "steps_of_per_class": steps_of or per_class,
            "test_per_class": TEST_PER_CLASS,
            "epochs": settings.epochs,
            "equal_steps": steps_of is not None,
            "seeds": list(settings.seeds),
            "limit_train_batches": settings.limit_train_batches,
        },
    }


def _fastai_run(dm: AnimalMNISTDataModule, test_loader: Any, settings: Settings, seed: int) -> dict[str, Any]:
    """The fastai anchor on the datamodule's training images as tensors (unflipped: fastai gets no augmentation)."""
    from benchmarks.techniques import _tensors, fit_fastai

    start = time.perf_counter()
    train = dm.train_dataset
    base = train.dataset if isinstance(train, Cycled) else train
    plain = copy.copy(base)
    plain.hflip = False  # type: ignore[union-attr]
    x, y = _tensors(plain)
    if isinstance(train, Cycled):  # the same optimizer steps as the other recipes
        repeats = -(-len(train) // len(plain))
        x, y = x.repeat(repeats, 1, 1, 1)[: len(train)], y.repeat(repeats)[: len(train)]
    if settings.limit_train_batches:
        x, y = x[: settings.limit_train_batches * 64], y[: settings.limit_train_batches * 64]
    model = fit_fastai((x, y), _tensors(dm.val_dataset), seed, settings.epochs)
    final = accuracy(model, test_loader, settings.limit_test_batches)
    return {"history": [], "final": final, "wall_s": time.perf_counter() - start}


def merge_runs(stored: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` runs of some recipes over a ``stored`` result of the same section: the stored runs of the recipes
    ``new`` did not run are kept. The protocols must agree (size, steps, epochs, seeds), so that every row of the
    merged table was produced the same way.

    Raises:
        ValueError: If the protocols differ.
    """
    keys = ("per_class", "steps_of_per_class", "epochs", "seeds", "limit_train_batches", "test_per_class")

    def get(protocol: dict[str, Any], key: str) -> Any:
        return protocol.get(key, protocol.get("few_per_class")) if key == "per_class" else protocol.get(key)

    differ = {k: (get(stored["protocol"], k), get(new["protocol"], k)) for k in keys}
    differ = {k: v for k, v in differ.items() if v[0] != v[1]}
    if differ:
        raise ValueError(f"cannot merge runs of another protocol into the stored result: {differ}; rerun every recipe")
    ran = {r["recipe"] for r in new["runs"]}
    kept = [r for r in stored["runs"] if r["recipe"] not in ran]
    skipped = {k: v for k, v in {**stored["skipped"], **new["skipped"]}.items() if k not in ran}
    return {
        **new,
        "recipes": {**stored["recipes"], **new["recipes"]},
        "hparams": {**stored["hparams"], **new["hparams"]},
        "skipped": skipped,
        "runs": [*kept, *new["runs"]],
    }
