"""The bad-input catalogue: each case, the error it raises and the phrase of its message, all before training.

Every case id is listed in ``docs/troubleshooting.md`` with its message and the fix; a test checks that the page
and this catalogue agree. Cases that are not errors (conversions, resuming without callback state) follow.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import StochasticWeightAveraging
from lightning.pytorch.strategies import FSDPStrategy
from PIL import Image
from tinymodels import ForeignModule, tiny_data, trainer
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, TensorDataset

from lt_finetune import TransferModule
from lt_finetune.callbacks import EMA, FreezeBackbone, GradualUnfreeze, LayerwiseLR
from lt_finetune.cli import main
from lt_finetune.data import ImageFolderDataModule
from lt_finetune.policy import check_strategy

TROUBLESHOOTING = Path(__file__).parents[1] / "docs" / "troubleshooting.md"


@dataclass(frozen=True)
class Case:
    id: str
    run: Callable[[Path], Any]
    error: type[BaseException]
    match: str  # a regular expression the message must contain


class CLIError(Exception):
    """What ``lt-finetune`` printed to stderr before exiting with an error."""


def _cli(tmp_path: Path, config: str, *args: str) -> None:
    (tmp_path / "config.yaml").write_text(config)
    import contextlib
    import io

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            main(["fit", "--config", str(tmp_path / "config.yaml"), *args])
        except SystemExit as exit_:
            if exit_.code:
                raise CLIError(stderr.getvalue()) from None


_TINY_CONFIG = (
    "model:\n  backbone: resnet18\n"
    "data:\n  class_path: AnimalMNISTDataModule\n  init_args: {image_size: 32, train_per_class: 2}\n"
    "trainer:\n  max_steps: 1\n  logger: false\n  enable_progress_bar: false\n"
)


def _images(root: Path, counts: dict[str, int], mode: str = "RGB", suffix: str = ".png") -> Path:
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(root / name / f"{i}{suffix}")
    return root


def _folder_dm(tmp_path: Path, **kwargs: Any) -> ImageFolderDataModule:
    train = _images(tmp_path / "train", {"cat": 3, "dog": 3, "emu": 3})
    return ImageFolderDataModule(str(train), image_size=16, batch_size=4, **kwargs)


def _fit_transfer(tmp_path: Path, callbacks: list[pl.Callback], **module: Any) -> None:
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    model = TransferModule(module.pop("backbone", "resnet18"), **{"num_classes": 10, **module})
    trainer(tmp_path, callbacks, max_steps=2).fit(model, DataLoader(TensorDataset(x, y), batch_size=8))


def _checkpoint(tmp_path: Path, model: pl.LightningModule, data: Any, callbacks: list[pl.Callback]) -> Path:
    fit = trainer(tmp_path, callbacks, max_steps=2)
    fit.fit(model, data)
    path = tmp_path / "written.ckpt"
    fit.save_checkpoint(path)
    return path


def _resume_other_backbone(tmp_path: Path) -> None:
    data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 10), batch_size=4)
    path = _checkpoint(tmp_path, TransferModule("resnet18"), data, [])
    trainer(tmp_path, [], max_steps=4).fit(TransferModule("resnet10t"), data, ckpt_path=path)


def _load_other_head(tmp_path: Path) -> None:
    data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 10), batch_size=4)
    path = _checkpoint(tmp_path, TransferModule("resnet18"), data, [])
    TransferModule.load_from_checkpoint(path, num_classes=5)


def _resume_with_callbacks_it_was_written_without(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, ForeignModule(), tiny_data(), [])
    callbacks = [FreezeBackbone(unfreeze_at_epoch=1), LayerwiseLR(decay=0.5)]
    trainer(tmp_path, callbacks, max_steps=4).fit(ForeignModule(), tiny_data(), ckpt_path=path)


def _corrupt_jpeg(tmp_path: Path) -> None:
    train = _images(tmp_path / "train", {"cat": 3, "dog": 3}, suffix=".jpg")
    data = (train / "cat" / "0.jpg").read_bytes()
    (train / "cat" / "0.jpg").write_bytes(data[:200] + bytes(len(data) - 200))  # header intact, pixels broken
    dm = ImageFolderDataModule(str(train), image_size=16, batch_size=2)
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        list(loader)


def _truncated(tmp_path: Path) -> None:
    train = _images(tmp_path / "train", {"cat": 3, "dog": 3})
    good = (train / "dog" / "0.png").read_bytes()
    (train / "dog" / "0.png").write_bytes(good[: len(good) // 2])
    ImageFolderDataModule(str(train), image_size=16).setup("fit")


def _not_an_image(tmp_path: Path) -> None:
    train = _images(tmp_path / "train", {"cat": 3, "dog": 3})
    (train / "cat" / "notes.png").write_text("not an image")
    ImageFolderDataModule(str(train), image_size=16).setup("fit")


def _empty_class(tmp_path: Path) -> None:
    train = _images(tmp_path / "train", {"cat": 3, "dog": 3})
    (train / "fox").mkdir()
    (train / "fox" / "readme.txt").write_text("no images here")
    ImageFolderDataModule(str(train), image_size=16).setup("fit")


def _classes_differ(tmp_path: Path) -> None:
    train = _images(tmp_path / "train", {"cat": 3, "dog": 3})
    val = _images(tmp_path / "val", {"cat": 1, "yak": 1})
    ImageFolderDataModule(str(train), val_dir=str(val), image_size=16).setup("fit")


def _num_classes_vs_folder(tmp_path: Path) -> None:
    dm = _folder_dm(tmp_path)
    trainer(tmp_path, [], max_steps=1).fit(TransferModule("resnet18", num_classes=4), dm)


def _num_classes_vs_targets(tmp_path: Path) -> None:
    _fit_transfer(tmp_path, [], num_classes=5)  # targets 0..9 from a plain DataLoader


def _manual_optimization(tmp_path: Path) -> None:
    class Manual(ForeignModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    trainer(tmp_path, [FreezeBackbone()], max_steps=1).fit(Manual(), tiny_data())


def _plateau(**kwargs: Any) -> None:
    from test_plateau import ALWAYS_PLATEAU, _fit, _model

    _fit(_model(**{"scheduler": ALWAYS_PLATEAU, **kwargs}), epochs=2)


CASES = [
    # module and callback arguments
    Case("lr_as_string", lambda p: TransferModule("resnet18", lr="1e-3"), TypeError, r"Expected `lr` to be a float"),
    Case("num_classes_too_small", lambda p: TransferModule("resnet18", num_classes=1), ValueError, r">= 2 for task"),
    Case("unknown_backbone", lambda p: TransferModule("resnet1888"), ValueError, r"Unknown timm model.*'resnet18'"),
    Case(
        "torchvision_name_without_prefix",
        lambda p: TransferModule("mobilenet_v2"),
        ValueError,
        r"use 'torchvision/mobilenet_v2'",
    ),
    Case(
        "missing_weights_file",
        lambda p: TransferModule("resnet18", pretrained=str(p / "nowhere.pth")),
        FileNotFoundError,
        r"nowhere.pth' does not exist",
    ),
    Case(
        "bool_for_an_epoch",
        lambda p: FreezeBackbone(unfreeze_at_epoch=True),
        TypeError,
        r"Expected `unfreeze_at_epoch` to be an int, got True",
    ),
    Case("decay_out_of_range", lambda p: LayerwiseLR(decay=1.5), ValueError, r"`decay` to be in \(0.0, 1.0\]"),
    Case("unknown_bn_mode", lambda p: FreezeBackbone(bn_mode="frozen"), ValueError, r"`bn_mode` to be one of"),
    Case(
        "pattern_matches_no_group",
        lambda p: _fit_transfer(p, [GradualUnfreeze(schedule={1: ["layer9*"]})]),
        ValueError,
        r"pattern .layer9\*. matched no layer group; available: .*layer4",
    ),
    Case(
        "backbone_attribute_missing",
        lambda p: trainer(p, [FreezeBackbone(backbone="encoder")]).fit(ForeignModule(), tiny_data()),
        AttributeError,
        r"found no sub-module 'encoder' on ForeignModule; available: \['backbone', 'head'\]",
    ),
    Case(
        "duplicate_callbacks",
        lambda p: trainer(p, [FreezeBackbone(), FreezeBackbone()]).fit(ForeignModule(), tiny_data()),
        RuntimeError,
        r"more than one stateful callback of type `FreezeBackbone`.*state_key. must be unique",
    ),
    Case(
        "swa_beside_a_policy",
        lambda p: trainer(p, [FreezeBackbone(), StochasticWeightAveraging(1e-2)]).fit(ForeignModule(), tiny_data()),
        ValueError,
        r"StochasticWeightAveraging cannot run beside FreezeBackbone.*EMA",
    ),
    Case(
        "two_weight_averagings",
        lambda p: trainer(p, [EMA(), EMA(decay=0.9)]).fit(ForeignModule(), tiny_data()),
        ValueError,
        r"average its weights once",
    ),
    Case(
        "fsdp_without_orig_params",
        lambda p: check_strategy(FSDPStrategy(use_orig_params=False), "FreezeBackbone"),
        ValueError,
        r"use_orig_params=True",
    ),
    Case("manual_optimization", _manual_optimization, ValueError, r"supports automatic optimization only"),
    Case(
        "num_classes_vs_class_folders",
        _num_classes_vs_folder,
        ValueError,
        r"does not fit the 3 classes of ImageFolderDataModule.*pass num_classes=3",
    ),
    Case("num_classes_vs_targets", _num_classes_vs_targets, ValueError, r"num_classes=5\) got a target class"),
    Case(
        "plateau_metric_never_logged",
        lambda p: _plateau(scheduler_monitor="val/acc5"),
        ValueError,
        r"watches 'val/acc5'.*Set `scheduler_monitor`",
    ),
    Case(
        "monitor_without_a_plateau_scheduler",
        lambda p: _plateau(scheduler=partial(StepLR, step_size=1), scheduler_monitor="val/loss"),
        ValueError,
        r"scheduler is a StepLR, which watches none; remove `scheduler_monitor`",
    ),
    # CLI and YAML
    Case("yaml_unknown_key", lambda p: _cli(p, _TINY_CONFIG + "seed_everythin: 1\n"), CLIError, r"seed_everythin"),
    Case("yaml_wrong_type", lambda p: _cli(p, _TINY_CONFIG, "--model.lr", "abc"), CLIError, r'"model.lr".*float'),
    Case(
        "yaml_misspelled_callback",
        lambda p: _cli(p, _TINY_CONFIG + "  callbacks:\n    - class_path: lt_finetune.callbacks.FreezeBakbone\n"),
        CLIError,
        r"Did you mean: lt_finetune.callbacks.FreezeBackbone\?",
    ),
    Case(
        "yaml_bad_callback_argument",
        lambda p: _cli(
            p,
            _TINY_CONFIG + "  callbacks:\n    - class_path: lt_finetune.callbacks.LayerwiseLR\n"
            "      init_args: {decay: 1.5}\n",
        ),
        ValueError,
        r"Expected `decay` to be in \(0.0, 1.0\], got 1.5",
    ),
    # data
    Case(
        "missing_train_folder",
        lambda p: ImageFolderDataModule(str(p / "nowhere")).setup("fit"),
        FileNotFoundError,
        r"`train_dir` '.*nowhere' does not exist",
    ),
    Case(
        "folder_without_class_folders",
        lambda p: ImageFolderDataModule(str(_images(p, {"flat": 3}) / "flat")).setup("fit"),
        FileNotFoundError,
        r"has no class sub-folders; expected the layout",
    ),
    Case("empty_class_folder", _empty_class, FileNotFoundError, r"\['.*fox'\] of `train_dir` hold no image files"),
    Case("not_an_image", _not_an_image, ValueError, r"cannot be opened: '.*notes\.png'.*on_bad_image='skip'"),
    Case("truncated_image", _truncated, ValueError, r"cannot be opened: '.*0\.png'"),
    Case("corrupt_pixel_data", _corrupt_jpeg, OSError, r"0\.jpg.*on_bad_image"),
    Case("classes_differ_train_val", _classes_differ, ValueError, r"missing from val_dir: \['dog'\]"),
    # checkpoints
    Case("checkpoint_of_another_backbone", _resume_other_backbone, ValueError, r"backbone='resnet18'\); this model"),
    Case("checkpoint_of_another_head", _load_other_head, ValueError, r"head has 10 outputs.*this model's has 5"),
    Case(
        "checkpoint_without_the_callbacks",
        _resume_with_callbacks_it_was_written_without,
        ValueError,
        r"written without lt_finetune's callbacks, so its optimizer state cannot be resumed",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_the_problem_and_the_fix(case: Case, tmp_path: Path) -> None:
    with pytest.raises(case.error) as info:
        case.run(tmp_path)
    message = str(info.value)
    assert re.search(case.match, message, flags=re.DOTALL), message[-2000:]


def test_catalogue_is_large_and_listed_in_the_troubleshooting_page() -> None:
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    page = TROUBLESHOOTING.read_text()
    listed = set(re.findall(r"^\| `(\w+)` \|", page, flags=re.MULTILINE))
    assert listed == {c.id for c in CASES}


# -- not errors: what is converted, and what resumes ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P", "CMYK"])
def test_image_modes_are_converted_to_rgb(tmp_path: Path, mode: str) -> None:
    train = tmp_path / "train"
    for name in ("cat", "dog"):
        (train / name).mkdir(parents=True)
        for i in range(3):
            level = (i + 1) * (1000 if mode == "I;16" else 60)
            if mode == "I;16":
                image = Image.fromarray(np.full((12, 12), level, dtype=np.uint16))
            else:
                image = Image.fromarray(np.full((12, 12), level, dtype=np.uint8)).convert(mode)
            image.save(train / name / f"{i}.{'jpg' if mode == 'CMYK' else 'png'}")
    dm = ImageFolderDataModule(str(train), image_size=8, batch_size=4, hflip=False)
    dm.setup("fit")
    images = [dm.train_dataset[i][0] for i in range(len(dm.train_dataset))]
    assert all(x.shape == (3, 8, 8) and torch.isfinite(x).all() for x in images)
    assert torch.stack(images).std() > 0  # not blank: the brightness levels survive the conversion


def test_resuming_with_callbacks_a_checkpoint_written_without_follows_the_schedule(tmp_path: Path) -> None:
    # TransferModule names its param groups itself: its optimizer state fits with or without the callbacks.
    data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 10), batch_size=4)
    path = _checkpoint(tmp_path, TransferModule("resnet18"), data, [])
    fit = trainer(tmp_path, [FreezeBackbone(unfreeze_at_epoch=5)], max_epochs=3)
    model = TransferModule("resnet18")
    fit.fit(model, data, ckpt_path=path)
    assert fit.global_step == 6 and not any(p.requires_grad for p in model.backbone.parameters())
