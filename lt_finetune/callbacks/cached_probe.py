"""CachedProbe: a linear probe on backbone features computed once, instead of at every epoch."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader
from typing_extensions import override

from lt_finetune.coordinator import resolve_backbone
from lt_finetune.feature_cache import (
    CachedBatches,
    CacheTooLarge,
    FeatureStore,
    compute_features,
    input_randomness,
    preserved_rng,
    stochastic_layers,
)
from lt_finetune.fingerprint import state_digests, unchanged_since, versions
from lt_finetune.groups import layer_groups
from lt_finetune.policy import LIGHTNING_LOGGING_ATTRS, FinetunePolicy, detach_lightning_logging
from lt_finetune.validation import check_bool, check_choice, check_int

__all__ = ["CachedProbe"]

_PER_FIT_ATTRS = ("_train", "_val", "_frozen_state", "_names", *LIGHTNING_LOGGING_ATTRS)


@dataclass
class _Cached:
    """One split served from the cache: the loader it replaces, inside which CombinedLoader, and the features."""

    original: DataLoader[Any]
    combined: CombinedLoader
    store: FeatureStore
    batches: CachedBatches
    params: tuple[nn.Parameter, ...] = ()  # the backbone's, checked to stay frozen while the cache serves


class CachedProbe(pl.Callback):
    """Train the head on backbone features computed once, while the backbone is frozen; transparent otherwise.

    A frozen backbone with its BatchNorm layers in eval mode (``FreezeBackbone()``, the probe phase of ``LPFT``,
    or a backbone frozen by hand) maps each input to the same features at every epoch. When the training inputs
    are deterministic too, CachedProbe computes the features of the whole training set once (one pass without
    gradients) and then serves them, batch for batch, in the order the training loader's sampler gives: the
    epochs skip image decoding, augmentation and the backbone, and run the head's steps only. The head's weights
    end up the same as without the cache, within floating-point rounding: same samples in the same order, the
    same optimizer steps, the same random draws (dropout in the head included). Logging, metrics, checkpoints and
    schedulers see ordinary training steps. Validation batches are cached too (``cache_val``): in eval mode the
    backbone is deterministic.

    The cache applies to an epoch when the fine-tuning policies of the fit keep every backbone layer group frozen
    with ``bn_mode="eval"`` through all its steps (without a policy: when no backbone parameter requires grad and
    no backbone BatchNorm layer is in training mode). It is dropped at the first epoch in which the backbone
    trains (``FreezeBackbone(unfreeze_at_epoch=...)``, ``LPFT``), and rebuilt, never saved, when a fit resumes
    from a checkpoint. An epoch in which the backbone starts training part-way runs uncached.

    When the cache cannot apply, CachedProbe warns once and the fit trains on images as usual (``strict=True``
    raises instead): random training inputs (``hflip=True``, random crops, colour jitter, RandAugment, or items that
    differ on two reads) unless ``views`` augmented views are cached, Mixup/CutMix, active dropout or drop-path
    layers in the backbone, features larger than ``max_cache_bytes`` (estimated from the first batch, before the
    rest is computed), more than one training loader, or a model other than ``TransferModule``.

    Args:
        backbone: Attribute path of the pretrained part on the LightningModule, as the policies name it.
        max_cache_bytes: Most memory the cached features (training and validation together) may take.
        views: Number of augmented views of each training item to cache when the training inputs are random:
            each epoch then draws, for each item, one of its views. ``0`` refuses to cache random inputs. With
            deterministic inputs one pass is cached whatever ``views`` says.
        cache_val: Cache the validation features as well, while the training cache is in use.
        storage: Where the features live: ``"model"`` (the model's device) or ``"cpu"`` (copied to the device at
            every step, like an ordinary batch).
        strict: Raise ``ValueError`` instead of warning and training uncached when the cache cannot apply.
        seed: Seed of the per-epoch choice among several views.

    Raises:
        TypeError: For arguments of the wrong type.
        ValueError: For out-of-range arguments; at setup, for a backbone path the model lacks or that disagrees
            with the policies'.

    Example::

        >>> from lt_finetune.callbacks import CachedProbe
        >>> CachedProbe(max_cache_bytes=2**30)  # doctest: +NORMALIZE_WHITESPACE
        CachedProbe(backbone='backbone', max_cache_bytes=1073741824, views=0, cache_val=True, storage='model',
                    strict=False, seed=0)
    """

    def __init__(
        self,
        backbone: str = "backbone",
        max_cache_bytes: int = 4 * 2**30,
        views: int = 0,
        cache_val: bool = True,
        storage: Literal["model", "cpu"] = "model",
        strict: bool = False,
        seed: int = 0,
    ) -> None:
        if not isinstance(backbone, str) or not backbone:
            raise TypeError(f"Expected `backbone` to be a non-empty attribute path string, got {backbone!r}.")
        self.backbone = backbone
        self.max_cache_bytes = check_int("max_cache_bytes", max_cache_bytes, 0)
        self.views = check_int("views", views, 0)
        self.cache_val = check_bool("cache_val", cache_val)
        self.storage: str = check_choice("storage", storage, ("model", "cpu"))
        self.strict = check_bool("strict", strict)
        self.seed = check_int("seed", seed)
        self._train: _Cached | None = None
        self._val: _Cached | None = None
        self._frozen_state: tuple[dict[str, tuple[int, int]], dict[str, str]] | None = None
        self._names: list[str] = []
        self._refused: str | None = None
        self._val_refused: str | None = None
        self._synced_epoch: int | None = None
        self._said: set[str] = set()

    def config(self) -> dict[str, Any]:
        """The constructor arguments, by name (``repr`` and ``state_key``)."""
        return {
            "backbone": self.backbone,
            "max_cache_bytes": self.max_cache_bytes,
            "views": self.views,
            "cache_val": self.cache_val,
            "storage": self.storage,
            "strict": self.strict,
            "seed": self.seed,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**self.config())

    def __getstate__(self) -> dict[str, Any]:
        # The cache is per fit (and rebuilt on resume): it is neither pickled nor copied with the callback.
        state = {k: v for k, v in self.__dict__.items() if k not in _PER_FIT_ATTRS}
        return state | {"_train": None, "_val": None, "_frozen_state": None, "_names": []}

    # -- hooks -----------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        module = resolve_backbone(pl_module, self.backbone, type(self).__name__)
        for policy in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(policy, FinetunePolicy) and policy.backbone != self.backbone:
                raise ValueError(
                    f"CachedProbe(backbone={self.backbone!r}) disagrees with {type(policy).__name__}"
                    f"(backbone={policy.backbone!r}); give them the same backbone."
                )
        self._names = [g.name for g in layer_groups(module)]
        self._refused = self._val_refused = None
        self._synced_epoch = None
        self._said = set()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(trainer, pl_module, fit_start=True)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._synced_epoch != trainer.current_epoch:
            self._sync(trainer, pl_module, fit_start=False)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._train is None or not any(p.requires_grad for p in self._train.params):
            return
        trainable = next((n for n, p in self._module(pl_module).named_parameters() if p.requires_grad), None)
        if trainable is not None:
            raise RuntimeError(
                f"CachedProbe serves cached features in epoch {trainer.current_epoch}, but backbone parameter "
                f"{trainable!r} became trainable at step {trainer.global_step}. Unfreeze at an epoch boundary through "
                "a fine-tuning policy (FreezeBackbone, LPFT), which CachedProbe reads ahead of each epoch."
            )

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._train is None or not self.cache_val or self._val_refused is not None:
            return
        combined = _combined(trainer, "val")
        if combined is None or (self._val is not None and combined.flattened == [self._val.batches]):
            return  # in place since an earlier validation: the loop has just iterated it
        original = _single_loader(combined)
        if isinstance(original, str):
            self._val_refused = original
            self._say(f"CachedProbe: validation stays uncached: {original}.")
            return
        if self._val is None or self._val.original is not original:
            store = self._val_store(trainer, pl_module, original)
            if store is None:
                return
        else:
            store = self._val.store
        batches = CachedBatches(original, store)
        self._val = _Cached(original, combined, store, batches)
        combined.flattened = [batches]
        batches.skip_next_draw = True  # the loop iterated the original loader (its draw) just before this hook
        iter(combined)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._end_fit()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._end_fit()

    # -- the cache -------------------------------------------------------------------------------------------

    def _module(self, pl_module: pl.LightningModule) -> nn.Module:
        return pl_module.get_submodule(self.backbone)

    def _sync(self, trainer: pl.Trainer, pl_module: pl.LightningModule, fit_start: bool) -> None:
        """Decide, at the start of an epoch, whether it trains on the cache; build, drop or swap accordingly."""
        self._synced_epoch = epoch = trainer.current_epoch
        reason = self._why_not_frozen(trainer, pl_module, epoch)
        if reason is not None:
            if self._train is not None:
                freed = self._drop()
                rank_zero_info(f"CachedProbe: {reason} in epoch {epoch}: dropped the feature cache ({_mb(freed)}).")
            else:
                self._say(f"CachedProbe: not caching epoch {epoch}: {reason}.")
            return
        if self._refused is not None:
            return
        if getattr(trainer, "fast_dev_run", False):
            self._say("CachedProbe: not caching in a fast_dev_run (a few batches cost less than the cache).")
            return
        combined = _combined(trainer, "train")
        original = _single_loader(combined) if combined is not None else "the fit has no training loader"
        if isinstance(original, str):
            self._refuse(original, "Train on one DataLoader.")
            return
        assert combined is not None
        if self._train is not None and (
            self._train.original is not original or not self._backbone_unchanged(pl_module)
        ):
            self._drop()
            self._say(f"CachedProbe: the backbone or the training loader changed: recomputing at epoch {epoch}.")
        store = self._train.store if self._train is not None else self._train_store(trainer, pl_module, original)
        if store is None:
            return
        if self._train is None or combined.flattened != [self._train.batches]:
            batches = CachedBatches(original, store, view_seed=self.seed)
            params = tuple(self._module(pl_module).parameters())
            self._train = _Cached(original, combined, store, batches, params)
            combined.flattened = [batches]
        batches = self._train.batches
        batches.epoch = epoch
        if fit_start:
            # The loop iterated the original loader when it set up (that was this epoch's draw of its seed) and
            # does not iterate again before the first batch: start the cached iteration here.
            batches.skip_next_draw = True
            if trainer.fit_loop.restarted_mid_epoch:  # resumed in the middle of an epoch: skip the batches done
                batches.skip_batches = lambda: trainer.fit_loop.epoch_loop.batch_progress.current.ready
            iter(combined)

    def _why_not_frozen(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> str | None:
        module = self._module(pl_module)
        policies = [c for c in trainer.callbacks if isinstance(c, FinetunePolicy)]  # type: ignore[attr-defined]
        if not policies:
            trainable = next((n for n, p in module.named_parameters() if p.requires_grad), None)
            if trainable is not None:
                return f"backbone parameter {trainable!r} trains"
            batchnorm = next((n for n, m in module.named_modules() if isinstance(m, _BatchNorm) and m.training), None)
            return None if batchnorm is None else f"backbone BatchNorm layer {batchnorm!r} is in training mode"
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            return "the training loader has no length"
        # Every step a whole epoch holds from here: an epoch resumed part-way is judged on more steps than it has.
        last = trainer.global_step + max(int(batches) - 1, 0) // max(trainer.accumulate_grad_batches, 1)
        for step in range(trainer.global_step, last + 1):
            wanted: dict[str, str] = {}
            for policy in policies:
                for name in policy.frozen_groups(self._names, epoch, step):
                    wanted.setdefault(name, policy.bn_mode)
            for name in self._names:
                if name not in wanted:
                    return f"the backbone trains from step {step}"
                if wanted[name] != "eval":
                    return f"layer group {name!r} is frozen with bn_mode={wanted[name]!r}, not 'eval'"
        return None

    def _train_store(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: DataLoader[Any]
    ) -> FeatureStore | None:
        from lt_finetune.module import TransferModule

        if not isinstance(pl_module, TransferModule):
            self._refuse(
                f"{type(pl_module).__name__} is not a TransferModule, whose training step takes cached features",
                "Use TransferModule (or a subclass).",
            )
            return None
        module = self._module(pl_module)
        policies = any(isinstance(c, FinetunePolicy) for c in trainer.callbacks)  # type: ignore[attr-defined]
        stochastic = [n for n in stochastic_layers(module) if not (policies and _is_bn(module, n))]
        if stochastic:
            self._refuse(
                f"backbone layers {stochastic[:3]} are random in training mode (dropout, drop-path)",
                "Build the backbone with drop_rate=0 and drop_path_rate=0, or put those layers in eval mode.",
            )
            return None
        datamodule = getattr(trainer, "datamodule", None)
        randomness = input_randomness(loader.dataset, datamodule)
        if randomness and (self.views == 0 or getattr(datamodule, "mixup_enabled", False)):
            hint = (
                "Mixup mixes images within each batch, which a cache cannot replay: turn it off for the probe."
                if getattr(datamodule, "mixup_enabled", False)
                else "Turn the augmentation off for the probe (e.g. hflip=False), or pass views=N to cache N "
                "augmented views of every item."
            )
            self._refuse(f"the training inputs are random ({'; '.join(randomness)})", hint)
            return None
        views = self.views if randomness else 1
        store = self._compute(trainer, pl_module, loader, views, self.max_cache_bytes, train=True)
        if isinstance(store, CacheTooLarge):
            self._refuse(
                f"the training features would take {_mb(store.estimate)}, over max_cache_bytes={self.max_cache_bytes}"
                f" ({_mb(self.max_cache_bytes)})",
                "Raise max_cache_bytes, use storage='cpu', or cache fewer views.",
            )
            return None
        tensors = _tensors(module)
        self._frozen_state = (versions(tensors), state_digests(tensors))
        return store

    def _val_store(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: DataLoader[Any]
    ) -> FeatureStore | None:
        randomness = input_randomness(loader.dataset)
        if randomness:
            self._val_refused = "; ".join(randomness)
            self._say(f"CachedProbe: validation stays uncached: its inputs are random ({self._val_refused}).")
            return None
        budget = self.max_cache_bytes - (self._train.store.nbytes if self._train is not None else 0)
        store = self._compute(trainer, pl_module, loader, 1, budget, train=False)
        if isinstance(store, CacheTooLarge):
            self._val_refused = f"its features would take {_mb(store.estimate)}, over the {_mb(budget)} left"
            self._say(f"CachedProbe: validation stays uncached: {self._val_refused} of max_cache_bytes.")
            return None
        return store

    def _compute(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        loader: DataLoader[Any],
        views: int,
        budget: int,
        train: bool,
    ) -> FeatureStore | CacheTooLarge:
        module = self._module(pl_module)
        # In a training epoch the policies keep the frozen BatchNorm layers in eval mode (re-applied before every
        # step): compute the features the steps would see, whatever the flags are at this moment.
        layers = [m for m in module.modules() if isinstance(m, _BatchNorm)] if train else []
        flags = [m.training for m in layers]
        precision = trainer.precision_plugin
        context = precision.train_step_context() if train else precision.val_step_context()
        start = time.perf_counter()
        try:
            with preserved_rng([pl_module.device]), context:
                for layer in layers:
                    layer.eval()
                store = compute_features(
                    loader.dataset,
                    pl_module.forward_features,  # type: ignore[arg-type]
                    batch_size=loader.batch_size or 1,
                    max_bytes=budget,
                    views=views,
                    num_workers=loader.num_workers,
                    collate_fn=loader.collate_fn,
                    to_device=trainer.strategy.batch_to_device,
                    storage="cpu" if self.storage == "cpu" else None,
                )
        except CacheTooLarge as err:
            return err
        finally:
            for layer, flag in zip(layers, flags):
                layer.train(flag)
        split = "training" if train else "validation"
        rank_zero_info(
            f"CachedProbe: cached the backbone features of {store.targets.shape[0]} {split} items"
            f"{f' ({views} views)' if views > 1 else ''}, {_mb(store.nbytes)}, in {time.perf_counter() - start:.1f} s;"
            f" {split} batches now skip the backbone."
        )
        return store

    def _backbone_unchanged(self, pl_module: pl.LightningModule) -> bool:
        if self._frozen_state is None:
            return False
        seen, digests = self._frozen_state
        return unchanged_since(_tensors(self._module(pl_module)), seen, digests)

    def _refuse(self, reason: str, hint: str) -> None:
        """Warn (or raise, with ``strict``) that the cache cannot apply, and train uncached for the rest of the fit."""
        message = f"CachedProbe cannot cache the backbone features: {reason}. {hint}".strip()
        if self.strict:
            raise ValueError(message + " (strict=True)")
        self._refused = reason
        rank_zero_warn(message + " Training on the inputs, uncached.")

    def _say(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            rank_zero_info(message)

    def _drop(self) -> int:
        """Put the original loaders back and free the features; returns the bytes freed."""
        freed = 0
        for cached in (self._train, self._val):
            if cached is None:
                continue
            if cached.combined.flattened == [cached.batches]:
                cached.combined.flattened = [cached.original]
            freed += cached.store.nbytes
        self._train = self._val = None
        self._frozen_state = None
        return freed

    def _end_fit(self) -> None:
        self._drop()
        self._names = []
        detach_lightning_logging(self)


def _combined(trainer: pl.Trainer, split: Literal["train", "val"]) -> CombinedLoader | None:
    # Lightning keeps the loop's CombinedLoader private; its `flattened` setter is the public way to swap loaders.
    loop: Any = trainer.fit_loop if split == "train" else trainer.fit_loop.epoch_loop.val_loop
    combined = getattr(loop, "_combined_loader", None)
    return combined if isinstance(combined, CombinedLoader) else None


def _single_loader(combined: CombinedLoader) -> DataLoader[Any] | str:
    """The one DataLoader inside ``combined`` (or the one a cache replaced), else why there is none."""
    flattened = combined.flattened
    if len(flattened) != 1:
        return f"the fit has {len(flattened)} loaders in one CombinedLoader"
    loader = flattened[0]
    if isinstance(loader, CachedBatches):
        return loader.loader
    if not isinstance(loader, DataLoader) or loader.batch_sampler is None or not hasattr(loader.dataset, "__len__"):
        return f"the loader is a {type(loader).__name__}, not a DataLoader over a sized dataset with a batch sampler"
    return loader


def _tensors(module: nn.Module) -> dict[str, Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _is_bn(module: nn.Module, name: str) -> bool:
    return isinstance(module.get_submodule(name), _BatchNorm) if name else isinstance(module, _BatchNorm)


def _mb(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"
