"""The optimizer contract the callbacks rely on, and the learning-rate scaling that keeps schedulers exact.

**Named param groups.** Every param group carries two keys besides ``params``: ``name`` (unique, what
Lightning's ``LearningRateMonitor`` shows) and ``layer_group`` (the layer group it belongs to: a name from
``layer_groups(backbone)`` or ``"head"``). Norm and bias parameters sit in a companion group
``"<layer group>/no_decay"`` with ``weight_decay=0``. All groups are present from the first step, frozen or
not. ``TransferModule`` builds its optimizer this way; for any other optimizer the callbacks split it at fit
start (:func:`split_param_groups`), keeping its class and hyper-parameters.

**Nominal and applied learning rates.** Schedulers compute *nominal* learning rates; a callback may scale
them per group (layer-wise decay, warm-up after unfreezing, 0 while frozen). The applied rate lives in
``group["lr"]`` (what the optimizer uses and ``LearningRateMonitor`` logs) and the nominal one in
``group["nominal_lr"]``; the factor in ``group["lr_factor"]``, plain data as timm's ``lr_scale``.
:func:`attach_lr_scaling` makes a scheduler step on the nominal rates and re-apply the factors afterwards, so every
torch scheduler (recursive ones such as ``ExponentialLR`` or ``ReduceLROnPlateau`` included) produces exactly
``scheduler value x factor``. The keys are saved with the optimizer state, so resuming is exact; nothing is kept
outside the optimizer and its schedulers, and :func:`detach_lr_scaling` undoes everything at the end of a fit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lt_finetune.groups import HEAD, LayerGroup

NOMINAL_LR = "nominal_lr"
LR_FACTOR = "lr_factor"
LAYER_GROUP = "layer_group"
NO_DECAY_SUFFIX = "/no_decay"

__all__ = [
    "LAYER_GROUP",
    "LR_FACTOR",
    "NOMINAL_LR",
    "add_param_groups",
    "apply_lr_factors",
    "attach_lr_scaling",
    "build_param_groups",
    "detach_lr_scaling",
    "is_lr_scaled",
    "is_no_decay",
    "split_param_groups",
]

LRFactor = Callable[[str], float]


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Whether weight decay should skip a parameter: biases, norm and other 1-D parameters, tokens."""
    return param.ndim <= 1 or name.endswith(".bias") or name.endswith("_token") or "pos_embed" in name


def build_param_groups(
    groups: Sequence[LayerGroup],
    head: Sequence[tuple[str, nn.Parameter]],
    weight_decay: float | None,
    extras: Mapping[str, Sequence[tuple[str, nn.Parameter]]] | None = None,
) -> list[dict[str, Any]]:
    """Param groups following the contract: one per layer group, ``"head"`` and extra module, with ``/no_decay``
    companions.

    Args:
        groups: The backbone's layer groups, input side first.
        head: Named parameters of the head.
        weight_decay: Set on the decay groups; ``None`` leaves it to the optimizer's default. With ``0`` there
            are no companions.
        extras: Named parameters of each extra trainable module (``lt_finetune.extras``), by module name.
    """
    named = [(g.name, list(zip(g.param_names, g.params))) for g in groups] + [(HEAD, list(head))]
    named += [(name, list(params)) for name, params in (extras or {}).items()]
    split = weight_decay != 0
    result: list[dict[str, Any]] = []
    for name, params in named:
        decay = [p for n, p in params if not (split and is_no_decay(n, p))]
        no_decay = [p for n, p in params if split and is_no_decay(n, p)]
        if decay:
            group: dict[str, Any] = {"params": decay, "name": name, LAYER_GROUP: name}
            if weight_decay is not None:
                group["weight_decay"] = weight_decay
            result.append(group)
        if no_decay:
            result.append({"params": no_decay, "name": name + NO_DECAY_SUFFIX, LAYER_GROUP: name, "weight_decay": 0.0})
    return result


def split_param_groups(
    optimizer: Optimizer, assignment: Mapping[int, str], order: Sequence[str], schedulers: Iterable[Any] = ()
) -> list[str]:
    """Make ``optimizer`` follow the named-group contract, in place; returns what was changed, for logging.

    Args:
        optimizer: Any torch optimizer; its class, defaults and per-group hyper-parameters are kept.
        assignment: ``id(param) -> layer group name`` for every parameter that should be optimised.
        order: Layer group names from the input side to the output side (``"head"`` last).
        schedulers: Schedulers built on ``optimizer``; their per-group lists are re-pointed to the new groups.

    A group that holds parameters of one layer group only is annotated and kept. A mixed group is split
    into one group per layer group, each with a copy of its hyper-parameters. Parameters the optimizer does
    not hold are :func:`add_param_groups`' business. Must run at fit start, before a checkpoint's optimizer
    state is loaded into the new groups.
    """
    rank = {name: i for i, name in enumerate(order)}
    old_groups = list(optimizer.param_groups)
    new_groups: list[dict[str, Any]] = []
    sources: list[int] = []
    changes: list[str] = []
    for index, group in enumerate(old_groups):
        by_layer: dict[str, list[nn.Parameter]] = {}
        for p in group["params"]:
            by_layer.setdefault(assignment.get(id(p), HEAD), []).append(p)
        parts = sorted(by_layer.items(), key=lambda kv: rank.get(kv[0], len(rank)))
        if len(parts) == 1 and group.get(LAYER_GROUP) == parts[0][0]:
            new_groups.append(group)
            sources.append(index)
            continue
        suffix = "" if len(old_groups) == 1 else "/" + str(group.get("name", index))
        for layer, params in parts:
            new = {k: v for k, v in group.items() if k != "params"}
            new.update(
                params=params,
                name=layer + suffix if len(parts) > 1 else group.get("name", layer),
                **{LAYER_GROUP: layer},
            )
            new_groups.append(new)
            sources.append(index)
        if len(parts) > 1:
            changes.append(f"split param group {group.get('name', index)!r} into {len(parts)} layer groups")
    _check_unique_names(new_groups)
    if len(new_groups) != len(old_groups) or any(a is not b for a, b in zip(new_groups, old_groups)):
        optimizer.param_groups[:] = new_groups
        _repoint_schedulers(schedulers, sources, len(old_groups))
    return changes


def add_param_groups(
    optimizer: Optimizer,
    params: Mapping[str, Sequence[nn.Parameter]],
    order: Sequence[str],
    schedulers: Iterable[Any] = (),
) -> list[str]:
    """Add groups for parameters the optimizer does not hold, copying the head group's hyper-parameters."""
    if not params:
        return []
    template_index = next((i for i, g in enumerate(optimizer.param_groups) if g.get(LAYER_GROUP) == HEAD), 0)
    template = optimizer.param_groups[template_index]
    sources = list(range(len(optimizer.param_groups)))
    added = []
    for layer in order:
        if layer not in params or not params[layer]:
            continue
        new = {k: v for k, v in template.items() if k != "params"}
        new.update(params=list(params[layer]), name=layer, **{LAYER_GROUP: layer})
        optimizer.param_groups.append(new)
        sources.append(template_index)
        added.append(layer)
    _check_unique_names(optimizer.param_groups)
    _repoint_schedulers(schedulers, sources, len(sources) - len(added))
    return [f"added param groups for parameters the optimizer did not hold: {added}"] if added else []


def _check_unique_names(groups: Sequence[dict[str, Any]]) -> None:
    seen: dict[str, int] = {}
    for g in groups:
        name = g["name"]
        if name in seen:
            seen[name] += 1
            g["name"] = f"{name}_{seen[name]}"
        else:
            seen[name] = 1


# Per-param-group lists that torch schedulers keep (LambdaLR/MultiplicativeLR: lr_lambdas; ReduceLROnPlateau: min_lrs;
# CyclicLR: max_lrs). Others keep their per-group values in the param groups, which are copied with the group.
_PER_GROUP_LISTS = ("base_lrs", "_last_lr", "lr_lambdas", "min_lrs", "max_lrs")


def _repoint_schedulers(schedulers: Iterable[Any], sources: Sequence[int], old_count: int) -> None:
    # Expand each per-group list to the new groups by their source group. Composite schedulers
    # (SequentialLR, ChainedScheduler) hold their children in ``_schedulers``.
    for scheduler in schedulers:
        _repoint_schedulers(getattr(scheduler, "_schedulers", ()), sources, old_count)
        for key in _PER_GROUP_LISTS:
            value = getattr(scheduler, key, None)
            if isinstance(value, list) and len(value) == old_count:
                setattr(scheduler, key, [value[i] for i in sources])


# --- nominal and applied learning rates ---------------------------------------------------------------------------


def apply_lr_factors(optimizer: Optimizer, factor: LRFactor | None = None) -> None:
    """Set ``group["lr"] = group["nominal_lr"] x group["lr_factor"]`` for every group.

    With ``factor``, first store ``factor(group["layer_group"])`` as each group's ``lr_factor``; without it the
    stored factors are used (1 where none is stored). Groups seen for the first time take their current ``lr``
    as nominal. Factors are plain data in the param groups, like timm's ``lr_scale``: nothing is registered.

    Example::

        >>> opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "layer_group": "stem"}], lr=0.1)
        >>> apply_lr_factors(opt, lambda layer: 0.5)
        >>> opt.param_groups[0]["lr"], opt.param_groups[0]["nominal_lr"], opt.param_groups[0]["lr_factor"]
        (0.05, 0.1, 0.5)
    """
    for group in optimizer.param_groups:
        nominal = group.setdefault(NOMINAL_LR, float(group["lr"]))
        if factor is not None:
            group[LR_FACTOR] = float(factor(group.get(LAYER_GROUP, HEAD)))
        group["lr"] = _like(group["lr"], nominal * group.get(LR_FACTOR, 1.0))


def attach_lr_scaling(optimizer: Optimizer, factor: LRFactor, schedulers: Iterable[Any]) -> None:
    """Store ``factor`` in ``optimizer``'s param groups and make ``schedulers`` step on nominal learning rates.

    Each scheduler instance gets a subclass of its own class, made for this call, whose ``step`` puts the nominal
    rates in place, steps, records the new nominal rates and applies the stored factors again. The scheduler's
    state (and so its ``state_dict``) is untouched, ``isinstance`` checks still hold, and it pickles as an
    instance of its own class. :func:`detach_lr_scaling` undoes it.
    """
    for scheduler in schedulers:
        if is_lr_scaled(scheduler):
            continue
        cls = type(scheduler)
        scaled = type(
            cls.__name__,
            (cls,),
            {"step": _scaled_step, "__reduce_ex__": _reduce_as_base, _BASE_ATTR: cls, "__module__": cls.__module__},
        )
        scaled.__qualname__ = cls.__qualname__
        scheduler.__class__ = scaled
    apply_lr_factors(optimizer, factor)


def detach_lr_scaling(optimizer: Optimizer, schedulers: Iterable[Any]) -> None:
    """Undo :func:`attach_lr_scaling`: schedulers get their own class back and step on ``group["lr"]`` again.

    ``group["lr"]`` keeps the applied rate (what the last step used); the ``lr_factor`` keys are removed.
    """
    for scheduler in schedulers:
        base = type(scheduler).__dict__.get(_BASE_ATTR)
        if base is not None:
            scheduler.__class__ = base
    for group in optimizer.param_groups:
        group.pop(LR_FACTOR, None)


def is_lr_scaled(scheduler: Any) -> bool:
    """Whether :func:`attach_lr_scaling` is in effect on ``scheduler``."""
    return _BASE_ATTR in type(scheduler).__dict__


_BASE_ATTR = "_lt_finetune_base"


def _reduce_as_base(self: Any, protocol: Any) -> Any:
    # Pickle (and deepcopy) as an instance of the scheduler's own class: the subclass exists only for one fit.
    base = type(self).__dict__[_BASE_ATTR]
    return _new_instance, (base,), self.__dict__.copy()


def _new_instance(cls: type[Any]) -> Any:
    return object.__new__(cls)


def _scaled_step(self: Any, *args: Any, **kwargs: Any) -> None:
    optimizer = self.optimizer
    for group in optimizer.param_groups:
        group["lr"] = _like(group["lr"], group.setdefault(NOMINAL_LR, float(group["lr"])))
    try:
        super(type(self), self).step(*args, **kwargs)
    finally:
        for group in optimizer.param_groups:
            group[NOMINAL_LR] = float(group["lr"])
        apply_lr_factors(optimizer)


def _like(current: Any, value: Any) -> Any:
    # Optimizers built with a tensor lr (capturable/fused) must keep a tensor.
    if isinstance(current, torch.Tensor):
        current.fill_(float(value))
        return current
    return float(value)
