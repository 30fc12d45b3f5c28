"""Generation for the Mix and Re-embed tabs: one warm pipeline per base model, shared by every session.

Swapping packages only swaps adapters in the `content` and `style` slots of a `StudioPipeline`; the base model
is loaded once per process. A lock serialises generations on a pipeline because its slots are shared state.
The "before" half of a before/after pair is the same call with both adapters at scale 0, which is exactly the
base model and keeps the adapters loaded.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from pipelines.errors import BlockStudioError
from pipelines.generation import AdapterChoice, StudioPipeline, check_sampling, expand_prompt
from pipelines.models import REGISTRY, ModelSpec
from pipelines.package import AdapterPackage
from studio.workspace import Workspace

CONTENT_TEMPLATES = (
    "A [c] on the beach",
    "A [c] made of gold",
    "A [c] in a snowy forest",
    "A photo of [c] wearing a hat",
    "A [c] on the surface of the moon",
    "A knitted [c]",
)
STYLE_TEMPLATES = (
    "A lighthouse in [s] style",
    "A city street at night in [s] style",
    "A bowl of fruit in [s] style",
    "A portrait of an old sailor in [s] style",
    "A mountain lake at dawn in [s] style",
)
MAX_GRID_SIDE = 5
MAX_PROMPTS = 8
OUTPUTS_SHOWN = 24


class GenerationError(BlockStudioError):
    """Settings or adapter choices that cannot make an image."""


@dataclass
class GenerationSettings:
    seed: int = 0
    steps: int | None = None  # None: the model's default
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    negative_prompt: str | None = None
    fast: bool = False  # with steps None: the model's fast steps (SDXL 30 instead of 50)

    def checked(self) -> GenerationSettings:
        """The settings as plain numbers; 0 or blank steps, width and height mean the model's default."""
        values = check_sampling(seed=self.seed, steps=self.steps or None, guidance=self.guidance,
                                width=self.width or None, height=self.height or None)
        negative = (self.negative_prompt or "").strip()[:500] or None
        if not isinstance(self.fast, bool):
            raise GenerationError("fast must be true or false")
        return GenerationSettings(values["seed"], values["steps"], values["guidance"], values["width"],
                                  values["height"], negative, self.fast)


def parse_scales(text: str, label: str) -> list[float]:
    """'0.5, 1, 1.5' -> [0.5, 1.0, 1.5] (at most MAX_GRID_SIDE values, each between -2 and 3)."""
    try:
        values = [float(v) for v in str(text).replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise GenerationError(f"{label} scales must be numbers separated by commas, e.g. 0.5, 1.0, 1.5") from None
    if not values:
        raise GenerationError(f"give at least one {label} scale")
    if len(values) > MAX_GRID_SIDE:
        raise GenerationError(f"at most {MAX_GRID_SIDE} {label} scales")
    if any(not -2 <= v <= 3 for v in values):
        raise GenerationError(f"{label} scales must lie between -2 and 3")
    return values


def prompt_lines(templates: list[str] | None, free_text: str | None) -> list[str]:
    """Chosen templates plus one prompt per non-empty line of free text, without repeats."""
    prompts = list(templates or []) + [p.strip() for p in (free_text or "").splitlines() if p.strip()]
    unique = list(dict.fromkeys(p[:300] for p in prompts))
    if not unique:
        raise GenerationError("pick a template or write a prompt")
    if len(unique) > MAX_PROMPTS:
        raise GenerationError(f"at most {MAX_PROMPTS} prompts at a time")
    return unique


def base_model_of(*packages: AdapterPackage | None) -> ModelSpec:
    """The base model every chosen package was made for (they must agree)."""
    chosen = [p for p in packages if p is not None]
    if not chosen:
        raise GenerationError("choose a content or a style adapter")
    models = {p.base_model for p in chosen}
    if len(models) > 1:
        raise GenerationError(f"these adapters are for different base models ({', '.join(sorted(models))})")
    model = models.pop()
    if model not in REGISTRY or REGISTRY[model].random_weights:
        raise GenerationError(f"adapter made for {model!r}, which this studio does not offer")
    return REGISTRY[model]


class GenerationService:
    """Warm pipelines by base model; every generation of the process goes through here."""

    def __init__(self, *, hotswap_rank: int | None = None,
                 factory: Callable[[str], StudioPipeline] | None = None) -> None:
        self.hotswap_rank = hotswap_rank
        self._factory = factory or (lambda model: StudioPipeline(model, hotswap_rank=self.hotswap_rank))
        self._pipelines: dict[str, StudioPipeline] = {}
        self._lock = threading.Lock()

    def pipeline(self, model: str) -> StudioPipeline:
        """The warm pipeline for `model` (created on first use; the caller holds the lock)."""
        if model not in self._pipelines:
            # Keep one base in memory: a second SDXL/Flux beside the first rarely fits next to training.
            self._pipelines.clear()
            self._pipelines[model] = self._factory(model)
        return self._pipelines[model]

    def loaded(self) -> dict[str, StudioPipeline]:
        return dict(self._pipelines)

    def generate(self, prompt: str, *, content: AdapterChoice | None, style: AdapterChoice | None,
                 settings: GenerationSettings) -> tuple[Image.Image, str]:
        """One image, and the prompt as the model saw it (placeholders replaced by tokens)."""
        spec = base_model_of(content.package if content else None, style.package if style else None)
        text = expand_prompt(prompt, content.package.token if content else None,
                             style.package.style_token if style else None)
        settings = settings.checked()
        with self._lock:
            studio = self.pipeline(spec.name)
            image = studio.generate(
                text, content=content, style=style, seed=settings.seed, steps=settings.steps,
                guidance=settings.guidance, width=settings.width, height=settings.height,
                negative_prompt=settings.negative_prompt, fast=settings.fast,
            )[0]
        return image, text

    def compare(self, prompt: str, *, content: AdapterChoice | None, style: AdapterChoice | None,
                settings: GenerationSettings) -> tuple[Image.Image, Image.Image, str]:
        """(before, after, prompt): the base model and the adapters, same prompt and seed."""
        after, text = self.generate(prompt, content=content, style=style, settings=settings)
        off = [replace(c, scale=0.0) if c else None for c in (content, style)]
        before, _ = self.generate(prompt, content=off[0], style=off[1], settings=settings)
        return before, after, text

    def grid(self, prompt: str, *, content: AdapterChoice, style: AdapterChoice, content_scales: list[float],
             style_scales: list[float], settings: GenerationSettings,
             on_image: Callable[[int, int], None] | None = None) -> tuple[Image.Image, list[tuple[Image.Image, str]]]:
        """Every content scale against every style scale, same seed: a labelled grid and the single images."""
        cells = []
        total = len(content_scales) * len(style_scales)
        for row, cs in enumerate(content_scales):
            for col, ss in enumerate(style_scales):
                image, _ = self.generate(prompt, content=replace(content, scale=cs), style=replace(style, scale=ss),
                                         settings=settings)
                cells.append((image, f"content {cs:g} · style {ss:g}"))
                if on_image is not None:
                    on_image(row * len(style_scales) + col + 1, total)
        return compose_grid([c[0] for c in cells], content_scales, style_scales), cells


def compose_grid(images: list[Image.Image], row_scales: list[float], col_scales: list[float]) -> Image.Image:
    """Images in rows (content scale) and columns (style scale), with the scales written along the edges."""
    width, height = images[0].size
    cell = max(width, 192)  # tiny models make 64 px images; show them large enough to see
    cell_h = round(height * cell / width)
    margin_left, margin_top = 110, 36
    grid = Image.new("RGB", (margin_left + cell * len(col_scales), margin_top + cell_h * len(row_scales)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=max(14, cell // 14))
    for col, scale in enumerate(col_scales):
        draw.text((margin_left + col * cell + cell // 2, margin_top // 2), f"style {scale:g}", fill="black",
                  font=font, anchor="mm")
    for row, scale in enumerate(row_scales):
        draw.text((margin_left // 2, margin_top + row * cell_h + cell_h // 2), f"content {scale:g}", fill="black",
                  font=font, anchor="mm")
    for i, image in enumerate(images):
        row, col = divmod(i, len(col_scales))
        resample = Image.Resampling.NEAREST if width < cell else Image.Resampling.LANCZOS
        grid.paste(image.resize((cell, cell_h), resample), (margin_left + col * cell, margin_top + row * cell_h))
    return grid


# -- results kept in the workspace ------------------------------------------------------------------------


def save_output(workspace: Workspace, image: Image.Image, parameters: dict) -> Path:
    """Write a result with its settings in the PNG (so a saved image says how it was made)."""
    # Names sort by time (the gallery shows the newest first), to the microsecond: results of one second
    # would otherwise be ordered by their random part.
    micros = time.time_ns() // 1000
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(micros // 10**6))
    name = f"{stamp}-{micros % 10**6:06d}-{secrets.token_hex(3)}.png"
    path = workspace.outputs / name
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(parameters, sort_keys=True))
    image.save(path, format="PNG", pnginfo=info)
    return path


def recent_outputs(workspace: Workspace, limit: int = OUTPUTS_SHOWN) -> list[tuple[str, str]]:
    """(path, caption) of the newest results, newest first."""
    out = []
    for path in sorted(workspace.outputs.glob("*.png"), reverse=True)[:limit]:
        caption = ""
        try:
            with Image.open(path) as image:
                params = json.loads(image.text.get("parameters", "{}"))
            caption = f"{params.get('prompt', '')} · seed {params.get('seed', '?')}"
        except (OSError, ValueError):
            pass
        out.append((str(path), caption))
    return out


def parameters(prompt: str, content: AdapterChoice | None, style: AdapterChoice | None,
               settings: GenerationSettings, **extra) -> dict:
    return {
        "prompt": prompt,
        "content": content.label() if content else None,
        "style": style.label() if style else None,
        **asdict(settings),
        **extra,
    }
