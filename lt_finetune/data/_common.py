"""Shared pieces of the image datamodules: their common arguments, stratified splits, loaders and the Mixup hook.

The split helpers and :func:`mix_labelled_batch` are pure functions, so they are tested without a Trainer.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from timm.data import Mixup
from timm.data.mixup import mixup_target
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lt_finetune.data._resumable import EpochShuffleSampler as EpochShuffleSampler  # importable from here too
from lt_finetune.data._resumable import ResumableDataLoader, TrainLoaderStates, sample_seed, seeded_global_rngs
from lt_finetune.validation import check_bool, check_float, check_int

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def resolve_mean_std(
    mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return per-channel ``(mean, std)`` for RGB images, ImageNet's where ``None``.

    Raises:
        TypeError: If ``mean`` or ``std`` is not a sequence of numbers.
        ValueError: If either does not have 3 values or ``std`` has a value <= 0.
    """
    resolved: list[tuple[float, ...]] = []
    for name, value, default in (("mean", mean, IMAGENET_MEAN), ("std", std, IMAGENET_STD)):
        if value is None:
            resolved.append(default)
            continue
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise TypeError(f"Expected `{name}` to be a sequence of 3 floats or None, got {value!r}.")
        if len(value) != 3:
            raise ValueError(f"Expected `{name}` to have 3 values (one per RGB channel), got {list(value)}.")
        items = tuple(check_float(f"{name}[{i}]", v, -math.inf) for i, v in enumerate(value))
        if name == "std" and min(items) <= 0:
            raise ValueError(f"Expected every value of `std` to be > 0, got {list(items)}.")
        resolved.append(items)
    return resolved[0], resolved[1]


def _class_permutations(targets: Tensor, num_classes: int, seed: int) -> list[Tensor]:
    """Indices of each class in ascending source order, shuffled by one generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    perms = []
    for c in range(num_classes):
        members = torch.nonzero(targets == c, as_tuple=True)[0]
        perms.append(members[torch.randperm(len(members), generator=generator)])
    return perms


def stratified_split(targets: Tensor, num_classes: int, per_class: Sequence[int | None], seed: int) -> list[Tensor]:
    """Split the indices of ``targets`` into consecutive chunks of ``per_class[i]`` items of every class.

    Each class is shuffled with a generator seeded by ``seed``; chunk ``i`` takes the next ``per_class[i]``
    items of every class (``None``: all that are left). The result depends only on ``targets`` and ``seed``.

    Args:
        targets: Class index of every item, shape ``[N]``.
        num_classes: Number of classes; classes are ``0 .. num_classes - 1``.
        per_class: Items per class of each chunk; only the last may be ``None``.
        seed: Seed of the shuffle.

    Returns:
        One sorted int64 tensor of indices into ``targets`` per chunk.

    Raises:
        ValueError: If a class has fewer items than the chunks ask for.

    Example::

        >>> targets = torch.tensor([0, 0, 0, 1, 1, 1])
        >>> [len(chunk) for chunk in stratified_split(targets, 2, [1, None], seed=0)]
        [2, 4]
    """
    requested = sum(n for n in per_class if n is not None)
    chunks: list[list[Tensor]] = [[] for _ in per_class]
    for c, perm in enumerate(_class_permutations(targets, num_classes, seed)):
        if len(perm) < requested:
            raise ValueError(f"Class {c} has {len(perm)} items but the split asks for {requested} per class.")
        start = 0
        for i, n in enumerate(per_class):
            stop = len(perm) if n is None else start + n
            chunks[i].append(perm[start:stop])
            start = stop
    return [torch.sort(torch.cat(parts)).values if parts else torch.empty(0, dtype=torch.long) for parts in chunks]


def stratified_fraction_split(targets: Tensor, num_classes: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split indices into ``(rest, held_out)`` with ``fraction`` of every class held out.

    Each class holds out ``round(n * fraction)`` items, at least 1 and at most ``n - 1`` when it has 2 items or
    more, so both sides see every class that can be split; a class with a single item stays in ``rest``.

    Example::

        >>> rest, held_out = stratified_fraction_split(torch.tensor([0] * 10 + [1] * 5), 2, 0.2, seed=0)
        >>> len(rest), len(held_out)
        (12, 3)
    """
    rest, held_out = [], []
    for perm in _class_permutations(targets, num_classes, seed):
        n = len(perm)
        k = min(max(round(n * fraction), 1), n - 1) if n >= 2 else 0
        held_out.append(perm[:k])
        rest.append(perm[k:])
    return torch.sort(torch.cat(rest)).values, torch.sort(torch.cat(held_out)).values


def mix_batch(mixup: Mixup, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Apply timm's batch-mode ``mixup`` to ``images`` and return soft targets ``[B, num_classes]``.

    timm's :class:`~timm.data.Mixup` needs an even batch; with an odd batch (the last one of an epoch, as train
    loaders keep it) the last image is left unmixed and gets the label-smoothed one-hot target.
    """
    even = images.shape[0] - images.shape[0] % 2
    head_images, head_targets = mixup(images[:even], targets[:even]) if even else (images[:0], None)
    tail_targets = mixup_target(targets[even:], mixup.num_classes, lam=1.0, smoothing=mixup.label_smoothing)
    if head_targets is None:
        return images, tail_targets
    return torch.cat((head_images, images[even:])), torch.cat((head_targets, tail_targets))


def _is_class_index_batch(batch: object) -> bool:
    """Whether ``batch`` is a tuple or list starting with images ``[B, ...]`` and integer class indices ``[B]``."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        return False
    images, targets = batch[0], batch[1]
    if not isinstance(images, Tensor) or not isinstance(targets, Tensor) or images.ndim == 0 or targets.ndim != 1:
        return False
    integer = not (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool)
    return integer and targets.shape[0] == images.shape[0]


def mix_labelled_batch(mixup: Mixup, batch: Any) -> Any:
    """Apply :func:`mix_batch` to the labelled images of ``batch``, whatever else the batch holds.

    The rule, which the datamodules' Mixup/CutMix hook follows:

    - A tuple or list whose first entry is images ``[B, ...]`` and whose second is integer class indices ``[B]``
      gets those two mixed (the targets become soft ``[B, num_classes]``); further entries, such as sample
      indices in ``(x, y, index)``, are kept unchanged. The result has the batch's type.
    - A dict (as Lightning's ``CombinedLoader`` yields, e.g. ``{"source": (x, y), "target": (x_t,)}``) is mixed
      at the key ``"source"`` only, by the tuple rule; the other keys, such as an unlabelled target-domain
      stream, are kept unchanged. A dict without ``"source"`` is returned unchanged.
    - Anything else, including a batch whose second entry is not an integer class-index tensor (soft targets
      already, or an unlabelled ``(x,)``), is returned unchanged.

    A mixed batch is a new tuple, list or dict; the image tensor itself is mixed in place, as timm's Mixup does.

    Example::

        >>> mixup = Mixup(mixup_alpha=1.0, num_classes=3)
        >>> images, labels, index = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]), torch.arange(4)
        >>> mixed, soft, same = mix_labelled_batch(mixup, (images, labels, index))
        >>> tuple(soft.shape), same is index
        ((4, 3), True)
        >>> out = mix_labelled_batch(mixup, {"source": (images, labels), "target": (images,)})
        >>> tuple(out["source"][1].shape), out["target"][0] is images
        ((4, 3), True)
    """
    if isinstance(batch, dict):
        if "source" not in batch:
            return batch
        mixed = copy.copy(batch)  # keeps the mapping's type and its other entries as they are
        mixed["source"] = mix_labelled_batch(mixup, batch["source"])
        return mixed
    if not _is_class_index_batch(batch):
        return batch
    images, targets = mix_batch(mixup, batch[0], batch[1])
    items = [images, targets, *batch[2:]]
    if isinstance(batch, list):
        return type(batch)(items)
    make = getattr(type(batch), "_make", None)  # a namedtuple keeps its type and field names
    return make(items) if make is not None else tuple(items)


class IndexedDataset(Dataset[tuple[Any, ...]]):
    """``dataset`` with each item's index appended: ``(image, target)`` becomes ``(image, target, index)``.

    The dataset's ``paths`` and ``targets`` (where it has them), its ``collate_fn`` and a ``source`` description
    are kept as attributes, for writers of predictions.
    """

    def __init__(self, dataset: Dataset[Any], source: str) -> None:
        self.dataset = dataset
        self.source = source
        self.paths: list[str] | None = getattr(dataset, "paths", None)
        self.targets: Sequence[int] | None = getattr(dataset, "targets", None)
        self.collate_fn = getattr(dataset, "collate_fn", None)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...] | None:  # type: ignore[override]
        item = self.dataset[index]
        if item is None:  # an unreadable file the dataset skips
            return None
        return (*item, index) if isinstance(item, tuple) else (item, -1, index)


class ImageDataModuleBase(LightningDataModule):
    """Loaders, normalisation settings and the Mixup/CutMix hook shared by the image datamodules.

    The arguments below are those every image datamodule shares; a subclass takes its own arguments and
    forwards the rest with ``**kwargs``, so they are stated and checked once, here. LightningCLI still lists each
    of them, with its type, default and help, under the subclass (jsonargparse follows ``**kwargs`` into
    ``super().__init__``).

    With ``mixup_alpha`` or ``cutmix_alpha`` > 0, training batches are mixed on the device by timm's
    :class:`~timm.data.Mixup` and their targets become soft float ``[B, num_classes]``: the model's loss must
    accept soft targets. Batches other than ``(images, targets)`` follow the rule of :func:`mix_labelled_batch`:
    further tuple entries are kept, and a dict batch is mixed at its ``"source"`` key only.

    Subclasses check their data in :meth:`setup`, fill ``train_dataset``, ``val_dataset`` and ``test_dataset``
    (``None`` when absent), and define :attr:`classes`.

    Args:
        image_size: Side of the square images fed to the model, in pixels.
        batch_size: Images per batch.
        num_workers: Loader worker processes; workers persist across epochs when > 0.
        seed: Seed of the training shuffle, of the augmentation (each item's draws are a function of ``(seed,
            epoch, index)``, Mixup's of the batch's place) and of the subclass's random splits (its
            documentation says which).
        mean: Per-channel normalisation mean; ``None`` for ImageNet's ``(0.485, 0.456, 0.406)``.
        std: Per-channel normalisation std; ``None`` for ImageNet's ``(0.229, 0.224, 0.225)``.
        hflip: Flip training images horizontally with probability 0.5.
        mixup_alpha: Mixup's beta-distribution alpha; 0 turns Mixup off.
        cutmix_alpha: CutMix's beta-distribution alpha; 0 turns CutMix off.
        label_smoothing: Label smoothing of the mixed targets; needs Mixup or CutMix.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an argument is out of range, or ``label_smoothing`` > 0 without Mixup or CutMix.
    """

    def __init__(
        self,
        *,
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        hflip: bool = True,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.image_size = check_int("image_size", image_size, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.num_workers = check_int("num_workers", num_workers, 0)
        self.seed = check_int("seed", seed)
        self.mean, self.std = resolve_mean_std(mean, std)
        self.hflip = check_bool("hflip", hflip)
        self.mixup_alpha = check_float("mixup_alpha", mixup_alpha, 0.0)
        self.cutmix_alpha = check_float("cutmix_alpha", cutmix_alpha, 0.0)
        self.label_smoothing = check_float("label_smoothing", label_smoothing, 0.0, 1.0)
        if self.label_smoothing > 0 and self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise ValueError(
                f"Expected `label_smoothing` to be 0 when `mixup_alpha` and `cutmix_alpha` are both 0, "
                f"got {self.label_smoothing}: it only shapes the Mixup/CutMix targets. Set `mixup_alpha` or "
                "`cutmix_alpha` > 0, or use the loss' label smoothing instead."
            )
        self.train_dataset: Dataset[Any] | None = None
        self.val_dataset: Dataset[Any] | None = None
        self.test_dataset: Dataset[Any] | None = None
        #: Images to predict on, when a subclass has a split for it (``ImageFolderDataModule(predict_dir=...)``).
        self.predict_dataset: Dataset[Any] | None = None
        self._mixup: Mixup | None = None
        self._train_loader_states = TrainLoaderStates()

    @property
    def classes(self) -> list[str]:
        """Class names; index ``i`` names target ``i``."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(classes)``."""
        return len(self.classes)

    @property
    def data_config(self) -> dict[str, Any]:
        """Input settings in timm's data-config form: ``input_size`` ``(3, H, W)``, ``mean``, ``std``."""
        return {"input_size": (3, self.image_size, self.image_size), "mean": self.mean, "std": self.std}

    @property
    def mixup_enabled(self) -> bool:
        """Whether training batches get Mixup/CutMix (and soft targets)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    #: How to add a split that a configuration can leave out, for the error when its loader is asked for.
    _missing_split_hints: dict[str, str] = {}

    def _require(self, dataset: Dataset[Any] | None, split: str) -> Dataset[Any]:
        if dataset is not None:
            return dataset
        name = type(self).__name__
        if self.train_dataset is None:
            raise RuntimeError(f"{name} has no {split} dataset yet; call `setup()` first (a Trainer does this).")
        hint = self._missing_split_hints.get(split, "")
        raise RuntimeError(f"{name} has no {split} split{'; ' + hint if hint else ''}.")

    def _loader(self, dataset: Dataset[Any], *, train: bool) -> DataLoader[Any]:
        settings: dict[str, Any] = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
            "drop_last": False,
            "collate_fn": getattr(dataset, "collate_fn", None),  # a dataset that can skip unreadable items says how
        }
        if train:
            loader = ResumableDataLoader(dataset, shuffle=True, seed=self.seed, **settings)
            return self._train_loader_states.track(loader)
        return DataLoader(dataset, **settings)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The training loader's position in its epoch (see :class:`~lt_finetune.data.ResumableDataLoader`)."""
        return self._train_loader_states.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training loaders built from now on at the position of ``state_dict``."""
        self._train_loader_states.load_state_dict(state_dict)

    @override
    def teardown(self, stage: str) -> None:
        """Forget a position loaded for the fit that ends, so that a fresh fit starts at the first batch."""
        self._train_loader_states.clear()

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        """Shuffled training loader that resumes mid-epoch; the last partial batch is kept.

        A :class:`~lt_finetune.data.ResumableDataLoader`: the order is a function of ``(seed, epoch)`` and each
        item's augmentation of ``(seed, epoch, index)``, whatever ``num_workers``; Lightning saves its position in
        every checkpoint, so ``fit(ckpt_path=...)`` continues an interrupted epoch where it stopped.
        """
        return self._loader(self._require(self.train_dataset, "train"), train=True)

    @override
    def val_dataloader(self) -> DataLoader[Any]:
        """Validation loader, in a fixed order."""
        return self._loader(self._require(self.val_dataset, "validation"), train=False)

    @override
    def test_dataloader(self) -> DataLoader[Any]:
        """Test loader, in a fixed order."""
        return self._loader(self._require(self.test_dataset, "test"), train=False)

    @override
    def predict_dataloader(self) -> DataLoader[Any]:
        """Batches ``(images, targets, indices)`` of the predict split, else the test split, else the validation split.

        ``indices`` are positions in the dataset, so each prediction stays with its image (see
        :class:`~lt_finetune.inference.PredictionWriter`); which split is used is logged on rank zero.
        """
        for dataset, split in (
            (self.predict_dataset, "predict"),
            (self.test_dataset, "test"),
            (self.val_dataset, "validation"),
        ):
            if dataset is not None:
                source = getattr(dataset, "source", None) or f"the {split} split"
                rank_zero_info(f"{type(self).__name__}: predicting on {source} ({len(dataset)} images).")  # type: ignore[arg-type]
                return self._loader(IndexedDataset(dataset, source), train=False)
        return self._loader(self._require(None, "test or validation"), train=False)

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Mix training batches on the device when ``mixup_alpha`` or ``cutmix_alpha`` is > 0.

        Targets then become soft float ``[B, num_classes]`` (label-smoothed by ``label_smoothing``); the model's
        loss must accept them. Validation, test and predict batches keep their int64 class indices. Which part of
        a batch is mixed follows :func:`mix_labelled_batch`: the first two entries of a tuple or list (the rest
        kept), the ``"source"`` entry of a dict, and nothing of a batch without integer class indices.
        """
        trainer = self.trainer
        if not self.mixup_enabled or trainer is None or not trainer.training:
            return batch
        if self._mixup is None:
            self._mixup = Mixup(
                mixup_alpha=self.mixup_alpha,
                cutmix_alpha=self.cutmix_alpha,
                label_smoothing=self.label_smoothing,
                num_classes=self.num_classes,
            )
        position = _batch_position(trainer)
        if position is None:
            return mix_labelled_batch(self._mixup, batch)
        # timm's Mixup draws from numpy's global RNG: seeded by the batch's place, a resumed run mixes alike.
        with seeded_global_rngs(sample_seed(self.seed, _MIXUP_STREAM, *position)):
            return mix_labelled_batch(self._mixup, batch)


#: Separates the Mixup seeds of a batch from the augmentation seeds of an item with the same numbers.
_MIXUP_STREAM = 0x6D69787570


def _batch_position(trainer: Any) -> tuple[int, int] | None:
    """``(epoch, batch index in the epoch)`` of the training batch being prepared, if the trainer tells it."""
    try:
        epoch = int(trainer.current_epoch)
        # The batch is prepared before Lightning counts it as ready: its index is the count so far.
        index = int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
    except (AttributeError, TypeError, ValueError):
        return None
    return epoch, index
