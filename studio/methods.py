"""The training methods the studio offers: the registered recipes (`pipelines.recipes`), and the models and
defaults that go with each.

`METHODS` is the recipe registry itself (key -> `RecipeSpec`), so a recipe registered later (a test's, a
plugin's) is offered too. A built-in recipe whose package cannot be imported is left out and named in
`unavailable()` instead of breaking the app.
"""

from __future__ import annotations

from typing import Any

from pipelines.models import REGISTRY, ModelSpec, resolve_model
from pipelines.recipes import UNAVAILABLE, RecipeSpec, load_builtin, recipe_for

Method = RecipeSpec
METHODS: dict[str, RecipeSpec] = load_builtin()

ADAPTER_LABELS = {
    "lora": "LoRA",
    "dylora": "DyLoRA · every rank up to the chosen one, in one run",
    "sora": "SoRA · gated ranks, the unused ones pruned",
}


def method_for(key: str) -> RecipeSpec:
    return recipe_for(key)


def unavailable() -> list[str]:
    """The built-in recipe packages this build could not import."""
    return sorted(UNAVAILABLE)


def models_for(arch: str) -> list[ModelSpec]:
    """The registry models of `arch` the studio offers (full-size random-weight models are for benchmarks)."""
    return [spec for spec in REGISTRY.values() if spec.arch == arch and not spec.random_weights]


def check_model(name: str, arch: str) -> ModelSpec:
    """Only registry models from the web: a path or arbitrary Hub id would let a visitor load anything."""
    if not isinstance(name, str) or name not in REGISTRY or REGISTRY[name].random_weights:
        raise ValueError(f"unknown base model {name!r}; choose one of the list")
    spec = resolve_model(name)
    if spec.arch != arch:
        raise ValueError(f"{name} is a {spec.arch.upper()} model; this method needs {arch.upper()}")
    return spec


def training_defaults(method: RecipeSpec, spec: ModelSpec) -> dict[str, Any]:
    """What the Train tab starts with: the recipe's defaults, shortened on the tiny models."""
    values = method.defaults()
    steps = int(values.get("steps", 1000))
    if spec.tiny:
        steps = min(steps, 50)
    return {
        "steps": steps,
        "rank": int(values.get("rank", 64)),
        "learning_rate": float(values.get("learning_rate", 5e-5)),
        "seed": int(values.get("seed", 0)),
        "sample_every": max(1, steps // 10),
    }
