"""One validation module: a wrong argument reads the same in the module, the callbacks and the datamodules."""

from __future__ import annotations

import math
from typing import Any

import pytest

from lt_finetune import TransferModule
from lt_finetune.callbacks import FreezeBackbone, GradualUnfreeze, LayerwiseLR
from lt_finetune.data import AnimalMNISTDataModule
from lt_finetune.validation import check_bool, check_choice, check_float, check_int, check_names


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: GradualUnfreeze(every_n_epochs="2"), "Expected `every_n_epochs` to be an int, got '2' of type str."),
        (lambda: AnimalMNISTDataModule(batch_size="2"), "Expected `batch_size` to be an int, got '2' of type str."),
        (lambda: TransferModule("resnet18", lr="x"), "Expected `lr` to be a float, got 'x' of type str."),
        (lambda: TransferModule("resnet18", lr="1e-3"), "Expected `lr` to be a float, got '1e-3' of type str."),
        (lambda: LayerwiseLR(decay="0.5"), "Expected `decay` to be a float, got '0.5' of type str."),
        (lambda: FreezeBackbone(unfreeze_at_epoch=True), "Expected `unfreeze_at_epoch` to be an int, got True"),
        (lambda: TransferModule("resnet18", num_classes=2.0), "Expected `num_classes` to be an int, got 2.0"),
    ],
    ids=["callback", "datamodule", "module", "module_numeric_string", "decay", "bool_for_int", "float_for_int"],
)
def test_wrong_types_are_type_errors_in_one_template(build: Any, message: str) -> None:
    with pytest.raises(TypeError) as info:
        build()
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: GradualUnfreeze(every_n_epochs=0), "Expected `every_n_epochs` to be an int >= 1, got 0."),
        (lambda: AnimalMNISTDataModule(batch_size=0), "Expected `batch_size` to be an int >= 1, got 0."),
        (lambda: TransferModule("resnet18", lr=-1.0), "Expected `lr` to be in (0.0, inf), got -1.0."),
        (lambda: LayerwiseLR(decay=1.5), "Expected `decay` to be in (0.0, 1.0], got 1.5."),
    ],
    ids=["callback", "datamodule", "module", "decay"],
)
def test_values_out_of_range_are_value_errors_in_one_template(build: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        build()
    assert str(info.value) == message


def test_checks_return_normalised_values() -> None:
    assert check_int("n", 3, 1) == 3
    assert check_float("x", 2, 0.0) == 2.0 and isinstance(check_float("x", 2, 0.0), float)
    assert check_bool("flag", False) is False
    assert check_choice("mode", "eval", ["eval", "train"]) == "eval"
    assert check_names("groups", ("a", "b")) == ["a", "b"]
    assert check_names("groups", None, allow_none=True) is None


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: check_int("n", 0, 1, 5), ValueError),
        (lambda: check_int("n", 6, 1, 5), ValueError),
        (lambda: check_float("x", math.nan), ValueError),
        (lambda: check_float("x", 1.0, 0.0, 1.0, high_open=True), ValueError),
        (lambda: check_bool("flag", 1), TypeError),
        (lambda: check_choice("mode", True, [True, False]), ValueError),
        (lambda: check_names("groups", "layer1"), TypeError),
        (lambda: check_names("groups", []), ValueError),
        (lambda: check_names("groups", ["ok", 3]), TypeError),
    ],
)
def test_checks_refuse(call: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="Expected `"):
        call()
