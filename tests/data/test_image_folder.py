"""Tests of ImageFolderDataModule on tiny folders of real PNG and JPEG files."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from PIL import Image
from torchvision.transforms import CenterCrop, RandomHorizontalFlip, Resize

from lt_finetune.data import ImageFolderDataModule


def _write_images(folder: Path, counts: dict[str, int], size: tuple[int, int] = (20, 12), fmt: str = "png") -> Path:
    """Write ``counts[name]`` RGB images (``size`` is W x H) into ``folder/name``: gradients, distinct per image."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for c, (name, n) in enumerate(counts.items()):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rgb = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, (40 * c + 7 * i) % 256)], axis=-1)
            Image.fromarray(rgb.astype(np.uint8)).save(folder / name / f"img_{i:03d}.{fmt}")
    return folder


@pytest.fixture
def train_dir(tmp_path: Path) -> Path:
    return _write_images(tmp_path / "train", {"cat": 10, "dog": 5, "emu": 2})


def _dm(folder: Path, **kwargs: Any) -> ImageFolderDataModule:
    kwargs.setdefault("image_size", 16)
    return ImageFolderDataModule(str(folder), **kwargs)


def _targets(dataset: Any) -> list[int]:
    return torch.bincount(torch.tensor(dataset.targets), minlength=3).tolist()


# --- constructor ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"val_fraction": 0.0}, ValueError, r"Expected `val_fraction` to be in \(0.0, 1.0\), got 0.0"),
        ({"val_fraction": 1.0}, ValueError, r"Expected `val_fraction` to be in \(0.0, 1.0\), got 1.0"),
        ({"interpolation": "cubic"}, ValueError, r"Expected `interpolation` to be one of \['nearest', 'bilinear'"),
        ({"crop_pct": 1.5}, ValueError, r"Expected `crop_pct` to be in \(0.0, 1.0\], got 1.5"),
        ({"rand_augment": "augmix-m5"}, ValueError, "Expected `rand_augment` to be a timm RandAugment config string"),
        ({"rand_augment": "rand-q9"}, ValueError, "Unknown RandAugment config section"),
        ({"on_bad_image": "ignore"}, ValueError, r"Expected `on_bad_image` to be one of \['error', 'skip'\]"),
        ({"val_dir": 3}, TypeError, "Expected `val_dir` to be a folder path or None, got 3"),
        ({"num_workers": -1}, ValueError, "Expected `num_workers` to be an int >= 0, got -1"),
    ],
)
def test_constructor_rejects_bad_values(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ImageFolderDataModule("anywhere", **kwargs)


def test_builds_from_yaml_signature(train_dir: Path) -> None:
    parser = ArgumentParser()
    parser.add_class_arguments(ImageFolderDataModule, "data")
    yaml = f"data:\n  train_dir: {train_dir}\n  on_bad_image: skip\n  std: [0.5, 0.5, 0.5]\n  crop_pct: 0.9\n"
    dm = parser.instantiate_classes(parser.parse_string(yaml)).data
    assert isinstance(dm, ImageFolderDataModule)
    assert (dm.on_bad_image, dm.std, dm.crop_pct) == ("skip", (0.5, 0.5, 0.5), 0.9)


def test_from_data_config_takes_backbone_settings_and_kwargs_win(train_dir: Path) -> None:
    config = {
        "input_size": (3, 32, 32),
        "mean": [0.5, 0.5, 0.5],
        "std": (0.25, 0.25, 0.25),
        "interpolation": "bicubic",
        "crop_pct": 0.5,
        "crop_mode": "center",
    }
    dm = ImageFolderDataModule.from_data_config(str(train_dir), config, batch_size=4, std=(1.0, 1.0, 1.0))
    assert dm.data_config == {
        "input_size": (3, 32, 32),
        "mean": (0.5, 0.5, 0.5),
        "std": (1.0, 1.0, 1.0),
        "interpolation": "bicubic",
        "crop_pct": 0.5,
    }
    assert dm.batch_size == 4
    resize = dm.eval_transform.transforms[0]
    assert isinstance(resize, Resize) and resize.size == 64  # 32 / crop_pct
    with pytest.raises(ValueError, match=r"input_size'\]` to be a square \(C, H, W\), got \(3, 32, 48\)"):
        ImageFolderDataModule.from_data_config(str(train_dir), {"input_size": (3, 32, 48)})


# --- splits -----------------------------------------------------------------------------------------------------


def test_classes_before_setup_ignore_hidden_folders(train_dir: Path) -> None:
    (train_dir / ".ipynb_checkpoints").mkdir()
    dm = _dm(train_dir)
    assert dm.classes == ["cat", "dog", "emu"] and dm.num_classes == 3
    dm.setup("fit")
    assert dm.classes == ["cat", "dog", "emu"]


def test_val_split_is_stratified_disjoint_and_seeded(train_dir: Path) -> None:
    dm = _dm(train_dir, val_fraction=0.2)
    dm.setup("fit")
    assert _targets(dm.val_dataset) == [2, 1, 1]  # round(n * 0.2), at least 1 while the class has 2 images
    assert _targets(dm.train_dataset) == [8, 4, 1]
    train, val = set(dm.train_dataset.samples), set(dm.val_dataset.samples)
    assert not train & val and len(train | val) == 17
    assert all(Path(path).parent.name == dm.classes[target] for path, target in train | val)

    same = _dm(train_dir, val_fraction=0.2)
    same.setup("fit")
    assert same.val_dataset.samples == dm.val_dataset.samples
    other = _dm(train_dir, val_fraction=0.2, seed=1)
    other.setup("fit")
    assert other.val_dataset.samples != dm.val_dataset.samples


def test_explicit_val_and_test_dirs_use_train_class_indices(tmp_path: Path, train_dir: Path) -> None:
    val_dir = _write_images(tmp_path / "val", {"cat": 1, "dog": 2, "emu": 3})
    test_dir = _write_images(tmp_path / "test", {"cat": 2, "dog": 2, "emu": 2})
    dm = _dm(train_dir, val_dir=str(val_dir), test_dir=str(test_dir), batch_size=4)
    dm.setup("fit")
    assert _targets(dm.train_dataset) == [10, 5, 2]
    assert _targets(dm.val_dataset) == [1, 2, 3]
    assert _targets(dm.test_dataset) == [2, 2, 2]
    assert len(list(dm.predict_dataloader())) == 2  # predict reads the test split: 6 images in batches of 4


def test_predict_falls_back_to_val_and_test_loader_says_how_to_add_one(train_dir: Path) -> None:
    dm = _dm(train_dir, batch_size=100)
    with pytest.raises(RuntimeError, match=r"no train dataset yet; call `setup\(\)` first"):
        dm.train_dataloader()
    dm.setup("fit")
    (_, targets, indices) = next(iter(dm.predict_dataloader()))
    assert targets.tolist() == [t for _, t in dm.val_dataset.samples]
    assert indices.tolist() == list(range(len(dm.val_dataset)))
    with pytest.raises(RuntimeError, match=r"has no test split; pass `test_dir`"):
        dm.test_dataloader()


# --- transforms -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rand_augment", [None, "rand-m9-mstd0.5"])
def test_batches_have_the_requested_size_and_types(train_dir: Path, rand_augment: str | None) -> None:
    dm = _dm(train_dir, image_size=24, batch_size=4, rand_augment=rand_augment)
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        images, targets = next(iter(loader))
        assert images.shape == (4, 3, 24, 24) and images.dtype == torch.float32
        assert targets.shape == (4,) and targets.dtype == torch.int64
    names = [type(t).__name__ for t in dm.train_transform.transforms]
    assert ("RandAugment" in names) == (rand_augment is not None)


def test_eval_transform_is_deterministic_and_normalised(train_dir: Path) -> None:
    dm = _dm(train_dir, image_size=8, crop_pct=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    dm.setup("fit")
    image, _ = dm.val_dataset[0]
    assert torch.equal(image, dm.val_dataset[0][0])
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert [type(t) for t in dm.eval_transform.transforms[:2]] == [Resize, CenterCrop]


def test_hflip_false_removes_the_flip(train_dir: Path) -> None:
    def flips(dm: ImageFolderDataModule) -> list[float]:
        return [t.p for t in dm.train_transform.transforms if isinstance(t, RandomHorizontalFlip)]

    assert flips(_dm(train_dir)) == [0.5]
    assert flips(_dm(train_dir, hflip=False)) == []


# --- data errors ------------------------------------------------------------------------------------------------


def test_missing_folders_are_named(tmp_path: Path, train_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"`train_dir` '.*nowhere' does not exist"):
        _dm(tmp_path / "nowhere").setup("fit")
    with pytest.raises(FileNotFoundError, match=r"`train_dir` '.*nowhere' does not exist"):
        _ = _dm(tmp_path / "nowhere").classes
    with pytest.raises(FileNotFoundError, match=r"`test_dir` '.*gone' does not exist"):
        _dm(train_dir, test_dir=str(tmp_path / "gone")).setup("fit")


def test_folder_without_class_subfolders(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    _write_images(tmp_path, {"flat": 3})  # images directly in the folder, no class level
    with pytest.raises(FileNotFoundError, match=r"`train_dir` '.*flat' has no class sub-folders; expected the layout"):
        _dm(flat).setup("fit")


def test_empty_class_folder_is_named(train_dir: Path) -> None:
    (train_dir / "fox").mkdir()
    (train_dir / "fox" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=r"class folder\(s\) \['.*fox'\] of `train_dir` hold no image files"):
        _dm(train_dir).setup("fit")


def test_class_sets_that_differ_are_listed(tmp_path: Path, train_dir: Path) -> None:
    val_dir = _write_images(tmp_path / "val", {"cat": 1, "dog": 1, "yak": 1})
    with pytest.raises(ValueError, match=r"missing from val_dir: \['emu'\]; missing from train_dir: \['yak'\]"):
        _dm(train_dir, val_dir=str(val_dir)).setup("fit")
    test_dir = _write_images(tmp_path / "test", {"cat": 1, "dog": 1})
    with pytest.raises(
        ValueError, match=r"`test_dir` .* missing from test_dir: \['emu'\]; missing from train_dir: \[\]"
    ):
        _dm(train_dir, test_dir=str(test_dir)).setup("fit")


def _add_bad_images(train_dir: Path) -> None:
    (train_dir / "cat" / "text.png").write_text("not an image")
    good = (train_dir / "dog" / "img_000.png").read_bytes()
    (train_dir / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])


def test_bad_images_raise_with_paths_and_the_skip_option(train_dir: Path) -> None:
    _add_bad_images(train_dir)
    with pytest.raises(ValueError, match=r"2 image file\(s\) cannot be opened: '.*text\.png' \(Unidentified") as info:
        _dm(train_dir).setup("fit")
    assert "truncated.png" in str(info.value) and "on_bad_image='skip'" in str(info.value)


def test_bad_images_skipped_with_one_warning(train_dir: Path) -> None:
    _add_bad_images(train_dir)
    _write_images(train_dir, {"cat": 1}, fmt="jpg")  # another format, readable
    dm = _dm(train_dir, on_bad_image="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    ours = [w for w in caught if "ImageFolderDataModule" in str(w.message)]
    assert len(ours) == 1 and "skipped 2 image file(s)" in str(ours[0].message)
    samples = dm.train_dataset.samples + dm.val_dataset.samples
    paths = [Path(p).name for p, _ in samples]
    assert len(paths) == 18 and "img_000.jpg" in paths  # 17 PNGs and the JPEG
    assert "text.png" not in paths and "truncated.png" not in paths


def test_class_left_empty_by_skipping_is_named(train_dir: Path) -> None:
    for path in (train_dir / "emu").iterdir():
        path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="skipped 2"), pytest.raises(ValueError, match=r"every image file in .*emu'"):
        _dm(train_dir, on_bad_image="skip").setup("fit")


def test_predict_dir_is_searched_recursively_without_class_folders(tmp_path: Path, train_dir: Path) -> None:
    new = _write_images(tmp_path / "new", {"a": 2, "b/c": 1}, fmt="jpg")
    Image.new("L", (9, 7)).save(new / "gray.png")
    (new / ".hidden.png").write_bytes((new / "gray.png").read_bytes())
    (new / "notes.txt").write_text("not an image")
    dm = _dm(train_dir, predict_dir=str(new), batch_size=10)
    dm.setup("predict")
    images, targets, indices = next(iter(dm.predict_dataloader()))
    expected = sorted([str(new / "gray.png"), *(str(p) for p in new.rglob("img_*.jpg"))])
    assert dm.predict_dataset.paths == expected and len(expected) == 4
    assert tuple(images.shape) == (4, 3, 16, 16) and targets.tolist() == [-1] * 4 and indices.tolist() == [0, 1, 2, 3]


def test_predict_dir_errors_name_the_argument(tmp_path: Path, train_dir: Path) -> None:
    (tmp_path / "empty").mkdir()
    for folder, match in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "holds no image files")):
        dm = _dm(train_dir, predict_dir=str(folder))
        with pytest.raises(FileNotFoundError, match=f"`predict_dir` '{folder}' {match}"):
            dm.setup("predict")
