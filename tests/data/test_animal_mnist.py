"""Tests of AnimalMNISTDataModule, the shared split helpers and the Mixup hook."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jsonargparse import ArgumentParser
from timm.data import Mixup
from torch import nn

from lt_finetune.data import ANIMAL_MNIST_CLASSES, AnimalMNISTDataModule, load_animal_mnist
from lt_finetune.data._common import mix_batch, stratified_fraction_split, stratified_split

needs_package = pytest.mark.skipif(
    importlib.util.find_spec("animal_mnist") is None,
    reason="needs the optional data package: pip install --no-deps animal-mnist==0.4",
)
SMALL = {"train_per_class": 5, "val_per_class": 3, "test_per_class": 4}


def _write_pickle(path: Path, obj: Any) -> None:
    with gzip.open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """A root folder with 12 images per class, 28x28, in the package's file format."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 12)
    images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    _write_pickle(tmp_path / "animal_data_version_3.gz", images)
    _write_pickle(tmp_path / "animal_label_version_3.gz", labels)
    return tmp_path


def _setup(**kwargs: Any) -> AnimalMNISTDataModule:
    dm = AnimalMNISTDataModule(**kwargs)
    dm.setup("fit")
    return dm


# --- pure helpers ---------------------------------------------------------------------------------------------


def test_stratified_split_counts_disjoint_and_deterministic() -> None:
    targets = torch.arange(3).repeat_interleave(torch.tensor([6, 7, 8]))
    a, b, rest = stratified_split(targets, 3, [2, 1, None], seed=5)
    assert torch.bincount(targets[a], minlength=3).tolist() == [2, 2, 2]
    assert torch.bincount(targets[b], minlength=3).tolist() == [1, 1, 1]
    assert torch.bincount(targets[rest], minlength=3).tolist() == [3, 4, 5]
    assert sorted(torch.cat([a, b, rest]).tolist()) == list(range(len(targets)))
    again = stratified_split(targets, 3, [2, 1, None], seed=5)
    assert all(torch.equal(x, y) for x, y in zip([a, b, rest], again))
    assert not torch.equal(a, stratified_split(targets, 3, [2, 1, None], seed=6)[0])
    with pytest.raises(ValueError, match="Class 0 has 6 items but the split asks for 7"):
        stratified_split(targets, 3, [7], seed=0)


def test_stratified_fraction_split_keeps_every_splittable_class_on_both_sides() -> None:
    targets = torch.tensor([0] * 10 + [1] * 5 + [2] * 2 + [3])
    rest, held_out = stratified_fraction_split(targets, 4, 0.2, seed=0)
    assert torch.bincount(targets[held_out], minlength=4).tolist() == [2, 1, 1, 0]
    assert torch.bincount(targets[rest], minlength=4).tolist() == [8, 4, 1, 1]


def test_mix_batch_handles_odd_batches() -> None:
    mixup = Mixup(mixup_alpha=1.0, label_smoothing=0.1, num_classes=4)
    images = torch.randn(5, 3, 8, 8)
    last_image = images[-1].clone()
    mixed, soft = mix_batch(mixup, images, torch.tensor([0, 1, 2, 3, 2]))
    assert mixed.shape == (5, 3, 8, 8) and soft.shape == (5, 4) and soft.dtype == torch.float32
    torch.testing.assert_close(soft.sum(1), torch.ones(5))
    torch.testing.assert_close(mixed[-1], last_image)  # the odd one out is left unmixed ...
    torch.testing.assert_close(soft[-1], torch.tensor([0.025, 0.025, 0.925, 0.025]))  # ... with a smoothed target
    _, single = mix_batch(mixup, torch.randn(1, 3, 8, 8), torch.tensor([1]))
    torch.testing.assert_close(single, torch.tensor([[0.025, 0.925, 0.025, 0.025]]))


# --- constructor ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0}, ValueError, "Expected `batch_size` to be an int >= 1, got 0"),
        ({"batch_size": 8.0}, TypeError, "Expected `batch_size` to be an int"),
        ({"train_per_class": 0}, ValueError, "Expected `train_per_class` to be an int >= 1"),
        ({"mean": (0.5, 0.5)}, ValueError, "Expected `mean` to have 3 values"),
        ({"std": (0.5, 0.0, 0.5)}, ValueError, "Expected every value of `std` to be > 0"),
        ({"hflip": "yes"}, TypeError, "Expected `hflip` to be a bool"),
        ({"mixup_alpha": -1.0}, ValueError, r"Expected `mixup_alpha` to be in \[0.0, inf\)"),
        ({"label_smoothing": 0.1}, ValueError, "`label_smoothing` to be 0 when `mixup_alpha` and `cutmix_alpha`"),
    ],
)
def test_constructor_rejects_bad_values(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        AnimalMNISTDataModule(**kwargs)


def test_classes_known_at_construction() -> None:
    dm = AnimalMNISTDataModule()
    assert dm.num_classes == 10
    names = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
    assert dm.classes == list(ANIMAL_MNIST_CLASSES) == names
    assert dm.data_config == {"input_size": (3, 64, 64), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def test_builds_from_yaml_signature() -> None:
    parser = ArgumentParser()
    parser.add_class_arguments(AnimalMNISTDataModule, "data")
    cfg = parser.parse_string("data:\n  train_per_class: 210\n  mean: [0.5, 0.5, 0.5]\n  mixup_alpha: 0.2\n")
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, AnimalMNISTDataModule)
    assert (dm.train_per_class, dm.mean, dm.mixup_alpha) == (210, (0.5, 0.5, 0.5), 0.2)


# --- data checks ----------------------------------------------------------------------------------------------


def test_missing_files_in_root_name_the_fix(tmp_path: Path) -> None:
    dm = AnimalMNISTDataModule(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"found no animal_data_version_3.gz or .*pip install --no-deps"):
        dm.setup("fit")


def test_missing_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "animal_mnist" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps animal-mnist==0\.4` or pass `root`"):
        AnimalMNISTDataModule().setup("fit")


def test_custom_root_and_too_few_images_per_class(tiny_root: Path) -> None:
    dm = _setup(root=str(tiny_root), image_size=16, **SMALL)
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (50, 30, 40)
    with pytest.raises(ValueError, match=r"needs 13 images per class .* fewer: bear: 12, bird: 12"):
        AnimalMNISTDataModule(root=str(tiny_root), train_per_class=6, val_per_class=3, test_per_class=4).setup("fit")


def test_refuses_pickles_of_other_objects(tiny_root: Path) -> None:
    _write_pickle(tiny_root / "animal_label_version_3.gz", OrderedDict(a=1))
    with pytest.raises(ValueError, match=r"animal_label_version_3.gz' as a gzip-compressed pickle.*refusing"):
        load_animal_mnist(str(tiny_root))


def test_rejects_labels_out_of_range(tiny_root: Path) -> None:
    _write_pickle(tiny_root / "animal_label_version_3.gz", np.arange(120))
    with pytest.raises(ValueError, match=r"labels in .* to be in 0\.\.9, got values from 0 to 119"):
        load_animal_mnist(str(tiny_root))


# --- the real data ----------------------------------------------------------------------------------------------


@needs_package
def test_package_data_is_ten_balanced_classes() -> None:
    images, labels = load_animal_mnist()
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [1000] * 10


@needs_package
def test_split_counts_per_class_and_disjoint() -> None:
    dm = _setup(**SMALL)
    splits = {"train": dm.train_dataset, "val": dm.val_dataset, "test": dm.test_dataset}
    for name, per_class in (("train", 5), ("val", 3), ("test", 4)):
        assert torch.bincount(splits[name].targets, minlength=10).tolist() == [per_class] * 10, name
    indices = [set(d.indices.tolist()) for d in splits.values()]
    assert sum(map(len, indices)) == 120
    assert not (indices[0] & indices[1] or indices[0] & indices[2] or indices[1] & indices[2])
    _, labels = load_animal_mnist()
    for dataset in splits.values():  # targets are the labels of the source images
        assert torch.equal(dataset.targets, labels[dataset.indices])


@needs_package
def test_test_split_is_fixed_while_val_follows_seed() -> None:
    base = _setup(**SMALL)
    for kwargs in ({"seed": 1}, {"train_per_class": None}, {"train_per_class": 50, "val_per_class": 20}):
        other = _setup(**{**SMALL, **kwargs})
        assert torch.equal(other.test_dataset.indices, base.test_dataset.indices), kwargs
    assert not torch.equal(_setup(**SMALL, seed=1).val_dataset.indices, base.val_dataset.indices)
    assert torch.equal(_setup(**SMALL).train_dataset.indices, base.train_dataset.indices)
    everything = _setup(train_per_class=None)  # the defaults: 200 test, 90 val, all the rest for training
    sizes = (len(everything.train_dataset), len(everything.val_dataset), len(everything.test_dataset))
    assert sizes == (7100, 900, 2000)


@needs_package
def test_batches_are_normalised_rgb_of_the_resized_source() -> None:
    dm = _setup(**SMALL, image_size=40, batch_size=8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    images, targets = next(iter(dm.val_dataloader()))
    assert images.shape == (8, 3, 40, 40) and images.dtype == torch.float32
    assert targets.dtype == torch.int64 and targets.shape == (8,)
    source, _ = load_animal_mnist()
    raw = source[dm.val_dataset.indices[:8]].unsqueeze(1).float()
    expected = F.interpolate(raw, size=(40, 40), mode="bilinear", antialias=True) / 255
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1), torch.tensor([0.2, 0.25, 0.5]).view(3, 1, 1)
    torch.testing.assert_close(images, (expected - mean) / std, atol=1.5 / 255 / 0.2, rtol=0)
    unnormalised = images * std + mean
    torch.testing.assert_close(unnormalised[:, 0], unnormalised[:, 2])  # gray repeated to 3 channels
    assert unnormalised.min() >= -1e-6 and unnormalised.max() <= 1 + 1e-6


@needs_package
def test_hflip_only_on_train_and_only_when_asked() -> None:
    torch.manual_seed(0)
    dm = _setup(**SMALL, image_size=28)
    image, _ = dm.train_dataset[0]
    assert not torch.equal(image, image.flip(-1))
    draws = [dm.train_dataset[0][0] for _ in range(20)]
    assert any(torch.equal(d, image.flip(-1)) for d in draws) and any(torch.equal(d, image) for d in draws)
    val_image = dm.val_dataset[0][0]
    assert all(torch.equal(dm.val_dataset[0][0], val_image) for _ in range(20))
    no_flip = _setup(**SMALL, image_size=28, hflip=False)
    assert all(torch.equal(no_flip.train_dataset[0][0], no_flip.train_dataset[0][0]) for _ in range(20))


@needs_package
def test_train_loader_order_follows_seed_and_keeps_last_batch() -> None:
    def first_epoch(seed: int) -> list[int]:
        loader = _setup(**SMALL, seed=seed, batch_size=16, hflip=False).train_dataloader()
        return torch.cat([y for _, y in loader]).tolist()

    assert len(first_epoch(0)) == 50  # 16 + 16 + 16 + 2: the partial batch is kept
    assert first_epoch(0) == first_epoch(0)
    assert first_epoch(0) != first_epoch(3)


@needs_package
def test_mixup_hook_only_while_training() -> None:
    dm = _setup(**SMALL, image_size=16, batch_size=6, mixup_alpha=0.4, cutmix_alpha=1.0, label_smoothing=0.1)
    batch = next(iter(dm.val_dataloader()))
    assert dm.on_after_batch_transfer(batch, 0) is batch  # no trainer
    dm.trainer = SimpleNamespace(training=False)  # type: ignore[assignment]
    assert dm.on_after_batch_transfer(batch, 0) is batch
    dm.trainer = SimpleNamespace(training=True)  # type: ignore[assignment]
    images, soft = dm.on_after_batch_transfer((batch[0].clone(), batch[1]), 0)
    assert images.shape == batch[0].shape and soft.shape == (6, 10) and soft.dtype == torch.float32
    torch.testing.assert_close(soft.sum(1), torch.ones(6))


class _Recorder(pl.LightningModule):
    """Tiny model that records the targets its steps receive."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.LazyLinear(10))
        self.seen: dict[str, list[tuple[torch.dtype, tuple[int, ...]]]] = {"train": [], "val": []}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.seen["train"].append((y.dtype, tuple(y.shape)))
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        _, y = batch
        self.seen["val"].append((y.dtype, tuple(y.shape)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@needs_package
def test_trainer_mixes_train_batches_only(tmp_path: Path) -> None:
    dm = AnimalMNISTDataModule(
        image_size=8, train_per_class=1, val_per_class=1, test_per_class=1, batch_size=4, mixup_alpha=0.2
    )
    model = _Recorder()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert model.seen["train"] == [(torch.float32, (4, 10)), (torch.float32, (4, 10)), (torch.float32, (2, 10))]
    assert model.seen["val"] == [(torch.int64, (4,)), (torch.int64, (4,)), (torch.int64, (2,))]
