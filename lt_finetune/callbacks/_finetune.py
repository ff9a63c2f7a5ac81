"""What the fine-tuning callbacks share: the base class with the Lightning hooks, and the per-model coordinator.

Each callback only states a policy: which backbone groups it wants frozen and which learning-rate factor a
group gets, as pure functions of the training progress ``(epoch, global_step)``. The coordinator (one per
LightningModule, shared by every lt_finetune callback on it) combines the policies (a group is frozen when
any callback freezes it; factors multiply), applies them, and owns the parts that must happen exactly once:

- splitting the optimizer into named layer groups at fit start (``lt_finetune.optim``);
- making the schedulers step on nominal learning rates (``attach_lr_scaling``);
- under DDP, averaging the gradients of parameters that were frozen when DDP wrapped the model: DDP never
  registered them, so without this the replicas drift apart after unfreezing.

Because the trainable set is a function of the progress counters, which Lightning restores on resume, a
resumed run freezes, unfreezes and scales exactly like an uninterrupted one.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lt_finetune.freezing import BN_MODES, batchnorm_layers, freeze, set_bn_mode, unfreeze
from lt_finetune.groups import HEAD, LayerGroup, layer_groups
from lt_finetune.optim import LAYER_GROUP, add_param_groups, apply_lr_factors, attach_lr_scaling, split_param_groups

_COORDINATORS: weakref.WeakKeyDictionary[pl.LightningModule, _Coordinator] = weakref.WeakKeyDictionary()


def resolve_backbone(pl_module: nn.Module, path: str, owner: str) -> nn.Module:
    """The sub-module at the dotted attribute ``path``, with an error that lists what is there instead."""
    module: Any = pl_module
    for part in path.split("."):
        child = getattr(module, part, None)
        if not isinstance(child, nn.Module):
            available = [n for n, _ in module.named_children()] if isinstance(module, nn.Module) else []
            raise AttributeError(
                f"{owner}(backbone={path!r}) found no sub-module {part!r} on {type(module).__name__}; "
                f"available: {available}. Pass the attribute path of the pretrained part, e.g. backbone='encoder'."
            )
        module = child
    return module


def human_count(n: float) -> str:
    """``1234567 -> '1.2M'``."""
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


class _Coordinator:
    """Applies the combined policy of every lt_finetune callback attached to one LightningModule."""

    def __init__(self, pl_module: pl.LightningModule, backbone_path: str, owner: str) -> None:
        self.backbone_path = backbone_path
        backbone = resolve_backbone(pl_module, backbone_path, owner)
        self.groups: list[LayerGroup] = layer_groups(backbone)
        self.names: list[str] = [g.name for g in self.groups]
        backbone_ids = {id(p) for p in backbone.parameters()}
        head = [p for _, p in pl_module.named_parameters() if id(p) not in backbone_ids and p.requires_grad]
        self.params: dict[str, tuple[nn.Parameter, ...]] = {g.name: g.params for g in self.groups}
        self.params[HEAD] = tuple(head)
        self.order = [*self.names, HEAD]
        self.assignment = {id(p): name for name, params in self.params.items() for p in params}
        self.batchnorms = {g.name: batchnorm_layers(backbone, {id(p) for p in g.params}) for g in self.groups}
        self.bn_param_ids = {id(p) for layers in self.batchnorms.values() for m in layers for p in m.parameters()}
        self.total_params = sum(p.numel() for params in self.params.values() for p in params)
        self.callbacks: list[_LayerGroupCallback] = []
        self.frozen: dict[str, str] = {}  # group -> bn mode applied
        self.progress = (0, 0)
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedulers: list[Any] = []
        self.ddp_managed: set[int] | None = None
        self._synced_step = -1
        self._trainer: weakref.ReferenceType[pl.Trainer] | None = None

    def register(self, callback: _LayerGroupCallback) -> None:
        """Validate ``callback`` against the layer groups and add its policy."""
        if callback.backbone != self.backbone_path:
            raise ValueError(
                f"{type(callback).__name__}(backbone={callback.backbone!r}) disagrees with another lt_finetune "
                f"callback (backbone={self.backbone_path!r}). Give every callback the same backbone."
            )
        callback.validate(self.names)
        callback.reset()
        if callback not in self.callbacks:
            self.callbacks.append(callback)

    # -- policy ------------------------------------------------------------------------------------------------

    def desired(self, epoch: int, step: int) -> dict[str, str]:
        """Frozen groups at a point of training, each with the BatchNorm mode of the first callback freezing it."""
        wanted: dict[str, str] = {}
        for callback in self.callbacks:
            for name in callback.frozen_groups(self.names, epoch, step):
                wanted.setdefault(name, callback.frozen_bn_mode)
        return wanted

    def lr_factor(self, layer: str) -> float:
        """The factor applied to a group's nominal learning rate at the current progress."""
        if self.frozen.get(layer, "train") != "train":  # with bn_mode="train" the group's BatchNorm still trains
            return 0.0
        epoch, step = self._live_progress()
        factor = 1.0
        for callback in self.callbacks:
            factor *= callback.lr_factor(layer, self.names, epoch, step)
        return factor

    def _live_progress(self) -> tuple[int, int]:
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is not None and trainer.training:
            return trainer.current_epoch, trainer.global_step
        return self.progress

    # -- applying --------------------------------------------------------------------------------------------

    def apply(self, epoch: int, step: int, training: bool = True) -> list[str]:
        """Freeze/unfreeze to the policy at ``(epoch, step)`` and re-apply the learning-rate factors.

        Returns the groups unfrozen by this call.
        """
        self.progress = (epoch, step)
        wanted = self.desired(epoch, step)
        unfrozen = [n for n in self.frozen if n not in wanted]
        for name in unfrozen:
            unfreeze(self.params[name])
            set_bn_mode(self.batchnorms[name], None, training=training)
            del self.frozen[name]
        for name, mode in wanted.items():
            if self.frozen.get(name) != mode:
                keep = self.bn_param_ids if mode == "train" else set()
                freeze(p for p in self.params[name] if id(p) not in keep)
                if mode == "train":
                    unfreeze(p for p in self.params[name] if id(p) in keep)
                self.frozen[name] = mode
            if training:  # Lightning's model.train() resets module flags: re-apply before every step
                set_bn_mode(self.batchnorms[name], mode)
        if unfrozen:
            ordered = [n for n in self.order if n in unfrozen]
            for callback in self.callbacks:
                callback.on_unfrozen(ordered, epoch, step)
        if self.optimizer is not None:
            apply_lr_factors(self.optimizer)
        return [n for n in self.order if n in unfrozen]

    def trainable(self) -> int:
        """Number of trainable scalars among the coordinated parameters."""
        return sum(p.numel() for params in self.params.values() for p in params if p.requires_grad)

    def lr_of(self, layer: str) -> float:
        """The applied learning rate of a layer group (its first param group)."""
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            if group.get(LAYER_GROUP) == layer:
                return float(group["lr"])
        return math.nan

    # -- fit-time wiring -------------------------------------------------------------------------------------

    def attach(self, trainer: pl.Trainer) -> None:
        """Bring the trainer's optimizer under the named-group contract and hook the schedulers; once per fit."""
        if self.optimizer is not None:
            return
        self._trainer = weakref.ref(trainer)
        if len(trainer.optimizers) != 1:
            owners = sorted({type(c).__name__ for c in self.callbacks})
            raise ValueError(
                f"{', '.join(owners)} support exactly one optimizer, got {len(trainer.optimizers)} from "
                "configure_optimizers. Return one optimizer (put every parameter in it, in any number of param groups)."
            )
        self.attach_optimizer(trainer.optimizers[0], [config.scheduler for config in trainer.lr_scheduler_configs])
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            # DDP registered exactly the parameters that required grad when it wrapped the model (just now).
            self.ddp_managed = {id(p) for p in trainer.strategy.model.parameters() if p.requires_grad}

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, schedulers: list[Any]) -> None:
        """Split ``optimizer`` into named layer groups, add missing parameters, make schedulers step nominally."""
        changes = split_param_groups(optimizer, self.assignment, self.order, schedulers)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = {name: [p for p in params if id(p) not in held] for name, params in self.params.items()}
        changes += add_param_groups(optimizer, missing, self.order, schedulers)
        attach_lr_scaling(optimizer, self.lr_factor, schedulers)
        self.optimizer, self.schedulers = optimizer, schedulers
        if changes:
            rank_zero_info(f"lt_finetune: {type(optimizer).__name__}: " + "; ".join(changes) + ".")

    def sync_gradients(self, trainer: pl.Trainer) -> None:
        """Average, across DDP processes, the gradients DDP does not manage; once per optimizer step."""
        if self.ddp_managed is None or self._synced_step == trainer.global_step:
            return
        self._synced_step = trainer.global_step
        params = [
            p for params in self.params.values() for p in params if p.requires_grad and id(p) not in self.ddp_managed
        ]
        if not params or not dist.is_available() or not dist.is_initialized():
            return
        # One collective for all of them; a has-grad mask keeps ranks consistent when a parameter went unused.
        grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device) for p in params]
        mask = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
        flat = torch.cat([*grads, mask])
        dist.all_reduce(flat)
        world = dist.get_world_size()
        offset = 0
        for i, p in enumerate(params):
            n = p.numel()
            if flat[-len(params) + i] > 0:
                reduced = flat[offset : offset + n].view_as(p).div_(world)
                if p.grad is None:
                    p.grad = reduced.clone()
                else:
                    p.grad.copy_(reduced)
            offset += n


class _LayerGroupCallback(pl.Callback):
    """Base of the lt_finetune callbacks: Lightning hooks here, policy in the subclasses.

    Subclasses override :meth:`frozen_groups`, :meth:`lr_factor`, :meth:`on_unfrozen` and :meth:`validate`.
    """

    frozen_bn_mode: str = "eval"

    def __init__(self, backbone: str) -> None:
        if not isinstance(backbone, str) or not backbone:
            raise TypeError(
                f"Expected `backbone` to be a non-empty attribute path string, got {backbone!r}. It is the first "
                "argument: pass the other settings by keyword, e.g. LayerwiseLR(decay=0.5)."
            )
        self.backbone = backbone

    @property
    @override
    def state_key(self) -> str:
        # Two instances of one callback class on different backbones keep separate state in a checkpoint.
        return self._generate_state_key(backbone=self.backbone)

    # -- policy (pure) -----------------------------------------------------------------------------------------

    def frozen_groups(self, names: Sequence[str], epoch: int, step: int) -> set[str]:
        """Backbone groups this callback wants frozen at ``(epoch, step)``."""
        return set()

    def lr_factor(self, layer: str, names: Sequence[str], epoch: int, step: int) -> float:
        """Factor on the nominal learning rate of ``layer`` (a backbone group or ``"head"``)."""
        return 1.0

    def on_unfrozen(self, layers: Sequence[str], epoch: int, step: int) -> None:
        """Called when groups become trainable."""

    def validate(self, names: Sequence[str]) -> None:
        """Check the callback's arguments against the model's layer group names."""

    def reset(self) -> None:
        """Clear runtime state at the start of a fit (a resumed fit then loads it from the checkpoint)."""

    # -- Lightning hooks -------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _check_strategy(trainer, type(self).__name__)
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"{type(self).__name__} supports automatic optimization only; {type(pl_module).__name__} sets "
                "automatic_optimization=False. Freeze with lt_finetune.freezing.freeze() in your training_step instead."
            )
        coordinator = _COORDINATORS.get(pl_module)
        if coordinator is None or coordinator.optimizer is not None:  # a new fit starts from a fresh coordinator
            previous = coordinator
            coordinator = _Coordinator(pl_module, self.backbone, type(self).__name__)
            if previous is not None:  # what an earlier fit left frozen is unfrozen if this fit does not want it
                coordinator.frozen = {n: m for n, m in previous.frozen.items() if n in coordinator.params}
            _COORDINATORS[pl_module] = coordinator
        coordinator.register(self)
        # Freeze before the strategy wraps the model, so that DDP never expects gradients for frozen parameters.
        coordinator.apply(0, 0, training=False)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        coordinator = _COORDINATORS[pl_module]
        if coordinator.optimizer is None:
            coordinator.attach(trainer)
            _log_trainable(trainer, coordinator, [])

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._refresh(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._refresh(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        _COORDINATORS[pl_module].sync_gradients(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        coordinator = _COORDINATORS.get(pl_module)
        if stage == "fit" and coordinator is not None and self in coordinator.callbacks:
            coordinator.callbacks.remove(self)

    def _refresh(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        coordinator = _COORDINATORS[pl_module]
        # The first callback of the step does the work; the others find it done.
        if coordinator.callbacks and coordinator.callbacks[0] is not self:
            return
        epoch, step = trainer.current_epoch, trainer.global_step
        unfrozen = coordinator.apply(epoch, step, training=True)
        if unfrozen:
            _log_trainable(trainer, coordinator, unfrozen)


def _check_strategy(trainer: pl.Trainer, owner: str) -> None:
    strategy = trainer.strategy
    name = type(strategy).__name__
    if "DeepSpeed" in name:
        raise ValueError(
            f"{owner} does not support DeepSpeed: its engine partitions parameters and optimizer state in ways "
            "that freezing and per-group learning rates have not been verified against. Use strategy='ddp' or "
            "'fsdp' (with use_orig_params=True)."
        )
    if "FSDP" in name:
        kwargs = getattr(strategy, "kwargs", {}) or {}
        if not kwargs.get("use_orig_params", False):
            raise ValueError(
                f"{owner} under FSDP needs per-parameter requires_grad and named param groups, which FSDP keeps only "
                "with use_orig_params=True: pass strategy=FSDPStrategy(use_orig_params=True)."
            )


def _log_trainable(trainer: pl.Trainer, coordinator: _Coordinator, unfrozen: Sequence[str]) -> None:
    trainable = coordinator.trainable()
    epoch, step = coordinator.progress
    if unfrozen and coordinator.optimizer is not None:
        count = sum(p.numel() for name in unfrozen for p in coordinator.params[name])
        lr = coordinator.lr_of(unfrozen[-1])
        rank_zero_info(
            f"lt_finetune: epoch {epoch}, step {step}: unfroze {', '.join(unfrozen)} "
            f"({human_count(count)} params) at lr {lr:.3g}; {human_count(trainable)} trainable."
        )
    elif not unfrozen:
        frozen = [n for n in coordinator.order if n in coordinator.frozen]
        rank_zero_info(
            f"lt_finetune: {len(frozen)} of {len(coordinator.names)} backbone groups frozen; "
            f"{human_count(trainable)} of {human_count(coordinator.total_params)} parameters trainable."
        )
    metrics = {
        "finetune/trainable_params": float(trainable),
        "finetune/trainable_fraction": trainable / max(coordinator.total_params, 1),
    }
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def check_bn_mode(value: str) -> None:
    """Validate a ``bn_mode`` argument."""
    if value not in BN_MODES:
        raise ValueError(f"Expected `bn_mode` to be one of {list(BN_MODES)}, got {value!r}.")
