"""LoRA adapters through Hugging Face ``peft``: which layers to wrap, wrapping them, and merging them back.

Pure functions (no Trainer); the :class:`~lt_finetune.callbacks.LoRA` callback and ``TransferModule`` use them.
Only :func:`inject_lora` and :func:`merge_lora` need ``peft`` (``pip install "lt_finetune[peft]"``); choosing the
layers and counting their adapter parameters work without it, which is how ``lt-finetune groups`` shows them.

**Which layers.** LoRA can wrap ``nn.Linear``, ``nn.Conv1d/2d/3d`` without groups (peft cannot merge a
depthwise or grouped convolution) and ``nn.MultiheadAttention`` (its input and output projections). Names are
module paths relative to the backbone. :func:`default_lora_targets` picks a set per architecture family:

- ``attention`` (ViT, DeiT, Swin, BERT-like): the linear layers inside attention blocks (``blocks.0.attn.qkv``,
  ``blocks.0.attn.proj``), or the ``nn.MultiheadAttention`` modules themselves (torchvision ViT), as in the LoRA
  paper (Hu et al., 2021), which adapts the attention projections only;
- ``conv`` (ResNet, MobileNet, EfficientNet, ConvNeXt): every wrappable convolution and linear layer except the
  first convolution, whose 3-channel input leaves nothing for a low-rank update to save;
- ``linear`` (anything else with linear layers, such as an MLP): every linear layer.

**The layout** (:class:`LoraLayout`: wrapped layers, ``r``, ``alpha``, ``dropout``) is read back from the wrapped
model itself (:func:`lora_layout`), so it never disagrees with the weights. Checkpoints carry it under
:data:`CHECKPOINT_KEY`, and ``TransferModule.load_from_checkpoint`` re-creates the adapters from it before the
weights are loaded (:func:`restore_lora`).

Example::

    >>> from torch import nn
    >>> mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> default_lora_targets(mlp)
    ('linear', ['0', '2'])
    >>> lora_param_count(mlp, ["0", "2"], r=2)  # 2 * (8 + 16) + 2 * (16 + 4)
    88
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lt_finetune.freezing import freeze

__all__ = [
    "CHECKPOINT_KEY",
    "FAMILY_RULES",
    "LoraLayout",
    "default_lora_targets",
    "has_lora",
    "inject_lora",
    "lora_candidates",
    "lora_layout",
    "lora_param_count",
    "lora_parameters",
    "lora_summary",
    "merge_lora",
    "require_peft",
    "resolve_lora_targets",
    "restore_lora",
    "save_lora",
    "unload_lora",
]

#: Key of the adapter layouts in a checkpoint: ``{backbone path: LoraLayout.as_dict()}``.
CHECKPOINT_KEY = "lt_finetune_lora"
#: peft's name for the single adapter lt_finetune injects.
ADAPTER = "default"
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_WRAPPABLE = "Linear, Conv1d/2d/3d (not grouped or depthwise) and MultiheadAttention layers"
_INSTALL = 'pip install "lt_finetune[peft]"'


@dataclass(frozen=True)
class LoraLayout:
    """Where the adapters sit and how they are shaped: everything needed to re-create them before loading weights.

    Attributes:
        targets: Module paths of the wrapped layers, relative to the backbone, in module order.
        r: Rank of every adapter.
        alpha: peft's ``lora_alpha``; the update is scaled by ``alpha / r``.
        dropout: Dropout on the adapters' input during training.
    """

    targets: tuple[str, ...]
    r: int
    alpha: float
    dropout: float

    def as_dict(self) -> dict[str, Any]:
        """Plain data, for checkpoints."""
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraLayout:
        """The inverse of :meth:`as_dict`."""
        return cls(tuple(data["targets"]), int(data["r"]), float(data["alpha"]), float(data["dropout"]))

    def describe(self) -> str:
        """``r=8, alpha=16.0, dropout=0.0 on 34 layers``."""
        return f"r={self.r}, alpha={self.alpha}, dropout={self.dropout} on {len(self.targets)} layers"


def require_peft() -> None:
    """Raise an ``ImportError`` that says how to install ``peft``, unless it is importable."""
    if importlib.util.find_spec("peft") is None:
        raise ImportError(f"LoRA needs Hugging Face `peft`: {_INSTALL}.")


# -- choosing layers (no peft needed) ----------------------------------------------------------------------------


def _tuner_layers(module: nn.Module) -> Iterator[tuple[str, Any]]:
    # Outermost peft layers only: peft's MultiheadAttention wraps its out_proj in a second, inner LoRA layer.
    if "peft" not in sys.modules:  # nothing can have been wrapped without importing peft
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    outer: list[str] = []
    for name, child in module.named_modules():
        if isinstance(child, BaseTunerLayer) and not any(name.startswith(o + ".") for o in outer):
            outer.append(name)
            yield name, child


def lora_candidates(module: nn.Module) -> dict[str, nn.Module]:
    """The layers of ``module`` LoRA can wrap, by module path; a wrapped layer is listed as the layer it wraps."""
    wrapped = dict(_tuner_layers(module))
    found: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, child in module.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if name in wrapped:
            found[name] = wrapped[name].get_base_layer()
            inside.append(name)
        elif isinstance(child, nn.MultiheadAttention):
            found[name] = child  # its out_proj is not called as a module: wrap the attention, never the projection
            inside.append(name)
        elif isinstance(child, nn.Linear) or (isinstance(child, _CONVS) and child.groups == 1):
            found[name] = child
    return found


def default_lora_targets(module: nn.Module) -> tuple[str, list[str]]:
    """The architecture family of ``module`` (``"attention"``, ``"conv"`` or ``"linear"``) and its default targets.

    Raises:
        ValueError: If ``module`` has no layer LoRA can wrap.
    """
    layers = lora_candidates(module)
    attention = [
        name
        for name, layer in layers.items()
        if isinstance(layer, nn.MultiheadAttention)
        or (isinstance(layer, nn.Linear) and any(_is_attention(part) for part in name.split(".")[:-1]))
    ]
    if attention:
        return "attention", attention
    convs = [name for name, layer in layers.items() if isinstance(layer, _CONVS)]
    if convs:
        return "conv", [name for name, layer in layers.items() if name != convs[0]]
    linears = [name for name, layer in layers.items() if isinstance(layer, nn.Linear)]
    if linears:
        return "linear", linears
    raise ValueError(
        f"{type(module).__name__} has no layer LoRA can wrap ({_WRAPPABLE}); LoRA cannot adapt it. Train it with "
        "FreezeBackbone or LayerwiseLR instead."
    )


#: What each family's default targets are, for messages and ``lt-finetune groups``.
FAMILY_RULES = {
    "attention": "the projections of the attention blocks",
    "conv": "every convolution but the first, and the linear layers",
    "linear": "every linear layer",
}


def lora_summary(module: nn.Module, r: int = 8) -> str:
    """One line on the default LoRA targets of ``module``: family, rule, count, adapter size at rank ``r``, names.

    Example::

        >>> from torch import nn
        >>> lora_summary(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), r=2)
        "LoRA default targets (linear: every linear layer): 2 layers, 88 adapter parameters at r=2: ['0', '2']"
    """
    try:
        family, targets = default_lora_targets(module)
    except ValueError:
        return f"LoRA: {type(module).__name__} has no layer LoRA can wrap ({_WRAPPABLE})."
    count = lora_param_count(module, targets, r)
    return (
        f"LoRA default targets ({family}: {FAMILY_RULES[family]}): {len(targets)} layers, {_human(count)} adapter "
        f"parameters at r={r}: {_listed(targets, 3, count=False)}"
    )


def _is_attention(part: str) -> bool:
    part = part.lower()
    return "attn" in part or "attention" in part


def resolve_lora_targets(module: nn.Module, patterns: Sequence[str] | None, owner: str = "LoRA") -> list[str]:
    """Module paths that ``patterns`` select among :func:`lora_candidates`, in module order; ``None``: the defaults.

    A pattern selects a layer whose path equals it, ends with ``"." + pattern`` (peft's rule: ``"qkv"`` selects
    every ``*.qkv``) or fully matches it as a regular expression.

    Raises:
        ValueError: If a pattern selects no layer; the message lists the layers there are.
    """
    if patterns is None:
        return default_lora_targets(module)[1]
    names = list(lora_candidates(module))
    selected: set[str] = set()
    for pattern in patterns:
        hits = [n for n in names if n == pattern or n.endswith("." + pattern) or _fullmatch(pattern, n)]
        if not hits:
            others = [n for n, m in module.named_modules() if n and (n == pattern or _fullmatch(pattern, n))]
            why = f" (it matches {others[:3]}, which LoRA cannot wrap)" if others else ""
            raise ValueError(
                f"{owner}(target_modules={list(patterns)!r}) pattern {pattern!r} matched no layer of "
                f"{type(module).__name__} LoRA can wrap{why}; LoRA wraps {_WRAPPABLE}. Available: {_listed(names)}."
            )
        selected.update(hits)
    return [n for n in names if n in selected]


def lora_param_count(module: nn.Module, targets: Sequence[str], r: int) -> int:
    """Number of adapter parameters rank-``r`` LoRA adds on ``targets`` (peft's shapes: ``A`` is ``r x in``, ``B``
    is ``out x r``; a convolution's ``A`` has its kernel; an attention adapts its input and output projections)."""
    layers = lora_candidates(module)
    total = 0
    for name in targets:
        layer = layers[name]
        if isinstance(layer, nn.MultiheadAttention):
            e = layer.embed_dim
            total += r * (e + 3 * e) + r * (e + e)
        elif isinstance(layer, _CONVS):
            total += r * layer.in_channels * math.prod(layer.kernel_size) + layer.out_channels * r
        elif isinstance(layer, nn.Linear):
            total += r * (layer.in_features + layer.out_features)
    return total


# -- wrapping, reading back, merging (peft) ----------------------------------------------------------------------


def has_lora(module: nn.Module) -> bool:
    """Whether ``module`` holds peft adapter layers."""
    return next(_tuner_layers(module), None) is not None


def lora_layout(module: nn.Module) -> LoraLayout | None:
    """The layout of the adapters in ``module``, read from its peft layers; ``None`` without adapters."""
    layers = list(_tuner_layers(module))
    if not layers:
        return None
    _, first = layers[0]
    dropout = first.lora_dropout[ADAPTER]
    return LoraLayout(
        targets=tuple(name for name, _ in layers),
        r=int(first.r[ADAPTER]),
        alpha=float(first.lora_alpha[ADAPTER]),
        dropout=float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0,
    )


def lora_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The adapter parameters of ``module`` (peft names them ``...lora_A...``, ``...lora_B...``), by name."""
    return [(n, p) for n, p in module.named_parameters() if any(part.startswith("lora_") for part in n.split("."))]


def inject_lora(module: nn.Module, layout: LoraLayout, seed: int | None = None) -> int:
    """Wrap the layers ``layout.targets`` of ``module`` in rank-``layout.r`` LoRA adapters (peft), in place.

    Every other parameter of ``module`` is frozen; the adapters start as peft initialises them (``B = 0``: the
    wrapped model computes what it computed before). With ``seed``, the adapters are drawn from a generator
    seeded with it and the global random state is left as it was, so that wrapping changes nothing else a seeded
    run draws.

    Returns:
        The number of adapter parameters added.

    Raises:
        ImportError: Without ``peft``.
        ValueError: If ``module`` already has adapters.
    """
    require_peft()
    from peft import LoraConfig, inject_adapter_in_model

    if has_lora(module):
        raise ValueError(f"{type(module).__name__} already has LoRA adapters; merge them with merge_lora() first.")
    config = LoraConfig(
        r=layout.r,
        lora_alpha=layout.alpha,  # type: ignore[arg-type]  # typed int, used as alpha / r: a float works
        lora_dropout=layout.dropout,
        # A full-match regex of the exact paths: peft's list form also matches any path ending in ".<name>".
        target_modules="^(?:" + "|".join(re.escape(t) for t in layout.targets) + ")$",
    )
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    adapters = {id(p) for _, p in lora_parameters(module)}
    freeze(p for p in module.parameters() if id(p) not in adapters)
    return sum(p.numel() for _, p in lora_parameters(module))


def merge_lora(module: nn.Module) -> int:
    """Fold the adapters of ``module`` into the weights they wrap and put the plain layers back, in place.

    The merged module computes the same function (up to float rounding) without the adapters' extra matrix
    products, has the parameter names of the unwrapped model, and exports like it. A no-op without adapters.

    Returns:
        The number of layers merged.
    """
    return _unwrap(module, merge=True)


def unload_lora(module: nn.Module) -> int:
    """Remove the adapters of ``module`` without merging them: the layers compute what they did before wrapping."""
    return _unwrap(module, merge=False)


def _unwrap(module: nn.Module, merge: bool) -> int:
    layers = list(_tuner_layers(module))
    for name, layer in layers:
        if hasattr(layer, "unload_and_optionally_merge_module"):  # MultiheadAttention unwraps itself
            plain = layer.unload_and_optionally_merge_module(merge=merge, safe_merge=False, adapter_names=None)
        else:
            if merge:
                layer.merge(safe_merge=False)
            plain = layer.get_base_layer()
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, plain)
    if layers:
        module.__dict__.pop("peft_config", None)  # peft's record of the injection; stale once the layers are gone
    return len(layers)


# -- checkpoints -------------------------------------------------------------------------------------------------


def save_lora(pl_module: nn.Module, checkpoint: dict[str, Any], backbone: str = "backbone") -> None:
    """Record the adapter layout of ``pl_module``'s ``backbone`` in ``checkpoint`` (nothing without adapters)."""
    module = pl_module.get_submodule(backbone)
    layout = lora_layout(module)
    if layout is not None:
        checkpoint.setdefault(CHECKPOINT_KEY, {})[backbone] = layout.as_dict()


def restore_lora(pl_module: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Re-create the adapters a checkpoint's weights need, before they are loaded (``load_from_checkpoint``).

    A backbone that already has the checkpoint's layout (a resumed fit with the ``LoRA`` callback) is left alone.

    Raises:
        ImportError: Without ``peft``.
        ValueError: If the backbone has adapters of another layout.
    """
    for backbone, saved in (checkpoint.get(CHECKPOINT_KEY) or {}).items():
        module = pl_module.get_submodule(backbone)
        layout, present = LoraLayout.from_dict(saved), lora_layout(module)
        if present is None:
            inject_lora(module, layout, seed=0)  # values are overwritten by the checkpoint's
        elif present != layout:
            raise ValueError(
                f"The checkpoint's LoRA adapters ({layout.describe()}) differ from those of {type(pl_module).__name__}"
                f".{backbone} ({present.describe()}); give LoRA the checkpoint's arguments to resume it."
            )


def _fullmatch(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _human(n: int) -> str:
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _listed(names: Sequence[str], keep: int = 4, count: bool = True) -> str:
    if len(names) <= 2 * keep:
        return str(list(names))
    shown = f"[{', '.join(map(repr, names[:keep]))}, ..., {', '.join(map(repr, names[-keep:]))}]"
    return shown + (f" ({len(names)} layers)" if count else "")
