"""Ordered, named layer groups of a backbone: the unit that freezing, unfreezing and learning rates act on.

``layer_groups(model)`` is pure (no Trainer): it returns the groups from the input side to the output side,
covering every parameter of ``model`` exactly once. A ``torch.compile`` wrapper (``OptimizedModule``) is
looked through: the groups, their names and ``param_names`` are those of the module it compiled, without the
``_orig_mod.`` prefix, so patterns written for the plain module keep matching. Two sources, tried in order:

1. a timm-style ``group_matcher(coarse=False)`` method (every timm model has one): one group per block;
2. a generic structural fallback for any other module (torchvision and Hugging Face models included): the
   top-level children in definition order, where a module that holds most of the parameters is split into
   its children. A long ``nn.Sequential``/``nn.ModuleList`` is split into its blocks (``features.0`` ...
   ``features.18`` for MobileNetV2), a wrapper into its parts, and wrappers with a single child are
   descended through to reach the blocks (``encoder`` -> ``encoder.layer`` -> ``encoder.layer.0`` ... in a
   BERT-style text encoder). Embedding tables (``nn.Embedding``) do not count towards "most of the
   parameters": a vocabulary can outweigh every transformer layer, yet it is one lookup on the input side,
   so ``embeddings`` stays one group before the layers. The leading leaf layers are merged into ``stem``.

The name ``"head"`` is reserved for the task head outside the backbone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

HEAD = "head"

__all__ = ["HEAD", "LayerGroup", "format_groups", "layer_groups", "match_groups"]


@dataclass(frozen=True)
class LayerGroup:
    """A named set of parameters of a backbone.

    Attributes:
        name: Group name, unique within the model (``"stem"``, ``"blocks.3"``, ``"layer4"``).
        param_names: Parameter names relative to the model the groups were computed on (to the module it
            compiled, for a ``torch.compile`` wrapper).
        params: The parameters, in the same order as ``param_names``.
        modules: Module paths that make up the group (for display).
    """

    name: str
    param_names: tuple[str, ...]
    params: tuple[nn.Parameter, ...] = field(repr=False)
    modules: tuple[str, ...] = ()

    @property
    def num_params(self) -> int:
        """Number of scalar parameters in the group."""
        return sum(p.numel() for p in self.params)


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """Split ``model`` into ordered, named layer groups, from the input side to the output side.

    Args:
        model: A timm model (uses its ``group_matcher``), a torchvision or Hugging Face model or any
            ``nn.Module``, compiled with ``torch.compile`` or not.

    Returns:
        The groups; every parameter of ``model`` is in exactly one of them.

    Raises:
        ValueError: If ``model`` has no parameters.

    Example::

        >>> import timm
        >>> groups = layer_groups(timm.create_model("resnet18", num_classes=0))
        >>> [g.name for g in groups][:3]
        ['stem', 'layer1.0', 'layer1.1']
    """
    model = _uncompiled(model)
    named = dict(model.named_parameters())
    if not named:
        raise ValueError(f"Expected `model` to have parameters, got {type(model).__name__} with none.")
    matcher = getattr(model, "group_matcher", None)
    groups = _groups_from_matcher(model, matcher) if callable(matcher) else None
    if groups is None:
        groups = _fallback_groups(model)
    return _finalise(groups, named)


def match_groups(patterns: Sequence[str], names: Sequence[str], *, argument: str, owner: str) -> list[str]:
    """Names in ``names`` that equal or fully match (as a regex) any of ``patterns``, in ``names`` order.

    Raises:
        ValueError: If a pattern matches no name; the message lists the available names.
    """
    selected: set[str] = set()
    for pattern in patterns:
        hits = [n for n in names if n == pattern or _fullmatch(pattern, n)]
        if not hits:
            raise ValueError(
                f"{owner}({argument}={list(patterns)!r}) pattern {pattern!r} matched no layer group; "
                f"available: {_abbreviate(names)}."
            )
        selected.update(hits)
    return [n for n in names if n in selected]


def format_groups(groups: Sequence[LayerGroup], max_modules: int = 3) -> str:
    """A table of the groups: index, name, parameter count and module paths."""
    rows = [("#", "group", "params", "modules")]
    for i, g in enumerate(groups):
        mods = ", ".join(g.modules[:max_modules]) + (
            f", ... (+{len(g.modules) - max_modules})" if len(g.modules) > max_modules else ""
        )
        rows.append((str(i), g.name, _human(g.num_params), mods))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    lines = [f"{r[0]:>{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
    total = sum(g.num_params for g in groups)
    lines.append(f"{len(groups)} groups, {_human(total)} parameters")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _abbreviate(names: Sequence[str], keep: int = 4) -> str:
    if len(names) <= 2 * keep:
        return str(list(names))
    head = ", ".join(repr(n) for n in names[:keep])
    tail = ", ".join(repr(n) for n in names[-keep:])
    return f"[{head}, ..., {tail}] ({len(names)} groups)"


def _fullmatch(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _uncompiled(model: nn.Module) -> nn.Module:
    # torch.compile returns an OptimizedModule whose only child is the original module, `_orig_mod`, so every
    # parameter name gains a `_orig_mod.` prefix (and timm's group_matcher, reached through attribute
    # forwarding, matches none of them). Duck-typed, to avoid importing torch._dynamo.
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) or [n for n, _ in model.named_children()] != ["_orig_mod"]:
            return model
        model = inner


# --- timm group_matcher -------------------------------------------------------------------------------------------


def _groups_from_matcher(model: nn.Module, matcher: object) -> list[tuple[str | None, list[str]]] | None:
    try:
        from timm.models import group_parameters
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    try:
        spec = matcher(coarse=False)  # type: ignore[operator]
        grouped = group_parameters(model, spec)
    except Exception:  # a foreign or broken group_matcher: fall back to the structure
        return None
    return [(None, list(names)) for _, names in sorted(grouped.items(), key=lambda kv: kv[0])]


# --- structural fallback ------------------------------------------------------------------------------------------


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _embedding_params(model: nn.Module) -> set[int]:
    return {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
        for p in m.parameters(recurse=False)
    }


def _body_size(module: nn.Module, skip: set[int]) -> int:
    # Embedding tables are lookups, not depth: the 30k-token vocabulary of a small text encoder outweighs all
    # its transformer layers, and must not decide where the body of the network is.
    return sum(p.numel() for p in module.parameters() if id(p) not in skip)


def _through_wrappers(prefix: str, module: nn.Module) -> tuple[str, nn.Module]:
    # Follow modules with one child and no parameters of their own: ``encoder`` -> ``encoder.layer``.
    while next(module.parameters(recurse=False), None) is None:
        children = [(n, c) for n, c in module.named_children() if _num_params(c) > 0]
        if len(children) != 1:
            break
        prefix, module = _join(prefix, children[0][0]), children[0][1]
    return prefix, module


def _fallback_groups(model: nn.Module) -> list[tuple[str | None, list[str]]]:
    # Items are (prefix, module or None for a direct parameter). A dominant item is replaced by its children:
    # a wrapper module always, a Sequential/ModuleList only when long, so ResNet keeps its four stages while
    # MobileNetV2's ``features`` and ViT's ``encoder.layers`` are split into blocks. Single-child wrappers are
    # looked through first, or a text encoder's ``encoder`` (whose one child holds the layers) stays whole.
    skip = _embedding_params(model)
    total = max(_body_size(model, skip), 1)
    items = _items(model, "")
    changed = True
    while changed:
        changed = False
        for i, (prefix, item) in enumerate(items):
            if item is None:
                continue
            path, inner = _through_wrappers(prefix, item)
            children = [c for c in inner.children() if _num_params(c) > 0]
            if len(children) < 2:
                continue
            is_list = isinstance(inner, (nn.Sequential, nn.ModuleList))
            dominant = _body_size(inner, skip) >= 0.5 * total and (not is_list or len(children) >= 4)
            if dominant or len(items) < 3:
                items[i : i + 1] = _items(inner, path)
                changed = True
                break
    groups: list[tuple[str | None, list[str]]] = []
    stem: list[str] = []
    leading = True
    leaves = [module is None or not any(True for _ in module.children()) for _, module in items]
    merge_stem = not all(leaves) and len(items) > 2  # a plain stack of layers keeps one group per layer
    for (prefix, module), is_leaf in zip(items, leaves):
        names = [prefix] if module is None else [_join(prefix, n) for n, _ in module.named_parameters()]
        if leading and is_leaf and merge_stem:
            stem.extend(names)
            continue
        leading = False
        groups.append((None if module is None else prefix, names))
    if stem:
        groups.insert(0, ("stem", stem))
    return groups


def _items(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module | None]]:
    direct: list[tuple[str, nn.Module | None]] = [
        (_join(prefix, n), None) for n, _ in module.named_parameters(recurse=False)
    ]
    children: list[tuple[str, nn.Module | None]] = [
        (_join(prefix, n), c) for n, c in module.named_children() if _num_params(c) > 0
    ]
    return direct + children


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# --- naming and invariants ----------------------------------------------------------------------------------------


def _finalise(groups: list[tuple[str | None, list[str]]], named: dict[str, nn.Parameter]) -> list[LayerGroup]:
    # named_parameters() de-duplicates shared parameters; keep the first name of each and drop unknowns.
    seen: set[str] = set()
    cleaned: list[tuple[str | None, list[str]]] = []
    for given, names in groups:
        keep = [n for n in names if n in named and n not in seen]
        seen.update(keep)
        if keep:
            cleaned.append((given, keep))
    missing = [n for n in named if n not in seen]
    if missing:  # parameters no rule claimed go to the output side, like timm's catch-all group
        cleaned.append((None, missing))
    result: list[LayerGroup] = []
    used: set[str] = set()
    for i, (given, names) in enumerate(cleaned):
        name = given or _group_name(names, first=i == 0)
        if name == HEAD:
            name = "backbone_head"
        base, k = name, 1
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        result.append(LayerGroup(name, tuple(names), tuple(named[n] for n in names), _module_paths(names)))
    return result


def _common_prefix(names: Sequence[str]) -> list[str]:
    common: list[str] = []
    for tokens in zip(*(n.split(".") for n in names)):
        if all(t == tokens[0] for t in tokens):
            common.append(tokens[0])
        else:
            break
    return common


def _group_name(names: list[str], first: bool) -> str:
    # One part per top-level module: ``blocks.6.0+conv_head+bn2`` (timm merges the neck into the last block).
    buckets: dict[str, list[str]] = {}
    for n in names:
        buckets.setdefault(n.split(".")[0], []).append(n)
    if len(buckets) > 1 and first:
        return "stem"
    parts = []
    for members in buckets.values():
        common = _common_prefix(members)
        if len(members) == 1 and len(common) > 1:
            common = common[:-1]  # a single parameter: name it after its module
        parts.append(".".join(common))
    return "+".join(parts)


def _module_paths(names: Sequence[str]) -> tuple[str, ...]:
    # The shortest distinct module paths: ``layer1.0`` rather than each conv inside it.
    depth = max(len(_common_prefix(names)), 1)
    paths = (".".join(n.split(".")[:depth]) if n.count(".") >= depth else n.rsplit(".", 1)[0] for n in names)
    return tuple(dict.fromkeys(paths))
