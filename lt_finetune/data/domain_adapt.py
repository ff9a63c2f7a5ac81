"""A labelled source and an unlabelled target stream in every training step, for unsupervised domain adaptation."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, random_split
from typing_extensions import override

from lt_finetune.data._resumable import ResumableDataLoader, TrainLoaderStates, sample_seed, seeded_global_rngs
from lt_finetune.validation import check_bool, check_float, check_int, check_optional_int

__all__ = ["DomainAdaptDataModule"]

Split = Literal["train", "val", "test"]


class _InputsOnly(Dataset[Tensor]):
    """The inputs of a labelled dataset: target labels never reach the training step."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Tensor:
        return _inputs(self.dataset[index])

    def seeded_item(self, index: int, seed: int) -> Tensor:
        """The inputs of the dataset's seeded item (see :class:`~lt_finetune.data.ResumableDataLoader`)."""
        seeded_item = getattr(self.dataset, "seeded_item", None)
        if seeded_item is not None:
            return _inputs(seeded_item(index, seed))
        with seeded_global_rngs(seed):
            return _inputs(self.dataset[index])


def _inputs(item: Any) -> Any:
    return item[0] if isinstance(item, (tuple, list)) else item


def _has_labels(dataset: Dataset[Any]) -> bool:
    item = dataset[0]
    return isinstance(item, (tuple, list)) and len(item) >= 2


class DomainAdaptDataModule(LightningDataModule):
    """Labelled source data and unlabelled target data, as ``CombinedLoader`` batches ``{"source", "target"}``.

    Training batches are ``{"source": (x, y), "target": x}`` from ``CombinedLoader(..., "max_size_cycle")``: an epoch
    is as long as the longer stream and the shorter one cycles. The target stream carries inputs only, so its labels
    cannot be used for training. Validation and test loaders serve the **source** splits (model selection sees no
    target label); :meth:`target_dataloader` serves the target splits, which ``DomainAdapt`` uses for AdaBN, for the
    label-free selection score (``"train"``, unlabelled) and to *report* ``val/target_acc`` and
    ``test/target_acc`` where the target has labels.

    Args:
        source: The labelled domain: a ``LightningDataModule`` (its train / val / test loaders are used) or a
            dataset of ``(x, y)`` (``val_fraction`` of it is held out for validation, drawn with ``seed``).
        target: The unlabelled domain: a ``LightningDataModule`` (its training split is the unlabelled stream;
            its val / test splits, if labelled, are only reported) or a dataset of ``x`` or ``(x, y)`` (streamed
            without labels; reported on as a whole when labelled, the transductive protocol).
        batch_size: Source batch size for dataset sources (a datamodule's loaders keep their own).
        target_batch_size: Target batch size; ``None``: as the source batch.
        val_fraction: Share of a dataset source held out for validation.
        stream_target: ``False`` trains on the source stream alone (the source-only baseline, ERM), keeping the
            target splits for AdaBN and reporting.
        num_workers: Loader workers, for dataset inputs and the target stream.
        seed: Seed of the shuffles, of the held-out split and of the dataset streams' augmentation (see
            :class:`~lt_finetune.data.ResumableDataLoader`; the streams resume mid-epoch).

    Raises:
        TypeError: If ``source`` or ``target`` is neither a ``LightningDataModule`` nor a ``Dataset``.
        ValueError: If a value is out of range, or (at setup) the source has no labels or the target is empty.

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> source = TensorDataset(torch.randn(40, 3), torch.randint(0, 2, (40,)))
        >>> dm = DomainAdaptDataModule(source, TensorDataset(torch.randn(24, 3)), batch_size=8)
        >>> dm.setup("fit")
        >>> batch, *_ = next(iter(dm.train_dataloader()))
        >>> sorted(batch), batch["source"][0].shape, batch["target"].shape
        (['source', 'target'], torch.Size([8, 3]), torch.Size([8, 3]))
    """

    def __init__(
        self,
        source: LightningDataModule | Dataset,
        target: LightningDataModule | Dataset,
        batch_size: int = 64,
        target_batch_size: int | None = None,
        val_fraction: float = 0.1,
        stream_target: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("source", source), ("target", target)):
            if not isinstance(value, (LightningDataModule, Dataset)):
                raise TypeError(
                    f"Expected `{name}` to be a LightningDataModule or a torch Dataset, got {value!r} of type "
                    f"{type(value).__name__}."
                )
        self.source = source
        self.target = target
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.target_batch_size = check_optional_int("target_batch_size", target_batch_size, 1) or self.batch_size
        self.val_fraction = check_float("val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        self.stream_target = check_bool("stream_target", stream_target)
        self.num_workers = check_int("num_workers", num_workers, 0)
        self.seed = check_int("seed", seed)
        self._source_train: Dataset[Any] | None = None
        self._source_val: Dataset[Any] | None = None
        self._ready = False
        self._train_loader_states = TrainLoaderStates()

    @property
    def num_classes(self) -> int:
        """The source datamodule's ``num_classes`` (a dataset source has none: set the model's yourself)."""
        value = getattr(self.source, "num_classes", None)
        if not isinstance(value, int):
            raise AttributeError(
                f"DomainAdaptDataModule's source ({type(self.source).__name__}) has no `num_classes`; "
                "give the model's `num_classes` explicitly."
            )
        return value

    @override
    def prepare_data(self) -> None:
        for part in (self.source, self.target):
            if isinstance(part, LightningDataModule):
                part.prepare_data()

    @override
    def setup(self, stage: str) -> None:
        """Set up the source and target (both, whatever ``stage``: evaluation on target needs the target splits)."""
        if self._ready:
            return
        for part in (self.source, self.target):
            if isinstance(part, LightningDataModule):
                part.setup("fit")
                part.setup("test")
        if isinstance(self.source, Dataset):
            if len(self.source) < 2 or not _has_labels(self.source):  # type: ignore[arg-type]
                raise ValueError("Expected `source` to be a labelled dataset of (x, y) items with at least 2 items.")
            n_val = max(1, round(len(self.source) * self.val_fraction))  # type: ignore[arg-type]
            generator = torch.Generator().manual_seed(self.seed)
            train, val = random_split(self.source, [len(self.source) - n_val, n_val], generator=generator)  # type: ignore[arg-type]
            self._source_train, self._source_val = train, val
        if isinstance(self.target, Dataset) and len(self.target) == 0:  # type: ignore[arg-type]
            raise ValueError("Expected `target` to hold at least one item, got an empty dataset.")
        self._ready = True

    def _dataset_loader(
        self, dataset: Dataset[Any], batch_size: int, *, train: bool, stream: int = 0
    ) -> DataLoader[Any]:
        settings: dict[str, Any] = {
            "batch_size": batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
        }
        if train:
            # Resumable mid-epoch; each stream its own augmentation seeds, so item i of both is not flipped alike.
            seed = self.seed if stream == 0 else sample_seed(self.seed, stream)
            return ResumableDataLoader(dataset, shuffle=True, seed=seed, **settings)
        return DataLoader(dataset, **settings)

    def _source_loader(self, split: Split) -> DataLoader[Any]:
        if isinstance(self.source, LightningDataModule):
            method = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader"}[split]
            return getattr(self.source, method)()
        if self._source_train is None or self._source_val is None:
            raise RuntimeError("DomainAdaptDataModule has no datasets yet; call `setup()` first (a Trainer does this).")
        # A dataset source has no test split: its held-out validation split serves both.
        dataset = self._source_train if split == "train" else self._source_val
        return self._dataset_loader(dataset, self.batch_size, train=split == "train")

    def _target_train_dataset(self) -> Dataset[Any] | None:
        if isinstance(self.target, Dataset):
            return self.target
        return getattr(self.target, "train_dataset", None)

    def _target_stream(self) -> DataLoader[Any]:
        dataset = self._target_train_dataset()
        if dataset is not None:
            return self._dataset_loader(_InputsOnly(dataset), self.target_batch_size, train=True, stream=1)
        # A datamodule without `train_dataset`: its own loader (labels, if any, are passed along but never used).
        return self.target.train_dataloader()  # type: ignore[union-attr]

    @override
    def train_dataloader(self) -> Any:
        """``CombinedLoader({"source", "target"}, "max_size_cycle")``, or the source loader if not ``stream_target``."""
        source = self._source_loader("train")
        if not self.stream_target:
            return self._train_loader_states.track(source)
        combined = CombinedLoader({"source": source, "target": self._target_stream()}, "max_size_cycle")
        return self._train_loader_states.track(combined)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The positions of the resumable training streams in their epoch, so that a resumed run continues them."""
        return self._train_loader_states.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training streams built from now on at the positions of ``state_dict``."""
        self._train_loader_states.load_state_dict(state_dict)

    @override
    def teardown(self, stage: str) -> None:
        """Forget a position loaded for the fit that ends, so that a fresh fit starts at the first batch."""
        self._train_loader_states.clear()

    @override
    def val_dataloader(self) -> DataLoader[Any]:
        """The source validation split: what model selection may use."""
        return self._source_loader("val")

    @override
    def test_dataloader(self) -> DataLoader[Any]:
        """The source test split (``DomainAdapt`` reports the target's as ``test/target_acc``)."""
        return self._source_loader("test")

    def target_dataloader(self, split: Split) -> DataLoader[Any] | None:
        """Target data in a fixed order: ``"train"`` the unlabelled pool (inputs only); ``"val"``/``"test"`` labelled
        splits for reporting only, ``None`` where the target has no labels."""
        if split == "train":
            dataset = self._target_train_dataset()
            if dataset is None:
                return self.target.train_dataloader()  # type: ignore[union-attr]
            return self._dataset_loader(_InputsOnly(dataset), self.target_batch_size, train=False)
        if isinstance(self.target, Dataset):
            if not _has_labels(self.target):
                return None
            return self._dataset_loader(self.target, self.target_batch_size, train=False)
        method = {"val": "val_dataloader", "test": "test_dataloader"}[split]
        try:
            loader = getattr(self.target, method)()
        except (RuntimeError, NotImplementedError, AttributeError):
            return None
        return loader if loader is not None and _has_labels(loader.dataset) else None
