"""Checks of a method config's fields: one line naming the method, the field and what it may hold.

Numbers are refused when they are bools (`True` is an int to Python), NaN or infinite.
"""

from __future__ import annotations

import math
from typing import Any

from pipelines.adapters.core import AdapterError


def check_int(method: str, name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> None:
    upper = f" and at most {maximum}" if maximum is not None else ""
    if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
            or (maximum is not None and value > maximum)):
        raise AdapterError(f"{method} {name} must be a whole number of at least {minimum}{upper}, not {value!r}")


def check_number(method: str, name: str, value: Any, low: float, high: float = math.inf, *,
                 low_open: bool = False, high_open: bool = False) -> None:
    """`value` must lie in [low, high] (an open end excludes it); `high=inf` means no upper bound."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > low if low_open else value >= low)
          and (value < high if high_open else value <= high))
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open or math.isinf(high) else "]"
        raise AdapterError(f"{method} {name} must be a finite number in {left}{low:g}, {high:g}{right}, not {value!r}")


def check_choice(method: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    # `True == 1`, so compare types too: 1 is not the choice True.
    if not any(type(value) is type(c) and value == c for c in choices):
        raise AdapterError(f"{method} {name} must be one of {', '.join(repr(c) for c in choices)}, not {value!r}")
