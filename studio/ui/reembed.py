"""The Re-embed tab: put a package's subject into new prompts, and apply a package's style to any prompt."""

from __future__ import annotations

import gradio as gr

from pipelines.generation import AdapterChoice
from studio.gpu import gpu
from studio.mixing import CONTENT_TEMPLATES, STYLE_TEMPLATES, parameters, prompt_lines, save_output
from studio.ui.common import Studio, handler
from studio.ui.mix import GENERATE, make_settings, settings_controls


def content_part(package) -> str:
    """The part the package records for new prompts (its recipe's composition says which)."""
    return package.part_for("reembed")


def style_part(package) -> str:
    """The part the package records for a style on any prompt."""
    return package.part_for("style")


def _column(studio: Studio, slot: str, title: str, templates: tuple[str, ...], example: str, gallery_label: str):
    """One half of the tab: a package, its scale, prompts, a button and the results."""
    placeholder = "[c]" if slot == "content" else "[s]"
    gr.Markdown(f"### {title}\nThe {slot} adapter alone: `{placeholder}` stands for it.")
    package = studio.package_picker(f"{slot.capitalize()} from", slot, generates=True, elem_id=f"reembed-{slot}")
    scale = gr.Slider(0, 2, value=1.0, step=0.05, label=f"{slot.capitalize()} scale")
    chosen = gr.CheckboxGroup(list(templates), value=list(templates[:4]), label="Ready prompts")
    free = gr.Textbox(label="Your prompts (one per line)", lines=2, placeholder=example)
    button = gr.Button("Generate", variant="primary", elem_id=f"reembed-{slot}-go")
    gallery = gr.Gallery(label=gallery_label, columns=4, height=300, object_fit="contain", fit_columns=False,
                         buttons=["download", "fullscreen"], format="png", elem_id=f"reembed-{slot}-gallery")
    return package, scale, chosen, free, button, gallery


def build(studio: Studio) -> None:
    ws = studio.workspace
    with gr.Row(equal_height=False):
        with gr.Column():
            content, content_scale, content_templates, content_free, reembed, content_gallery = _column(
                studio, "content", "The subject in new scenes", CONTENT_TEMPLATES, "A [c] riding a bicycle",
                "Subject in new prompts")
        with gr.Column():
            style, style_scale, style_templates, style_free, restyle, style_gallery = _column(
                studio, "style", "A style on any prompt", STYLE_TEMPLATES, "A red bicycle in [s] style",
                "Style on new prompts")
    with gr.Accordion("Generation settings", open=False):
        settings = settings_controls()

    def run(workspace_id, name, part_of, scale, slot, templates, free, values, progress):
        workspace = studio.workspace_of(workspace_id)
        if not name:
            raise gr.Error(f"Choose a {slot} package first.", print_exception=False)
        package = studio.library(workspace_id).open(name)
        choice = AdapterChoice(package, part_of(package), float(scale))
        prompts = prompt_lines(templates, free)
        placeholder = "[c]" if slot == "content" else "[s]"
        results = []
        for i, prompt in enumerate(prompts):
            progress((i, len(prompts)), desc=f"prompt {i + 1} of {len(prompts)}")
            if placeholder not in prompt.lower():
                gr.Warning(f"'{prompt}' has no {placeholder}; the adapter acts without its token.")
            kwargs = {"content": choice, "style": None} if slot == "content" else {"content": None, "style": choice}
            image, expanded = studio.generation.generate(prompt, settings=values, **kwargs)
            save_output(workspace, image, parameters(prompt, kwargs["content"], kwargs["style"], values,
                                                     expanded=expanded))
            results.append((image, prompt))
        return results

    @handler
    @gpu
    def subject_in_prompts(workspace_id, name, scale, templates, prompts, seed, steps, guidance, width, height,
                           negative_prompt, fast=False, progress=gr.Progress()):
        values = make_settings(seed, steps, guidance, width, height, negative_prompt, fast)
        return run(workspace_id, name, content_part, scale, "content", templates, prompts, values, progress)

    @handler
    @gpu
    def style_on_prompts(workspace_id, name, scale, templates, prompts, seed, steps, guidance, width, height,
                         negative_prompt, fast=False, progress=gr.Progress()):
        values = make_settings(seed, steps, guidance, width, height, negative_prompt, fast)
        return run(workspace_id, name, style_part, scale, "style", templates, prompts, values, progress)

    reembed.click(subject_in_prompts, [ws, content, content_scale, content_templates, content_free] + settings,
                  [content_gallery], api_name="reembed", **GENERATE)
    restyle.click(style_on_prompts, [ws, style, style_scale, style_templates, style_free] + settings,
                  [style_gallery], api_name="restyle", **GENERATE)
