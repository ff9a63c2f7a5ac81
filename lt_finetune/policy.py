"""The public fine-tuning policy protocol: subclass :class:`FinetunePolicy` to write your own callback.

A policy states, as pure functions of the training progress ``(epoch, global_step)``:

- :meth:`FinetunePolicy.frozen_groups`: which backbone layer groups it wants frozen;
- :meth:`FinetunePolicy.lr_factor`: a factor on each group's learning rate (``"head"`` and extra modules included);
- :attr:`FinetunePolicy.bn_mode`: what the BatchNorm layers of the groups it freezes do (``lt_finetune.freezing``).

Everything else is the library's: the Lightning hooks here hand the policies of one fit to one
:class:`~lt_finetune.coordinator.Coordinator`, which combines them (frozen if any policy freezes; factors
multiply), applies them before every step, splits the optimizer into named layer groups, makes every scheduler
exact and keeps DDP replicas identical. ``FreezeBackbone``, ``GradualUnfreeze`` and ``LayerwiseLR`` are written
against this protocol only; so can yours, and the same contract test holds for it (see ``docs/extending.md``).

Rules a policy follows: configuration lives in the constructor (and :meth:`FinetunePolicy.config`, which gives
``repr`` and a ``state_key`` that tells two instances apart); runtime state lives in ``state_dict``; the answer
of ``frozen_groups``/``lr_factor`` depends only on the arguments, the configuration and that runtime state, so a
resumed run behaves exactly like an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lt_finetune._log import info
from lt_finetune.coordinator import Coordinator
from lt_finetune.freezing import BN_MODES
from lt_finetune.snapshot import load_snapshots, save_snapshots
from lt_finetune.validation import check_choice

__all__ = ["LIGHTNING_LOGGING_ATTRS", "FinetunePolicy", "check_strategy", "detach_lightning_logging"]

#: Attributes Lightning attaches to every callback at fit start: the model's bound `log` and `log_dict`. Left in
#: place they keep the model, its trainer and its optimizer alive as long as the callback.
LIGHTNING_LOGGING_ATTRS = ("log", "log_dict")
_PER_FIT_ATTRS = ("_coordinator", "_checkpoint_groups", "_batch_idx", *LIGHTNING_LOGGING_ATTRS)


def detach_lightning_logging(callback: object) -> None:
    """Drop what Lightning attached to ``callback`` for a fit (it attaches it again at the next one)."""
    for name in LIGHTNING_LOGGING_ATTRS:
        callback.__dict__.pop(name, None)


class FinetunePolicy(pl.Callback):
    """Base class of the fine-tuning callbacks. Override the policy methods; the Lightning hooks are done.

    Args:
        backbone: Attribute path of the pretrained part on the LightningModule (``"encoder"``,
            ``"model.backbone"``); every policy of one fit must name the same one.
        bn_mode: What the BatchNorm layers of the groups this policy freezes do: ``"eval"`` (running statistics
            and affine parameters fixed; no backward pass through a frozen prefix), ``"train"`` (they keep
            training, as fastai does) or ``"batch_stats"``. See ``lt_finetune.freezing``.

    Example::

        >>> class FreezeStem(FinetunePolicy):
        ...     '''Keep the input-side group frozen for the first ``epochs`` epochs.'''
        ...
        ...     def __init__(self, epochs: int = 1) -> None:
        ...         super().__init__()
        ...         self.epochs = epochs
        ...
        ...     def config(self) -> dict:
        ...         return {**super().config(), "epochs": self.epochs}
        ...
        ...     def frozen_groups(self, names, epoch, step):
        ...         return {names[0]} if epoch < self.epochs else set()
        >>> FreezeStem(epochs=2)
        FreezeStem(backbone='backbone', bn_mode='eval', epochs=2)
        >>> FreezeStem().frozen_groups(["stem", "layer1"], epoch=0, step=0)
        {'stem'}
    """

    def __init__(self, backbone: str = "backbone", bn_mode: str = "eval") -> None:
        if not isinstance(backbone, str) or not backbone:
            raise TypeError(
                f"Expected `backbone` to be a non-empty attribute path string, got {backbone!r}. It is the first "
                "argument: pass the other settings by keyword, e.g. LayerwiseLR(decay=0.5)."
            )
        self.backbone = backbone
        self.bn_mode: str = check_choice("bn_mode", bn_mode, BN_MODES)
        self._coordinator: Coordinator | None = None
        self._checkpoint_groups: list[list[Any]] | None = None

    # -- configuration ---------------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The constructor arguments, by name: they give ``repr`` and ``state_key``. Extend it in subclasses."""
        return {"backbone": self.backbone, "bn_mode": self.bn_mode}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    @property
    @override
    def state_key(self) -> str:
        # Two instances with different arguments keep separate state in a checkpoint.
        return self._generate_state_key(**self.config())

    def __getstate__(self) -> dict[str, Any]:
        # The coordinator holds the optimizer of a running fit, and Lightning's `log`/`log_dict` (bound to the
        # model during a fit) hold the model: neither is pickled or copied with the callback.
        state = {k: v for k, v in self.__dict__.items() if k not in _PER_FIT_ATTRS}
        return state | {"_coordinator": None}

    # -- the policy (override these) -------------------------------------------------------------------------

    def validate(self, names: Sequence[str], extras: Sequence[str]) -> None:
        """Check the arguments against the model, at setup: ``names`` are the backbone's layer groups (input side
        first), ``extras`` the extra trainable modules. Raise ``ValueError`` naming the problem and the fix."""

    def reset(self) -> None:
        """Clear runtime state at the start of a fit (a resumed fit then loads it from the checkpoint)."""

    def frozen_groups(self, names: Sequence[str], epoch: int, step: int) -> set[str]:
        """Backbone groups this policy wants frozen at ``(epoch, step)``; ``step`` counts optimizer steps."""
        return set()

    def lr_factor(self, layer: str, names: Sequence[str], epoch: int, step: int) -> float:
        """Factor on the nominal learning rate of ``layer`` (a backbone group, ``"head"`` or an extra module)."""
        return 1.0

    def on_unfrozen(self, layers: Sequence[str], epoch: int, step: int) -> None:
        """Called when groups become trainable (after every policy has been asked)."""

    # -- Lightning hooks -------------------------------------------------------------------------------------

    @property
    def coordinator(self) -> Coordinator | None:
        """The coordinator of the running fit, on the first policy of the trainer (``None`` on the others)."""
        return self._coordinator

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        owner = type(self).__name__
        check_strategy(trainer.strategy, owner)
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"{owner} supports automatic optimization only; {type(pl_module).__name__} sets "
                "automatic_optimization=False. Freeze with lt_finetune.freezing.freeze() in your training_step instead."
            )
        policies = [c for c in trainer.callbacks if isinstance(c, FinetunePolicy)]  # type: ignore[attr-defined]
        if not policies or policies[0] is not self:
            return  # the first policy sets up the fit for all of them
        for policy in policies[1:]:
            if policy.backbone != self.backbone:
                raise ValueError(
                    f"{type(policy).__name__}(backbone={policy.backbone!r}) disagrees with {owner}"
                    f"(backbone={self.backbone!r}). Give every fine-tuning callback of a fit the same backbone."
                )
        from lt_finetune.callbacks.weight_averaging import check_weight_averaging  # the callbacks import this module

        check_weight_averaging(trainer.callbacks)  # type: ignore[attr-defined]
        keys = [p.state_key for p in policies]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(
                f"Two fine-tuning callbacks have the same arguments ({duplicates[0]}): their checkpoint state would "
                "collide. Remove the duplicate, or give them different arguments."
            )
        coordinator = Coordinator(pl_module, self.backbone, policies, owner)
        coordinator.release(pl_module)
        # Freeze before the strategy wraps the model, so that DDP never expects gradients for frozen parameters.
        coordinator.apply(0, 0, training=False)
        self._coordinator = coordinator

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        coordinator = self._coordinator
        if coordinator is None:
            return
        if len(trainer.optimizers) != 1:
            owners = sorted({type(p).__name__ for p in coordinator.policies})
            raise ValueError(
                f"{', '.join(owners)} support exactly one optimizer, got {len(trainer.optimizers)} from "
                "configure_optimizers. Return one optimizer (put every parameter in it, in any number of param groups)."
            )
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        coordinator.attach_optimizer(trainer.optimizers[0], schedulers)
        self._check_checkpoint_optimizer(trainer.optimizers[0], coordinator)
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            # DDP registered exactly the parameters that required grad when it wrapped the model (just now).
            coordinator.ddp_managed = {id(p) for p in trainer.strategy.model.parameters() if p.requires_grad}
        _log_trainable(trainer, coordinator, [])

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._refresh(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx
        self._refresh(trainer)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the last backward of the step, before a 16-bit grad scaler unscales the gradients and looks for
        # inf/nan: averaged here, every rank sees the same gradients and so skips (or takes) the same steps.
        batch_idx = getattr(self, "_batch_idx", 0)
        last = (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or trainer.is_last_batch
        if self._coordinator is not None and last:
            self._coordinator.sync_gradients((trainer.global_step, batch_idx))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._coordinator is not None:  # a no-op when on_after_backward synced this step
            self._coordinator.sync_gradients((trainer.global_step, getattr(self, "_batch_idx", 0)))

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        save_snapshots(pl_module, checkpoint)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        load_snapshots(pl_module, checkpoint)
        self._checkpoint_groups = [
            [group.get("layer_group") for group in state.get("param_groups", [])]
            for state in checkpoint.get("optimizer_states", [])
        ]

    def _check_checkpoint_optimizer(self, optimizer: torch.optim.Optimizer, coordinator: Coordinator) -> None:
        # Lightning loads the optimizer state after on_fit_start and, on a group-count mismatch, says only "loaded
        # state dict has a different number of parameter groups": say which run wrote what, and the fix.
        saved, self._checkpoint_groups = getattr(self, "_checkpoint_groups", None), None
        if not saved or len(saved) != 1:
            return
        now = [group.get("layer_group") for group in optimizer.param_groups]
        if len(saved[0]) == len(now):
            return
        owners = ", ".join(sorted({type(p).__name__ for p in coordinator.policies}))
        written = "without lt_finetune's callbacks" if not any(saved[0]) else "with other fine-tuning callbacks"
        raise ValueError(
            f"The checkpoint's optimizer has {len(saved[0])} param group(s); with {owners} it has {len(now)} "
            f"(layer groups {', '.join(map(str, now))}): the checkpoint was written {written}, so its optimizer state "
            "cannot be resumed. Resume with the callbacks it was written with, or start a new fit from its weights: "
            "`model = YourModule.load_from_checkpoint(path)`, then `trainer.fit(model)` without `ckpt_path`."
        )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._end_fit(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._end_fit(pl_module)

    def _end_fit(self, pl_module: pl.LightningModule) -> None:
        if self._coordinator is not None:
            self._coordinator.detach(pl_module)
            self._coordinator = None
        detach_lightning_logging(self)

    def _refresh(self, trainer: pl.Trainer) -> None:
        coordinator = self._coordinator
        if coordinator is None:
            return
        unfrozen = coordinator.apply(trainer.current_epoch, trainer.global_step, training=True)
        if unfrozen:
            _log_trainable(trainer, coordinator, unfrozen)


def check_strategy(strategy: Strategy, owner: str) -> None:
    """Refuse strategies the fine-tuning callbacks cannot vouch for, with the fix.

    Raises:
        ValueError: Under DeepSpeed, or FSDP without ``use_orig_params=True``.
    """
    if isinstance(strategy, DeepSpeedStrategy):
        raise ValueError(
            f"{owner} does not support DeepSpeed: its engine partitions parameters and optimizer state in ways "
            "that freezing and per-group learning rates have not been verified against. Use strategy='ddp' or "
            "'fsdp' (with use_orig_params=True)."
        )
    if isinstance(strategy, FSDPStrategy):
        kwargs = getattr(strategy, "kwargs", {}) or {}
        if not kwargs.get("use_orig_params", False):
            raise ValueError(
                f"{owner} under FSDP needs per-parameter requires_grad and named param groups, which FSDP keeps only "
                "with use_orig_params=True: pass strategy=FSDPStrategy(use_orig_params=True)."
            )


def human_count(n: float) -> str:
    """``1234567 -> '1.2M'``."""
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def _log_trainable(trainer: pl.Trainer, coordinator: Coordinator, unfrozen: Sequence[str]) -> None:
    trainable = coordinator.trainable()
    epoch, step = coordinator.progress
    if unfrozen:
        count = sum(p.numel() for name in unfrozen for p in coordinator.params[name])
        lr = coordinator.lr_of(unfrozen[-1])
        info(
            f"lt_finetune: epoch {epoch}, step {step}: unfroze {', '.join(unfrozen)} "
            f"({human_count(count)} params) at lr {lr:.3g}; {human_count(trainable)} trainable.",
            trainer,
        )
    else:
        frozen = [n for n in coordinator.order if n in coordinator.frozen]
        info(
            f"lt_finetune: {len(frozen)} of {len(coordinator.names)} backbone groups frozen; "
            f"{human_count(trainable)} of {human_count(coordinator.total_params)} parameters trainable.",
            trainer,
        )
    metrics = {
        "finetune/trainable_params": float(trainable),
        "finetune/trainable_fraction": trainable / max(coordinator.total_params, 1),
    }
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
