"""The training methods the studio offers, and the models and defaults that go with each.

A method names its recipe module, request class and train function (`train_blora`, `train_splitflux`: same
contract). A method whose module is not installed shows as unavailable instead of breaking the app.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipelines.models import REGISTRY, ModelSpec, resolve_model


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    arch: str
    module: str
    request: str
    train: str
    blurb: str
    # Request values the studio does not ask for but derives from the rank (rank, recipe defaults) -> values.
    extras: Callable[[int, dict], dict] | None = None
    # The adapters the recipe can train its blocks with (`adapter` of its request); the first is the default.
    adapters: tuple[str, ...] = ("lora",)
    # What the Train form's token box shows while empty: the tokens this method makes by itself.
    token_hint: str = "automatic"

    @property
    def available(self) -> bool:
        try:
            return importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):
            return False

    def functions(self) -> tuple[type, Any]:
        """The request dataclass and the train function."""
        module = importlib.import_module(self.module)
        return getattr(module, self.request), getattr(module, self.train)

    def build_request(self, **values: Any):
        """A request from the values its dataclass knows; the others (a method's extras) are left out."""
        request_cls, _ = self.functions()
        known = {f.name for f in dataclasses.fields(request_cls)}
        return request_cls(**{k: v for k, v in values.items() if k in known})

    def extra_values(self, rank: int) -> dict[str, Any]:
        """The method's own request values for `rank` (raises ValueError when the rank does not suit it)."""
        return self.extras(rank, self.defaults()) if self.extras else {}

    def defaults(self) -> dict[str, Any]:
        """The request dataclass's own defaults (steps, rank, learning rate, ...)."""
        if not self.available:
            return {}
        request_cls, _ = self.functions()
        return {f.name: f.default for f in dataclasses.fields(request_cls)
                if f.default is not dataclasses.MISSING}


ADAPTER_LABELS = {
    "lora": "LoRA",
    "dylora": "DyLoRA · every rank up to the chosen one, in one run",
    "sora": "SoRA · gated ranks, the unused ones pruned",
}


def _splitflux_extras(rank: int, defaults: dict) -> dict:
    """SplitFlux divides its content LoRA into a content branch and a residual one: keep the recipe's split."""
    if rank < 2:
        raise ValueError("SplitFlux needs a rank of at least 2: its content adapter has two branches")
    ratio = defaults.get("content_rank", 48) / defaults.get("rank", 64)
    return {"content_rank": min(rank - 1, max(1, round(rank * ratio)))}


METHODS: dict[str, Method] = {
    m.key: m
    for m in (
        Method("b-lora", "B-LoRA · SDXL", "sdxl", "pipelines.blora", "TrainRequest", "train_blora",
               "Content and style LoRA on two attention blocks of SDXL's first up-block (Frenkel et al., 2024).",
               token_hint="automatic, e.g. [v42]", adapters=("lora", "dylora", "sora")),
        Method("splitflux", "SplitFlux · Flux", "flux", "pipelines.splitflux", "SplitFluxRequest",
               "train_splitflux",
               "Content and style from Flux's single-stream blocks, with a re-embedding content part.",
               extras=_splitflux_extras, token_hint="content token, automatic, e.g. [c42] (style token [s42])"),
    )
}


def method_for(key: str) -> Method:
    if not isinstance(key, str) or key not in METHODS:
        raise ValueError(f"unknown method {key!r}; choose one of {', '.join(METHODS)}")
    method = METHODS[key]
    if not method.available:
        raise ValueError(f"{method.label} is not installed in this build of Block Studio")
    return method


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


def training_defaults(method: Method, spec: ModelSpec) -> dict[str, Any]:
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
