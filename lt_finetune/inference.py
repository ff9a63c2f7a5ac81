"""From a trained model to answers: class names and preprocessing kept with the model, predictions on image files.

A :class:`~lt_finetune.TransferModule` fitted on a datamodule keeps its class names, task and eval preprocessing
(:func:`inference_settings`) in every checkpoint, so a checkpoint alone classifies new images
(:meth:`TransferModule.predict_images`). :class:`PredictionWriter` is the ``predict`` side of the same thing: a
Lightning callback that writes one CSV row per image (path, predicted class name, probability, top-k).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from timm.data import create_transform
from timm.data.constants import DEFAULT_CROP_PCT
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS
from typing_extensions import override

from lt_finetune.validation import check_int

__all__ = [
    "CHECKPOINT_KEY",
    "ImagePrediction",
    "PredictionWriter",
    "eval_transform",
    "image_files",
    "inference_settings",
    "load_rgb",
    "predict_images",
    "top_k_predictions",
    "write_predictions_csv",
]

#: Where a checkpoint keeps the class names, task and preprocessing (``checkpoint[CHECKPOINT_KEY]``).
CHECKPOINT_KEY = "lt_finetune_inference"


class ImagePrediction(NamedTuple):
    """One image's answer: the predicted class name, its probability and the ``top_k`` ``(name, probability)``."""

    path: str | None
    label: str
    probability: float
    top_k: list[tuple[str, float]]


def inference_settings(datamodule: Any, task: str) -> dict[str, Any]:
    """The class names, task and eval preprocessing of ``datamodule``, as plain data saved in checkpoints.

    ``preprocessing`` holds timm's data-config keys ``input_size``, ``mean``, ``std``, ``interpolation`` and
    ``crop_pct``: a datamodule that states no ``crop_pct`` resizes whole images (``crop_pct`` 1.0), one that
    states ``None`` uses timm's default (0.875), as :func:`timm.data.create_transform` does.

    Example::

        >>> from lt_finetune.data import AnimalMNISTDataModule
        >>> settings = inference_settings(AnimalMNISTDataModule(image_size=32), "multiclass")
        >>> settings["classes"][:2], settings["preprocessing"]["input_size"], settings["preprocessing"]["crop_pct"]
        (['bear', 'bird'], (3, 32, 32), 1.0)
    """
    config = dict(getattr(datamodule, "data_config", {}) or {})
    crop_pct = config.get("crop_pct", 1.0)
    preprocessing = {
        "input_size": tuple(int(v) for v in config.get("input_size", (3, 224, 224))),
        "mean": tuple(float(v) for v in config.get("mean", (0.485, 0.456, 0.406))),
        "std": tuple(float(v) for v in config.get("std", (0.229, 0.224, 0.225))),
        "interpolation": str(config.get("interpolation") or "bilinear"),
        "crop_pct": float(DEFAULT_CROP_PCT if crop_pct is None else crop_pct),
    }
    return {"classes": [str(c) for c in datamodule.classes], "task": task, "preprocessing": preprocessing}


def eval_transform(preprocessing: dict[str, Any]) -> Callable[[Image.Image], Tensor]:
    """timm's eval transform (resize to ``H / crop_pct``, centre crop, normalise) for ``preprocessing``."""
    size = tuple(preprocessing["input_size"])
    return create_transform(
        size[1] if size[1] == size[2] else size[1:],
        is_training=False,
        interpolation=preprocessing.get("interpolation", "bilinear"),
        mean=tuple(preprocessing["mean"]),
        std=tuple(preprocessing["std"]),
        crop_pct=preprocessing.get("crop_pct", DEFAULT_CROP_PCT),
    )


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Read an image file as RGB, as the datamodules do: grayscale, palette and RGBA files are converted.

    Raises:
        OSError: If the file cannot be read or decoded; the message names the file.
    """
    try:
        with open(path, "rb") as f, Image.open(f) as image:
            return image.convert("RGB")  # convert() decodes the pixels, so a corrupt file fails here
    except Exception as err:  # PIL raises OSError, SyntaxError, struct.error, ... for bad files
        raise OSError(f"cannot read image file '{path}' ({type(err).__name__}: {err})") from err


def image_files(folder: str | os.PathLike[str]) -> list[str]:
    """Image files under ``folder``, recursively (following links as torchvision does), sorted by path.

    Hidden files and folders (names starting with ``.``) are skipped.

    Raises:
        FileNotFoundError: If ``folder`` is not a folder or holds no image file.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"'{folder}' {'is not a folder' if root.exists() else 'does not exist'}.")
    files = []
    for dirpath, dirnames, filenames in sorted(os.walk(root, followlinks=True)):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")
        ]
    files.sort()
    if not files:
        raise FileNotFoundError(f"'{folder}' holds no image files (extensions {', '.join(IMG_EXTENSIONS)}).")
    return files


def _as_images(images: Any) -> tuple[list[str | None], list[Any]]:
    """Split ``images`` (a path, a folder, a PIL image or a sequence of paths and images) into paths and items."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    paths: list[str | None] = []
    items: list[Any] = []
    for item in images:
        if isinstance(item, Image.Image):
            paths.append(None)
            items.append(item)
        elif isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
            found = image_files(item)
            paths += found
            items += found
        elif isinstance(item, (str, os.PathLike)):
            paths.append(str(item))
            items.append(str(item))
        else:
            raise TypeError(
                f"Expected image file paths, folders or PIL images, got {item!r} of type {type(item).__name__}."
            )
    return paths, items


def top_k_predictions(
    probabilities: Tensor, classes: Sequence[str], task: str, k: int, paths: Sequence[str | None]
) -> list[ImagePrediction]:
    """Turn probabilities ``[N, C]`` (``[N, 1]`` or ``[N]`` for ``"binary"``) into :class:`ImagePrediction` rows.

    Multiclass: the label is the most probable class. Binary: ``classes[1]`` when its probability is >= 0.5, else
    ``classes[0]`` (with the probability of that answer). Multilabel: the classes with probability >= 0.5 joined
    by ``"|"`` (empty when none), with the highest probability.

    Example::

        >>> rows = top_k_predictions(torch.tensor([[0.1, 0.7, 0.2]]), ["cat", "dog", "emu"], "multiclass", 2, ["a.png"])
        >>> rows[0].label, rows[0].top_k
        ('dog', [('dog', 0.699999988079071), ('emu', 0.20000000298023224)])
    """
    probabilities = probabilities.detach().float().cpu()
    rows = []
    if task == "binary":
        positive = probabilities.reshape(-1)
        names = list(classes) if len(classes) == 2 else ["0", "1"]
        for p, path in zip(positive.tolist(), paths):
            pairs = sorted([(names[1], p), (names[0], 1 - p)], key=lambda pair: -pair[1])
            rows.append(ImagePrediction(path, pairs[0][0], pairs[0][1], pairs[:k]))
        return rows
    values, indices = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
    for vals, idx, row, path in zip(values.tolist(), indices.tolist(), probabilities, paths):
        top = [(classes[i], v) for i, v in zip(idx, vals)]
        if task == "multilabel":
            label = "|".join(classes[i] for i in torch.nonzero(row >= 0.5).flatten().tolist())
            rows.append(ImagePrediction(path, label, vals[0], top))
        else:
            rows.append(ImagePrediction(path, top[0][0], top[0][1], top))
    return rows


@torch.no_grad()
def predict_images(
    model: Any, images: Any, settings: dict[str, Any], *, batch_size: int = 32, top_k: int = 5
) -> list[ImagePrediction]:
    """Classify ``images`` with ``model`` (eval mode, no gradients) under ``settings`` (see :func:`inference_settings`).

    The model's training mode is restored afterwards. See :meth:`TransferModule.predict_images`.
    """
    check_int("batch_size", batch_size, 1)
    check_int("top_k", top_k, 1)
    paths, items = _as_images(images)
    transform = eval_transform(settings["preprocessing"])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for start in range(0, len(items), batch_size):
            batch = [load_rgb(i) if isinstance(i, str) else i.convert("RGB") for i in items[start : start + batch_size]]
            x = torch.stack([transform(image) for image in batch]).to(device)
            logits = model(x)
            chunks.append(logits.softmax(dim=-1) if settings["task"] == "multiclass" else logits.sigmoid())
    finally:
        model.train(was_training)
    if not chunks:
        return []
    return top_k_predictions(torch.cat(chunks), settings["classes"], settings["task"], top_k, paths)


def write_predictions_csv(
    path: str | os.PathLike[str], rows: Sequence[ImagePrediction], k: int, targets: Sequence[str] | None = None
) -> int:
    """Write ``rows`` as CSV: ``path, [target,] label, probability, top1, top1_probability, ...``.

    Returns:
        The number of rows written.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        header = ["path", *(["target"] if targets is not None else []), "label", "probability"]
        for i in range(1, k + 1):
            header += [f"top{i}", f"top{i}_probability"]
        writer.writerow(header)
        for i, row in enumerate(rows):
            top = [value for name, p in row.top_k for value in (name, f"{p:.6f}")]
            target = [targets[i]] if targets is not None else []
            writer.writerow([row.path or "", *target, row.label, f"{row.probability:.6f}", *top])
    return len(rows)


class PredictionWriter(BasePredictionWriter):
    """Write the predictions of ``trainer.predict`` as CSV: one row per image, with class names and top-k.

    Rows follow the predict dataset's order. The ``path`` column holds the file of each image where the dataset
    lists its files (``dataset.paths``, as :class:`~lt_finetune.data.ImageFolderDataModule`'s datasets do), else
    the image's index; a ``target`` column gives the true class name where the dataset has labels. Batches
    ``(images, targets, indices)`` (as the datamodules' predict loaders yield) keep each row on its image even
    when unreadable files are skipped. Class names come from the model (``pl_module.classes``, restored from the
    checkpoint) or else the datamodule. ``lt-finetune predict`` adds one writing
    ``<default_root_dir>/predictions.csv`` when the config has none. Under DDP the ranks' rows are gathered and
    rank zero writes one row per image, in the dataset's order, as a single process does.

    Args:
        output: CSV file to write; a relative path is taken under the trainer's ``default_root_dir``.
        top_k: Classes listed per row, most probable first.

    Example::

        >>> PredictionWriter("predictions.csv", top_k=3).top_k
        3
    """

    def __init__(self, output: str = "predictions.csv", top_k: int = 5) -> None:
        super().__init__(write_interval="batch")
        if not isinstance(output, (str, os.PathLike)):
            raise TypeError(f"Expected `output` to be a file path, got {output!r} of type {type(output).__name__}.")
        self.output = str(output)
        self.top_k = check_int("top_k", top_k, 1)
        self.written: str | None = None
        self._probabilities: list[Tensor] = []
        self._indices: list[Tensor] = []

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._probabilities, self._indices, self.written = [], [], None

    @override
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if dataloader_idx != 0:
            return
        probabilities = torch.as_tensor(prediction).detach().cpu()
        if isinstance(batch, (tuple, list)) and len(batch) >= 3 and torch.is_tensor(batch[2]):
            indices = batch[2].detach().cpu().long()
        elif batch_indices is not None and len(batch_indices) == len(probabilities):
            indices = torch.as_tensor(list(batch_indices), dtype=torch.long)
        else:
            start = sum(len(i) for i in self._indices)
            indices = torch.arange(start, start + len(probabilities))
        self._probabilities.append(probabilities)
        self._indices.append(indices)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gathered = _gather_rows(trainer, self._indices, self._probabilities)
        self._probabilities, self._indices = [], []
        if not trainer.is_global_zero or gathered is None:
            return
        indices, probabilities = gathered
        loaders = trainer.predict_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        dataset = getattr(loader, "dataset", None)
        task = str(getattr(pl_module, "task", "multiclass"))
        classes = _class_names(
            pl_module, getattr(trainer, "datamodule", None), probabilities.shape[-1] if probabilities.ndim > 1 else 2
        )
        listed = getattr(dataset, "paths", None)
        paths = [str(listed[i]) if listed is not None else str(i) for i in indices]
        rows = top_k_predictions(probabilities, classes, task, self.top_k, paths)
        labels = getattr(dataset, "targets", None)
        targets = None
        if labels is not None and all(0 <= int(labels[i]) < len(classes) for i in indices):
            targets = [classes[int(labels[i])] for i in indices]
        path = self.output if os.path.isabs(self.output) else os.path.join(trainer.default_root_dir, self.output)
        count = write_predictions_csv(path, rows, min(self.top_k, len(classes)), targets)
        self.written = path
        source = getattr(dataset, "source", None)
        rank_zero_info(f"Wrote {count} predictions{f' of {source}' if source else ''} to {path}")


def _gather_rows(
    trainer: pl.Trainer, indices: list[Tensor], probabilities: list[Tensor]
) -> tuple[list[int], Tensor] | None:
    """Every rank's rows, on every rank: one row per dataset index, in index order (or None when there are none).

    Under DDP each rank predicts its share of the dataset (and ``DistributedSampler`` repeats a few images to even
    the shares out): the rows are gathered, de-duplicated by index and sorted, so the CSV matches a single process.
    """
    mine = (torch.cat(indices), torch.cat(probabilities)) if indices else None
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(parts, mine)
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        every, rows = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        order: dict[int, int] = {}
        for position, index in enumerate(every.tolist()):
            order.setdefault(index, position)
        kept = sorted(order)
        return kept, rows[[order[i] for i in kept]]
    if mine is None:
        return None
    return mine[0].tolist(), mine[1]


def _class_names(pl_module: Any, datamodule: Any, count: int) -> list[str]:
    for owner in (pl_module, datamodule):
        names = getattr(owner, "classes", None)
        if names:
            return [str(n) for n in names]
    return [str(i) for i in range(count)]
