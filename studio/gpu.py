"""`@gpu`: Hugging Face ZeroGPU's `@spaces.GPU` where the `spaces` package is installed, a no-op elsewhere.

On ZeroGPU a GPU is attached only while a decorated function runs, so every handler that generates images
is decorated. Training runs in a background worker and needs dedicated GPU hardware (see the README).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


def on_zero_gpu() -> bool:
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def gpu(fn: F | None = None, *, duration: int | None = None):
    """Decorate `fn` with `spaces.GPU` (optionally with a `duration` in seconds) when available."""

    def wrap(func: F) -> F:
        try:
            import spaces
        except ImportError:
            return func
        return spaces.GPU(duration=duration)(func) if duration else spaces.GPU(func)

    return wrap(fn) if fn is not None else wrap
