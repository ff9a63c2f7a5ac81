"""The registry of fine-tuning recipes compared in the accuracy section (and reused by the scale section).

A recipe is a function from a :class:`RecipeContext` (hyper-parameters, weights, classes) to a LightningModule and
its callbacks. Adding a technique (domain adaptation, a regulariser, weight averaging) is one decorated function;
every table and plot picks it up::

    @register("swa", "SWA (Lightning)", family="lt_finetune", hparams="full")
    def _swa(ctx: RecipeContext) -> Built:
        return _transfer(ctx), [StochasticWeightAveraging(swa_lrs=ctx.lr)]

Hyper-parameters come from ``benchmarks/lr_table.json`` (written by ``python -m benchmarks.select_lr`` on a
validation split carved from the training images) under the recipe's ``hparams`` key.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BackboneFinetuning, Callback

from benchmarks.common import BACKBONE, fts_available
from benchmarks.models import TrainableOnlyModule, fts_schedule, group_names
from lt_finetune import FreezeBackbone, GradualUnfreeze, LayerwiseLR, TransferModule
from lt_finetune.callbacks import BSS, EMA, L2SP, LPFT

LR_TABLE = Path(__file__).with_name("lr_table.json")
#: The hyper-parameters chosen at 10 labels per class (``python -m benchmarks.select_few``), per recipe.
FEW_TABLE = Path(__file__).with_name("few_lr_table.json")
Family = Literal["baseline", "lt_finetune", "anchor"]
Built = tuple[pl.LightningModule, list[Callback]]

#: Used when ``lr_table.json`` lacks a key (timing runs, and before the selection has been run).
DEFAULT_HPARAMS: dict[str, dict[str, float]] = {
    "scratch": {"lr": 3e-3},
    "full": {"lr": 1e-3},
    "linear_probe": {"lr": 1e-2},
    "layerwise_lr": {"lr": 3e-3, "decay": 0.8},
    "backbone_finetuning": {"lr": 1e-3, "gamma": 0.6},
}
#: GradualUnfreeze and finetuning-scheduler share one schedule: the head, then the top 10 of MobileNetV2's 19
#: groups (features.9-18) at epoch 1, then the rest at epoch 2.
TOP_GROUPS = 10


@dataclass
class RecipeContext:
    """What a recipe builder gets."""

    hparams: Mapping[str, float]
    weights: str
    num_classes: int
    root: str
    epochs: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lr(self) -> float:
        """The recipe's peak learning rate."""
        return float(self.hparams["lr"])


@dataclass(frozen=True)
class Recipe:
    """A named way to fine-tune: how to build the module and callbacks, and where its hyper-parameters live."""

    name: str
    label: str
    family: Family
    hparams: str
    build: Callable[[RecipeContext], Built]
    description: str
    requires: Callable[[], bool] | None = None

    def available(self) -> bool:
        """Whether the recipe's optional dependencies are installed."""
        return self.requires is None or self.requires()


RECIPES: dict[str, Recipe] = {}


def register(
    name: str, label: str, *, family: Family, hparams: str, requires: Callable[[], bool] | None = None
) -> Callable[[Callable[[RecipeContext], Built]], Callable[[RecipeContext], Built]]:
    """Add a recipe builder to :data:`RECIPES` under ``name`` (its docstring becomes the description)."""

    def decorator(fn: Callable[[RecipeContext], Built]) -> Callable[[RecipeContext], Built]:
        if name in RECIPES:
            raise ValueError(f"Recipe {name!r} is already registered.")
        RECIPES[name] = Recipe(name, label, family, hparams, fn, (fn.__doc__ or "").strip().splitlines()[0], requires)
        return fn

    return decorator


def load_hparams() -> dict[str, dict[str, float]]:
    """Selected hyper-parameters per key: ``lr_table.json``'s ``chosen`` entries over :data:`DEFAULT_HPARAMS`."""
    table = {k: dict(v) for k, v in DEFAULT_HPARAMS.items()}
    if LR_TABLE.is_file():
        for key, value in json.loads(LR_TABLE.read_text()).get("chosen", {}).items():
            table[key] = dict(value)
    return table


def build(
    name: str,
    hparams: Mapping[str, Mapping[str, float]],
    weights: str,
    num_classes: int,
    root: str,
    epochs: int,
    steps_per_epoch: int | None = None,
) -> Built:
    """Build recipe ``name`` with its hyper-parameters (:func:`recipe_hparams`), for a run of ``epochs`` epochs.

    ``steps_per_epoch`` feeds the rules of the recipes whose settings depend on the run's length (EMA, LPFT).
    """
    recipe = RECIPES[name]
    extra = {} if steps_per_epoch is None else {"steps_per_epoch": steps_per_epoch}
    return recipe.build(RecipeContext(recipe_hparams(name, hparams), weights, num_classes, root, epochs, extra))


def recipe_hparams(name: str, hparams: Mapping[str, Mapping[str, float]]) -> Mapping[str, float]:
    """A recipe's hyper-parameters: its own entry of the table (chosen for it alone), else its key's."""
    return hparams[name] if name in hparams else hparams[RECIPES[name].hparams]


# -- builders ----------------------------------------------------------------------------------------------------


def _transfer(
    ctx: RecipeContext,
    pretrained: bool = True,
    cls: type[TransferModule] = TransferModule,
    weight_decay: float = 0.05,
    **kwargs: Any,
) -> TransferModule:
    return cls(
        backbone=BACKBONE,
        num_classes=ctx.num_classes,
        pretrained=ctx.weights if pretrained else False,
        lr=ctx.lr,
        weight_decay=weight_decay,
        schedule="cosine",
        **kwargs,
    )


@register("scratch", "From scratch", family="baseline", hparams="scratch")
def _scratch(ctx: RecipeContext) -> Built:
    """Random initialisation, every layer trained (plain Lightning)."""
    return _transfer(ctx, pretrained=False), []


@register("linear_probe", "Linear probe", family="lt_finetune", hparams="linear_probe")
def _linear_probe(ctx: RecipeContext) -> Built:
    """`FreezeBackbone()`: only the head trains."""
    return _transfer(ctx), [FreezeBackbone()]


@register("full", "Full fine-tuning", family="baseline", hparams="full")
def _full(ctx: RecipeContext) -> Built:
    """ImageNet weights, every layer trained at one learning rate (plain Lightning)."""
    return _transfer(ctx), []


@register("lp_ft", "LP-FT", family="lt_finetune", hparams="full")
def _lp_ft(ctx: RecipeContext) -> Built:
    """`FreezeBackbone(unfreeze_at_epoch=1)`: linear probe for one epoch, then everything."""
    return _transfer(ctx), [FreezeBackbone(unfreeze_at_epoch=1)]


@register("gradual_unfreeze", "GradualUnfreeze", family="lt_finetune", hparams="full")
def _gradual(ctx: RecipeContext) -> Built:
    """`GradualUnfreeze(every_n_epochs=1, groups_per_stage=10)`: head, then top 10 groups, then all."""
    return _transfer(ctx), [GradualUnfreeze(every_n_epochs=1, groups_per_stage=TOP_GROUPS)]


@register("layerwise_lr", "LayerwiseLR", family="lt_finetune", hparams="layerwise_lr")
def _layerwise(ctx: RecipeContext) -> Built:
    """`LayerwiseLR(decay=d)`: group k below the head trains at d**k times the rate."""
    return _transfer(ctx), [LayerwiseLR(decay=float(ctx.hparams["decay"]))]


@register("gu_llr", "GradualUnfreeze + LayerwiseLR", family="lt_finetune", hparams="layerwise_lr")
def _gradual_layerwise(ctx: RecipeContext) -> Built:
    """Both callbacks: the GradualUnfreeze schedule with layer-wise decayed rates."""
    callbacks: list[Callback] = [
        GradualUnfreeze(every_n_epochs=1, groups_per_stage=TOP_GROUPS),
        LayerwiseLR(decay=float(ctx.hparams["decay"])),
    ]
    return _transfer(ctx), callbacks


@register("backbone_finetuning", "Lightning BackboneFinetuning", family="anchor", hparams="backbone_finetuning")
def _backbone_finetuning(ctx: RecipeContext) -> Built:
    """`BackboneFinetuning(unfreeze_backbone_at_epoch=1)` (the LP-FT intent), defaults otherwise; epoch-wise StepLR."""
    model = _transfer(ctx, cls=TrainableOnlyModule, step_gamma=float(ctx.hparams["gamma"]))
    return model, [BackboneFinetuning(unfreeze_backbone_at_epoch=1)]


@register("finetuning_scheduler", "finetuning-scheduler", family="anchor", hparams="full", requires=fts_available)
def _finetuning_scheduler(ctx: RecipeContext) -> Built:
    """`FinetuningScheduler` with an explicit 3-phase schedule (the GradualUnfreeze intent), epoch transitions."""
    from finetuning_scheduler import FinetuningScheduler

    model = _transfer(ctx, cls=TrainableOnlyModule)
    names = group_names(model)
    schedule = fts_schedule(model, [names[-TOP_GROUPS:], names[:-TOP_GROUPS]], ctx.lr, ctx.epochs)
    fts = FinetuningScheduler(
        ft_schedule=schedule,
        epoch_transitions_only=True,
        restore_best=False,
        apply_lambdas_new_pgs=True,  # the per-step cosine also drives the groups added by later phases
        logging_level=logging.ERROR,
        log_dir=ctx.root,
    )
    return model, [fts]


# -- the techniques of section 7 (and rows of section 5). Their settings follow rules fixed before any test run:
# the learning rates chosen on validation above, the papers' defaults, and lengths as fractions of the run.


def _total_steps(ctx: RecipeContext) -> int:
    return max(1, int(ctx.extra.get("steps_per_epoch", 16)) * ctx.epochs)


@register("l2sp", "L2-SP", family="lt_finetune", hparams="full")
def _l2sp(ctx: RecipeContext) -> Built:
    """`L2SP(alpha=0.01, beta=0.01)` (the paper's defaults) instead of weight decay, full fine-tuning otherwise."""
    alpha = float(ctx.hparams.get("alpha", 0.01))  # the paper's default unless chosen for this size on validation
    return _transfer(ctx, weight_decay=0.0), [L2SP(alpha=alpha, beta=0.01)]


@register("bss", "BSS", family="lt_finetune", hparams="full")
def _bss(ctx: RecipeContext) -> Built:
    """`BSS(weight=1e-3, k=1)` (the paper's and TLlib's defaults) on full fine-tuning."""
    weight = float(ctx.hparams.get("weight", 1e-3))  # the paper's default unless chosen on validation
    return _transfer(ctx), [BSS(weight=weight, k=1)]


@register("ema", "EMA of weights", family="lt_finetune", hparams="full")
def _ema(ctx: RecipeContext) -> Built:
    """`EMA(decay=1 - 10/T)`: an average over about the last tenth of the T steps, on full fine-tuning."""
    decay = max(0.0, 1.0 - 10.0 / _total_steps(ctx))
    return _transfer(ctx), [EMA(decay=round(decay, 6))]


@register("lpft", "LPFT preset", family="lt_finetune", hparams="linear_probe")
def _lpft(ctx: RecipeContext) -> Built:
    """`LPFT(probe_epochs=1)`: probe at the linear-probe rate, then all at the full-FT rate, warmed up over 10 %."""
    full_lr = float(load_hparams()["full"]["lr"])
    factor = min(1.0, full_lr / ctx.lr)
    warmup = max(1, round(0.1 * _total_steps(ctx)))
    return _transfer(ctx), [LPFT(probe_epochs=1, finetune_lr_factor=factor, warmup_steps=warmup)]
