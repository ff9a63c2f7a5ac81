"""Unsupervised domain adaptation, MNIST-5k (source) to UCI digits (target): ERM vs AdaBN vs each DomainAdapt method.

``python -m benchmarks.domain_adapt [--seeds 0,1,2] [--epochs 10] [--methods erm,adabn,...] [--smoke]``

One backbone for every method, a LeNet-style CNN with BatchNorm at 28 px trained from scratch, AdamW with the
default warm-up + cosine schedule. Target test accuracy is reported at two checkpoints per run, both chosen
without target labels: the epoch with the best ``val/da_score`` (the label-free rule of ``DomainAdapt``: source
validation accuracy and information maximization on the unlabelled target pool) and the last epoch. Target labels
are only read to compute the reported accuracy. Results go to ``benchmarks/results/domain_adapt.json``; the page is
``docs/domain_adaptation.md`` with ``docs/benchmarks/domain_adaptation.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from benchmarks.common import REPO, RESULTS_DIR, library_versions, machine_info, quiet
from lt_finetune import TransferModule
from lt_finetune.callbacks import DomainAdapt
from lt_finetune.data import DomainAdaptDataModule, MNIST5kDataModule, UCIDigitsDataModule

PAGE = REPO / "docs" / "domain_adaptation.md"
PLOT = REPO / "docs" / "benchmarks" / "domain_adaptation.png"

#: name -> (label, DomainAdapt arguments, whether the target stream is in the training batches)
METHODS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "erm": ("ERM (source only)", {"method": "none"}, False),
    "adabn": ("AdaBN", {"method": "none", "adabn": True}, False),
    "dann": ("DANN", {"method": "dann"}, True),
    "cdan": ("CDAN+E", {"method": "cdan", "entropy": True}, True),
    "mcc": ("MCC", {"method": "mcc"}, True),
    "mmd": ("MK-MMD", {"method": "mmd"}, True),
    "coral": ("Deep CORAL", {"method": "coral"}, True),
    "mcc_adabn": ("MCC + AdaBN", {"method": "mcc", "adabn": True}, True),
}


def lenet() -> nn.Module:
    """LeNet-style feature extractor with BatchNorm: [B, 3, 28, 28] -> [B, 128]."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 5), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.BatchNorm1d(128), nn.ReLU(),
    )  # fmt: skip


def run_one(method: str, seed: int, epochs: int, limit: int | None, root: Path) -> dict[str, Any]:
    """Fit one method with one seed; the target test accuracy at the label-free selection and at the last epoch."""
    _, args, stream = METHODS[method]
    args = {**args, "hidden": 256} if args["method"] in ("dann", "cdan") else args
    pl.seed_everything(seed, workers=True)
    source = MNIST5kDataModule(batch_size=64, seed=seed)
    target = UCIDigitsDataModule(batch_size=64, seed=seed)
    data = DomainAdaptDataModule(source, target, target_batch_size=64, stream_target=stream, seed=seed)
    model = TransferModule(lenet(), num_classes=10, lr=2e-3, weight_decay=5e-4, input_size=(3, 28, 28))
    ckpt = ModelCheckpoint(dirpath=root, monitor="val/da_score", mode="max", save_top_k=1, save_last=True)
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
    for which, path in (("selected", ckpt.best_model_path), ("last", ckpt.last_model_path)):
        metrics = trainer.test(model, data, ckpt_path=path, verbose=False)[0]
        result[which] = {"target_acc": metrics["test/target_acc"], "source_acc": metrics["test/acc"]}
    result["selected_epoch"] = max(range(len(history)), key=lambda i: history[i].get("val/da_score", -1.0))
    return result


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        row: dict[str, Any] = {"method": method, "label": METHODS[method][0], "seeds": [r["seed"] for r in mine]}
        for which in ("selected", "last"):
            row[which] = _mean_std([100 * r[which]["target_acc"] for r in mine])
            row[which + "_source"] = _mean_std([100 * r[which]["source_acc"] for r in mine])
        row["fit_s"] = statistics.fmean(r["fit_s"] for r in mine)
        rows.append(row)
    return rows


def write_page(result: dict[str, Any]) -> None:
    rows = summarise(result["runs"])
    erm = next((r for r in rows if r["method"] == "erm"), None)
    lines = [
        "## Benchmark: MNIST-5k to UCI digits",
        "",
        f"`{result['command']}`, {result['started']}, {result['wall_s'] / 60:.1f} min on "
        f"{result['machine'].get('nproc', '?')} CPU cores (shared with other work). Source: 3,500 MNIST-5k training "
        "digits (500 for validation); target: 1,078 UCI digits, unlabelled, upscaled from 8x8 to 28 px; reported on "
        f"the 359 held-out UCI test digits. LeNet-style CNN with BatchNorm, {result['epochs']} epochs, batch 64 + 64, "
        "AdamW lr 2e-3, every method at its default weight (none tuned on target labels). Target test accuracy, "
        f"mean ± std over seeds {result['seeds']}:",
        "",
        "| method | target acc, label-free selection (%) | target acc, last epoch (%) | vs ERM (selected) "
        "| source test acc, last (%) | fit time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = "" if erm is None or r is erm else f"{r['selected'][0] - erm['selected'][0]:+.1f}"
        lines.append(
            f"| {r['label']} | {r['selected'][0]:.1f} ± {r['selected'][1]:.1f} "
            f"| {r['last'][0]:.1f} ± {r['last'][1]:.1f} | {delta} | {r['last_source'][0]:.1f} | {r['fit_s']:.0f} |"
        )
    lines += ["", "![Target test accuracy per method](benchmarks/domain_adaptation.png)", ""]
    _plot(rows)
    text = PAGE.read_text() if PAGE.exists() else ""
    marker = "## Benchmark: MNIST-5k to UCI digits"
    head = text.split(marker)[0].rstrip() + "\n\n" if marker in text else text
    PAGE.write_text(head + "\n".join(lines) + "\n" + _tail(text, marker))


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

    fig, ax = plt.subplots(figsize=(8, 3.6))
    x = range(len(rows))
    for offset, which, label in ((-0.2, "selected", "label-free selection"), (0.2, "last", "last epoch")):
        ax.bar(
            [i + offset for i in x], [r[which][0] for r in rows], 0.4, yerr=[r[which][1] for r in rows],
            label=label, capsize=3,
        )  # fmt: skip
    ax.set_xticks(list(x), [r["label"] for r in rows], rotation=20, ha="right")
    ax.set_ylabel("target test accuracy (%)")
    ax.set_title("MNIST-5k -> UCI digits, LeNet-BN at 28 px")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--methods", default="erm,adabn,dann,cdan,mcc,mmd,coral")
    parser.add_argument("--smoke", action="store_true", help="2 epochs of 5 batches, results under /tmp")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "domain_adapt.json")
    parser.add_argument("--page", action="store_true", help="only rewrite the docs page from --out")
    args = parser.parse_args(argv)
    quiet()
    if args.page:
        write_page(json.loads(args.out.read_text()))
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    epochs, limit = (2, 5) if args.smoke else (args.epochs, None)
    out = Path(tempfile.gettempdir()) / "lt_finetune_da_smoke.json" if args.smoke else args.out
    previous = json.loads(out.read_text())["runs"] if out.exists() and not args.smoke else []
    runs = [r for r in previous if (r["method"], r["seed"]) not in {(m, s) for m in methods for s in seeds}]
    start = time.perf_counter()
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
                "command": "python -m benchmarks.domain_adapt " + " ".join(argv or []),
                "started": time.strftime("%Y-%m-%d %H:%M %Z"),
                "wall_s": time.perf_counter() - start,
                "epochs": epochs,
                "seeds": sorted({r["seed"] for r in runs}),
                "machine": machine_info(),
                "versions": library_versions(),
                "runs": runs,
            }
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))
    if not args.smoke:
        write_page(result)
    for row in summarise(runs):
        print(f"{row['label']:20s} selected {row['selected'][0]:.1f} ± {row['selected'][1]:.1f}   "
              f"last {row['last'][0]:.1f} ± {row['last'][1]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
