"""Argument checks shared by the module, the callbacks and the datamodules: one mistake reads the same everywhere.

Every check returns the (normalised) value, so constructors read ``self.lr = check_float("lr", lr, 0, low_open=True)``.
Wrong types raise ``TypeError``, values out of range ``ValueError``, both in one template::

    Expected `every_n_epochs` to be an int, got '2' of type str.
    Expected `decay` to be in (0.0, 1.0], got 1.5.

Third-party callbacks and policies may use these checks too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

__all__ = ["check_bool", "check_choice", "check_float", "check_int", "check_names", "check_optional_int"]

T = TypeVar("T")


def _describe(value: object) -> str:
    return f"{value!r} of type {type(value).__name__}"


def check_int(name: str, value: object, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` if it is an int (not a bool) in ``[minimum, maximum]``, else raise.

    Raises:
        TypeError: If ``value`` is not an int.
        ValueError: If ``value`` lies outside the bounds.

    Example::

        >>> check_int("batch_size", 8, 1)
        8
        >>> check_int("batch_size", "8", 1)
        Traceback (most recent call last):
        ...
        TypeError: Expected `batch_size` to be an int, got '8' of type str.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected `{name}` to be an int, got {_describe(value)}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"Expected `{name}` to be an int >= {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"Expected `{name}` to be an int <= {maximum}, got {value}.")
    return value


def check_optional_int(name: str, value: object, minimum: int | None = None) -> int | None:
    """:func:`check_int`, with ``None`` allowed (and returned)."""
    return None if value is None else check_int(name, value, minimum)


def check_float(
    name: str,
    value: object,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float if it is a real number in the interval, else raise.

    The interval is ``[low, high]``; ``low_open``/``high_open`` exclude an end. Infinite ends are always open.

    Raises:
        TypeError: If ``value`` is not a real number (a bool or a string is not).
        ValueError: If ``value`` is NaN or lies outside the interval.

    Example::

        >>> check_float("lr", 1e-3, 0.0, low_open=True)
        0.001
        >>> check_float("decay", 1.5, 0.0, 1.0, low_open=True)
        Traceback (most recent call last):
        ...
        ValueError: Expected `decay` to be in (0.0, 1.0], got 1.5.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected `{name}` to be a float, got {_describe(value)}.")
    number = float(value)
    too_low = number <= low if low_open else number < low
    too_high = number >= high if high_open else number > high
    if math.isnan(number) or too_low or too_high:
        left = "(" if low_open or not math.isfinite(low) else "["
        right = ")" if high_open or not math.isfinite(high) else "]"
        raise ValueError(f"Expected `{name}` to be in {left}{float(low)}, {float(high)}{right}, got {number}.")
    return number


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a bool, else raise ``TypeError``."""
    if not isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be a bool, got {_describe(value)}.")
    return value


def check_choice(name: str, value: T, choices: Sequence[T]) -> T:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError`` listing them.

    Example::

        >>> check_choice("bn_mode", "frozen", ["eval", "train"])
        Traceback (most recent call last):
        ...
        ValueError: Expected `bn_mode` to be one of ['eval', 'train'], got 'frozen'.
    """
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {list(choices)}, got {value!r}.")
    return value


def check_names(name: str, value: Any, *, allow_none: bool = False) -> list[str] | None:
    """Return a non-empty list of strings (group names or patterns) from a sequence; a lone string is refused.

    Raises:
        TypeError: If ``value`` is a string or not a sequence of strings.
        ValueError: If ``value`` is empty.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"Expected `{name}` to be a list of names or patterns, got {_describe(value)}.")
    items = list(value)
    if not items:
        raise ValueError(f"Expected `{name}` to be a non-empty list of names or patterns, got {items!r}.")
    for item in items:
        if not isinstance(item, str) or not item:
            raise TypeError(f"Expected `{name}` to hold non-empty strings, got {_describe(item)}.")
    return items
