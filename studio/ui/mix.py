"""The Mix tab: the content of one package with the style of another, as one image, a before/after, or a grid;
and several styles merged into one new package.

The content slot loads the part the package mixes with (its recipe's composition: SplitFlux's content branch
alone, as the paper mixes) unless another part is chosen; a recipe's optional parts (SplitFlux's boundary
blocks) join only when asked for. The parts offered are those the registered recipes make.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from pipelines.generation import AdapterChoice
from pipelines.merge import MergeOptions, parse_weights
from pipelines.recipes import all_recipes
from studio.gpu import gpu
from studio.mixing import (
    GenerationError,
    GenerationSettings,
    parameters,
    parse_scales,
    recent_outputs,
    save_output,
)
from studio.ui.common import Studio, handler

# Every generating event shares one queue served one request at a time: the warm pipeline's adapter slots
# are shared state, and Gradio shows each waiting page its place in the line. Their values reach the handlers
# raw (preprocess=False) and are checked there (`GenerationSettings.checked`, `AdapterChoice`), so a bad number
# gets a line naming its field rather than Gradio's unnamed bounds error or, for NaN, no message at all.
GENERATE = dict(concurrency_id="generate", concurrency_limit=1, preprocess=False)
DEFAULT_PART = "default"


def content_parts() -> list[tuple[str, str]]:
    """(label, part) of the Content part box: the part each package mixes with, then every part a registered
    recipe makes for content (not its style part, not an optional one), described as its recipes describe it."""
    described: dict[str, list[str]] = {}
    for spec in all_recipes():
        style = spec.composition.uses.get("style")
        for part in spec.parts:
            if part.name != style and not part.optional:
                described.setdefault(part.name, []).append(f"{spec.name}: {part.description}")
    mixes = ", ".join(f"{spec.name}: {spec.composition.uses.get('mix', 'content')}" for spec in all_recipes())
    return [(f"The part the package mixes with ({mixes})", DEFAULT_PART)] + [
        (f"{part}: {'; '.join(what)}", part) for part, what in described.items()]


def optional_parts() -> dict[str, str]:
    """{part: what it is} of every part a registered recipe loads only when asked for."""
    found: dict[str, list[str]] = {}
    for spec in all_recipes():
        for part in spec.parts:
            if part.optional:
                found.setdefault(part.name, []).append(f"{spec.name}: {part.description}")
    return {part: "; ".join(what) for part, what in found.items()}


@dataclass
class MixTab:
    outputs: list
    refresh: Any


def settings_controls() -> list[gr.components.Component]:
    """Seed, steps, guidance, size, negative prompt and "fast"; blank means the base model's default.

    The optional values are text boxes: a number box cannot stay blank (it fills with 0 when first shown),
    and a 0 there is not the model's default.
    """
    with gr.Row():
        seed = gr.Number(value=0, label="Seed", precision=0)
        steps = gr.Textbox(label="Steps", placeholder="the model's default", max_length=8)
        guidance = gr.Textbox(label="Guidance", placeholder="the model's default", max_length=8)
    with gr.Row():
        width = gr.Textbox(label="Width", placeholder="the model's size", max_length=8)
        height = gr.Textbox(label="Height", placeholder="the model's size", max_length=8)
        negative = gr.Textbox(label="Negative prompt", max_length=500)
    fast = gr.Checkbox(value=False, label="Fast", info="blank steps: the model's fast setting (SDXL 30 instead of 50)")
    return [seed, steps, guidance, width, height, negative, fast]


def optional_number(value, label: str, whole: bool = True) -> float | int | None:
    """A settings box's value: None when blank, else the number it holds (one line naming the box if not)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(str(value).strip())
    except ValueError:
        number = float("nan")
    kind = "a whole number" if whole else "a number"
    if number != number or number in (float("inf"), float("-inf")) or (whole and not number.is_integer()):
        raise GenerationError(f"{label} must be {kind}, or blank for the model's default (not {str(value)[:20]!r})")
    return int(number) if whole else number


def make_settings(seed, steps, guidance, width, height, negative, fast=False) -> GenerationSettings:
    """The settings controls' values as `GenerationSettings` (checked when used)."""
    return GenerationSettings(seed=0 if seed is None else seed, steps=optional_number(steps, "steps"),
                              guidance=optional_number(guidance, "guidance", whole=False),
                              width=optional_number(width, "width"), height=optional_number(height, "height"),
                              negative_prompt=negative or None, fast=False if fast is None else fast)


def part_controls() -> list[gr.components.Component]:
    """Which content part the mix loads, and a box per optional part to load beside it (SplitFlux's boundary)."""
    part = gr.Dropdown(content_parts(), value=DEFAULT_PART, label="Content part")
    extras = [gr.Checkbox(value=False, label=f"Add the {name} part", info=f"{what}; beside the content part, at "
                          "its scale") for name, what in optional_parts().items()]
    return [part, *extras]


def choose(studio: Studio, workspace_id: str | None, name: str | None, use: str, scale: float,
           part: str | None = DEFAULT_PART, with_parts: tuple = ()) -> AdapterChoice | None:
    """The package `name` for `use` ("mix", "reembed", "style"), or the chosen `part` of it; `with_parts` holds
    one flag per optional part (`optional_parts`), in order: those set are loaded beside it."""
    if not name:
        return None
    package = studio.library(workspace_id).open(name)
    if part is not None and part not in [value for _, value in content_parts()]:
        raise ValueError(f"unknown content part {part!r}; choose one of the list")
    chosen = package.part_for(use) if part in (None, DEFAULT_PART) else part
    extras = tuple(extra for extra, wanted in zip(optional_parts(), with_parts, strict=False) if wanted)
    return AdapterChoice(package, chosen, float(scale), extras)


def build(studio: Studio) -> MixTab:
    ws = studio.workspace
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            with gr.Row():
                with gr.Column(min_width=220):
                    content = studio.package_picker("Content from", "content", generates=True, elem_id="mix-content")
                    content_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Content scale")
                with gr.Column(min_width=220):
                    style = studio.package_picker("Style from", "style", generates=True, partner=content,
                                                 elem_id="mix-style")
                    style_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Style scale")
            prompt = gr.Textbox(value="A [c] in [s] style", label="Prompt", max_length=300, elem_id="mix-prompt",
                                info="[c] becomes the content package's token, [s] the style package's.")
            compare = gr.Checkbox(value=True, label="Before/after: also render the base model, same seed")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", size="lg", elem_id="mix-generate")
                grid = gr.Button("Scale grid", size="lg", elem_id="mix-grid")
            with gr.Accordion("Generation settings", open=False):
                settings = settings_controls()
            with gr.Accordion("Content part", open=False):
                parts = part_controls()
            with gr.Accordion("Scale grid", open=False):
                gr.Markdown("Every content scale against every style scale, same seed and prompt. A scale "
                            "multiplies the adapter's weight delta (official B-LoRA `alpha = a` is a scale of a²).")
                with gr.Row():
                    content_scales_box = gr.Textbox(value="0.5, 1.0, 1.5", label="Content scales")
                    style_scales_box = gr.Textbox(value="0.5, 1.0, 1.5", label="Style scales")
        with gr.Column(scale=3):
            compared = gr.ImageSlider(label="Before (base model) ⟷ after (with adapters)", type="pil",
                                      format="png", height=420, elem_id="mix-slider", buttons=["download",
                                                                                             "fullscreen"])
            used = gr.Markdown(elem_id="mix-used")
            grid_image = gr.Image(label="Scale grid", type="pil", format="png", visible=False, interactive=False,
                                  buttons=["download", "fullscreen"], elem_id="mix-grid-image")
    results = gr.Gallery(label="Your results (newest first)", columns=6, height=260, object_fit="contain",
                         fit_columns=False,
                         buttons=["download", "fullscreen"], elem_id="mix-results")

    @handler
    @gpu
    def mix(workspace_id, content_name, content_scale, style_name, style_scale, prompt, with_base, seed, steps,
            guidance, width, height, negative_prompt, fast=False, content_part=DEFAULT_PART, *with_parts):
        workspace = studio.workspace_of(workspace_id)
        content_choice = choose(studio, workspace_id, content_name, "mix", content_scale, content_part, with_parts)
        style_choice = choose(studio, workspace_id, style_name, "style", style_scale)
        values = make_settings(seed, steps, guidance, width, height, negative_prompt, fast)
        prompt_text = (prompt or "").strip() or None
        if prompt_text is None:
            raise gr.Error("Write a prompt, e.g. 'A [c] in [s] style'.", print_exception=False)
        if with_base:
            before, after, expanded = studio.generation.compare(prompt_text, content=content_choice,
                                                                style=style_choice, settings=values)
        else:
            after, expanded = studio.generation.generate(prompt_text, content=content_choice, style=style_choice,
                                                         settings=values)
            before = after
        save_output(workspace, after, parameters(prompt_text, content_choice, style_choice, values,
                                                 expanded=expanded))
        return ((before, after), f"Prompt as the model saw it: `{expanded}`", recent_outputs(workspace),
                gr.Image(visible=False))

    @handler
    @gpu
    def scale_grid(workspace_id, content_name, style_name, prompt, content_scales, style_scales, seed, steps,
                   guidance, width, height, negative_prompt, fast=False, progress=gr.Progress(),
                   content_part=DEFAULT_PART, *with_parts):
        # `progress` sits among the positional parameters, where Gradio inserts it; the optional parts' boxes,
        # as many as the recipes have, come last.
        workspace = studio.workspace_of(workspace_id)
        if not content_name or not style_name:
            raise gr.Error("A grid needs both a content and a style package.", print_exception=False)
        content_choice = choose(studio, workspace_id, content_name, "mix", 1.0, content_part, with_parts)
        style_choice = choose(studio, workspace_id, style_name, "style", 1.0)
        rows, cols = parse_scales(content_scales, "content"), parse_scales(style_scales, "style")
        values = make_settings(seed, steps, guidance, width, height, negative_prompt, fast)
        prompt = (prompt or "").strip() or "A [c] in [s] style"
        image, _ = studio.generation.grid(
            prompt, content=content_choice, style=style_choice,
            content_scales=rows, style_scales=cols, settings=values,
            on_image=lambda done, total: progress((done, total), desc=f"image {done} of {total}"),
        )
        save_output(workspace, image, parameters(prompt, content_choice, style_choice, values, grid=[rows, cols]))
        return gr.Image(value=image, visible=True), recent_outputs(workspace)

    merge_section(studio)

    @handler
    def show_results(workspace_id):
        return recent_outputs(studio.workspace_of(workspace_id))

    generate.click(mix, [ws, content, content_scale, style, style_scale, prompt, compare] + settings + parts,
                   [compared, used, results, grid_image], api_name="mix", show_progress_on=[compared], **GENERATE)
    grid.click(scale_grid, [ws, content, style, prompt, content_scales_box, style_scales_box] + settings + parts,
               [grid_image, results], api_name="grid", show_progress_on=[compared], **GENERATE)
    return MixTab(outputs=[results], refresh=show_results)


def merge_section(studio: Studio) -> None:
    """Several style packages merged into one new package of the library (MergeVLA's masks, or a plain sum)."""
    ws = studio.workspace
    with gr.Accordion("Merge styles into a new package", open=False):
        gr.Markdown("The styles of two or three packages of one base model and method, merged into one package "
                    "that any diffusers pipeline loads. **Masked**: each style adds its weights only where its TALL "
                    "mask (MergeVLA) says they carry that style, so weaker clashing updates drop out; **plain sum**: "
                    "the styles' deltas added. The merged deltas are factored back into a LoRA by a truncated SVD (a plain sum "
                    "at the default rank is exact).")
        with gr.Row():
            first = studio.package_picker("Style 1", "style", elem_id="merge-first")
            second = studio.package_picker("Style 2", "style", partner=first, elem_id="merge-second")
            third = studio.package_picker("Style 3 (optional)", "style", partner=first, elem_id="merge-third")
        with gr.Row():
            mode = gr.Radio([("Masked (MergeVLA)", "masked"), ("Plain sum", "sum")], value="masked", label="Mode")
            mask_lambda = gr.Textbox(value="0.6", label="Mask lambda", max_length=12)
            weights = gr.Textbox(label="Weights", placeholder="1 each, e.g. 1, 0.5", max_length=100)
            rank = gr.Textbox(label="Rank", placeholder="the sum of the styles' ranks", max_length=8)
            name = gr.Textbox(label="New package", placeholder="merged-style", max_length=64)
        merge = gr.Button("Merge", elem_id="merge-run")
        merged = gr.Markdown(elem_id="merge-result")

    @handler
    def merge_styles(workspace_id, first_name, second_name, third_name, chosen_mode, lam, weight_text, rank_text,
                     new_name):
        names = [n for n in (first_name, second_name, third_name) if n]
        lam_value = optional_number(lam, "mask lambda", whole=False)
        options = MergeOptions(mode=str(chosen_mode), mask_lambda=0.6 if lam_value is None else lam_value,
                               weights=parse_weights(weight_text), rank=optional_number(rank_text, "rank"))
        taken = studio.library(workspace_id).merge_styles(names, (new_name or "").strip() or None, options)
        info = studio.library(workspace_id).open(taken).info
        return (f"Merged {len(names)} styles into **{taken}** ({info['merge']['mode']}, rank {info['rank']}, "
                f"{info['merge']['energy_kept_min']:.1%} of the merged delta kept in the worst layer).")

    merge.click(merge_styles, [ws, first, second, third, mode, mask_lambda, weights, rank, name], [merged],
                api_name="merge", concurrency_limit=2, concurrency_id="merge", show_progress_on=[merged])
