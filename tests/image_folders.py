"""Small folders of real image files for the tests: Animal-MNIST silhouettes as RGB JPEGs and grayscale PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from lt_finetune.data import ANIMAL_MNIST_CLASSES, load_animal_mnist


def write_animal_folders(
    root: Path, classes: int = 3, train: int = 8, val: int = 3, new: int = 4, size: int = 32
) -> dict[str, Path]:
    """Write ``root/train/<class>/``, ``root/val/<class>/`` and an unlabelled, nested ``root/new/`` of real images.

    Even-numbered images are RGB JPEGs, odd ones grayscale PNGs (mixed formats and modes, as a user's folder is).
    ``new`` holds ``new`` images per class with no class sub-folders, in a nested folder. Needs the ``animal-mnist``
    package (use the ``animal_mnist`` fixture).

    Returns:
        ``{"train": ..., "val": ..., "new": ...}`` folders.
    """
    images, labels = load_animal_mnist()
    folders = {name: root / name for name in ("train", "val", "new")}
    for c in range(classes):
        members = np.nonzero(labels.numpy() == c)[0][: train + val + new]
        name = ANIMAL_MNIST_CLASSES[c]
        for i, index in enumerate(members):
            gray = Image.fromarray(images[index].numpy()).resize((size, size))
            if i < train:
                folder = folders["train"] / name
            elif i < train + val:
                folder = folders["val"] / name
            else:
                folder = folders["new"] / ("batch_b" if i % 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            stem = f"{name}_{i:03d}"
            if i % 2 == 0:
                gray.convert("RGB").save(folder / f"{stem}.jpg", quality=95)
            else:
                gray.save(folder / f"{stem}.png")
    return folders
