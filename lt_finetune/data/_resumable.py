"""Training loaders that resume mid-epoch and draw augmentation from ``(seed, epoch, index)``, not the global RNG.

Three pieces, each usable on its own:

- :func:`sample_seed`, a pure function: the seed of one item's augmentation in one epoch.
- :class:`EpochShuffleSampler`: an order that is a function of ``(seed, epoch)`` only.
- :class:`ResumableDataLoader`: a ``DataLoader`` with ``state_dict``/``load_state_dict``, which Lightning saves in
  every checkpoint and restores on ``fit(ckpt_path=...)``, so a run resumed mid-epoch serves the batches the
  interrupted run had not served yet, with the same augmentation, whatever ``num_workers``.

docs/determinism.md says what the guarantee rests on and what breaks it.
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from typing import Any, NamedTuple

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info
from typing_extensions import override

__all__ = ["EpochShuffleSampler", "ResumableDataLoader", "TrainLoaderStates", "sample_seed", "seeded_global_rngs"]

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    # SplitMix64's finaliser: a bijection on 64-bit ints in which every input bit changes about half the output bits.
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def sample_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that is a function of ``seed`` and ``keys`` only, such as ``(epoch, index)``.

    Neighbouring keys give unrelated seeds, so the augmentation of item ``index`` in ``epoch`` does not resemble that
    of its neighbours or of the next epoch. Negative values are taken modulo 2**64.

    Example::

        >>> sample_seed(0, 3, 17) == sample_seed(0, 3, 17), sample_seed(0, 3, 17) == sample_seed(0, 3, 18)
        (True, False)
        >>> 0 <= sample_seed(-1, 0, 0) < 2**63
        True
    """
    value = _splitmix64(seed & _MASK64)
    for key in keys:
        value = _splitmix64(value ^ (key & _MASK64))
    return value >> 1


@contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, ``random`` and numpy's global RNG with ``seed`` for the duration of the block.

    In the main process the three states are restored afterwards, so loading data neither reads nor advances the
    RNG that training draws from; in a loader worker, whose RNGs only serve data loading, they are left as they are.
    This is how transforms that draw from the global RNGs (torchvision's and timm's) become a function of ``seed``.
    """
    restore = get_worker_info() is None
    if restore:
        torch_state = torch.default_generator.get_state()
        random_state = random.getstate()
        numpy_state = np.random.get_state()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        if restore:
            torch.default_generator.set_state(torch_state)
            random.setstate(random_state)
            np.random.set_state(numpy_state)


class EpochShuffleSampler(Sampler[int]):
    """A shuffling sampler whose order is a function of ``(seed, epoch)`` only.

    Lightning calls ``set_epoch`` at the start of every epoch, so a run resumed from a checkpoint sees, epoch for
    epoch, the same order as the uninterrupted run (a ``RandomSampler`` with a seeded generator does not: its
    generator restarts at the resumed epoch).

    Args:
        size: Number of items; the sampler yields a permutation of ``range(size)``.
        seed: Seed of the permutations.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class _Pass(NamedTuple):
    """One iteration over a loader: its epoch, its rank among the iterations of that epoch, batches to skip."""

    epoch: int
    round: int
    skip: int


class _SeededItems(Dataset[Any]):
    """``dataset`` read with keys ``(epoch, round, index)``: item ``index`` under its seed of that epoch and round.

    A dataset with a ``seeded_item(index, seed)`` method draws from generators it seeds itself (no global state is
    touched); any other is read under :func:`seeded_global_rngs`. A plain integer key reads ``dataset[index]``.
    """

    def __init__(self, dataset: Dataset[Any], seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        epoch, round_, index = key
        # Round 0, the only one of a stream that is not cycled, is the documented (seed, epoch, index).
        seed = sample_seed(self.seed, epoch, index) if round_ == 0 else sample_seed(self.seed, epoch, index, round_)
        seeded_item = getattr(self.dataset, "seeded_item", None)
        if seeded_item is not None:
            return seeded_item(index, seed)
        with seeded_global_rngs(seed):
            return self.dataset[index]


class _KeyedBatches:
    """The loader's index sampler: its batches of indices for the current pass, past the skipped ones, as keys."""

    def __init__(self, loader: ResumableDataLoader, indices: Any, batched: bool) -> None:
        self.loader = loader
        self.indices = indices  # the batch sampler, or the sampler when batching is off
        self.batched = batched

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Any]:
        # Read at every iteration: with persistent workers torch keeps this object and iterates it again each pass.
        epoch, round_, skip = self.loader._current
        for batch in islice(self.indices, skip, None):
            if self.batched:
                yield [(epoch, round_, int(i)) for i in batch]
            else:
                yield (epoch, round_, int(batch))


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that resumes mid-epoch and gives every item an augmentation seed of ``(seed, epoch, index)``.

    - **Order**: with ``shuffle=True`` the sampler is :class:`EpochShuffleSampler`, a function of ``(seed, epoch)``.
    - **Augmentation**: item ``index`` of ``epoch`` is read with the seed :func:`sample_seed` ``(seed, epoch,
      index)``: a dataset with a ``seeded_item(index, seed)`` method gets it, any other is read under
      :func:`seeded_global_rngs`, so transforms drawing from the global RNGs depend on that seed only, not on the
      worker that reads the item, the number of workers, or what was read before. In the main process the global
      RNGs are restored after each item, so loading leaves training's random draws (dropout, say) untouched. An
      epoch whose loader is iterated again (a shorter stream cycled by ``CombinedLoader``) draws anew each round.
    - **Resume**: :meth:`state_dict` holds the epoch, its round and the batches served to the consumer; Lightning
      saves it in every checkpoint and calls :meth:`load_state_dict` on ``fit(ckpt_path=...)`` before iterating.
      The next iteration in the same epoch skips the served batches (their indices only: nothing is read), so the
      resumed run gets the batches the interrupted one had not; a finished epoch, or an iteration for another
      epoch, starts at its first batch.

    The epoch is the sampler's ``epoch`` attribute (Lightning calls ``set_epoch`` every epoch); a sampler without
    one counts as epoch 0, each iteration a new round. The loader starts reading (and its workers start working)
    at the first ``next()``, not at ``iter()``, so a ``set_epoch`` between the two is honoured. ``loader.dataset``
    is a wrapper of ``dataset`` that reads ``(epoch, round, index)`` keys; its ``dataset`` attribute is yours.

    Args:
        dataset: A map-style dataset.
        batch_size: Items per batch, as for ``DataLoader``.
        shuffle: Shuffle with :class:`EpochShuffleSampler` ``(len(dataset), seed)``.
        seed: Seed of the shuffle and of the augmentation seeds.
        **kwargs: Other ``DataLoader`` arguments (``num_workers``, ``sampler``, ``collate_fn``, ...). Without a
            ``generator``, one seeded with ``seed`` is used, so iterating draws nothing from the global RNG.

    Raises:
        TypeError: If ``dataset`` is an ``IterableDataset`` (it has no indices to resume from).

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> loader = ResumableDataLoader(TensorDataset(torch.arange(10)), batch_size=4, shuffle=True, seed=0)
        >>> it = iter(loader)
        >>> first = next(it)[0]
        >>> state = loader.state_dict()
        >>> resumed = ResumableDataLoader(TensorDataset(torch.arange(10)), batch_size=4, shuffle=True, seed=0)
        >>> resumed.load_state_dict(state)
        >>> [b[0].tolist() for b in resumed] == [b[0].tolist() for b in it]
        True
    """

    def __init__(
        self, dataset: Dataset[Any], batch_size: int | None = 1, shuffle: bool = False, *, seed: int = 0, **kwargs: Any
    ) -> None:
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                f"Expected `dataset` to be a map-style dataset, got the IterableDataset {type(dataset).__name__}: "
                "it has no indices to resume from."
            )
        if shuffle and kwargs.get("sampler") is None and kwargs.get("batch_sampler") is None:
            kwargs["sampler"] = EpochShuffleSampler(len(dataset), seed)  # type: ignore[arg-type]
            shuffle = False
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed % 2**63))
        self.seed = seed
        self._current = _Pass(0, 0, 0)
        self._last: _Pass | None = None  # the latest pass started
        self._served = 0  # batches of the latest pass handed to the consumer, skipped ones included
        self._pending: dict[str, int] | None = None  # a loaded state, applied when the next pass starts
        self._token = 0
        super().__init__(_SeededItems(dataset, seed), batch_size=batch_size, shuffle=shuffle or None, **kwargs)

    @property
    def _index_sampler(self) -> Any:
        # torch reads the index sampler through this property; its batches become keys and the served ones are skipped.
        batched = self._auto_collation
        return _KeyedBatches(self, self.batch_sampler if batched else self.sampler, batched)

    def _epoch(self) -> int:
        for holder in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            epoch = getattr(holder, "epoch", None)
            if isinstance(epoch, int):
                return epoch
        return 0

    def _start(self) -> _Pass:
        epoch, pending, last = self._epoch(), self._pending, self._last
        self._pending = None
        if pending is not None and pending["epoch"] == epoch:
            skip, round_ = _batches_to_skip(pending, self), pending["round"]
            current = _Pass(epoch, round_, skip) if skip < len(self) else _Pass(epoch, round_ + 1, 0)
        elif last is not None and last.epoch == epoch:
            current = _Pass(epoch, last.round + 1, 0)
        else:
            current = _Pass(epoch, 0, 0)
        self._current = self._last = current
        self._served = current.skip
        return current

    @override
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        # A generator: nothing below runs before the first next(), which comes after Lightning's set_epoch.
        self._start()
        self._token += 1
        token = self._token
        for batch in super().__iter__():
            if token == self._token:
                self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``epoch``, ``round`` and ``batches`` served of the latest iteration, with ``batch_size`` and ``size``.

        A pending state (loaded, not yet iterated) is returned as loaded.
        """
        if self._pending is not None:
            return dict(self._pending)
        current = self._last or _Pass(self._epoch(), 0, 0)
        return {
            "epoch": current.epoch,
            "round": current.round,
            "batches": self._served,
            "batch_size": self.batch_size or 0,
            "size": len(self.dataset),  # type: ignore[arg-type]
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume from ``state_dict`` at the next iteration of the same epoch (see the class description).

        The sampler is put at the saved epoch (where it has ``set_epoch``); a later ``set_epoch`` to another epoch
        starts that epoch at its first batch.
        """
        missing = {"epoch", "round", "batches"} - set(state_dict)
        if missing:
            raise ValueError(
                "Expected a ResumableDataLoader state with keys 'epoch', 'round' and 'batches', "
                f"got {sorted(state_dict)}."
            )
        self._pending = {k: int(v) for k, v in state_dict.items()}
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self._pending["epoch"])


def _batches_to_skip(state: dict[str, int], loader: ResumableDataLoader) -> int:
    """Batches of ``loader`` to skip to resume ``state``; a changed dataset or batch size is resumed approximately."""
    batches, size = state["batches"], len(loader.dataset)  # type: ignore[arg-type]
    saved_size, saved_batch = state.get("size", size), state.get("batch_size", loader.batch_size or 0)
    if saved_size != size:
        rank_zero_warn(
            f"ResumableDataLoader: the checkpoint's epoch ran over {saved_size} items, this loader has {size}; "
            "the epoch restarts at its first batch, so the resumed run differs from an uninterrupted one."
        )
        return 0
    if saved_batch != (loader.batch_size or 0) and loader.batch_size:
        items = batches * saved_batch
        rank_zero_warn(
            f"ResumableDataLoader: the checkpoint was written with batch_size={saved_batch}, this loader has "
            f"{loader.batch_size}; the epoch resumes near item {items}, so the resumed run differs from an "
            "uninterrupted one."
        )
        return items // loader.batch_size
    return batches


class TrainLoaderStates:
    """The positions of a datamodule's training loaders, for its ``state_dict``/``load_state_dict``.

    Lightning saves a stateful loader's position in the fit loop's state, but loads it only if the training loader
    is first built after the checkpoint's loop state is restored. A module that reads
    ``trainer.estimated_stepping_batches`` in ``configure_optimizers`` (as ``TransferModule`` does, for its
    schedule) has it built earlier, and the position is silently dropped. A datamodule's own state is restored
    before ``configure_optimizers``, so the datamodules keep their loaders' positions there as well: ``track`` the
    result of ``train_dataloader``, return :meth:`state_dict` from the datamodule's ``state_dict``, pass it back to
    :meth:`load_state_dict` and call :meth:`clear` in ``teardown``; loaded positions go to every training loader
    built in between (a position only applies to its own epoch, so a loader for a later epoch starts at its first
    batch).

    Only a weak reference to the latest loader is kept: a finished fit's loaders and workers are not held.
    """

    def __init__(self) -> None:
        self._latest: weakref.ref[Any] | None = None
        self._loaded: list[dict[str, int]] | None = None

    def track(self, loaders: Any) -> Any:
        """Remember ``loaders`` (a loader or a ``CombinedLoader``) as the latest, give it any loaded positions."""
        if self._loaded is not None:
            for loader, state in zip(_resumable_loaders(loaders), self._loaded):
                loader.load_state_dict(state)
        self._latest = weakref.ref(loaders)
        return loaders

    def state_dict(self) -> dict[str, Any]:
        """``{"train_loaders": [position, ...]}`` of the latest tracked loaders; ``{}`` before any."""
        latest = self._latest() if self._latest is not None else None
        if latest is None:
            return {} if self._loaded is None else {"train_loaders": list(self._loaded)}
        return {"train_loaders": [loader.state_dict() for loader in _resumable_loaders(latest)]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the positions of ``state_dict`` for the training loaders built from now on."""
        self._loaded = [dict(state) for state in state_dict.get("train_loaders", [])]

    def clear(self) -> None:
        """Forget the loaded positions, at the end of the fit they were for (the datamodule's ``teardown``).

        A datamodule reused for a fresh fit must not resume that fit's first epoch at the old position.
        """
        self._loaded = None


def _resumable_loaders(loaders: Any) -> list[ResumableDataLoader]:
    """The :class:`ResumableDataLoader` objects of a loader or of a ``CombinedLoader``, in its order."""
    parts = getattr(loaders, "flattened", [loaders])
    return [part for part in parts if isinstance(part, ResumableDataLoader)]
