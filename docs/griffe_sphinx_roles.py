"""A griffe extension for the API reference: the Sphinx idioms of lt_finetune's docstrings, read as Markdown.

The docstrings are Google style, written to read well in ``help()`` and to run as doctests. Three reStructuredText
idioms in them mean nothing to Markdown; this extension rewrites them when mkdocstrings loads the package:

- cross-reference roles, ``:class:`~lt_finetune.data.ImageFolderDataModule``` and relative ones such as
  ``:meth:`forward_head```, become cross-references, resolved in the scope of the object the docstring belongs to
  (its members, its parents', its module's imports). A name that resolves to an object of lt_finetune links to it
  where the site documents it and is printed as code where it does not (a private helper); a name that resolves to
  nothing is left as a plain cross-reference, so that the strict build fails and names it (a typo, a renamed
  function); a name of another project (torch, timm, Lightning, a hook inherited from one of their classes) is
  printed as code, since the site links no other project's reference;
- ``Example::`` followed by doctest lines becomes a Google ``Examples:`` section, shown as a Python console block,
  without the ``# doctest:`` directives;
- any other ``text::`` followed by an indented block becomes ``text:`` and a fenced code block.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|mod|data|exc|obj):`(~?)([^`<>]+?)`")
_DIRECTIVE = re.compile(r"\s+# doctest:[^\n]*")
_PACKAGE = "lt_finetune"


def _exists(obj: griffe.Object, path: str) -> bool:
    try:
        obj.modules_collection[path]
    except (KeyError, ValueError, griffe.AliasResolutionError):
        return False
    return True


def _scopes(obj: griffe.Object) -> list[griffe.Object]:
    """Where a name in ``obj``'s docstring is looked up: a method names its siblings (``:meth:`setup```)."""
    if isinstance(obj, griffe.Function | griffe.Attribute) and obj.parent is not None:
        return [obj.parent, obj]
    return [obj]


def _resolve(obj: griffe.Object, name: str) -> str | None:
    """The full path of ``name`` as seen from ``obj``, or None where it cannot be resolved."""
    if name.startswith(_PACKAGE + ".") or name == _PACKAGE:
        return name if _exists(obj, name) else None
    head, _, rest = name.partition(".")
    for scope in _scopes(obj):
        if isinstance(scope, griffe.Class) and head in scope.all_members:
            path = f"{scope.path}.{name}"
        else:
            try:
                resolved = scope.resolve(head)
            except (griffe.NameResolutionError, AttributeError, KeyError):
                continue
            path = f"{resolved}.{rest}" if rest else resolved
        ours = path == _PACKAGE or path.startswith(_PACKAGE + ".")
        return path if not ours or _exists(obj, path) else None
    return None


def _inherited_from_elsewhere(obj: griffe.Object, name: str) -> bool:
    """Whether ``name`` is a member of another project's base class of ``obj`` (``LightningDataModule.setup``)."""
    if "." in name:
        return False
    for scope in _scopes(obj):
        if not isinstance(scope, griffe.Class):
            continue
        for base in scope.bases:
            path = str(getattr(base, "canonical_path", base))
            if path.startswith(_PACKAGE):
                continue
            module, _, attribute = path.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module), attribute)
            except (ImportError, AttributeError, ValueError):
                continue
            if hasattr(cls, name):
                return True
    return False


def _roles(obj: griffe.Object, text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        short, name = match.group(2) == "~", match.group(3).strip()
        shown = name.rsplit(".", 1)[-1] if short else name
        path = _resolve(obj, name)
        if path is None:
            if name.split(".")[0] in _FOREIGN or _inherited_from_elsewhere(obj, name):
                return f"`{shown}`"
            return f"[`{shown}`][{name}]"  # a name that exists nowhere: the strict build reports it
        if not (path == _PACKAGE or path.startswith(_PACKAGE + ".")):
            return f"`{shown}`"  # another project's object: the site links no other project's reference
        # A real object of ours: a link where the site documents it, plain code where it does not.
        return f'<autoref identifier="{path}" optional><code>{shown}</code></autoref>'

    return _ROLE.sub(replace, text)


#: Top-level names of other projects that docstrings refer to without an import in scope.
_FOREIGN = {"timm", "torch", "torchmetrics", "lightning", "LearningRateMonitor", "WeightAveraging"}


def _literal_blocks(text: str) -> str:
    """``Example::`` + doctest lines to an ``Examples:`` section; other ``text::`` blocks to fenced code."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.rstrip().endswith("::"):
            out.append(line)
            i += 1
            continue
        indent = len(line) - len(line.lstrip())
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        block: list[str] = []
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
            block.append(lines[j])
            j += 1
        while block and not block[-1].strip():
            block.pop()
        if not block:
            out.append(line)
            i += 1
            continue
        body_indent = min(len(b) - len(b.lstrip()) for b in block if b.strip())
        body = [b[body_indent:] for b in block]
        title = line.strip()[:-2].rstrip()
        pad = " " * indent
        if title in ("Example", "Examples") and body[0].startswith(">>>"):
            out.append(f"{pad}Examples:")
            out.extend(pad + "    " + _DIRECTIVE.sub("", b) if b else "" for b in body)
        else:
            language = "yaml" if "YAML" in title else "bash" if body[0].startswith("lt-finetune") else "text"
            out.append(f"{pad}{title}:" if title else "")
            out.append("")
            out.append(f"{pad}```{language}")
            out.extend(pad + b if b else "" for b in body)
            out.append(f"{pad}```")
        out.append("")
        i = j
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    """Rewrite the docstrings of a loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _walk(pkg, set()):
            if obj.docstring is not None:
                obj.docstring.value = _roles(obj, _literal_blocks(obj.docstring.value))

    def on_package_loaded(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """The same hook under its griffe 1 name (griffe 2 calls ``on_package``)."""
        self.on_package(pkg=pkg, **kwargs)


def _walk(obj: griffe.Object, seen: set[str]) -> list[griffe.Object]:
    if obj.path in seen:
        return []
    seen.add(obj.path)
    found = [obj]
    for member in obj.members.values():
        if not member.is_alias:
            found.extend(_walk(member, seen))  # type: ignore[arg-type]
    return found
