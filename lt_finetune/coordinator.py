"""The coordinator: applies the combined fine-tuning policies of one fit to one LightningModule.

Policies (:class:`lt_finetune.policy.FinetunePolicy` and its subclasses) only say which backbone groups they
want frozen and which learning-rate factor a group gets, as pure functions of the progress ``(epoch, step)``.
One coordinator per fit, owned by the first policy in ``trainer.callbacks``, does the four jobs that must happen
exactly once:

1. **Combine the policies**: a group is frozen when any policy freezes it (with the BatchNorm mode of the first
   policy that does); factors multiply. (:meth:`Coordinator.desired`, :meth:`Coordinator.lr_factor`)
2. **Apply freezing**: ``requires_grad`` and BatchNorm modes follow the policies at every step; a group's
   learning rate is 0 while it is frozen. (:meth:`Coordinator.apply`)
3. **Rewrite the optimizer**: at fit start, split it into named layer groups, add the parameters it does not
   hold, and make its schedulers step on nominal learning rates (``lt_finetune.optim``); undone at the end of the
   fit. (:meth:`Coordinator.attach_optimizer`, :meth:`Coordinator.detach`)
4. **DDP gradient sync**: parameters frozen when DDP wrapped the model were never registered by DDP; after they
   are unfrozen their gradients are averaged here, one ``all_reduce`` per optimizer step.
   (:meth:`Coordinator.sync_gradients`)

The coordinator holds the optimizer only during the fit: nothing is kept at module level, so a finished fit's
optimizer, its state and its parameters are freed with the trainer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lt_finetune.extras import EXTRA_MODULES, trainable_modules
from lt_finetune.freezing import batchnorm_layers, freeze, set_bn_mode, unfreeze
from lt_finetune.groups import HEAD, LayerGroup, layer_groups
from lt_finetune.optim import (
    LAYER_GROUP,
    add_param_groups,
    apply_lr_factors,
    attach_lr_scaling,
    detach_lr_scaling,
    split_param_groups,
)

if TYPE_CHECKING:
    from lt_finetune.policy import FinetunePolicy

__all__ = ["Coordinator", "average_gradients", "resolve_backbone"]

#: Attribute of the LightningModule naming the parameters a finished fit left frozen, so that the next fit can
#: unfreeze those its own policies do not freeze. Plain names: it holds no tensor and no optimizer.
LEFT_FROZEN_ATTR = "_lt_finetune_left_frozen"


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


class Coordinator:
    """Applies the combined policy of ``policies`` to ``pl_module``'s layer groups.

    Args:
        pl_module: The model being fitted.
        backbone: Attribute path of the pretrained part; everything trainable outside it and its extra modules
            (``lt_finetune.extras``) is the group ``"head"``.
        policies: The policies of the fit, in the trainer's callback order.
        owner: Name used in error messages.
    """

    def __init__(
        self, pl_module: nn.Module, backbone: str, policies: Sequence[FinetunePolicy], owner: str = "FinetunePolicy"
    ) -> None:
        self.backbone_path = backbone
        module = resolve_backbone(pl_module, backbone, owner)
        self.groups: list[LayerGroup] = layer_groups(module)
        self.names: list[str] = [g.name for g in self.groups]
        extras = {name: m for name, m in trainable_modules(pl_module).items() if name not in self.names}
        self.extras: list[str] = list(extras)
        taken = set(self.names) & set(trainable_modules(pl_module))
        if taken:
            raise ValueError(
                f"Extra module name(s) {sorted(taken)} of {type(pl_module).__name__}.{EXTRA_MODULES} are also layer "
                "group names of the backbone; give the extra modules other names."
            )
        backbone_ids = {id(p) for p in module.parameters()}
        extra_ids = {id(p) for m in extras.values() for p in m.parameters()}
        self.params: dict[str, tuple[nn.Parameter, ...]] = {g.name: g.params for g in self.groups}
        self.params[HEAD] = tuple(
            p
            for _, p in pl_module.named_parameters()
            if id(p) not in backbone_ids and id(p) not in extra_ids and p.requires_grad
        )
        for name, extra in extras.items():
            self.params[name] = tuple(extra.parameters())
        self.order = [*self.names, HEAD, *self.extras]
        self.assignment = {id(p): name for name, params in self.params.items() for p in params}
        self.batchnorms = {g.name: batchnorm_layers(module, {id(p) for p in g.params}) for g in self.groups}
        self.bn_param_ids = {id(p) for layers in self.batchnorms.values() for m in layers for p in m.parameters()}
        self.total_params = sum(p.numel() for params in self.params.values() for p in params)
        self.policies: list[FinetunePolicy] = list(policies)
        self.frozen: dict[str, str] = {}  # group -> BatchNorm mode applied
        self.progress = (0, 0)
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedulers: list[Any] = []
        self.ddp_managed: set[int] | None = None
        self._synced_step: Any = None
        for policy in self.policies:
            policy.validate(self.names, self.extras)
            policy.reset()

    # -- 1. combining the policies ---------------------------------------------------------------------------

    def desired(self, epoch: int, step: int) -> dict[str, str]:
        """Frozen groups at a point of training, each with the BatchNorm mode of the first policy freezing it."""
        wanted: dict[str, str] = {}
        for policy in self.policies:
            for name in policy.frozen_groups(self.names, epoch, step):
                if name in self.params and name != HEAD and name not in self.extras:
                    wanted.setdefault(name, policy.bn_mode)
        return wanted

    def lr_factor(self, layer: str) -> float:
        """The factor applied to a group's nominal learning rate at the current progress."""
        if self.frozen.get(layer, "train") != "train":  # with bn_mode="train" the group's BatchNorm still trains
            return 0.0
        epoch, step = self.progress
        factor = 1.0
        for policy in self.policies:
            factor *= float(policy.lr_factor(layer, self.names, epoch, step))
        return factor

    # -- 2. applying freezing ----------------------------------------------------------------------------------

    def release(self, pl_module: nn.Module) -> None:
        """Unfreeze what an earlier fit's policies left frozen; this fit's policies then freeze what they want."""
        names = pl_module.__dict__.pop(LEFT_FROZEN_ATTR, None)
        if names:
            unfreeze(p for n, p in pl_module.named_parameters() if n in names)
            for name in self.names:
                set_bn_mode(self.batchnorms[name], None, training=pl_module.training)

    def apply(self, epoch: int, step: int, training: bool = True) -> list[str]:
        """Freeze/unfreeze to the policies at ``(epoch, step)`` and re-apply the learning-rate factors.

        Returns the groups unfrozen by this call, input side first.
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
        ordered = [n for n in self.order if n in unfrozen]
        if ordered:
            for policy in self.policies:
                policy.on_unfrozen(ordered, epoch, step)
        if self.optimizer is not None:
            apply_lr_factors(self.optimizer, self.lr_factor)
        return ordered

    def trainable(self) -> int:
        """Number of trainable scalars among the coordinated parameters."""
        return sum(p.numel() for params in self.params.values() for p in params if p.requires_grad)

    def lr_of(self, layer: str) -> float:
        """The applied learning rate of a layer group (its first param group); NaN before fit start."""
        for group in self.optimizer.param_groups if self.optimizer is not None else ():
            if group.get(LAYER_GROUP) == layer:
                return float(group["lr"])
        return math.nan

    # -- 3. rewriting the optimizer ----------------------------------------------------------------------------

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, schedulers: list[Any]) -> None:
        """Split ``optimizer`` into named layer groups, add missing parameters, make schedulers step nominally."""
        changes = split_param_groups(optimizer, self.assignment, self.order, schedulers)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = {name: [p for p in params if id(p) not in held] for name, params in self.params.items()}
        changes += add_param_groups(optimizer, missing, self.order, schedulers)
        self.optimizer, self.schedulers = optimizer, list(schedulers)
        attach_lr_scaling(optimizer, self.lr_factor, schedulers)
        if changes:
            rank_zero_info(f"lt_finetune: {type(optimizer).__name__}: " + "; ".join(changes) + ".")

    def detach(self, pl_module: nn.Module) -> None:
        """End of the fit: give the schedulers their own class back, drop the optimizer, remember what is frozen."""
        if self.optimizer is not None:
            detach_lr_scaling(self.optimizer, self.schedulers)
        frozen_ids = {id(p) for name in self.frozen for p in self.params[name] if not p.requires_grad}
        left = {n for n, p in pl_module.named_parameters() if id(p) in frozen_ids}
        if left:
            pl_module.__dict__[LEFT_FROZEN_ATTR] = left
        self.optimizer, self.schedulers, self.ddp_managed = None, [], None

    # -- 4. DDP gradient sync ----------------------------------------------------------------------------------

    def sync_gradients(self, step: Any) -> None:
        """Average, across DDP processes, the gradients DDP does not manage; once per ``step`` key.

        The policies call it after the last backward of an optimizer step, keyed by ``(global_step, batch_idx)``,
        before a 16-bit grad scaler unscales and checks for inf/nan, so every rank reaches the same verdict; and
        again before the optimizer step, which is a no-op when that key was synced. Averaging is linear, so a
        call after an earlier micro-batch of gradient accumulation is harmless: the next one averages the rest.
        """
        if self.ddp_managed is None or self._synced_step == step:
            return
        self._synced_step = step
        params = [
            p for params in self.params.values() for p in params if p.requires_grad and id(p) not in self.ddp_managed
        ]
        average_gradients(params)


def average_gradients(params: Sequence[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the default process group, in one ``all_reduce``; in place.

    Like DDP, every rank counts: a parameter without a gradient on some ranks contributes zeros there. A
    has-gradient mask travels with the gradients, so a parameter with no gradient on any rank keeps
    ``grad=None``. A no-op outside a distributed run.
    """
    if not params or not dist.is_available() or not dist.is_initialized():
        return
    device = params[0].device
    dtype = next((p.grad.dtype for p in params if p.grad is not None), params[0].dtype)
    grads = [
        p.grad.reshape(-1).to(dtype) if p.grad is not None else torch.zeros(p.numel(), device=device, dtype=dtype)
        for p in params
    ]
    mask = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=device)
    flat = torch.cat([*grads, mask])
    dist.all_reduce(flat)
    world = dist.get_world_size()
    counts = flat[-len(params) :]
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        if counts[i] > 0:
            reduced = flat[offset : offset + n].view_as(p).div_(world)
            if p.grad is None:
                p.grad = reduced.clone()
            else:
                p.grad.copy_(reduced)
        offset += n
