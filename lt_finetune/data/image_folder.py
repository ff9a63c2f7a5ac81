"""A datamodule for image files laid out one sub-folder per class, with timm's transforms."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import rand_augment_transform
from torch import Tensor
from torch.utils.data import Dataset, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS
from typing_extensions import override

from lt_finetune.data._common import ImageDataModuleBase, stratified_fraction_split
from lt_finetune.inference import image_files, load_rgb
from lt_finetune.validation import check_choice, check_float

__all__ = ["ImageFolderDataModule"]

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
_SHOWN_PATHS = 5  # bad files listed in an error or warning


class _ImageFileDataset(Dataset[tuple[Tensor, int]]):
    """``(path, class index)`` samples read with PIL as RGB, like torchvision's ``ImageFolder``.

    A file that cannot be decoded (corrupt pixel data passes :meth:`ImageFolderDataModule.setup`'s check) raises an
    ``OSError`` naming it with ``on_bad_image="error"``; with ``"skip"`` the item is ``None``, :attr:`collate_fn`
    leaves it out of its batch, and one warning per file names it.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Callable[[Image.Image], Tensor],
        on_bad_image: str = "error",
        source: str | None = None,
    ) -> None:
        self.samples = list(samples)
        self.targets = [target for _, target in self.samples]
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.source = source
        self.collate_fn = _collate_readable if on_bad_image == "skip" else None
        self._warned: set[str] = set()

    @property
    def paths(self) -> list[str]:
        """The image files, in dataset order."""
        return [path for path, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:  # type: ignore[override]
        path, target = self.samples[index]
        try:
            image = load_rgb(path)
        except OSError as err:
            if self.on_bad_image == "error":
                raise OSError(
                    f"ImageFolderDataModule: {err}. Fix or remove it, or pass `on_bad_image='skip'` to leave "
                    "unreadable files out with a warning."
                ) from err
            if path not in self._warned:
                self._warned.add(path)
                rank_zero_warn(f"ImageFolderDataModule: skipped an unreadable image (on_bad_image='skip'): {err}.")
            return None
        return self.transform(image), target


def _collate_readable(batch: list[Any]) -> Any:
    """``default_collate`` over the items that are not ``None`` (files skipped as unreadable)."""
    items = [item for item in batch if item is not None]
    if not items:
        raise OSError(
            f"ImageFolderDataModule: all {len(batch)} images of a batch are unreadable (on_bad_image='skip'); "
            "see the warnings above for their files."
        )
    return default_collate(items)


def _class_folders(folder: Path, arg: str) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``folder``; errors name ``arg`` and the fix."""
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(
            f"ImageFolderDataModule: `{arg}` '{folder}' {what}; pass a folder with one sub-folder of images per class."
        )
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(
            f"ImageFolderDataModule: `{arg}` '{folder}' has no class sub-folders; expected the layout "
            f"{folder}/<class name>/<image files>."
        )
    return classes


def _image_files(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively, following links as torchvision does), sorted."""
    files = []
    for dirpath, _, filenames in sorted(os.walk(folder, followlinks=True)):
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS)]
    return files


def _scan(folder: Path, arg: str) -> dict[str, list[str]]:
    """Map every class of ``folder`` to its image files; raise on an empty class folder."""
    files = {name: _image_files(folder / name) for name in _class_folders(folder, arg)}
    empty = [str(folder / name) for name, paths in files.items() if not paths]
    if empty:
        raise FileNotFoundError(
            f"ImageFolderDataModule: class folder(s) {empty} of `{arg}` hold no image files (extensions "
            f"{', '.join(IMG_EXTENSIONS)}); add images or remove the folder(s)."
        )
    return files


def _check_image(path: str) -> str | None:
    """``None`` if PIL can identify and verify ``path`` without decoding it, else the reason it cannot."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) for bad files
        return f"{type(err).__name__}: {err}"
    return None


def _bad_images(paths: Sequence[str]) -> list[tuple[str, str]]:
    """``(path, reason)`` for every file of ``paths`` that PIL cannot open, in ``paths`` order."""
    # Sequential: about 0.1 ms a file on a local disk, where a thread pool measured slower (GIL-bound).
    checked = ((path, _check_image(path)) for path in paths)
    return [(path, reason) for path, reason in checked if reason is not None]


class ImageFolderDataModule(ImageDataModuleBase):
    """Images in ``<dir>/<class name>/<file>`` folders, transformed by timm's ImageNet train and eval recipes.

    Class names are the sub-folder names of ``train_dir``, sorted (hidden folders such as
    ``.ipynb_checkpoints`` are ignored); ``classes`` and ``num_classes`` are available right after construction
    (reading them lists ``train_dir``'s sub-folders) and every split uses ``train_dir``'s class indices. Without
    ``val_dir``, ``val_fraction`` of every class of ``train_dir`` is held out for validation, drawn with ``seed``.

    The train transform is :func:`timm.data.create_transform` with ``is_training=True``: random resized crop,
    horizontal flip (probability 0.5 with ``hflip``, else 0), and RandAugment when ``rand_augment`` is given
    (colour jitter otherwise). Validation and test use timm's eval transform: resize to
    ``image_size / crop_pct`` and centre crop. :meth:`from_data_config` takes these settings from a backbone's
    timm data config.

    :meth:`setup` checks the data before training starts: every folder exists, has class sub-folders, no class
    folder is empty, and all splits have the same classes. It also opens every image file with PIL
    (``Image.open`` and ``verify()``, about 0.1 ms a file, without decoding pixels): this catches non-images and
    truncated files, though a file corrupt inside its pixel data can still fail when read in training. Files
    that fail raise an error listing them with ``on_bad_image="error"``; with ``"skip"`` they are left out and
    one warning (on rank zero) gives their count.

    Loading, normalisation, ``hflip`` and Mixup/CutMix are set by the shared arguments of
    :class:`~lt_finetune.data.ImageDataModuleBase`, documented there once.

    Args:
        train_dir: Folder of training images, one sub-folder per class.
        val_dir: Folder of validation images with the same class sub-folders; ``None`` splits ``train_dir``.
        test_dir: Folder of test images with the same class sub-folders; ``None`` for no test split.
        predict_dir: Folder of images to predict on, searched recursively; it needs no class sub-folders.
            ``predict`` uses it, else the test split, else the validation split (and logs which).
        val_fraction: Fraction of every class held out for validation when ``val_dir`` is ``None``, in (0, 1).
        interpolation: Resize interpolation, one of ``nearest``, ``bilinear``, ``bicubic``, ``box``, ``hamming``,
            ``lanczos``.
        crop_pct: Eval centre-crop fraction; ``None`` for timm's default (0.875).
        rand_augment: timm RandAugment config string such as ``"rand-m9-mstd0.5"``; ``None`` for none.
        on_bad_image: What :meth:`setup` does with image files PIL cannot open: ``"error"`` or ``"skip"``.
        **kwargs: The shared arguments of ``ImageDataModuleBase`` (``image_size``, ``batch_size``,
            ``num_workers``, ``seed``, ``mean``, ``std``, ``hflip``, ``mixup_alpha``, ``cutmix_alpha``,
            ``label_smoothing``); ``seed`` also draws the validation split when ``val_dir`` is ``None``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an argument is out of range or not a known option.

    Example::

        >>> dm = ImageFolderDataModule("data/train", test_dir="data/test", image_size=160)  # doctest: +SKIP
        >>> dm.setup("fit")  # doctest: +SKIP
    """

    def __init__(
        self,
        train_dir: str,
        val_dir: str | None = None,
        test_dir: str | None = None,
        predict_dir: str | None = None,
        val_fraction: float = 0.2,
        interpolation: str = "bilinear",
        crop_pct: float | None = None,
        rand_augment: str | None = None,
        on_bad_image: Literal["error", "skip"] = "error",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (
            ("train_dir", train_dir),
            ("val_dir", val_dir),
            ("test_dir", test_dir),
            ("predict_dir", predict_dir),
        ):
            if not isinstance(value, (str, os.PathLike)) and not (value is None and name != "train_dir"):
                allowed = "a folder path" + (" or None" if name != "train_dir" else "")
                raise TypeError(f"Expected `{name}` to be {allowed}, got {value!r} of type {type(value).__name__}.")
        self.train_dir = str(train_dir)
        self.val_dir = None if val_dir is None else str(val_dir)
        self.test_dir = None if test_dir is None else str(test_dir)
        self.predict_dir = None if predict_dir is None else str(predict_dir)
        self.val_fraction = check_float("val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        self.interpolation = check_choice("interpolation", interpolation, _INTERPOLATIONS)
        self.crop_pct = None if crop_pct is None else check_float("crop_pct", crop_pct, 0.0, 1.0, low_open=True)
        if rand_augment is not None:
            _check_rand_augment(rand_augment)
        self.rand_augment = rand_augment
        self.on_bad_image = check_choice("on_bad_image", on_bad_image, ("error", "skip"))
        self.train_transform: Callable[[Image.Image], Tensor] = create_transform(
            self.image_size,
            is_training=True,
            hflip=0.5 if self.hflip else 0.0,
            auto_augment=rand_augment,
            interpolation=interpolation,
            mean=self.mean,
            std=self.std,
        )
        self.eval_transform: Callable[[Image.Image], Tensor] = create_transform(
            self.image_size,
            is_training=False,
            interpolation=interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=self.crop_pct,
        )
        self._classes: list[str] | None = None

    _missing_split_hints = {"test": "pass `test_dir`, a folder with the same class sub-folders as `train_dir`"}

    @classmethod
    def from_data_config(cls, train_dir: str, data_config: Mapping[str, Any], **kwargs: Any) -> ImageFolderDataModule:
        """Build a datamodule whose input settings match a backbone's timm data config.

        Args:
            train_dir: Folder of training images, one sub-folder per class.
            data_config: A timm data config such as ``timm.data.resolve_data_config(model=model)``; its
                ``input_size`` ``(C, H, W)`` (square), ``mean``, ``std``, ``interpolation`` and ``crop_pct`` are
                used where present, other keys are ignored.
            **kwargs: Other constructor arguments; they take precedence over ``data_config``.

        Returns:
            The datamodule.

        Raises:
            ValueError: If ``input_size`` is not a square ``(C, H, W)``.

        Example::

            >>> config = {"input_size": (3, 160, 160), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
            ...           "interpolation": "bicubic", "crop_pct": 0.95, "crop_mode": "center"}
            >>> dm = ImageFolderDataModule.from_data_config("data/train", config, batch_size=32)
            >>> dm.data_config["input_size"], dm.interpolation
            ((3, 160, 160), 'bicubic')
        """
        settings: dict[str, Any] = {}
        if "input_size" in data_config:
            size = tuple(data_config["input_size"])
            if len(size) != 3 or size[1] != size[2]:
                raise ValueError(
                    f"Expected `data_config['input_size']` to be a square (C, H, W), got {size}; "
                    "pass `image_size` to choose the side."
                )
            settings["image_size"] = int(size[1])
        for key in ("mean", "std"):
            if key in data_config:
                settings[key] = tuple(float(v) for v in data_config[key])
        for key in ("interpolation", "crop_pct"):
            if key in data_config:
                settings[key] = data_config[key]
        settings.update(kwargs)
        return cls(train_dir, **settings)

    @property
    @override
    def classes(self) -> list[str]:
        """Sorted class sub-folder names of ``train_dir``, read on first access.

        Raises:
            FileNotFoundError: If ``train_dir`` is missing or has no class sub-folders.
        """
        if self._classes is None:
            self._classes = _class_folders(Path(self.train_dir), "train_dir")
        return list(self._classes)

    @property
    @override
    def data_config(self) -> dict[str, Any]:
        """timm-style input settings: ``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``."""
        return {**super().data_config, "interpolation": self.interpolation, "crop_pct": self.crop_pct}

    @override
    def setup(self, stage: str) -> None:
        """Check the folders and image files, then build the datasets (once; later calls return at once).

        Raises:
            FileNotFoundError: If a folder is missing, has no class sub-folders or has an empty class folder.
            ValueError: If the splits' class sets differ, or files cannot be opened with ``on_bad_image="error"``.
        """
        if stage == "predict" and self.predict_dir is not None and self.predict_dataset is None:
            self._setup_predict(self.predict_dir)
        if self.train_dataset is not None:
            return
        folders = {"train_dir": self.train_dir, "val_dir": self.val_dir, "test_dir": self.test_dir}
        scans = {arg: _scan(Path(folder), arg) for arg, folder in folders.items() if folder is not None}
        classes = list(scans["train_dir"])
        for arg, files in scans.items():
            if list(files) != classes:
                missing = sorted(set(classes) - set(files))
                extra = sorted(set(files) - set(classes))
                raise ValueError(
                    f"ImageFolderDataModule: the class folders of `{arg}` '{folders[arg]}' differ from those of "
                    f"`train_dir` '{self.train_dir}': missing from {arg}: {missing}; missing from train_dir: "
                    f"{extra}. Give every split the same class sub-folders."
                )
        bad = _bad_images([path for files in scans.values() for paths in files.values() for path in paths])
        if bad:
            shown = "; ".join(f"'{path}' ({reason})" for path, reason in bad[:_SHOWN_PATHS])
            more = f" and {len(bad) - _SHOWN_PATHS} more" if len(bad) > _SHOWN_PATHS else ""
            if self.on_bad_image == "error":
                raise ValueError(
                    f"ImageFolderDataModule: {len(bad)} image file(s) cannot be opened: {shown}{more}. Fix or "
                    "remove them, or pass `on_bad_image='skip'` to leave them out with a warning."
                )
            rank_zero_warn(
                f"ImageFolderDataModule: skipped {len(bad)} image file(s) that cannot be opened "
                f"(on_bad_image='skip'): {shown}{more}."
            )
            dropped = {path for path, _ in bad}
            for arg, files in scans.items():
                for name, paths in files.items():
                    files[name] = [p for p in paths if p not in dropped]
                    if not files[name]:
                        raise ValueError(
                            f"ImageFolderDataModule: every image file in class folder "
                            f"'{Path(folders[arg] or '') / name}' of `{arg}` cannot be opened; fix or remove them."
                        )
        samples = {arg: [(p, i) for i, name in enumerate(classes) for p in files[name]] for arg, files in scans.items()}
        self._classes = classes
        train_samples = samples["train_dir"]
        if self.val_dir is None:
            targets = torch.tensor([target for _, target in train_samples])
            train_idx, val_idx = stratified_fraction_split(targets, len(classes), self.val_fraction, self.seed)
            val_samples = [train_samples[i] for i in val_idx.tolist()]
            train_samples = [train_samples[i] for i in train_idx.tolist()]
        else:
            val_samples = samples["val_dir"]
        skip = self.on_bad_image
        self.train_dataset = _ImageFileDataset(train_samples, self.train_transform, skip)
        self.val_dataset = _ImageFileDataset(val_samples, self.eval_transform, skip, "the validation split")
        if self.test_dir is not None:
            self.test_dataset = _ImageFileDataset(samples["test_dir"], self.eval_transform, skip, "the test split")

    def _setup_predict(self, folder: str) -> None:
        """Build the predict split: every image file under ``folder``, unlabelled (target -1)."""
        try:
            files = image_files(folder)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"ImageFolderDataModule: `predict_dir` {err}") from None
        bad = _bad_images(files)
        if bad:
            shown = "; ".join(f"'{path}' ({reason})" for path, reason in bad[:_SHOWN_PATHS])
            more = f" and {len(bad) - _SHOWN_PATHS} more" if len(bad) > _SHOWN_PATHS else ""
            if self.on_bad_image == "error" or len(bad) == len(files):
                raise ValueError(
                    f"ImageFolderDataModule: {len(bad)} image file(s) of `predict_dir` cannot be opened: {shown}"
                    f"{more}. Fix or remove them, or pass `on_bad_image='skip'` to leave them out with a warning."
                )
            rank_zero_warn(f"ImageFolderDataModule: skipped {len(bad)} image file(s) of `predict_dir`: {shown}{more}.")
            dropped = {path for path, _ in bad}
            files = [f for f in files if f not in dropped]
        source = f"predict_dir '{folder}'"
        samples = [(f, -1) for f in files]
        self.predict_dataset = _ImageFileDataset(samples, self.eval_transform, self.on_bad_image, source)


def _check_rand_augment(config: str) -> None:
    """Raise a ``ValueError`` unless timm parses ``config`` as a RandAugment config string."""
    error = None
    if isinstance(config, str) and config.startswith("rand"):
        try:
            rand_augment_transform(config, {})
            return
        except (AssertionError, ValueError, KeyError) as err:
            error = err
    reason = f" ({error})" if error is not None and str(error) else ""
    raise ValueError(
        f"Expected `rand_augment` to be a timm RandAugment config string such as 'rand-m9-mstd0.5' or None, "
        f"got {config!r}{reason}."
    )
