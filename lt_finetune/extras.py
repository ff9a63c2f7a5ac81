"""Extra trainable modules: parts a callback adds to a model for training (a domain discriminator, an adapter).

An extra module lives in the LightningModule's ``extra_modules`` (an ``nn.ModuleDict``), so it is saved in
checkpoints, moved to the device and registered with DDP like any sub-module. It gets its own named param group
(``layer_group`` = its name), after ``"head"``: it is neither part of the backbone nor swallowed into the head,
and ``LayerwiseLR`` leaves its rate alone unless its ``multipliers`` name it.

Add extra modules in a callback's ``setup`` (before ``configure_optimizers`` and before DDP wraps the model).

Example::

    >>> import lightning.pytorch as pl
    >>> from torch import nn
    >>> model = pl.LightningModule()
    >>> discriminator = add_trainable_module(model, "discriminator", nn.Linear(4, 1))
    >>> list(trainable_modules(model)), [n for n, _ in model.named_parameters()]
    (['discriminator'], ['extra_modules.discriminator.weight', 'extra_modules.discriminator.bias'])
"""

from __future__ import annotations

import re

from torch import nn

from lt_finetune.groups import HEAD

EXTRA_MODULES = "extra_modules"

__all__ = ["EXTRA_MODULES", "add_trainable_module", "remove_trainable_module", "trainable_modules"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def add_trainable_module(pl_module: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Add ``module`` to ``pl_module`` as the extra trainable module ``name``; returns the module in place.

    If ``pl_module`` already has an extra module ``name`` (a second fit, or a resumed one), that module is kept and
    returned, so that what it learned carries over; a module of another class under that name is an error.

    Raises:
        TypeError: If ``module`` is not an ``nn.Module``.
        ValueError: If ``name`` is not an identifier, is ``"head"``, or is taken by a module of another class.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == HEAD:
        raise ValueError(f"Expected `name` to be a Python identifier other than 'head', got {name!r}.")
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected `module` to be an nn.Module, got {module!r} of type {type(module).__name__}.")
    container = pl_module._modules.get(EXTRA_MODULES)
    if container is None:
        container = nn.ModuleDict()
        pl_module.add_module(EXTRA_MODULES, container)
    if not isinstance(container, nn.ModuleDict):
        raise ValueError(
            f"{type(pl_module).__name__} has an attribute `{EXTRA_MODULES}` that is not an nn.ModuleDict; "
            "lt_finetune keeps extra trainable modules there: rename that attribute."
        )
    existing = container[name] if name in container else None
    if existing is not None:
        if type(existing) is not type(module):
            raise ValueError(
                f"{type(pl_module).__name__} already has an extra module {name!r} of type {type(existing).__name__}, "
                f"not {type(module).__name__}; remove it with remove_trainable_module(model, {name!r}) first."
            )
        return existing
    container[name] = module
    return module


def trainable_modules(pl_module: nn.Module) -> dict[str, nn.Module]:
    """The extra trainable modules of ``pl_module`` by name, in the order they were added."""
    container = pl_module._modules.get(EXTRA_MODULES)
    return dict(container.items()) if isinstance(container, nn.ModuleDict) else {}


def remove_trainable_module(pl_module: nn.Module, name: str) -> nn.Module | None:
    """Remove the extra module ``name`` from ``pl_module`` and return it (``None`` if there is none)."""
    container = pl_module._modules.get(EXTRA_MODULES)
    if not isinstance(container, nn.ModuleDict) or name not in container:
        return None
    module = container[name]
    del container[name]
    if len(container) == 0:
        delattr(pl_module, EXTRA_MODULES)
    return module
