"""The documentation site's sources: every callback has a page, every example is shown, every preview is drawn, and
the docstrings' Sphinx roles become cross-references (`make docs` builds the site itself, strictly)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from lt_finetune.callbacks import __all__ as CALLBACKS

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _nav_files(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [f for item in nav for f in _nav_files(item)]
    if isinstance(nav, dict):
        return [f for value in nav.values() for f in _nav_files(value)]
    return []


def _snake(name: str) -> str:
    """``GradualUnfreeze`` -> ``gradual_unfreeze``; ``LPFT`` -> ``lp_ft``, ``L2SP`` -> ``l2sp`` (the module names)."""
    irregular = {"LPFT": "lp_ft", "L2SP": "l2sp", "BSS": "bss", "EMA": "ema", "LoRA": "lora"}
    irregular["LayerwiseLR"] = "layerwise_lr"
    return irregular.get(name, re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower())


@pytest.mark.parametrize("name", CALLBACKS)
def test_every_callback_has_a_page_in_the_nav(name: str) -> None:
    page = f"callbacks/{_snake(name)}.md"
    text = (DOCS / page).read_text()
    assert f"::: lt_finetune.callbacks.{name}\n" in text, f"{page} lacks the reference of {name}"
    assert re.search(r"\]\(\.\./img/previews/\w+\.png\)", text), f"{page} lacks its schedule preview"
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text().split("\ntheme:")[0])["nav"]
    assert page in _nav_files(nav)
    assert f"({page})" in (DOCS / "callbacks.md").read_text(), f"the callbacks overview does not link {page}"


def test_every_example_config_is_shown_in_the_docs() -> None:
    pages = "".join(p.read_text() for p in DOCS.rglob("*.md"))
    fixtures = {"tiny_fit.yaml"}  # the test fixture of tests/test_cli.py, not a recipe
    for config in sorted((ROOT / "examples" / "configs").glob("*.yaml")):
        if config.name not in fixtures:
            assert f"examples/configs/{config.name}" in pages, f"no documentation page shows {config.name}"


def test_every_preview_is_drawn() -> None:
    previews = _load("gen_previews")
    for name in [*previews.PREVIEWS, "domain_adapt"]:
        path = DOCS / "img" / "previews" / f"{name}.png"
        assert path.is_file(), f"run `python docs/gen_previews.py {name}`"
        assert path.stat().st_size < 300_000


@pytest.fixture(scope="module")
def roles() -> ModuleType:
    pytest.importorskip("griffe", reason="needs the docs extra (`pip install -e '.[docs]'`)")
    return _load("griffe_sphinx_roles")


@pytest.fixture(scope="module")
def package(roles: ModuleType) -> object:
    """lt_finetune as the API reference loads it: statically, with the extension applied."""
    import griffe

    extensions = griffe.load_extensions(roles.SphinxRoles)
    return griffe.load("lt_finetune", search_paths=[str(ROOT)], extensions=extensions, docstring_parser="google")


def test_sphinx_roles_become_cross_references(package: object) -> None:
    module = package["module.TransferModule"]  # type: ignore[index]
    text = module.docstring.value
    assert '<autoref identifier="lt_finetune.module.TransferModule.forward_head" optional>' in text  # :meth:, relative
    short = '<autoref identifier="lt_finetune.data.ImageFolderDataModule" optional><code>ImageFolderDataModule</code>'
    assert short in text  # :class:`~...`, shown by its last name
    assert ":meth:" not in text and ":class:" not in text
    assert module.docstring.parsed[-1].kind.value == "examples"  # `Example::` became a Google section


def test_unresolvable_roles_stay_plain_references_and_foreign_ones_become_code(
    roles: ModuleType, package: object
) -> None:
    module = package["module.TransferModule"]  # type: ignore[index]
    assert roles._roles(module, ":meth:`no_such_method`") == "[`no_such_method`][no_such_method]"  # the build fails
    assert roles._roles(module, ":meth:`log_dict`") == "`log_dict`"  # inherited from LightningModule
    assert roles._roles(module, ":class:`~timm.data.Mixup`") == "`Mixup`"
    assert roles._roles(module, ":func:`lt_finetune.groups.layer_groups`").startswith(
        '<autoref identifier="lt_finetune.groups.layer_groups" optional>'
    )


def test_literal_blocks_become_examples_or_fenced_code(roles: ModuleType) -> None:
    assert roles._literal_blocks("Example::\n\n    >>> 1 + 1  # doctest: +SKIP\n    2") == (
        "Examples:\n    >>> 1 + 1\n    2\n"
    )
    assert roles._literal_blocks("In YAML::\n\n    a: 1\n\nAfter.") == "In YAML:\n\n```yaml\na: 1\n```\n\nAfter."
