"""Advise a fine-tuning recipe from the data: labels per class, how well the pretrained features already fit, backbone.

:func:`advise` is a pure function of an :class:`Evidence` record and :class:`Thresholds`; ``lt-finetune advise``
(:func:`lt_finetune.advise_command.run_advise`) measures the evidence on the training data of a config, prints the
reasoning with every number and threshold, and writes a config that ``lt-finetune fit --config`` runs
(:func:`advised_config`).

The evidence:

- **labels per class**: the median class count of the training split;
- **linear-probe accuracy** (:func:`linear_probe_cv`): k-fold cross-validated accuracy of a ridge-regression
  probe on the backbone's pooled features of (a sample of) the training images: how much of the task the
  pretrained features already solve, at this amount of data;
- **source-head confidence** (:func:`source_confidence`): the mean max-probability of the backbone's own
  pretraining classifier on the images (Hendrycks and Gimpel, 2017: lower on data unlike the training data). It is
  printed, not thresholded: its level depends on the model (see ``docs/selection.md``).

The rule, first match wins (the thresholds and their sources are in :class:`Thresholds` and
``docs/selection.md``):

1. no pretrained weights: full fine-tuning (there is nothing to preserve);
2. probe accuracy >= ``probe_enough``: linear probe;
3. probe accuracy < ``probe_far``: full fine-tuning;
4. fewer than ``few_labels`` labels per class: regularised fine-tuning (L2-SP);
5. probe accuracy >= ``probe_lp_ft``: LP-FT;
6. otherwise: gradual unfreezing with layer-wise learning-rate decay.

Example::

    >>> advice = advise(Evidence(labels_per_class=10, probe_accuracy=0.64, num_classes=10))
    >>> advice.recipe
    'full'
    >>> advise(Evidence(labels_per_class=20, probe_accuracy=0.93, num_classes=10)).recipe
    'l2sp'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lt_finetune.validation import check_float, check_int

__all__ = [
    "RECIPES",
    "THRESHOLDS",
    "Advice",
    "Evidence",
    "Thresholds",
    "advise",
    "advised_config",
    "format_evidence",
    "linear_probe_cv",
    "measure_evidence",
    "source_confidence",
]

Recipe = Literal["linear_probe", "lp_ft", "gradual_layerwise", "full", "l2sp"]

#: What each recipe is, in words.
RECIPES: dict[str, str] = {
    "linear_probe": "linear probe (FreezeBackbone: only the head trains)",
    "lp_ft": "LP-FT (LPFT: a linear probe for one epoch, then everything at a lower rate, warmed up)",
    "gradual_layerwise": "gradual unfreezing with layer-wise decay (GradualUnfreeze + LayerwiseLR)",
    "full": "full fine-tuning (every layer at one learning rate)",
    "l2sp": "regularised fine-tuning (L2SP: every layer trains, pulled towards the pretrained weights)",
}

#: Optimizer settings per recipe: the values ``benchmarks/lr_table.json`` chose on validation for ImageNet
#: MobileNetV2 on Animal-MNIST (64 px, batch 64, AdamW, warm-up + cosine), and the papers' L2-SP defaults. A
#: starting point for other backbones and data, not a tuned value for them.
_HPARAMS: dict[str, dict[str, float]] = {
    "full": {"lr": 0.002, "weight_decay": 0.05},
    "linear_probe": {"lr": 0.03, "weight_decay": 0.05},
    "lp_ft": {"lr": 0.03, "weight_decay": 0.05},  # the probe's rate; the fine-tuning phase runs at the full rate
    "gradual_layerwise": {"lr": 0.004, "weight_decay": 0.05, "decay": 0.7},
    "l2sp": {"lr": 0.002, "weight_decay": 0.0, "alpha": 0.01, "beta": 0.01},  # L2-SP replaces weight decay
}
_DEFAULT_EPOCHS = 5  # the accuracy benchmark's protocol
#: Trainer settings carried over from the given config into the advised one.
_TRAINER_KEYS = ("accelerator", "devices", "precision", "default_root_dir")


@dataclass(frozen=True)
class Thresholds:
    """The advisor's thresholds. Sources (``docs/selection.md`` has the numbers behind them):

    Attributes:
        probe_enough: A linear probe this accurate leaves fine-tuning at most ``1 - probe_enough`` to gain (1
            point at 0.99), so the probe, the cheapest recipe, is advised. Kornblith et al. (2019) found
            fine-tuning's gain over logistic regression on fixed ImageNet features small where the fixed features
            already score high.
        probe_far: Below it, the features are far from the task and every layer should move freely. Measured
            here: on Animal-MNIST the probe scores 0.66 (10 labels per class) and 0.85 (200) by this estimate, and
            full fine-tuning beat L2-SP, LP-FT, gradual unfreezing, layer-wise decay and the linear probe at both
            sizes (``docs/benchmarks.md`` sections 5 and 8). Kornblith et al. (2019) saw the largest fine-tuning
            gains on data far from ImageNet (cars, aircraft).
        few_labels: Below this many labels per class, with features close to the task, regularise towards the
            pretrained weights: L2-SP's gains (Li et al., 2018) were measured with a few dozen images per class, and
            our full fine-tuning curve is far from its plateau there (0.580, 0.893, 0.964 at 10, 50, 200 per class).
        probe_lp_ft: With this good a probe and enough labels, LP-FT (Kumar et al., 2022: the head is fitted before
            the features move, so they are distorted less). Between ``probe_far`` and this, gradual unfreezing with
            layer-wise decay (Howard and Ruder, 2018; Yosinski et al., 2014: lower layers transfer, top layers are
            specific, so the top moves first and fastest). Neither was measured here on such data.
    """

    probe_enough: float = 0.99
    probe_far: float = 0.90
    few_labels: int = 50
    probe_lp_ft: float = 0.95

    def __post_init__(self) -> None:
        for name in ("probe_enough", "probe_far", "probe_lp_ft"):
            check_float(name, getattr(self, name), 0.0, 1.0)
        check_int("few_labels", self.few_labels, 1)
        if not self.probe_far <= self.probe_lp_ft <= self.probe_enough:
            raise ValueError(
                "Expected `probe_far` <= `probe_lp_ft` <= `probe_enough`, got "
                f"{self.probe_far}, {self.probe_lp_ft}, {self.probe_enough}."
            )


THRESHOLDS = Thresholds()


@dataclass(frozen=True)
class Evidence:
    """What :func:`advise` decides on.

    Attributes:
        labels_per_class: Median number of training labels per class.
        probe_accuracy: Cross-validated linear-probe accuracy on the pretrained features; ``None`` if unmeasured.
        num_classes: Number of classes (for the chance level in the reasons).
        pretrained: Whether the backbone starts from pretrained weights.
        source_confidence: Mean max-probability of the source head on the images; ``None`` without a source head.
        samples: Images the probe and the confidence were measured on.
        min_per_class: Labels of the smallest class.
    """

    labels_per_class: float
    probe_accuracy: float | None
    num_classes: int
    pretrained: bool = True
    source_confidence: float | None = None
    samples: int | None = None
    min_per_class: int | None = None


@dataclass(frozen=True)
class Advice:
    """A recipe (a key of :data:`RECIPES`) and the reasoning: every check made, with its numbers, in order."""

    recipe: Recipe
    reasons: list[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        """The recipe in words."""
        return RECIPES[self.recipe]


def advise(evidence: Evidence, thresholds: Thresholds = THRESHOLDS) -> Advice:
    """Pick a recipe by the rule of this module (first match wins) and say why, with the numbers.

    Raises:
        ValueError: If the backbone is pretrained but ``probe_accuracy`` is ``None``.
    """
    t, n, probe = thresholds, evidence.labels_per_class, evidence.probe_accuracy
    reasons: list[str] = []
    if not evidence.pretrained:
        reasons.append("1. the backbone has no pretrained weights: there is nothing to preserve -> full fine-tuning")
        return Advice("full", reasons)
    if probe is None:
        raise ValueError("Expected `probe_accuracy` for a pretrained backbone, got None.")
    chance = 1.0 / max(evidence.num_classes, 1)
    reasons.append("1. the backbone is pretrained: go on")
    if probe >= t.probe_enough:
        reasons.append(f"2. probe accuracy {probe:.3f} >= {t.probe_enough} (fine-tuning can add at most "
                       f"{1 - probe:.3f}) -> linear probe")  # fmt: skip
        return Advice("linear_probe", reasons)
    reasons.append(f"2. probe accuracy {probe:.3f} < {t.probe_enough}: fine-tuning has room to gain")
    if probe < t.probe_far:
        reasons.append(f"3. probe accuracy {probe:.3f} < {t.probe_far} (chance {chance:.3f}): the features are far "
                       "from the task, every layer should adapt -> full fine-tuning")  # fmt: skip
        return Advice("full", reasons)
    reasons.append(f"3. probe accuracy {probe:.3f} >= {t.probe_far}: the features are close to the task")
    if n < t.few_labels:
        reasons.append(f"4. {n:g} labels per class < {t.few_labels}: few labels, stay near the pretrained weights "
                       "-> L2-SP")  # fmt: skip
        return Advice("l2sp", reasons)
    reasons.append(f"4. {n:g} labels per class >= {t.few_labels}: enough labels to move the features")
    if probe >= t.probe_lp_ft:
        reasons.append(f"5. probe accuracy {probe:.3f} >= {t.probe_lp_ft}: fit the head first -> LP-FT")
        return Advice("lp_ft", reasons)
    reasons.append(f"5. probe accuracy {probe:.3f} < {t.probe_lp_ft}: adapt the top layers first and fastest "
                   "-> gradual unfreezing with layer-wise decay")  # fmt: skip
    return Advice("gradual_layerwise", reasons)


# -- the measurements --------------------------------------------------------------------------------------------

#: Ridge penalties tried, as multiples of the mean eigenvalue of the training fold's Gram matrix.
_RIDGE_GRID = tuple(10.0**e for e in range(-4, 3))


def linear_probe_cv(features: Tensor, labels: Tensor, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated accuracy of a linear probe: a ridge classifier (regression on one-hot targets, argmax).

    The probe of scikit-learn's ``RidgeClassifierCV``: features are standardised on each training fold and the ridge
    penalty is chosen per training fold by its exact leave-one-out error (from one eigendecomposition), so nothing
    is tuned on the held-out fold. Closed form and in float64: deterministic, and fast when there are fewer images
    than features. Folds are stratified, drawn with ``seed``. Like any least-squares classifier it can miss classes
    whose means lie on one line ("masking"); pooled features of real images spread the classes over many directions.

    Args:
        features: Pooled features ``[N, D]``.
        labels: Class indices ``[N]`` in ``0..C-1``.
        folds: Number of folds, at least 2 and at most the smallest class count.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> labels = torch.arange(60) % 3
        >>> means = 4.0 * torch.eye(3, 5)  # one direction per class
        >>> linear_probe_cv(torch.randn(60, 5, generator=g) + means[labels], labels)
        1.0
    """
    check_int("folds", folds, 2)
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
        raise ValueError(
            f"Expected `features` [N, D] and `labels` [N], got shapes {list(features.shape)} and {list(labels.shape)}."
        )
    y = labels.long()
    classes = int(y.max()) + 1
    counts = torch.bincount(y, minlength=classes)
    present = counts[counts > 0]
    if int(present.min()) < folds:
        raise ValueError(
            f"Expected every class to have at least `folds` = {folds} samples, got a class with {int(present.min())}."
        )
    generator = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(y), dtype=torch.long)
    for c in range(classes):
        members = torch.nonzero(y == c, as_tuple=True)[0]
        fold[members[torch.randperm(len(members), generator=generator)]] = torch.arange(len(members)) % folds
    f = features.detach().double()
    correct = 0
    for k in range(folds):
        train, test = fold != k, fold == k
        correct += int((_ridge_predict(f[train], y[train], classes, f[test]) == y[test]).sum())
    return correct / len(y)


def _ridge_predict(x: Tensor, y: Tensor, classes: int, x_test: Tensor) -> Tensor:
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x, x_test = (x - mean) / std, (x_test - mean) / std
    targets = torch.nn.functional.one_hot(y, classes).double()
    offset = targets.mean(0)
    s, u = torch.linalg.eigh(x @ x.T)  # the Gram matrix: [n, n], cheaper than [D, D] when n < D
    s = s.clamp_min(0.0)
    projected = u.T @ (targets - offset)
    best: tuple[float, float] | None = None
    for factor in _RIDGE_GRID:
        penalty = factor * float(s.mean())
        shrink = s / (s + penalty)
        fitted = u @ (shrink[:, None] * projected) + offset
        leverage = (u * u * shrink).sum(1) + 1.0 / len(x)  # diagonal of the hat matrix, intercept included
        loo = (fitted - leverage[:, None] * targets) / (1.0 - leverage[:, None]).clamp_min(1e-9)
        error = float((loo.argmax(1) != y).double().mean())
        if best is None or error < best[0]:
            best = (error, penalty)
    assert best is not None
    dual = u @ (projected / (s + best[1])[:, None])  # (K + penalty I)^-1 (T - offset)
    return (x_test @ (x.T @ dual) + offset).argmax(1)


def source_confidence(probs: Tensor) -> float:
    """Mean over images of the source head's highest class probability (``probs`` ``[N, Z]``, rows summing to 1).

    Example::

        >>> source_confidence(torch.tensor([[0.9, 0.1], [0.5, 0.5]], dtype=torch.float64))
        0.7
    """
    return float(probs.max(1).values.double().mean())


# -- the config --------------------------------------------------------------------------------------------------


def advised_config(
    advice: Advice,
    *,
    backbone: str,
    pretrained: bool | str,
    data: dict[str, Any],
    groups: int,
    steps_per_epoch: int,
    epochs: int | None = None,
    model: dict[str, Any] | None = None,
    trainer: dict[str, Any] | None = None,
    seed: int | None = 0,
) -> dict[str, Any]:
    """A ``fit`` config (as a dict, for YAML) that runs ``advice``'s recipe with its settings.

    Args:
        advice: From :func:`advise`.
        backbone: Model name, as ``model.backbone``.
        pretrained: As ``model.pretrained``.
        data: The data section: ``{"class_path": ..., "init_args": {...}}``.
        groups: Number of the backbone's layer groups (gradual unfreezing opens the top half, then the rest).
        steps_per_epoch: Optimizer steps per epoch (LP-FT warms up over a tenth of the run).
        epochs: ``trainer.max_epochs``; ``None`` for 5, the accuracy benchmark's protocol.
        model: Other model settings to keep (``num_classes`` and the recipe's own settings are replaced).
        trainer: Trainer settings; only accelerator, devices, precision and default_root_dir are kept.
        seed: ``seed_everything``.
    """
    epochs = epochs or _DEFAULT_EPOCHS
    hp = _HPARAMS[advice.recipe]
    kept = {k: v for k, v in (model or {}).items() if v is not None and k not in ("num_classes", "lr", "weight_decay")}
    model_section = {**kept, "backbone": backbone, "pretrained": pretrained, "lr": hp["lr"]}
    model_section["weight_decay"] = hp["weight_decay"]
    callbacks: list[dict[str, Any]] = []
    if advice.recipe == "linear_probe":
        callbacks.append(_callback("FreezeBackbone"))
    elif advice.recipe == "l2sp":
        callbacks.append(_callback("L2SP", alpha=hp["alpha"], beta=hp["beta"]))
    elif advice.recipe == "lp_ft":
        factor = round(_HPARAMS["full"]["lr"] / hp["lr"], 6)  # the fine-tuning phase runs at the full-FT rate
        warmup = max(1, round(0.1 * steps_per_epoch * epochs))
        callbacks.append(_callback("LPFT", probe_epochs=1, finetune_lr_factor=factor, warmup_steps=warmup))
    elif advice.recipe == "gradual_layerwise":
        per_stage = max(1, math.ceil(groups / 2))  # the head, then the top half of the groups, then all
        callbacks.append(_callback("GradualUnfreeze", every_n_epochs=1, groups_per_stage=per_stage))
        callbacks.append(_callback("LayerwiseLR", decay=hp["decay"]))
    callbacks.append(
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"monitor": "val/acc", "mode": "max", "filename": "best-epoch{epoch}"},
        }
    )
    trainer_section = {k: v for k, v in (trainer or {}).items() if k in _TRAINER_KEYS and v is not None}
    trainer_section |= {"max_epochs": epochs, "callbacks": callbacks}
    config: dict[str, Any] = {}
    if seed is not None:
        config["seed_everything"] = seed
    config |= {"model": model_section, "data": data, "trainer": trainer_section}
    return config


def _callback(name: str, **init_args: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"class_path": f"lt_finetune.callbacks.{name}"}
    if init_args:
        entry["init_args"] = init_args
    return entry


def format_evidence(evidence: Evidence, backbone: str, groups: int, source_classes: int | None) -> list[str]:
    """The evidence as lines for the report and the config's header."""
    e = evidence
    smallest = f", smallest class {e.min_per_class}" if e.min_per_class is not None else ""
    lines = [f"labels per class: median {e.labels_per_class:g}{smallest}, {e.num_classes} classes"]
    if e.probe_accuracy is not None:
        lines.append(
            f"linear-probe accuracy: {e.probe_accuracy:.3f} (ridge probe, stratified cross-validation on {e.samples} "
            f"training images; chance {1 / e.num_classes:.3f})"
        )
    if e.source_confidence is not None:
        lines.append(
            f"source-head confidence: {e.source_confidence:.3f} (mean max-probability over {source_classes} source "
            "classes; reported, not thresholded: its level depends on the model)"
        )
    lines.append(f"backbone: {backbone}, {'pretrained' if e.pretrained else 'random weights'}, {groups} layer groups")
    return lines


def measure_evidence(
    datamodule: Any,
    backbone: str,
    pretrained: bool | str,
    *,
    max_samples: int | None = 1000,
    folds: int = 5,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[Evidence, int | None]:
    """Measure the :class:`Evidence` of ``backbone`` (with ``pretrained`` weights) on ``datamodule``'s training split.

    Labels per class count the whole training split; the probe and the source-head confidence use one pass over
    at most ``max_samples`` of its images, stratified and without augmentation
    (:func:`~lt_finetune.ranking.training_sample`).

    Returns:
        ``(evidence, source_classes)``: the number of source classes is ``None`` without a source head.
    """
    from lt_finetune.ranking import (
        Candidate,
        candidate_normalization,
        datamodule_normalization,
        extract,
        renormalizer,
        source_model,
        training_sample,
    )

    _, all_labels, num_classes = training_sample(datamodule, None)
    counts = torch.bincount(all_labels, minlength=num_classes)
    counts = counts[counts > 0]
    dataset: Dataset[Any]
    dataset, labels, _ = training_sample(datamodule, max_samples)
    candidate = Candidate(backbone, pretrained, backbone)
    features, probs = extract(
        source_model(candidate),
        dataset,
        batch_size=int(getattr(datamodule, "batch_size", 64)),
        device=device,
        progress=backbone if progress else None,
        renormalize=renormalizer(datamodule_normalization(datamodule), candidate_normalization(candidate)),
    )
    sampled = torch.bincount(labels)
    folds = min(folds, int(sampled[sampled > 0].min()))
    probe = linear_probe_cv(features, labels, folds=folds) if folds >= 2 and pretrained is not False else None
    evidence = Evidence(
        labels_per_class=float(counts.float().median()),
        probe_accuracy=probe,
        num_classes=num_classes,
        pretrained=pretrained is not False,
        source_confidence=source_confidence(probs) if probs is not None else None,
        samples=len(labels),
        min_per_class=int(counts.min()),
    )
    return evidence, (int(probs.shape[1]) if probs is not None else None)
