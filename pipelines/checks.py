"""Checks of the numbers and tensors that arrive from outside: command-line options, web requests, files.

Every value is hostile until checked: a bool is not a number, NaN and infinity are not settings, and a weight
file may hold integers or non-finite values. Each check raises `InvalidSetting` (or `InvalidAdapter` for
tensors) with one line that names the value and the range it must lie in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral, Real

import torch

from pipelines.errors import InvalidAdapter, InvalidSetting

__all__ = ["InvalidSetting", "MAX_SEED", "check_weights", "real_number", "seed", "whole_number"]

MAX_SEED = 2**32 - 1  # what numpy, torch and diffusers' pipelines all accept as a seed


def whole_number(value: object, label: str, low: int, high: int) -> int:
    """`value` as an int in [low, high]; a float is accepted only when it is finite and whole (3.0, not 3.5)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidSetting(f"{label} must be a whole number between {low} and {high}, not {value!r}")
    if not isinstance(value, Integral):
        if not math.isfinite(value) or value != int(value):
            raise InvalidSetting(f"{label} must be a whole number between {low} and {high}, not {value!r}")
    number = int(value)
    if not low <= number <= high:
        raise InvalidSetting(f"{label} must be between {low} and {high}, not {value!r}")
    return number


def real_number(value: object, label: str, low: float, high: float, *, above_low: bool = False) -> float:
    """`value` as a finite float in [low, high] (or (low, high] with `above_low`)."""
    interval = f"{'above' if above_low else 'between'} {low:g} {'and at most' if above_low else 'and'} {high:g}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidSetting(f"{label} must be a number {interval}, not {value!r}")
    number = float(value)
    if not math.isfinite(number) or number > high or number < low or (above_low and number == low):
        raise InvalidSetting(f"{label} must be a number {interval}, not {value!r}")
    return number


def seed(value: object, label: str = "seed") -> int:
    return whole_number(value, label, 0, MAX_SEED)


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_weights(tensors: Mapping[str, torch.Tensor], label: str) -> None:
    """Refuse adapter weights that are not floating point or hold NaN or infinite values."""
    for key, value in tensors.items():
        if value.dtype not in FLOAT_DTYPES:
            raise InvalidAdapter(f"{label}: {key} holds {str(value.dtype).removeprefix('torch.')} values; "
                                 "LoRA weights are floating point")
        if value.numel() and not bool(torch.isfinite(value).all()):
            raise InvalidAdapter(f"{label}: {key} holds NaN or infinite values; the adapter is broken")
