"""Datamodules yielding ``(images float32 [B, 3, H, W], targets int64 [B])`` batches.

:class:`ImageFolderDataModule` reads class-per-folder image files with timm's transforms;
:class:`AnimalMNISTDataModule` serves the small offline Animal-MNIST set for demos and tests. Both take the shared
arguments of :class:`ImageDataModuleBase` (batch size, loaders, normalisation, flips, Mixup/CutMix), whose
training batches are mixed by the rule of :func:`mix_labelled_batch`. Their training loaders are
:class:`ResumableDataLoader`: a run resumed mid-epoch from a checkpoint continues the epoch where it stopped, and
augmentation is a function of ``(seed, epoch, index)`` (:func:`sample_seed`), not of the global RNG.
"""

from lt_finetune.data._common import ImageDataModuleBase, mix_labelled_batch
from lt_finetune.data._resumable import EpochShuffleSampler, ResumableDataLoader, TrainLoaderStates, sample_seed
from lt_finetune.data.animal_mnist import ANIMAL_MNIST_CLASSES, AnimalMNISTDataModule, load_animal_mnist
from lt_finetune.data.digits import MNIST5kDataModule, UCIDigitsDataModule
from lt_finetune.data.domain_adapt import DomainAdaptDataModule
from lt_finetune.data.image_folder import ImageFolderDataModule

__all__ = [
    "ANIMAL_MNIST_CLASSES",
    "AnimalMNISTDataModule",
    "DomainAdaptDataModule",
    "EpochShuffleSampler",
    "ImageDataModuleBase",
    "ImageFolderDataModule",
    "MNIST5kDataModule",
    "ResumableDataLoader",
    "TrainLoaderStates",
    "UCIDigitsDataModule",
    "load_animal_mnist",
    "mix_labelled_batch",
    "sample_seed",
]
