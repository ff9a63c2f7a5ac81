"""Fast and light: the cached linear probe (``CachedProbe``) and slim checkpoints (``SlimCheckpoint``).

``python -m benchmarks.fast_light [--sections probe,checkpoints] [--epochs 20] [--smoke]`` prints two Markdown
tables and writes them to ``docs/benchmarks/fast_light_probe.md`` and ``docs/benchmarks/fast_light_checkpoints.md``
(``--smoke``: tiny settings, nothing written unless ``--out`` is given).

Protocol, both sections: Animal-MNIST at 64 px (``AnimalMNISTDataModule(train_per_class=210, val_per_class=90)``:
2,100 training and 900 validation images, batch 64, seed 0), torchvision's ImageNet MobileNetV2, the linear-probe
recipe of ``benchmarks/recipes.py`` (``FreezeBackbone()``, AdamW at the selected learning rate, per-step warm-up
and cosine), on the CPU.

- **probe**: the same probe with and without ``CachedProbe``, ``hflip=False`` (deterministic inputs), validated every
  epoch. Epoch time is wall time from ``on_train_epoch_start`` to ``on_train_epoch_end`` (training and validation);
  "epoch 2+" is the median over every epoch after the first (the cached run builds its cache in its first epoch).
  End to end is the wall time of ``trainer.fit``. Both runs alternate in one process, so the ratios compare like
  with like on the same machine state. The final head weights and validation accuracy of both are compared.
- **checkpoints**: after a short fit, ``trainer.save_checkpoint`` with Lightning's default contents and with
  ``SlimCheckpoint``, for a linear probe and (when ``lt_finetune/callbacks/lora.py`` and ``peft`` are there) a
  LoRA run: file size, median save time over repeats, and the time of ``TransferModule.load_from_checkpoint``;
  every slim checkpoint is loaded back and compared tensor for tensor with the model that saved it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.common import (
    REPO,
    RESULTS_DIR,
    library_versions,
    machine_info,
    make_trainer,
    quiet,
    save_result,
    scratch_dir,
    weights_path,
)
from benchmarks.markdown import table
from benchmarks.recipes import build, load_hparams
from lt_finetune import TransferModule
from lt_finetune.callbacks import CachedProbe, SlimCheckpoint
from lt_finetune.data import AnimalMNISTDataModule

PROBE_PAGE = REPO / "docs" / "benchmarks" / "fast_light_probe.md"
CHECKPOINT_PAGE = REPO / "docs" / "benchmarks" / "fast_light_checkpoints.md"
COMMAND = "python -m benchmarks.fast_light"


def _log(message: str) -> None:
    print(message, flush=True)


class EpochClock(Callback):
    """Wall and CPU time of every training epoch, validation included (Lightning validates inside the epoch).

    CPU time (``time.process_time``, all threads of this process) is the steadier number on a shared machine:
    other processes lengthen the wall time of an epoch, not the CPU time it takes.
    """

    def __init__(self) -> None:
        self.starts: list[tuple[float, float]] = []
        self.durations: list[float] = []
        self.cpu: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.starts.append((time.perf_counter(), time.process_time()))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wall, cpu = self.starts[-1]
        self.durations.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)


def _datamodule(per_class: int, val_per_class: int) -> AnimalMNISTDataModule:
    data = AnimalMNISTDataModule(
        image_size=64, train_per_class=per_class, val_per_class=val_per_class, batch_size=64, hflip=False, seed=0
    )
    data.setup("fit")
    return data


def _probe_run(data: AnimalMNISTDataModule, epochs: int, cached: bool, weights: str) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    root = scratch_dir()
    model, callbacks = build("linear_probe", load_hparams(), weights, 10, root, epochs)
    clock = EpochClock()
    extra: list[Callback] = [CachedProbe()] if cached else []
    trainer = make_trainer(root, [clock, *callbacks, *extra], max_epochs=epochs, limit_val_batches=1.0)
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, datamodule=data)
    total = time.perf_counter() - start
    return {
        "epoch_s": clock.durations,
        "epoch_cpu_s": clock.cpu,
        "fit_s": total,
        "fit_cpu_s": time.process_time() - cpu,
        "val_acc": float(trainer.callback_metrics["val/acc"]),
        "head": torch.cat([p.detach().reshape(-1) for p in model.head.parameters()]),
    }


def run_probe(epochs: int, per_class: int, val_per_class: int, log: Any = _log) -> dict[str, Any]:
    """The cached and the uncached probe, one after the other in this process."""
    weights = weights_path()
    data = _datamodule(per_class, val_per_class)
    runs = {}
    for name, cached in (("uncached", False), ("cached", True)):
        runs[name] = _probe_run(data, epochs, cached, weights)
        log(f"  probe {name}: {runs[name]['fit_s']:.1f} s, val acc {runs[name]['val_acc']:.4f}")
    later = {name: statistics.median(r["epoch_s"][1:] or r["epoch_s"]) for name, r in runs.items()}
    later_cpu = {name: statistics.median(r["epoch_cpu_s"][1:] or r["epoch_cpu_s"]) for name, r in runs.items()}
    head_diff = float((runs["cached"]["head"] - runs["uncached"]["head"]).abs().max())
    return {
        "epochs": epochs,
        "train_items": len(data.train_dataset),  # type: ignore[arg-type]
        "val_items": len(data.val_dataset),  # type: ignore[arg-type]
        "first_epoch_s": {name: r["epoch_s"][0] for name, r in runs.items()},
        "later_epoch_s": later,
        "epoch_speedup": later["uncached"] / later["cached"],
        "fit_s": {name: r["fit_s"] for name, r in runs.items()},
        "fit_speedup": runs["uncached"]["fit_s"] / runs["cached"]["fit_s"],
        "later_epoch_cpu_s": later_cpu,
        "epoch_cpu_speedup": later_cpu["uncached"] / later_cpu["cached"],
        "fit_cpu_s": {name: r["fit_cpu_s"] for name, r in runs.items()},
        "fit_cpu_speedup": runs["uncached"]["fit_cpu_s"] / runs["cached"]["fit_cpu_s"],
        "epoch_s": {name: r["epoch_s"] for name, r in runs.items()},
        "epoch_cpu_s": {name: r["epoch_cpu_s"] for name, r in runs.items()},
        "val_acc": {name: r["val_acc"] for name, r in runs.items()},
        "head_max_abs_diff": head_diff,
        "versions": library_versions(),
    }


# -- checkpoints -------------------------------------------------------------------------------------------------


class _SaveTimer(Callback):
    """At the end of training (SlimCheckpoint still active), saves ``repeats`` checkpoints and times each."""

    def __init__(self, folder: Path, repeats: int) -> None:
        self.folder = folder
        self.repeats = repeats
        self.times: list[float] = []
        self.path = folder / "model.ckpt"

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for _ in range(self.repeats):
            start = time.perf_counter()
            trainer.save_checkpoint(self.path)
            self.times.append(time.perf_counter() - start)


def lora_available() -> bool:
    """Whether the LoRA callback and peft are installed."""
    return (REPO / "lt_finetune" / "callbacks" / "lora.py").is_file() and importlib.util.find_spec("peft") is not None


def _checkpoint_run(data: AnimalMNISTDataModule, kind: str, slim: bool, weights: str, repeats: int) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    root = scratch_dir()
    model, callbacks = build("linear_probe", load_hparams(), weights, 10, root, 1)
    if kind == "lora":
        from lt_finetune.callbacks import LoRA

        callbacks = [LoRA(r=8)]
    folder = Path(tempfile.mkdtemp(prefix="lt_bench_ckpt_"))
    timer = _SaveTimer(folder, repeats)
    extra: list[Callback] = [SlimCheckpoint()] if slim else []
    trainer = make_trainer(root, [*callbacks, *extra, timer], max_epochs=1, limit_train_batches=4)
    trainer.fit(model, datamodule=data)
    size = os.path.getsize(timer.path)
    start = time.perf_counter()
    loaded = TransferModule.load_from_checkpoint(timer.path, map_location="cpu")
    load_s = time.perf_counter() - start
    mine, theirs = model.state_dict(), loaded.state_dict()
    exact = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    return {"bytes": size, "save_s": statistics.median(timer.times), "load_s": load_s, "exact": exact}


def run_checkpoints(per_class: int, repeats: int, log: Any = _log) -> dict[str, Any]:
    """Sizes and save times of default and slim checkpoints, for a linear probe and a LoRA run."""
    weights = weights_path()
    data = _datamodule(per_class, 2)
    kinds = ["linear_probe", *(["lora"] if lora_available() else [])]
    rows: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        for slim in (False, True):
            name = f"{kind}/{'slim' if slim else 'default'}"
            rows[name] = _checkpoint_run(data, kind, slim, weights, repeats)
            log(f"  {name}: {rows[name]['bytes'] / 2**20:.2f} MiB, save {rows[name]['save_s'] * 1000:.1f} ms")
    return {"rows": rows, "lora": "lora" in kinds, "repeats": repeats}


# -- report ------------------------------------------------------------------------------------------------------


def _provenance(wall: float, args: argparse.Namespace) -> str:
    machine, versions = machine_info(), library_versions()
    return (
        f"*Produced by `{COMMAND}{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` on "
        f"{time.strftime('%Y-%m-%d')} ({machine['cpu_model'] or 'CPU'}, {machine['nproc']} cores, "
        f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}, torch "
        f"{versions['torch']}, lightning {versions['lightning']}, lt_finetune {versions['git']}); wall time "
        f"{wall:.0f} s.*"
    )


def _meta(wall: float, args: argparse.Namespace) -> dict[str, Any]:
    command = f"{COMMAND} {' '.join(sys.argv[1:])}".strip()
    return {"command": command, "wall_s": wall, "threads": torch.get_num_threads(), "machine": machine_info()}


def probe_page(result: dict[str, Any], provenance: str) -> str:
    """The Markdown page of the probe section."""
    epochs = result["epochs"]

    def row(name: str, label: str) -> list[str]:
        return [
            label,
            f"{result['first_epoch_s'][name]:.2f}",
            f"{result['later_epoch_s'][name]:.3f}",
            f"{result['later_epoch_cpu_s'][name]:.3f}",
            f"{result['fit_s'][name]:.1f}",
            f"{result['fit_cpu_s'][name]:.1f}",
            f"{result['val_acc'][name]:.4f}",
        ]

    speedups = [result[k] for k in ("epoch_speedup", "epoch_cpu_speedup", "fit_speedup", "fit_cpu_speedup")]
    rows = [
        row("uncached", "Uncached (FreezeBackbone)"),
        row("cached", "Cached (FreezeBackbone + CachedProbe)"),
        ["Speed-up", "", *(f"**{x:.1f}x**" for x in speedups[:2]), *(f"**{x:.1f}x**" for x in speedups[2:]), ""],
    ]
    epoch_goal = min(result["epoch_speedup"], result["epoch_cpu_speedup"])
    goal = "met" if epoch_goal >= 20 else "**not met**"
    header = [
        "run",
        "epoch 1 wall (s)",
        "epoch 2+ wall (s)",
        "epoch 2+ CPU (s)",
        f"{epochs} epochs wall (s)",
        f"{epochs} epochs CPU (s)",
        "val acc",
    ]
    lines = [
        "# Cached linear probe",
        "",
        provenance,
        "",
        f"Animal-MNIST, 64 px, {result['train_items']} training and {result['val_items']} validation images, batch 64;"
        f" ImageNet MobileNetV2 frozen, linear head; {epochs} epochs, validation every epoch; CPU. Epoch times include"
        " validation (cached too, by `cache_val`); the cached run computes its features during its first epoch. "
        '"Epoch 2+" is the median over epochs 2 to the last; CPU is the process\'s CPU time (all its threads), '
        "which other processes on a shared machine do not lengthen; wall is what a user waits.",
        "",
        *table(header, rows),
        f"Goal: epochs 2+ at least 20x faster than an uncached frozen epoch: {goal} ({result['epoch_speedup']:.1f}x "
        f"wall, {result['epoch_cpu_speedup']:.1f}x CPU). Largest difference between the two runs' final head weights:"
        f" {result['head_max_abs_diff']:.2e}.",
        "",
    ]
    return "\n".join(lines)


def checkpoint_page(result: dict[str, Any], provenance: str) -> str:
    """The Markdown page of the checkpoint section."""
    rows = []
    labels = {"linear_probe": "Linear probe (FreezeBackbone)", "lora": "LoRA (r=8, default conv targets)"}
    for kind in ("linear_probe", "lora"):
        default, slim = result["rows"].get(f"{kind}/default"), result["rows"].get(f"{kind}/slim")
        if default is None or slim is None:
            continue
        for name, row in (("Lightning default", default), ("SlimCheckpoint", slim)):
            rows.append(
                [
                    labels[kind],
                    name,
                    f"{row['bytes'] / 2**20:.2f}",
                    f"{row['save_s'] * 1000:.1f}",
                    f"{row['load_s'] * 1000:.0f}",
                    "yes" if row["exact"] else "**no**",
                ]
            )
        rows.append(
            [
                labels[kind],
                "ratio",
                f"**{default['bytes'] / slim['bytes']:.0f}x smaller**",
                f"{default['save_s'] / slim['save_s']:.1f}x",
                "",
                "",
            ]
        )
    note = "" if result["lora"] else "LoRA row missing: `lt_finetune/callbacks/lora.py` or `peft` was not installed.\n"
    lines = [
        "# Slim checkpoints",
        "",
        provenance,
        "",
        "MobileNetV2 (ImageNet weights) on Animal-MNIST, 4 training steps, then `trainer.save_checkpoint` "
        f"{result['repeats']} times (median save time). Load time is `TransferModule.load_from_checkpoint` (a slim "
        'checkpoint re-creates the backbone from the weights file and checks every digest). "Exact": every tensor '
        "of the loaded model equals the model that saved it.",
        "",
        *table(["run", "checkpoint", "size (MiB)", "save (ms)", "load (ms)", "exact"], rows),
        note,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="probe,checkpoints")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny settings; writes nothing unless --out is given")
    parser.add_argument("--out", type=Path, default=None, help="folder for the two pages (default docs/benchmarks)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args(argv)
    quiet()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    per_class, val_per_class, epochs = (20, 10, 2) if args.smoke else (210, 90, args.epochs)
    out = args.out if args.out is not None else (None if args.smoke else PROBE_PAGE.parent)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if "probe" in sections:
        start = time.perf_counter()
        result = run_probe(epochs, per_class, val_per_class)
        wall = time.perf_counter() - start
        page = probe_page(result, _provenance(wall, args))
        print(page)
        if out is not None:
            (out / PROBE_PAGE.name).write_text(page)
            save_result(out if args.out is not None else RESULTS_DIR, "fast_light_probe", result, _meta(wall, args))
    if "checkpoints" in sections:
        start = time.perf_counter()
        result = run_checkpoints(per_class, 2 if args.smoke else args.repeats)
        wall = time.perf_counter() - start
        page = checkpoint_page(result, _provenance(wall, args))
        print(page)
        if out is not None:
            (out / CHECKPOINT_PAGE.name).write_text(page)
            save_result(
                out if args.out is not None else RESULTS_DIR, "fast_light_checkpoints", result, _meta(wall, args)
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
