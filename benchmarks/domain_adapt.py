"""Unsupervised domain adaptation, MNIST-5k (source) to UCI digits (target): ERM vs AdaBN vs each DomainAdapt method.

``python -m benchmarks.domain_adapt [--seeds 0,1,2] [--epochs 10] [--methods erm,adabn,...] [--threads 1] [--smoke]``

Protocol (every choice made without target labels):

- **Data.** Source: the MNIST-5k training split (3,500 digits; 500 more for validation). Target: the UCI digits of
  scikit-learn, 8x8 counts 0-16 scaled to 0-255, upscaled bilinearly to 28 px: 1,078 training digits serve as the
  unlabelled pool, the 359 held-out test digits are reported. Both are ink-bright on dark, normalised with mean and
  std 0.5, no augmentation. A UCI digit fills its whole frame while an MNIST digit sits in a 20 px box inside 28 px;
  as with USPS in the usual MNIST-to-USPS protocol, the loader does not re-frame the target: lower resolution,
  blur, stroke width and framing are the shift under study.
- **Backbone.** The LeNet of the DANN and Transfer-Learning-Library digit experiments, trained from scratch: conv
  5x5 (20) - max-pool - ReLU - conv 5x5 (50) - Dropout2d 0.5 - max-pool - ReLU - fc 500 - ReLU, then dropout 0.5
  and a linear classifier (the 500-d features are what the alignment losses see). It has no BatchNorm, so
  **AdaBN** (and MCC + AdaBN, and the "ERM (LeNet-BN)" reference) run on **LeNet-BN**, the same network with
  BatchNorm after both convolutions and the fc layer: AdaBN has nothing to adapt without BatchNorm. With source
  statistics, LeNet-BN falls apart on this target (its ERM row), which is why it is not the common backbone.
- **Optimisation.** AdamW, lr 2e-3, weight decay 5e-4, the library's warm-up + cosine schedule, batches of 64
  source (+ 64 target for the alignment methods), 10 epochs of 55 steps. lr and epochs were chosen on the
  *source* validation accuracy of the source-only LeNet: at 15 epochs AdamW with lr 1e-3, 2e-3 or 5e-3 plateaus at
  98.6 % from epoch 9-12 (SGD with momentum: 97.2 % at lr 0.01, 98.4 % at 0.03); 10 epochs reach 98.4 %, within
  one validation image, and fit the time budget (9 rows x 3 seeds on 2 shared CPU cores). Every method uses its
  default weight and the default discriminator; nothing is tuned per method.
- **Selection.** Target test accuracy at two checkpoints per run, both chosen without target labels: the epoch
  with the best ``val/da_score`` (the label-free rule of ``DomainAdapt``: source validation accuracy and
  information maximization on the unlabelled target pool) and the last epoch. Target labels are only read to
  compute the reported accuracy.

Results go to ``benchmarks/results/domain_adapt.json`` (runs of another protocol there are dropped, runs of this
one are kept and merged); the page is ``docs/domain_adaptation.md`` with ``docs/benchmarks/domain_adaptation.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from benchmarks.common import REPO, RESULTS_DIR, library_versions, machine_info, quiet
from lt_finetune import TransferModule
from lt_finetune.callbacks import DomainAdapt
from lt_finetune.data import DomainAdaptDataModule, MNIST5kDataModule, UCIDigitsDataModule
from lt_finetune.domain import DigitLeNet

PAGE = REPO / "docs" / "domain_adaptation.md"
PLOT = REPO / "docs" / "benchmarks" / "domain_adaptation.png"

#: Every choice of the protocol (see the module docstring); runs of another protocol are not merged.
PROTOCOL: dict[str, Any] = {
    "backbone": "LeNet (20-50-500, dropout 0.5); LeNet-BN for AdaBN rows",
    "optimizer": "AdamW",
    "lr": 2e-3,
    "weight_decay": 5e-4,
    "batch_size": 64,
    "target_batch_size": 64,
    "drop_rate": 0.5,
    "image_size": 28,
    "selection": "val/da_score",
}

#: name -> (label, DomainAdapt arguments, whether the target stream is in the training batches, BatchNorm backbone)
METHODS: dict[str, tuple[str, dict[str, Any], bool, bool]] = {
    "erm": ("ERM (source only)", {"method": "none"}, False, False),
    "erm_bn": ("ERM (LeNet-BN)", {"method": "none"}, False, True),
    "adabn": ("AdaBN (LeNet-BN)", {"method": "none", "adabn": True}, False, True),
    "dann": ("DANN", {"method": "dann"}, True, False),
    "cdan": ("CDAN+E", {"method": "cdan", "entropy": True}, True, False),
    "mcc": ("MCC", {"method": "mcc"}, True, False),
    "mmd": ("MK-MMD", {"method": "mmd"}, True, False),
    "coral": ("Deep CORAL", {"method": "coral"}, True, False),
    "mcc_adabn": ("MCC + AdaBN (LeNet-BN)", {"method": "mcc", "adabn": True}, True, True),
}


def spec(method: str) -> tuple[str, dict[str, Any], bool, bool]:
    """A row of :data:`METHODS`, or a weight variant written ``name@weight`` (``cdan@3``: CDAN+E at weight 3)."""
    name, _, weight = method.partition("@")
    label, args, stream, batchnorm = METHODS[name]
    if not weight:
        return label, args, stream, batchnorm
    return f"{label} (weight {weight})", {**args, "weight": float(weight)}, stream, batchnorm


def run_one(method: str, seed: int, epochs: int, limit: int | None, root: Path) -> dict[str, Any]:
    """Fit one method with one seed; the target test accuracy at the label-free selection and at the last epoch."""
    _, args, stream, batchnorm = spec(method)
    p = PROTOCOL
    pl.seed_everything(seed, workers=True)
    source = MNIST5kDataModule(image_size=p["image_size"], batch_size=p["batch_size"], seed=seed)
    target = UCIDigitsDataModule(image_size=p["image_size"], batch_size=p["batch_size"], seed=seed)
    data = DomainAdaptDataModule(
        source, target, target_batch_size=p["target_batch_size"], stream_target=stream, seed=seed
    )
    model = TransferModule(
        DigitLeNet(batchnorm), num_classes=10, lr=p["lr"], weight_decay=p["weight_decay"], drop_rate=p["drop_rate"],
        input_size=(3, p["image_size"], p["image_size"]),
    )  # fmt: skip
    # No `save_last`: Lightning 2.6 writes last.ckpt only when a top-k checkpoint was written in the same step, so
    # it would be the selected checkpoint again. The last epoch is tested from the weights in memory after fit.
    ckpt = ModelCheckpoint(dirpath=root, monitor="val/da_score", mode="max", save_top_k=1)
    history: list[dict[str, float]] = []

    class _Record(pl.Callback):
        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if not trainer.sanity_checking:
                history.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})

    callback = DomainAdapt(**args)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[callback, ckpt, _Record()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=limit,
        default_root_dir=root,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    fit_s = time.perf_counter() - start
    result: dict[str, Any] = {"method": method, "seed": seed, "fit_s": fit_s, "history": history}
    for which, path in (("last", None), ("selected", ckpt.best_model_path)):  # "last" first: the weights in memory
        metrics = trainer.test(model, data, ckpt_path=path, verbose=False)[0]
        result[which] = {"target_acc": metrics["test/target_acc"], "source_acc": metrics["test/acc"]}
    result["selected_epoch"] = int(torch.load(ckpt.best_model_path, map_location="cpu", weights_only=False)["epoch"])
    best = max(range(len(history)), key=lambda i: history[i].get("val/da_score", -1.0))
    if best != result["selected_epoch"]:
        raise RuntimeError(f"The selected checkpoint is from epoch {result['selected_epoch']}, the best score {best}.")
    return result


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    present = list(dict.fromkeys(r["method"] for r in runs))
    order = [m for m in METHODS if m in present] + [m for m in present if m not in METHODS]
    for method in order:
        mine = [r for r in runs if r["method"] == method]
        row: dict[str, Any] = {"method": method, "label": spec(method)[0], "seeds": [r["seed"] for r in mine]}
        scores = [r["history"][r["selected_epoch"]].get("val/da_score") for r in mine]
        row["da_score"] = statistics.fmean(scores) if None not in scores else None
        for which in ("selected", "last"):
            row[which] = _mean_std([100 * r[which]["target_acc"] for r in mine])
            row[which + "_source"] = _mean_std([100 * r[which]["source_acc"] for r in mine])
        row["fit_s"] = statistics.fmean(r["fit_s"] for r in mine)
        erm = {r["seed"]: r for r in runs if r["method"] == "erm"}
        paired = [
            100 * (r["selected"]["target_acc"] - erm[r["seed"]]["selected"]["target_acc"])
            for r in mine
            if r["seed"] in erm
        ]
        row["vs_erm"] = _mean_std(paired) if paired and method != "erm" else None
        rows.append(row)
    return rows


#: Rows that are references, not DomainAdapt methods held to the goals.
REFERENCES = ("erm", "erm_bn")


def goals(rows: list[dict[str, Any]], which: str = "selected") -> list[tuple[str, bool, str]]:
    """The three goals, each as (goal, met, numbers), on the mean target accuracy at ``which`` checkpoint."""
    by = {r["method"]: r for r in rows}
    if "erm" not in by:
        return []
    erm = by["erm"][which][0]
    methods = [r for r in rows if r["method"] not in REFERENCES]
    if not methods:
        return []
    best = max(methods, key=lambda r: r[which][0])
    deltas = ", ".join(f"{r['label']} {r[which][0] - erm:+.1f}" for r in methods)
    out = [
        (
            "the best DomainAdapt method >= +10 points over ERM",
            best[which][0] - erm >= 10,
            f"ERM {erm:.1f}; best {best['label']} {best[which][0] - erm:+.1f}; all: {deltas}",
        )
    ]
    if "adabn" in by:
        adabn = by["adabn"][which][0]
        ahead = [f"{r['label']} {r[which][0]:.1f}" for r in methods if r["method"] != "adabn" and r[which][0] > adabn]
        out.append(
            (
                "at least one method ahead of AdaBN",
                bool(ahead),
                f"AdaBN {adabn:.1f}; ahead: {', '.join(ahead) if ahead else 'none'}",
            )
        )
    below = [f"{r['label']} {r[which][0]:.1f}" for r in methods if r[which][0] < erm - 2]
    out.append(
        (
            "no method below ERM - 2",
            not below,
            f"threshold {erm - 2:.1f}; below: {', '.join(below) if below else 'none'}",
        )
    )
    return out


def write_page(result: dict[str, Any]) -> None:
    rows = summarise(result["runs"])
    protocol = result.get("protocol", {})
    lines = [
        "## Benchmark: MNIST-5k to UCI digits",
        "",
        f"`{result['command']}`, {result['started']}, {result['wall_s'] / 60:.1f} min on "
        f"{result['machine'].get('nproc', '?')} CPU cores shared with other work ({result.get('threads', '?')} torch "
        "thread, runs one at a time). Source: 3,500 MNIST-5k training digits (500 for validation); target: 1,078 UCI "
        "digits, unlabelled, upscaled from 8x8 to 28 px; reported on the 359 held-out UCI test digits. The LeNet of "
        "the DANN / Transfer-Learning-Library digit experiments (20-50-500, dropout 0.5), from scratch; the AdaBN rows "
        "use LeNet-BN, the same network with BatchNorm (see [the protocol](#benchmark-protocol)). "
        f"{result['epochs']} epochs, batch {protocol.get('batch_size', 64)} source + "
        f"{protocol.get('target_batch_size', 64)} target, AdamW lr {protocol.get('lr', 2e-3):g}, weight decay "
        f"{protocol.get('weight_decay', 5e-4):g}, every method at its default weight; nothing tuned on target labels. "
        f"Target test accuracy, mean ± std over seeds {result['seeds']}:",
        "",
        "| method | target acc, label-free selection (%) | target acc, last epoch (%) | vs ERM, same seed (selected) "
        "| source test acc, last (%) | fit time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = "" if r["vs_erm"] is None else f"{r['vs_erm'][0]:+.1f} ± {r['vs_erm'][1]:.1f}"
        lines.append(
            f"| {r['label']} | {r['selected'][0]:.1f} ± {r['selected'][1]:.1f} "
            f"| {r['last'][0]:.1f} ± {r['last'][1]:.1f} | {delta} | {r['last_source'][0]:.1f} | {r['fit_s']:.0f} |"
        )
    lines += ["", "![Target test accuracy per method](benchmarks/domain_adaptation.png)", ""]
    for which, title in (("selected", "label-free selection"), ("last", "last epoch")):
        verdict = goals(rows, which)
        if verdict:
            lines += [f"**Goals at the {title}** (mean target accuracy; ERM is the LeNet source-only row):", ""]
            lines += [f"- {goal}: **{'met' if met else 'not met'}** ({numbers})" for goal, met, numbers in verdict]
            lines.append("")
    _plot(rows)
    text = PAGE.read_text() if PAGE.exists() else ""
    marker = "## Benchmark: MNIST-5k to UCI digits"
    head = text.split(marker)[0].rstrip() + "\n\n" if marker in text else text
    PAGE.write_text(head + "\n".join(lines) + _tail(text, marker))


def _tail(text: str, marker: str) -> str:
    """Anything after the generated section (it ends at the next '## ' heading)."""
    if marker not in text:
        return ""
    after = text.split(marker, 1)[1]
    nxt = after.find("\n## ")
    return "" if nxt < 0 else after[nxt:]


def _plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    x = range(len(rows))
    for offset, which, label in ((-0.2, "selected", "label-free selection"), (0.2, "last", "last epoch")):
        ax.bar(
            [i + offset for i in x], [r[which][0] for r in rows], 0.4, yerr=[r[which][1] for r in rows],
            label=label, capsize=3,
        )  # fmt: skip
    ax.set_xticks(list(x), [r["label"] for r in rows], rotation=20, ha="right")
    ax.set_ylabel("target test accuracy (%)")
    erm = next((r for r in rows if r["method"] == "erm"), None)
    if erm is not None:
        ax.axhline(erm["selected"][0], color="grey", linestyle="--", linewidth=1, label="ERM (selected)")
    ax.set_title("MNIST-5k -> UCI digits, LeNet at 28 px (AdaBN rows: LeNet-BN), mean ± std over seeds")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (runs go one at a time)")
    parser.add_argument("--smoke", action="store_true", help="2 epochs of 5 batches, results under /tmp")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "domain_adapt.json")
    parser.add_argument("--page", action="store_true", help="only rewrite the docs page from --out")
    args = parser.parse_args(argv)
    quiet()
    if args.page:
        write_page(json.loads(args.out.read_text()))
        return
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted({m.partition("@")[0] for m in methods} - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    epochs, limit = (2, 5) if args.smoke else (args.epochs, None)
    protocol = {**PROTOCOL, "epochs": epochs}
    out = Path(tempfile.gettempdir()) / "lt_finetune_da_smoke.json" if args.smoke else args.out
    previous: dict[str, Any] = json.loads(out.read_text()) if out.exists() and not args.smoke else {}
    same = previous.get("protocol") == protocol
    if previous and not same:
        print(f"{out.name} holds runs of another protocol: they are replaced", flush=True)
    todo = {(m, s) for m in methods for s in seeds}
    runs = [r for r in previous.get("runs", []) if same and (r["method"], r["seed"]) not in todo]
    command = "python -m benchmarks.domain_adapt " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    wall_before = previous.get("wall_s", 0.0) if same and runs else 0.0
    start = time.perf_counter()
    result: dict[str, Any] = {}
    for seed in seeds:
        for method in methods:
            with tempfile.TemporaryDirectory() as tmp:
                run = run_one(method, seed, epochs, limit, Path(tmp))
            runs.append(run)
            print(
                f"{method:10s} seed {seed}: target acc selected {100 * run['selected']['target_acc']:.1f} "
                f"(epoch {run['selected_epoch']}), last {100 * run['last']['target_acc']:.1f}; {run['fit_s']:.0f} s",
                flush=True,
            )
            result = {
                "command": command.strip(),
                "started": started,
                "wall_s": wall_before + time.perf_counter() - start,
                "epochs": epochs,
                "threads": args.threads,
                "protocol": protocol,
                "seeds": sorted({r["seed"] for r in runs}),
                "machine": machine_info(),
                "versions": library_versions(),
                "runs": runs,
            }
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))
    if not args.smoke and args.out == RESULTS_DIR / "domain_adapt.json":
        write_page(result)  # other --out files (sweeps) leave the page alone
    for row in summarise(runs):
        score = "n/a" if row["da_score"] is None else f"{row['da_score']:.3f}"
        print(f"{row['label']:24s} selected {row['selected'][0]:.1f} ± {row['selected'][1]:.1f}   "
              f"last {row['last'][0]:.1f} ± {row['last'][1]:.1f}   mean val/da_score {score}")  # fmt: skip


if __name__ == "__main__":
    main()
