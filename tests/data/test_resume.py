"""Exact resume with the datamodules' own loaders, augmentation on: mid-epoch, at an epoch boundary, any workers.

A run interrupted after a step-based checkpoint and resumed from it with ``ckpt_path`` must end with the same
parameters, bit for bit, as the run that was never interrupted. ``TransferModule`` reads
``trainer.estimated_stepping_batches`` in ``configure_optimizers``, the case in which Lightning does not restore a
loader's position by itself: these tests also cover the datamodules' own copy of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from lt_finetune import TransferModule
from lt_finetune.data import AnimalMNISTDataModule, DomainAdaptDataModule, ResumableDataLoader, sample_seed
from lt_finetune.data._resumable import seeded_global_rngs

# 40 training images in batches of 8: 5 steps an epoch, 15 in all.
DATA = {"image_size": 16, "train_per_class": 4, "val_per_class": 1, "test_per_class": 1, "batch_size": 8}
STEPS_PER_EPOCH = 5


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU()
    )


def _params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class _Interrupted(Exception):
    pass


class _StopAt(pl.Callback):
    """Interrupts the fit before the step after ``step``: that step's checkpoint has been written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise _Interrupted


def _data(**kwargs: Any) -> pl.LightningDataModule:
    return AnimalMNISTDataModule(**{**DATA, "hflip": True, **kwargs})


def _fit(
    root: Path, data: pl.LightningDataModule, *, stop: int | None = None, ckpt: Path | None = None
) -> torch.Tensor:
    torch.manual_seed(0)
    model = TransferModule(_backbone(), num_classes=10, input_size=(3, 16, 16), lr=0.01)
    checkpoint = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_last=True, filename="{step}")
    trainer = pl.Trainer(
        max_epochs=3, accelerator="cpu", deterministic=True, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
        callbacks=[checkpoint, *([_StopAt(stop)] if stop is not None else [])],
    )  # fmt: skip
    if stop is None:
        trainer.fit(model, data, ckpt_path=ckpt)
    else:
        with pytest.raises(_Interrupted):
            trainer.fit(model, data, ckpt_path=ckpt)
    return _params(model)


def _interrupt_and_resume(tmp_path: Path, stop: int, **data: Any) -> torch.Tensor:
    _fit(tmp_path / "interrupted", _data(**data), stop=stop)
    last = tmp_path / "interrupted" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == stop
    return _fit(tmp_path / "resumed", _data(**data), ckpt=last)


@pytest.mark.parametrize(
    ("stop", "data"),
    [(6, {}), (STEPS_PER_EPOCH * 2, {}), (6, {"mixup_alpha": 0.4, "cutmix_alpha": 1.0})],
    ids=["mid_epoch", "epoch_boundary", "mid_epoch_mixup_cutmix"],
)
def test_resume_is_bit_identical_with_augmentation_on(
    tmp_path: Path, animal_mnist: None, stop: int, data: dict[str, Any]
) -> None:
    full = _fit(tmp_path / "full", _data(**data))
    resumed = _interrupt_and_resume(tmp_path, stop, **data)
    assert torch.equal(full, resumed)


def test_a_datamodule_reused_after_a_resumed_fit_starts_afresh(tmp_path: Path, animal_mnist: None) -> None:
    """The position loaded for one fit is forgotten at its end: the next fit's first epoch is whole."""
    full = _fit(tmp_path / "full", _data())
    _fit(tmp_path / "interrupted", _data(), stop=4)  # in epoch 0, the epoch a fresh fit starts with
    data = _data()
    assert torch.equal(_fit(tmp_path / "resumed", data, ckpt=tmp_path / "interrupted" / "last.ckpt"), full)
    assert torch.equal(_fit(tmp_path / "again", data), full)


def test_resumed_mid_epoch_run_gets_the_unserved_batches(tmp_path: Path, animal_mnist: None) -> None:
    """The checkpoint holds the loader's place; the resumed epoch starts at its next batch."""
    _fit(tmp_path / "interrupted", _data(), stop=7)
    state = torch.load(tmp_path / "interrupted" / "last.ckpt", weights_only=False)
    position = {"epoch": 1, "round": 0, "batches": 1, "batch_size": 8, "size": 40}
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [position]
    assert state["AnimalMNISTDataModule"] == {"train_loaders": [position]}


# -- the loader, without a Trainer ----------------------------------------------------------------------------


def _epoch(loader: Any, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


def _same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


def test_augmentation_is_a_function_of_seed_epoch_and_index(animal_mnist: None) -> None:
    def epochs(num_workers: int, global_seed: int, seed: int = 0) -> list[list[Any]]:
        torch.manual_seed(global_seed)
        data = _data(image_size=28, num_workers=num_workers, seed=seed)
        data.setup("fit")
        loader = data.train_dataloader()
        return [_epoch(loader, 0), _epoch(loader, 1), _epoch(loader, 1)]

    base = epochs(num_workers=0, global_seed=0)
    assert _same(base[0], epochs(num_workers=2, global_seed=1)[0])  # not the workers', not the global RNG's
    assert _same(base[1], epochs(num_workers=0, global_seed=2)[1])
    assert not _same(base[1], base[2])  # a second pass over one epoch draws anew
    # Flips happen, and differ between epochs and seeds: the same item is sometimes mirrored, sometimes not.
    data = _data(image_size=28)
    data.setup("fit")
    dataset: Any = data.train_dataset
    draws = [dataset.seeded_item(3, sample_seed(0, epoch, 3))[0] for epoch in range(12)]
    plain = dataset.seeded_item(3, 0)[0]
    assert {torch.equal(d, plain) for d in draws} == {True, False}
    assert {torch.equal(d, plain.flip(-1)) for d in draws} == {True, False}
    assert not _same(base[0], epochs(num_workers=0, global_seed=0, seed=1)[0])


def test_loading_leaves_the_global_rngs_alone(animal_mnist: None) -> None:
    data = _data()
    data.setup("fit")
    torch.manual_seed(5)
    np.random.seed(5)
    before = torch.get_rng_state(), np.random.get_state()[1].copy()
    list(data.train_dataloader())
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])


class _Counting(Dataset[tuple[torch.Tensor, int]]):
    """Ten items whose transform draws from the global RNG; counts the reads."""

    def __init__(self) -> None:
        self.reads = 0

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self.reads += 1
        return torch.rand(2) + index, index


def test_resume_skips_without_reading_and_repeats_the_draws() -> None:
    full_data = _Counting()
    loader = ResumableDataLoader(full_data, batch_size=3, shuffle=True, seed=4)
    loader.sampler.set_epoch(2)  # type: ignore[attr-defined]
    it = iter(loader)
    served = [next(it), next(it)]
    state = loader.state_dict()
    assert state == {"epoch": 2, "round": 0, "batches": 2, "batch_size": 3, "size": 10}
    rest = list(it)

    data = _Counting()
    resumed = ResumableDataLoader(data, batch_size=3, shuffle=True, seed=4)
    resumed.load_state_dict(state)
    again = list(resumed)
    assert data.reads == 4 and _same(again, rest) and len(served + rest) == 4
    # The next epoch starts at its first batch.
    resumed.sampler.set_epoch(3)  # type: ignore[attr-defined]
    assert len(list(resumed)) == 4


def test_a_loaded_position_applies_to_its_own_epoch_only() -> None:
    dataset = TensorDataset(torch.arange(10))
    loader = ResumableDataLoader(dataset, batch_size=4, shuffle=True, seed=0)
    loader.load_state_dict({"epoch": 1, "round": 0, "batches": 2})
    loader.sampler.set_epoch(2)  # type: ignore[attr-defined]  # Lightning moved on: e.g. limit_train_batches=2
    assert len(list(loader)) == 3
    finished = ResumableDataLoader(dataset, batch_size=4, shuffle=True, seed=0)
    finished.load_state_dict({"epoch": 0, "round": 0, "batches": 3})
    assert finished.state_dict()["batches"] == 3  # pending, as loaded
    first_round = [b[0].tolist() for b in ResumableDataLoader(dataset, batch_size=4, shuffle=True, seed=0)]
    assert [b[0].tolist() for b in finished] == first_round  # same order, next round
    assert finished.state_dict() == {"epoch": 0, "round": 1, "batches": 3, "batch_size": 4, "size": 10}


def test_a_changed_batch_size_resumes_near_the_same_item_with_a_warning() -> None:
    loader = ResumableDataLoader(TensorDataset(torch.arange(12)), batch_size=2, shuffle=True, seed=0)
    loader.load_state_dict({"epoch": 0, "round": 0, "batches": 2, "batch_size": 4, "size": 12})
    with pytest.warns(UserWarning, match="batch_size=4.*near item 8"):
        assert len(list(loader)) == 2
    with pytest.raises(ValueError, match="keys 'epoch', 'round' and 'batches'"):
        loader.load_state_dict({"epoch": 0})
    with pytest.raises(TypeError, match="map-style"):
        ResumableDataLoader(_Stream())


class _Stream(torch.utils.data.IterableDataset[int]):
    def __iter__(self) -> Iterator[int]:
        return iter(range(3))


def test_seeded_global_rngs_restores_the_states() -> None:
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    with seeded_global_rngs(123):
        inside = torch.rand(3)
    with seeded_global_rngs(123):
        assert torch.equal(torch.rand(3), inside)
    assert torch.equal(torch.rand(3), expected)


def test_lightning_can_rebuild_the_loader_with_another_sampler() -> None:
    """DDP replaces the sampler by re-instantiating the loader from its arguments; the result still resumes."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DataLoader, DistributedSampler

    dataset = TensorDataset(torch.arange(10))
    with _replace_dunder_methods(DataLoader, "dataset"):
        loader = ResumableDataLoader(dataset, batch_size=2, shuffle=True, seed=0)
    sampler = DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=False)
    rebuilt = _update_dataloader(loader, sampler)
    assert isinstance(rebuilt, ResumableDataLoader) and rebuilt.sampler is sampler
    assert rebuilt.dataset.dataset is dataset  # type: ignore[attr-defined]
    rebuilt.load_state_dict({"epoch": 0, "round": 0, "batches": 1})
    assert [b[0].tolist() for b in rebuilt] == [[4, 6], [8]]  # rank 0's items 0, 2, 4, 6, 8 past one batch


# -- two streams: a datamodule source and a cycled target ------------------------------------------------------


class _Recorder(pl.Callback):
    def __init__(self) -> None:
        self.targets: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.targets.append(batch["target"].clone())


def _domain_fit(root: Path, *, stop: int | None = None, ckpt: Path | None = None) -> tuple[Any, list[Any]]:
    target = TensorDataset(torch.rand(20, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    data = DomainAdaptDataModule(_data(), target, target_batch_size=8)  # target: 3 batches, cycled
    recorder = _Recorder()
    torch.manual_seed(0)
    model = TransferModule(_backbone(), num_classes=10, input_size=(3, 16, 16), lr=0.01)
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", deterministic=True, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
        callbacks=[ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_last=True), recorder,
                   *([_StopAt(stop)] if stop is not None else [])],
    )  # fmt: skip
    if stop is None:
        trainer.fit(model, data, ckpt_path=ckpt)
    else:
        with pytest.raises(_Interrupted):
            trainer.fit(model, data)
    assert sorted(trainer.train_dataloader) == ["source", "target"]
    return _params(model), recorder.targets


def test_combined_streams_resume_mid_epoch_and_mid_cycle(tmp_path: Path, animal_mnist: None) -> None:
    full, seen = _domain_fit(tmp_path / "full")
    _domain_fit(tmp_path / "interrupted", stop=9)  # epoch 1, batch 4: the target stream in its second round
    resumed, seen_resumed = _domain_fit(tmp_path / "resumed", ckpt=tmp_path / "interrupted" / "last.ckpt")
    assert torch.equal(full, resumed)
    assert all(torch.equal(a, b) for a, b in zip(seen[9:], seen_resumed, strict=True))


def test_timm_transforms_of_image_folders_follow_the_seed_too(tmp_path: Path, animal_mnist: None) -> None:
    """Random resized crop, flip, colour jitter and RandAugment draw from torch's, random's and numpy's RNGs."""
    from image_folders import write_animal_folders

    from lt_finetune.data import ImageFolderDataModule

    folders = write_animal_folders(tmp_path, classes=2, train=4, val=1, new=0, size=24)

    def epoch(num_workers: int, global_seed: int, rand_augment: str | None) -> list[Any]:
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        data = ImageFolderDataModule(
            str(folders["train"]), val_dir=str(folders["val"]), image_size=16, batch_size=4,
            num_workers=num_workers, rand_augment=rand_augment,
        )  # fmt: skip
        data.setup("fit")
        return _epoch(data.train_dataloader(), 1)

    for rand_augment in (None, "rand-m9-mstd0.5"):
        base = epoch(0, 0, rand_augment)
        assert _same(base, epoch(0, 1, rand_augment)) and _same(base, epoch(2, 2, rand_augment))
