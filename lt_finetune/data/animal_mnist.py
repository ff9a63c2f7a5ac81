"""Animal-MNIST: 10,000 animal silhouettes (10 classes x 1,000, 28x28 grayscale), an offline demo dataset.

The data come from the ``animal-mnist==0.4`` package on PyPI (``pip install --no-deps animal-mnist==0.4``; its
Python loader needs TensorFlow, so this module only reads the package's data files and never imports it).
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import override

from lt_finetune.data._common import ImageDataModuleBase, stratified_split
from lt_finetune.validation import check_int, check_optional_int

__all__ = ["ANIMAL_MNIST_CLASSES", "AnimalMNISTDataModule"]

#: Class names of the labels 0..9: the package's description lists them in this (alphabetical) order, and the
#: images of each label show that animal.
ANIMAL_MNIST_CLASSES: tuple[str, ...] = (
    "bear",
    "bird",
    "cat",
    "cow",
    "dog",
    "elephant",
    "giraffe",
    "horse",
    "sheep",
    "zebra",
)
_DATA_FILE = "animal_data_version_3.gz"
_LABEL_FILE = "animal_label_version_3.gz"
_INSTALL_HINT = (
    f"run `pip install --no-deps animal-mnist==0.4` or pass `root`, a folder holding {_DATA_FILE} and {_LABEL_FILE}"
)
# The test split is drawn with this constant, not `seed`, so every run of every seed tests on the same images.
_TEST_SPLIT_SEED = 20_240_917
# The files are pickled numpy arrays; refuse anything else, since `root` may point at files of unknown origin.
_ALLOWED_PICKLE_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }
)


class _NumpyUnpickler(pickle.Unpickler):
    @override
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")
        return super().find_class(module, name)


def _load_array(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            array = _NumpyUnpickler(f).load()
    except (OSError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(
            f"Could not read '{path}' as a gzip-compressed pickle of a numpy array ({err}); "
            f"replace it with the file from the `animal-mnist==0.4` package."
        ) from err
    if not isinstance(array, np.ndarray):
        raise ValueError(f"Expected '{path}' to hold a numpy array, got {type(array).__name__}.")
    return array


def _data_folder(root: str | None) -> Path:
    if root is not None:
        return Path(root).expanduser()
    spec = importlib.util.find_spec("animal_mnist")  # finds the package without importing it (it imports TF)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"AnimalMNISTDataModule(root=None) needs the `animal-mnist` package; {_INSTALL_HINT}.")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"


def load_animal_mnist(root: str | None = None) -> tuple[Tensor, Tensor]:
    """Read the Animal-MNIST images and labels.

    Args:
        root: Folder holding ``animal_data_version_3.gz`` and ``animal_label_version_3.gz``; ``None`` reads them
            from the installed ``animal-mnist`` package.

    Returns:
        ``(images, labels)``: uint8 ``[N, H, W]`` (10,000 x 28 x 28 for the package) and int64 ``[N]`` in ``0..9``.

    Raises:
        FileNotFoundError: If the package is not installed (``root=None``) or a file is missing from ``root``.
        ValueError: If a file does not hold the expected arrays.
    """
    folder = _data_folder(root)
    missing = [name for name in (_DATA_FILE, _LABEL_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"AnimalMNISTDataModule found no {' or '.join(missing)} in '{folder}'; {_INSTALL_HINT}."
        )
    images = _load_array(folder / _DATA_FILE)
    labels = _load_array(folder / _LABEL_FILE)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"Expected '{folder / _DATA_FILE}' to hold uint8 images of shape [N, H, W], "
            f"got {images.dtype} of shape {list(images.shape)}."
        )
    if labels.dtype.kind not in "iu" or labels.shape != (len(images),):
        raise ValueError(
            f"Expected '{folder / _LABEL_FILE}' to hold {len(images)} integer labels (one per image), "
            f"got {labels.dtype} of shape {list(labels.shape)}."
        )
    num_classes = len(ANIMAL_MNIST_CLASSES)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"Expected the labels in '{folder / _LABEL_FILE}' to be in 0..{num_classes - 1}, "
            f"got values from {labels.min()} to {labels.max()}."
        )
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class _GrayImageDataset(Dataset[tuple[Tensor, int]]):
    """Preresized uint8 grayscale images served as normalised 3-channel float tensors."""

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        indices: Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        hflip: bool,
    ) -> None:
        self.images = images  # uint8 [N, 1, H, W]
        self.targets = targets  # int64 [N]
        self.indices = indices  # int64 [N]: position of each item in the source arrays
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        # (x / 255 - mean) / std as one fused multiply-add; broadcasting repeats the gray channel.
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std_t
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self._item(index, None)

    def seeded_item(self, index: int, seed: int) -> tuple[Tensor, int]:
        """Item ``index`` with its flip drawn from a generator seeded with ``seed`` (the global RNG is untouched)."""
        return self._item(index, torch.Generator().manual_seed(seed) if self.hflip else None)

    def _item(self, index: int, generator: torch.Generator | None) -> tuple[Tensor, int]:
        image = self.images[index]
        if self.hflip and torch.rand((), generator=generator) < 0.5:
            image = image.flip(-1)
        return torch.addcmul(self._shift, image.float(), self._scale), int(self.targets[index])


class AnimalMNISTDataModule(ImageDataModuleBase):
    """Animal-MNIST silhouettes, resized and served as normalised RGB batches.

    Ten classes (:data:`ANIMAL_MNIST_CLASSES`: bear, bird, cat, cow, dog, elephant, giraffe, horse, sheep,
    zebra) of 1,000 28x28 grayscale images each. ``classes`` and ``num_classes`` are known right after
    construction.

    Splits are stratified and deterministic. A fixed test split of ``test_per_class`` images per class is drawn
    first with a constant seed, so it is the same for every ``seed``, ``val_per_class`` and ``train_per_class``.
    From the rest, ``val_per_class`` images per class are drawn with ``seed``, and the training set is the next
    ``train_per_class`` per class (``None``: all the rest). The default demo setting, 2,100 training and 900
    validation images at 64 px, is ``AnimalMNISTDataModule(train_per_class=210, val_per_class=90)``.

    :meth:`setup` resizes the images once (bilinear, antialiased when shrinking) and keeps them as uint8; items
    are then scaled to [0, 1], repeated to 3 channels, normalised with ``mean``/``std`` and, for training,
    flipped horizontally at random (``hflip``).

    Loading, normalisation, ``hflip`` and Mixup/CutMix are set by the shared arguments of
    :class:`~lt_finetune.data.ImageDataModuleBase`, documented there once.

    Args:
        root: Folder holding ``animal_data_version_3.gz`` and ``animal_label_version_3.gz``; ``None`` reads the
            installed ``animal-mnist`` package (``pip install --no-deps animal-mnist==0.4``).
        image_size: Side of the square images fed to the model, in pixels (the source images are 28 px).
        train_per_class: Training images per class; ``None`` takes all that the other splits leave.
        val_per_class: Validation images per class.
        test_per_class: Test images per class.
        **kwargs: The shared arguments of ``ImageDataModuleBase`` (``batch_size``, ``num_workers``, ``seed``,
            ``mean``, ``std``, ``hflip``, ``mixup_alpha``, ``cutmix_alpha``, ``label_smoothing``); ``seed`` also
            draws the validation/training split.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an argument is out of range.

    Example::

        >>> dm = AnimalMNISTDataModule(train_per_class=5, val_per_class=5, test_per_class=5, batch_size=4)
        >>> dm.num_classes, dm.classes[:3]
        (10, ['bear', 'bird', 'cat'])
        >>> dm.setup("fit")
        >>> images, targets = next(iter(dm.train_dataloader()))
        >>> tuple(images.shape), images.dtype, targets.dtype
        ((4, 3, 64, 64), torch.float32, torch.int64)
    """

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 64,
        train_per_class: int | None = None,
        val_per_class: int = 90,
        test_per_class: int = 200,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_size=image_size, **kwargs)
        if root is not None and not isinstance(root, (str, Path)):
            raise TypeError(f"Expected `root` to be a folder path or None, got {root!r} of type {type(root).__name__}.")
        self.root = None if root is None else str(root)
        self.train_per_class = check_optional_int("train_per_class", train_per_class, 1)
        self.val_per_class = check_int("val_per_class", val_per_class, 1)
        self.test_per_class = check_int("test_per_class", test_per_class, 1)

    @property
    @override
    def classes(self) -> list[str]:
        """The ten animal names, known right after construction."""
        return list(ANIMAL_MNIST_CLASSES)

    @override
    def setup(self, stage: str) -> None:
        """Read the files, draw the splits and resize the images (once; later calls return at once).

        Raises:
            FileNotFoundError: If the data files are missing (the message says how to get them).
            ValueError: If a file holds unexpected arrays or a class has too few images for the splits.
        """
        if self.train_dataset is not None:
            return
        images, labels = load_animal_mnist(self.root)
        counts = torch.bincount(labels, minlength=self.num_classes)
        needed = self.test_per_class + self.val_per_class + (self.train_per_class or 0)
        short = [f"{self.classes[c]}: {int(n)}" for c, n in enumerate(counts) if n < needed]
        if short:
            raise ValueError(
                f"AnimalMNISTDataModule needs {needed} images per class (test_per_class={self.test_per_class} + "
                f"val_per_class={self.val_per_class} + train_per_class={self.train_per_class or 0}), but these "
                f"classes have fewer: {', '.join(short)}; lower the per-class counts."
            )
        (test_idx,) = stratified_split(labels, self.num_classes, [self.test_per_class], _TEST_SPLIT_SEED)
        remaining = torch.ones(len(labels), dtype=torch.bool)
        remaining[test_idx] = False
        rest = torch.nonzero(remaining, as_tuple=True)[0]
        val_pos, train_pos = stratified_split(
            labels[rest], self.num_classes, [self.val_per_class, self.train_per_class], self.seed
        )
        splits = {"train": rest[train_pos], "val": rest[val_pos], "test": test_idx}
        # Only the images some split uses are resized, in one call.
        used = torch.cat(list(splits.values()))
        resized = _resize(images[used].unsqueeze(1), self.image_size)
        start = 0
        datasets = {}
        for name, idx in splits.items():
            datasets[name] = _GrayImageDataset(
                resized[start : start + len(idx)],
                labels[idx],
                idx,
                self.mean,
                self.std,
                hflip=self.hflip and name == "train",
            )
            start += len(idx)
        self.train_dataset, self.val_dataset, self.test_dataset = datasets["train"], datasets["val"], datasets["test"]


def _resize(images: Tensor, size: int) -> Tensor:
    """Resize uint8 ``[N, 1, H, W]`` images to ``[N, 1, size, size]``, bilinear and antialiased."""
    if images.shape[-2:] == (size, size):
        return images.clone()
    # torch resizes uint8 directly (and ~3x faster than via float); antialias only changes downscaling.
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
