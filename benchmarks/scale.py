"""Section 6: cost as the training set grows, on Fashion-MNIST (Debian ``dataset-fashion-mnist``).

Each configuration (recipe, training-set size, DDP processes) runs one epoch in a fresh process
(:mod:`benchmarks.worker`); the report gives the epoch's wall time and the throughput. Skipped, with a note, when
the Debian package is absent.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import REPO, Settings, fashion_mnist_files

ROOT = REPO / ".cache" / "fashion_mnist"
IMAGE_SIZE = 64
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: Full fine-tuning through lt_finetune (backward through everything) and the frozen-backbone linear probe.
SCALE_RECIPES = ("layerwise_lr", "linear_probe")


def prepare_root() -> Path:
    """Decompress the Debian package's files into ``ROOT/FashionMNIST/raw/`` (torchvision's layout), once."""
    raw = ROOT / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for source in fashion_mnist_files():
        target = raw / source.name.removesuffix(".gz")
        if not target.is_file():
            with gzip.open(source, "rb") as f_in, tempfile.NamedTemporaryFile(dir=raw, delete=False) as f_out:
                shutil.copyfileobj(f_in, f_out)
            Path(f_out.name).replace(target)
    return ROOT


class _GrayImages(Dataset[tuple[Tensor, int]]):
    """uint8 ``[N, 1, H, W]`` images served as normalised 3-channel tensors, randomly flipped."""

    def __init__(self, images: Tensor, targets: Tensor) -> None:
        self.images, self.targets = images, targets
        std = torch.tensor(STD).view(3, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std), -torch.tensor(MEAN).view(3, 1, 1) / std

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return torch.addcmul(self.shift, image.float(), self.scale), int(self.targets[index])


class FashionSubset(pl.LightningDataModule):
    """The first ``size`` images of a seeded permutation of Fashion-MNIST's training set, at 64 px."""

    def __init__(self, images: Tensor, targets: Tensor, seed: int, batch_size: int = 64) -> None:
        super().__init__()
        self.dataset = _GrayImages(images, targets)
        self.seed, self.batch_size = seed, batch_size

    def train_dataloader(self) -> DataLoader[Any]:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True, generator=generator)


def fashion_datamodule(size: int, seed: int = 0) -> FashionSubset:
    """``size`` training images of Fashion-MNIST, resized to 64 px once."""
    from torchvision.datasets import FashionMNIST

    data = FashionMNIST(str(ROOT), train=True, download=False)
    order = torch.randperm(len(data.targets), generator=torch.Generator().manual_seed(seed))[:size]
    images = data.data[order].unsqueeze(1)
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return FashionSubset(images, data.targets[order], seed)


def run(settings: Settings, log: Any = print) -> dict[str, Any]:
    """Every (recipe, size, processes) configuration, each in a fresh process."""
    if not fashion_mnist_files():
        return {"skipped": "Fashion-MNIST is not installed (`make bench-setup` installs it when run as root)."}
    prepare_root()
    devices = (1, 2) if settings.scale_ddp else (1,)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in settings.scale_sizes:
            for recipe in SCALE_RECIPES:
                for n in devices:
                    out = Path(tmp) / f"{recipe}_{size}_{n}.json"
                    cmd = [sys.executable, "-m", "benchmarks.worker", "scale", str(out), "--size", str(size)]
                    cmd += ["--devices", str(n), "--recipe", recipe, "--warmup", "3"]
                    if settings.scale_limit_batches is not None:
                        cmd += ["--limit-batches", str(settings.scale_limit_batches)]
                    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
                    if result.returncode != 0 or not out.is_file():
                        raise RuntimeError(f"scale run failed: {' '.join(cmd)}\n{result.stderr[-3000:]}")
                    row = json.loads(out.read_text())
                    runs.append(row)
                    log(f"  {size:>6} images {recipe:<13} {n} process(es): epoch {row['epoch_s']:.1f} s")
    return {"runs": runs, "image_size": IMAGE_SIZE, "batch_size_per_process": 64}
