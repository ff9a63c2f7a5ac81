"""Cached backbone features: what :class:`~lt_finetune.callbacks.CachedProbe` trains a linear probe on. Pure: no
Trainer needed.

While the backbone is frozen with its BatchNorm layers in eval mode, it computes the same features for the same
input at every epoch. With deterministic inputs (no random augmentation), those features can be computed once and
the head trained on them: an epoch then costs the head's steps only, with neither image decoding nor a backbone
pass. The pieces:

- :class:`FeatureBatch`: a batch of cached features, ``(features, target)``; ``TransferModule`` recognises it and
  skips ``forward_features``.
- :func:`input_randomness` and :func:`stochastic_layers`: why the inputs or the frozen backbone are random, if they
  are (a cache would then freeze one random draw).
- :func:`compute_features`: one pass over a dataset, in index order, with a bound on the memory it may take.
- :class:`CachedBatches`: an iterable that serves the cached features in the order the training loader's sampler
  gives, batch for batch, so that a cached epoch sees the batches an uncached epoch would.

Example::

    >>> from torch import nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> data = TensorDataset(torch.arange(12.0).view(6, 2), torch.arange(6))
    >>> store = compute_features(data, nn.Linear(2, 3), batch_size=4, max_bytes=1 << 20)
    >>> store.features.shape, store.targets.tolist()
    (torch.Size([1, 6, 3]), [0, 1, 2, 3, 4, 5])
    >>> batches = CachedBatches(DataLoader(data, batch_size=4), store)
    >>> [tuple(b.features.shape) for b in batches]
    [(4, 3), (2, 3)]
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.utils.data import DataLoader, Dataset

from lt_finetune.loss_terms import split_batch

__all__ = [
    "CacheTooLarge",
    "CachedBatches",
    "FeatureBatch",
    "FeatureStore",
    "compute_features",
    "input_randomness",
    "preserved_rng",
    "stochastic_layers",
]

#: Transforms that draw at random whatever their arguments (besides every ``Random*`` class).
_RANDOM_TRANSFORMS = frozenset(
    {"ColorJitter", "RandAugment", "AutoAugment", "TrivialAugmentWide", "AugMix", "AugMixAugment", "GaussianBlur"}
)
#: Items read twice to catch randomness the attributes do not show.
_PROBE_ITEMS = 8


class FeatureBatch(NamedTuple):
    """A batch of cached backbone features ``[B, D]`` and their targets.

    ``TransferModule`` takes ``features`` as the output of ``forward_features`` and runs only the head; loss terms
    then see the features as both ``features`` and ``inputs``.
    """

    features: Tensor
    target: Tensor


class CacheTooLarge(RuntimeError):
    """The features would take more memory than allowed (raised after the first batch, before the rest)."""

    def __init__(self, estimate: int, limit: int) -> None:
        super().__init__(f"{estimate} bytes needed, {limit} allowed")
        self.estimate = estimate
        self.limit = limit


@dataclass
class FeatureStore:
    """Features of every item of a dataset, by index: ``features[view, index]``, ``targets[index]``."""

    features: Tensor
    targets: Tensor

    @property
    def nbytes(self) -> int:
        """Memory the store takes."""
        return _nbytes(self.features) + _nbytes(self.targets)

    @property
    def views(self) -> int:
        """Number of cached views of each item."""
        return int(self.features.shape[0])


# -- randomness --------------------------------------------------------------------------------------------------


def stochastic_layers(module: nn.Module) -> list[str]:
    """Names of the layers of ``module`` whose output is random or depends on the batch in its current mode.

    These are BatchNorm layers in training mode (batch statistics) and dropout-like layers (``Dropout``, timm's
    ``DropPath`` and ``DropBlock``) in training mode with a non-zero probability.
    """
    found = []
    for name, layer in module.named_modules():
        if not layer.training:
            continue
        if isinstance(layer, _BatchNorm):
            found.append(name)
        elif isinstance(layer, _DropoutNd) or "drop" in type(layer).__name__.lower():
            rate = next((getattr(layer, a) for a in ("p", "drop_prob", "drop_rate") if hasattr(layer, a)), None)
            if rate is None or float(rate) > 0:
                found.append(name)
    return found


def input_randomness(dataset: Dataset[Any], datamodule: object = None, probe_items: int = _PROBE_ITEMS) -> list[str]:
    """Reasons why reading ``dataset`` twice can give different inputs; ``[]`` when it looks deterministic.

    Looks at what lt_finetune's datamodules set (``hflip`` on their datasets, Mixup/CutMix on the datamodule), at
    the dataset's ``transform`` (any ``Random*`` transform, colour jitter, RandAugment and the like, unless its
    probability is 0), through ``Subset``/``ConcatDataset`` wrappers, and finally reads the first ``probe_items``
    items twice and compares them. The random number generators are left as they were.

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> input_randomness(TensorDataset(torch.zeros(4, 2)))
        []
    """
    reasons: list[str] = []
    if getattr(datamodule, "mixup_enabled", False):
        reasons.append(
            f"{type(datamodule).__name__} mixes training batches (mixup_alpha={getattr(datamodule, 'mixup_alpha', '?')}"
            f", cutmix_alpha={getattr(datamodule, 'cutmix_alpha', '?')})"
        )
    for level in _dataset_levels(dataset):
        if getattr(level, "hflip", False) is True:
            reasons.append(f"{type(level).__name__} flips images at random (hflip=True)")
        for attr in ("transform", "transforms"):
            reasons += [
                f"{type(level).__name__}.{attr} has {t}" for t in _random_transforms(getattr(level, attr, None))
            ]
    if not reasons:
        index = _first_differing_item(dataset, probe_items)
        if index is not None:
            reasons.append(f"{type(dataset).__name__} returned different values for item {index} on two reads")
    return reasons


def _dataset_levels(dataset: object) -> Iterator[object]:
    seen: set[int] = set()
    stack = [dataset]
    while stack:
        level = stack.pop()
        if level is None or id(level) in seen:
            continue
        seen.add(id(level))
        yield level
        stack.append(getattr(level, "dataset", None))
        stack.extend(getattr(level, "datasets", None) or ())


def _random_transforms(transform: object, depth: int = 0) -> list[str]:
    if transform is None or depth > 8:
        return []
    children = getattr(transform, "transforms", None)
    if isinstance(children, Sequence) and not isinstance(children, (str, bytes)):
        return [name for child in children for name in _random_transforms(child, depth + 1)]
    name = type(transform).__name__
    if not (name.startswith("Random") or name in _RANDOM_TRANSFORMS):
        return []
    probability = next((getattr(transform, a) for a in ("p", "probability", "prob") if hasattr(transform, a)), None)
    if isinstance(probability, (int, float)) and probability == 0:
        return []
    return [name]


def _first_differing_item(dataset: Dataset[Any], count: int) -> int | None:
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None
    with preserved_rng():
        for index in range(min(count, size)):
            if not _same(dataset[index], dataset[index]):
                return index
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return bool(np.array_equal(a, b))
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


@contextlib.contextmanager
def preserved_rng(devices: Sequence[torch.device] = ()) -> Iterator[None]:
    """Run a block without moving any random number generator: torch's CPU (and CUDA) generators, Python's
    ``random`` and NumPy's global state are restored afterwards, so that a training run drawing after it sees the
    numbers it would have seen without it."""
    cuda = [d.index if d.index is not None else torch.cuda.current_device() for d in devices if d.type == "cuda"]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=cuda, enabled=True):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


# -- computing and serving the features --------------------------------------------------------------------------


@torch.no_grad()
def compute_features(
    dataset: Dataset[Any],
    features_fn: Callable[[Tensor], Tensor],
    *,
    batch_size: int,
    max_bytes: int,
    views: int = 1,
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    to_device: Callable[[Any], Any] | None = None,
    storage: torch.device | str | None = None,
) -> FeatureStore:
    """Features of every item of ``dataset``, in index order, ``views`` times (one pass per view).

    The memory the result will take is estimated from the first batch and checked against ``max_bytes`` before
    the rest is computed. Run it inside :func:`preserved_rng` to leave the generators of a training run untouched.

    Args:
        dataset: A map-style dataset of ``(input, target, *rest)`` items.
        features_fn: Inputs to features (``TransferModule.forward_features``); called without gradients.
        batch_size: Items per forward pass.
        max_bytes: Most memory the features and targets may take.
        views: Passes over the dataset (views of each item, for random augmentation).
        num_workers: Loader worker processes for reading the items.
        collate_fn: The training loader's ``collate_fn`` (``None``: PyTorch's default).
        to_device: Moves a collated batch to the model's device (``Strategy.batch_to_device``).
        storage: Where the features are kept; ``None`` leaves them where ``features_fn`` puts them.

    Returns:
        The :class:`FeatureStore`.

    Raises:
        CacheTooLarge: If the estimate exceeds ``max_bytes``.
        ValueError: If a batch comes out smaller than requested (a ``collate_fn`` that skips unreadable items).
    """
    size = len(dataset)  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {"batch_size": batch_size, "shuffle": False, "num_workers": num_workers}
    if collate_fn is not None:
        kwargs["collate_fn"] = collate_fn
    loader = DataLoader(dataset, **kwargs)
    features: Tensor | None = None
    targets: Tensor | None = None
    for view in range(views):
        start = 0
        for batch in loader:
            if to_device is not None:
                batch = to_device(batch)
            x, y, _ = split_batch(batch)
            expected = min(batch_size, size - start)
            if len(x) != expected:
                raise ValueError(
                    f"a batch of items {start}..{start + expected - 1} came out with {len(x)} items instead of "
                    f"{expected} (its collate_fn leaves items out), so features cannot be matched to indices"
                )
            out = features_fn(x)
            if features is None:
                estimate = views * size * _nbytes(out[:1]) + size * _nbytes(y[:1])
                if estimate > max_bytes:
                    raise CacheTooLarge(estimate, max_bytes)
                where = out.device if storage is None else torch.device(storage)
                features = torch.empty((views, size, *out.shape[1:]), dtype=out.dtype, device=where)
                targets = torch.empty((size, *y.shape[1:]), dtype=y.dtype, device=where)
            features[view, start : start + len(out)] = out
            if view == 0:
                assert targets is not None
                targets[start : start + len(out)] = y
            start += len(out)
    if features is None or targets is None:
        raise ValueError("the dataset is empty")
    return FeatureStore(features, targets)


class CachedBatches:
    """Serves a :class:`FeatureStore` batch for batch in the order of ``loader``'s batch sampler.

    It draws from the random number generators exactly what iterating ``loader`` itself draws (the loader's base
    seed, once per epoch unless its workers persist, and whatever its sampler draws), so a cached epoch leaves the
    generators where an uncached one would, and dropout in the head sees the same masks. ``sampler`` and
    ``batch_sampler`` are the loader's, so Lightning's ``set_epoch`` reaches a distributed or epoch-seeded sampler.

    Args:
        loader: The training (or validation) loader; it must batch with a batch sampler.
        store: The cached features, by index.
        view_seed: Seed of the choice among several views (``store.views > 1``): item ``i`` of epoch ``e`` uses a
            view drawn by a generator seeded with ``(view_seed, e)``, so the choice survives resuming.
    """

    def __init__(self, loader: DataLoader[Any], store: FeatureStore, view_seed: int = 0) -> None:
        if loader.batch_sampler is None:
            raise ValueError("the loader batches without a batch sampler (batch_size=None)")
        self.loader = loader
        self.store = store
        self.sampler = loader.sampler
        self.batch_sampler = loader.batch_sampler
        self.view_seed = view_seed
        #: Epoch of the next iteration (chooses the views).
        self.epoch = 0
        #: Skip the base-seed draw at the next iteration: the loader itself was iterated for this epoch already.
        self.skip_next_draw = False
        #: Batches to leave out at the start of the next iteration (an epoch resumed in its middle): a count, or a
        #: function giving it, called at the first batch (when the training loop knows where it stands).
        self.skip_batches: int | Callable[[], int] = 0
        self._draws_seed = not (loader.num_workers > 0 and loader.persistent_workers)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[FeatureBatch]:
        if self.skip_next_draw:
            self.skip_next_draw = False
        elif self._draws_seed:
            torch.empty((), dtype=torch.int64).random_(generator=self.loader.generator)
        skip, self.skip_batches = self.skip_batches, 0
        return self._batches(skip, self._view_choice())

    def _view_choice(self) -> Tensor | None:
        views = self.store.views
        if views == 1:
            return None
        generator = torch.Generator().manual_seed((self.view_seed * 1_000_003 + self.epoch) % 2**63)
        choice = torch.randint(views, (self.store.features.shape[1],), generator=generator)
        return choice.to(self.store.features.device)

    def _batches(self, skip: int | Callable[[], int], choice: Tensor | None) -> Iterator[FeatureBatch]:
        # A generator: this runs at the first next(), after Lightning's set_epoch and its loop's reset.
        skip = skip() if callable(skip) else skip
        features, targets = self.store.features, self.store.targets
        assert self.batch_sampler is not None
        for position, indices in enumerate(self.batch_sampler):
            if position < skip:
                continue
            index = torch.as_tensor(indices, dtype=torch.long, device=features.device)
            # index_select, not fancy indexing: several times faster for a batch of rows.
            rows = features[0].index_select(0, index) if choice is None else features[choice[index], index]
            yield FeatureBatch(rows, targets.index_select(0, index))


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()
