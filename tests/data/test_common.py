"""Tests of what the image datamodules share: their arguments, stated once, and the rule for mixing batches."""

from __future__ import annotations

import inspect
import re
from collections import OrderedDict, namedtuple
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from timm.data import Mixup

from lt_finetune.cli import main
from lt_finetune.data import AnimalMNISTDataModule, ImageDataModuleBase, ImageFolderDataModule, mix_labelled_batch

SHARED = [name for name in inspect.signature(ImageDataModuleBase.__init__).parameters if name != "self"]
DATAMODULES = {
    "AnimalMNISTDataModule": (AnimalMNISTDataModule, []),
    "ImageFolderDataModule": (ImageFolderDataModule, ["--data.train_dir", "anywhere"]),
}


def test_the_shared_arguments_are_the_ten_of_the_base() -> None:
    assert SHARED == [
        "image_size",
        "batch_size",
        "num_workers",
        "seed",
        "mean",
        "std",
        "hflip",
        "mixup_alpha",
        "cutmix_alpha",
        "label_smoothing",
    ]


def _expected_defaults(cls: type) -> dict[str, Any]:
    """Every shared argument's default as the datamodule sees it: its own where it overrides one, else the base's."""
    base = inspect.signature(ImageDataModuleBase.__init__).parameters
    own = inspect.signature(cls.__init__).parameters
    return {name: (own[name] if name in own else base[name]).default for name in SHARED}


@pytest.mark.parametrize("name", DATAMODULES)
def test_printed_config_lists_every_shared_argument_with_its_default(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cls, extra = DATAMODULES[name]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--data", f"lt_finetune.data.{name}", *extra, "--data.batch_size", "8", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)["data"]
    assert printed["class_path"] == f"lt_finetune.data.{name}"
    init_args = printed["init_args"]
    expected = {**_expected_defaults(cls), "batch_size": 8}
    assert {key: init_args.get(key, "<missing>") for key in SHARED} == expected
    assert _expected_defaults(AnimalMNISTDataModule)["image_size"] == 64  # a subclass may still set its own default


@pytest.mark.parametrize("name", DATAMODULES)
def test_cli_help_gives_every_shared_argument_a_type_and_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--data.help", f"lt_finetune.data.{name}"])
    assert exit_info.value.code == 0
    entries: dict[str, str] = {}  # option name -> its help entry, line wrapping undone
    for line in capsys.readouterr().out.splitlines():
        match = re.match(r"\s+--data\.(\w+)", line)
        if match:
            key = match.group(1)
            entries[key] = ""
        if entries:
            entries[key] += " " + line.strip()
    types = {"mean": "Optional[Sequence[float]]", "std": "Optional[Sequence[float]]", "hflip": "bool"}
    for arg in SHARED:
        kind = types.get(arg, "float" if arg.endswith(("alpha", "smoothing")) else "int")
        assert f"(type: {kind}, default:" in entries.get(arg, ""), arg
    assert "Images per batch. (type: int, default: 64)" in entries["batch_size"]  # help from the base's docstring


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"seed": "0"}, TypeError, "Expected `seed` to be an int, got '0' of type str."),
        ({"seed": True}, TypeError, "Expected `seed` to be an int, got True of type bool."),
        ({"hflip": 1}, TypeError, "Expected `hflip` to be a bool, got 1 of type int."),
        ({"image_size": 0}, ValueError, "Expected `image_size` to be an int >= 1, got 0."),
        ({"label_smoothing": 1.5, "mixup_alpha": 0.2}, ValueError, r"`label_smoothing` to be in \[0.0, 1.0\]"),
        ({"cutmix_alpha": "1"}, TypeError, "Expected `cutmix_alpha` to be a float"),
    ],
)
@pytest.mark.parametrize("name", DATAMODULES)
def test_both_datamodules_check_the_shared_arguments_alike(
    name: str, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    cls, _ = DATAMODULES[name]
    args = ["anywhere"] if cls is ImageFolderDataModule else []
    with pytest.raises(error, match=match):
        cls(*args, **kwargs)


def test_unknown_keyword_is_refused() -> None:
    with pytest.raises(TypeError, match="batchsize"):
        AnimalMNISTDataModule(batchsize=8)  # type: ignore[call-arg]


# --- mix_labelled_batch -------------------------------------------------------------------------------------------


@pytest.fixture
def mixup() -> Mixup:
    return Mixup(mixup_alpha=1.0, label_smoothing=0.1, num_classes=3)


def _labelled(batch_size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch_size, 3, 8, 8), torch.arange(batch_size) % 3


def _is_soft(targets: Any, batch_size: int = 4) -> bool:
    return (
        isinstance(targets, torch.Tensor)
        and targets.shape == (batch_size, 3)
        and targets.dtype == torch.float32
        and torch.allclose(targets.sum(1), torch.ones(batch_size))
    )


def test_pair_is_mixed(mixup: Mixup) -> None:
    images, labels = _labelled()
    mixed, soft = mix_labelled_batch(mixup, (images, labels))
    assert mixed.shape == images.shape and _is_soft(soft)
    assert labels.dtype == torch.int64  # the input batch is left as it was


def test_triple_keeps_its_third_entry(mixup: Mixup) -> None:
    images, labels = _labelled()
    index = torch.tensor([10, 11, 12, 13])
    out = mix_labelled_batch(mixup, (images, labels, index, "meta"))
    assert isinstance(out, tuple) and len(out) == 4
    assert out[0].shape == images.shape and _is_soft(out[1])
    assert out[2] is index and out[3] == "meta"


def test_list_and_namedtuple_keep_their_type(mixup: Mixup) -> None:
    images, labels = _labelled()
    out = mix_labelled_batch(mixup, [images, labels, torch.arange(4)])
    assert isinstance(out, list) and _is_soft(out[1]) and out[2].tolist() == [0, 1, 2, 3]
    Batch = namedtuple("Batch", ["x", "y", "index"])
    named = mix_labelled_batch(mixup, Batch(images, labels, torch.arange(4)))
    assert isinstance(named, Batch) and _is_soft(named.y) and named.index.tolist() == [0, 1, 2, 3]


def test_dict_is_mixed_at_source_only(mixup: Mixup) -> None:
    source, target = _labelled(), (torch.randn(6, 3, 8, 8),)
    batch = OrderedDict(source=source, target=target)
    out = mix_labelled_batch(mixup, batch)
    assert isinstance(out, OrderedDict) and list(out) == ["source", "target"]
    assert _is_soft(out["source"][1]) and out["target"] is target
    assert batch["source"] is source  # a new dict: the loader's batch is not modified
    labelled_target = {"source": _labelled(), "target": _labelled()}  # even a labelled target stays as it is
    assert mix_labelled_batch(mixup, labelled_target)["target"] is labelled_target["target"]


def test_dict_source_with_extra_entries(mixup: Mixup) -> None:
    images, labels = _labelled()
    out = mix_labelled_batch(mixup, {"source": (images, labels, torch.arange(4)), "target": (images,)})
    assert _is_soft(out["source"][1]) and out["source"][2].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "batch",
    [
        pytest.param({"target": _labelled()}, id="dict-without-source"),
        pytest.param({"image": torch.randn(4, 3, 8, 8), "label": torch.zeros(4, dtype=torch.long)}, id="flat-dict"),
        pytest.param((torch.randn(4, 3, 8, 8),), id="unlabelled"),
        pytest.param((torch.randn(4, 3, 8, 8), torch.full((4, 3), 1 / 3)), id="soft-targets"),
        pytest.param((torch.randn(4, 3, 8, 8), torch.ones(4, dtype=torch.bool)), id="bool-targets"),
        pytest.param((torch.randn(4, 3, 8, 8), torch.zeros(4, 2, dtype=torch.long)), id="2d-targets"),
        pytest.param((torch.randn(4, 3, 8, 8), torch.zeros(3, dtype=torch.long)), id="length-mismatch"),
        pytest.param((torch.randn(4, 3, 8, 8), [0, 1, 2, 0]), id="list-targets"),
        pytest.param(torch.randn(4, 3, 8, 8), id="tensor"),
        pytest.param({"source": (torch.randn(4, 3, 8, 8),)}, id="unlabelled-source"),
    ],
)
def test_batches_without_class_indices_pass_through(mixup: Mixup, batch: Any) -> None:
    out = mix_labelled_batch(mixup, batch)
    if isinstance(batch, dict) and "source" in batch:
        assert out["source"] is batch["source"]
    else:
        assert out is batch


def test_hook_mixes_a_triple_and_a_combined_loader_dict(tmp_path: Path) -> None:
    dm = AnimalMNISTDataModule(root=str(tmp_path), image_size=8, batch_size=4, mixup_alpha=0.4, cutmix_alpha=1.0)
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 3, 5, 9])
    dm.trainer = SimpleNamespace(training=True)  # type: ignore[assignment]
    x, soft, index = dm.on_after_batch_transfer((images, labels, torch.arange(4)), 0)
    assert x.shape == images.shape and soft.shape == (4, 10) and index.tolist() == [0, 1, 2, 3]
    target = (torch.randn(4, 3, 8, 8),)
    out = dm.on_after_batch_transfer({"source": (images, labels), "target": target}, 0)
    assert out["source"][1].shape == (4, 10) and out["target"] is target
    dm.trainer = SimpleNamespace(training=False)  # type: ignore[assignment]
    batch = (images, labels, torch.arange(4))
    assert dm.on_after_batch_transfer(batch, 0) is batch
