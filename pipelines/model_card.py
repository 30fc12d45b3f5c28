"""The model card (README.md) of an adapter package, with Hugging Face Hub front matter.

The card says what the adapter is, how to use each part in diffusers and in ComfyUI/A1111, and how it was
trained. Sample images become Hub widgets.
"""

from __future__ import annotations

import json

from pipelines.models import ARCHITECTURES
from pipelines.package_info import PackageInfo, as_package_info

# The Hub ids of the base models. The tiny offline models have none: their cards name no `base_model`, since
# an adapter for tiny-sdxl does not load into SDXL (same block names, other widths).
BASE_IDS = {
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
}
# What the card's Training table lists of every package; a recipe adds its own settings (`card_settings`).
TRAINING_KEYS = ("method", "base_model", "steps", "rank", "learning_rate", "resolution", "seed", "blocks",
                 "target_modules")


def _yaml_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def render_model_card(info: PackageInfo | dict) -> str:
    """README.md of a package: Hub front matter, its parts, how to use them, how it was trained."""
    from pipelines.recipes import recipe_of

    info = as_package_info(info)
    recipe = recipe_of(info.method)
    arch = ARCHITECTURES.get(info.arch, ARCHITECTURES["sdxl"])
    base = info.base_model or arch.default_model
    base_id = BASE_IDS.get(base, base)
    token = info.token
    method = info.method or "adapter"
    name = info.name or "adapter"
    prompt = info.prompt or f"A {token}"
    tiny = base.startswith("tiny-")
    samples = [s for s in info.files.get("samples", []) if not s.endswith("input.png")]
    lines = ["---"] + ([] if tiny else [f"base_model: {_yaml_str(base_id)}"]) + [
        "library_name: diffusers", f"license: {arch.license}", f"instance_prompt: {_yaml_str(prompt)}",
        "tags:"]
    tags = ["text-to-image", "lora", "diffusers", "template:sd-lora", method, "blockstudio", arch.hub_tag]
    lines += [f"- {t}" for t in tags]
    if samples:
        lines.append("widget:")
        for sample in samples:
            stem = sample.rsplit("/", 1)[-1].removesuffix(".png")
            text = info.sample_prompts.get(stem, prompt)
            lines += [f"- text: {_yaml_str(text)}", "  output:", f"    url: {sample}"]
    lines.append("---")
    parts = [p for p in info.files if p not in ("full", "samples") and not p.startswith("kohya")]
    composition = info.composition
    mix_part, style_part = info.part_for("mix"), info.part_for("style")
    subject = recipe.subject if recipe is not None else "[c]"
    content_prompt = f"A {subject.replace('[c]', token)}"
    if tiny:
        load_base = [f"from pipelines.models import model_path  # {base} is built by Block Studio, not on the Hub",
                     "", f'pipe = {arch.pipeline}.from_pretrained(model_path("{base}"))']
    else:
        load_base = ["", f'pipe = {arch.pipeline}.from_pretrained("{base_id}", torch_dtype=torch.{arch.dtype})'
                         '.to("cuda")']
    body = [
        "",
        f"# {name}",
        "",
        f"A **{method}** adapter for `{base_id}` trained with Block Studio from one image. "
        f"Trigger token: `{token}`; training prompt: `{prompt}`.",
    ]
    if tiny:
        body += ["", f"> Trained on `{base}`, a tiny random-weight model Block Studio builds offline for trying the "
                 "workflow; it does not make real images, and it loads into that model only."]
    if samples:
        body += ["", "<Gallery />"]
    body += [
        "",
        "## Parts",
        "",
        "| file | what it holds |",
        "| --- | --- |",
        "| `pytorch_lora_weights.safetensors` | every part together (diffusers format) |",
    ]
    for part in parts:
        entry = info.parts.get(part)
        described = recipe.part(part) if recipe is not None else None
        what = (entry.description if entry is not None and entry.description
                else described.description if described is not None else DESCRIPTIONS.get(part, part))
        body.append(f"| `{part}.safetensors` | {what}: {info.describe_part(part)} |")
    body += [
        f"| `kohya/{name}*.safetensors` | the same in kohya/WebUI format for ComfyUI, A1111 and Forge |",
        "",
        "## Use with diffusers",
        "",
        "```python",
        "import torch",
        f"from diffusers import {arch.pipeline}",
        *load_base,
        f'pipe.load_lora_weights("{name}", weight_name="{mix_part}.safetensors", adapter_name="content")',
        'pipe.load_lora_weights("<another package>", weight_name="style.safetensors", adapter_name="style")',
        'pipe.set_adapters(["content", "style"], adapter_weights=[1.0, 1.0])',
        f'image = pipe("{content_prompt} in [s] style", generator=torch.Generator("cpu").manual_seed(0)).images[0]',
        "```",
        "",
        "Replace `[s]` with the style package's token. A scale multiplies the adapter's weight delta (the "
        "`set_adapters` convention); the official B-LoRA code's `alpha` scales both LoRA factors, so its "
        "`alpha = a` equals a scale of `a * a` here.",
        "",
    ]
    if composition is not None:
        body += _composition_notes(composition.uses, composition.optional)
    if recipe is not None and recipe.card_notes is not None:
        body += recipe.card_notes(info)
    if isinstance(info.adapter, dict):
        body += _rank_notes(info.adapter, info.exported_from)
    body += [
        "## Use with ComfyUI, A1111 or Forge",
        "",
        f"Load `kohya/{name}_{mix_part}.safetensors` or `kohya/{name}_{style_part}.safetensors` with a LoRA loader node "
        "on the same base model, and put the trigger token in the prompt.",
        "",
        "## Training",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    recorded = info.to_dict()
    for key in (*TRAINING_KEYS, *(recipe.card_settings if recipe is not None else ()), "created"):
        if key in recorded:
            body.append(f"| {key} | `{_cell(recorded[key])}` |")
    silent = info.extra.get("paper_silent")
    if isinstance(silent, dict) and silent:
        body += ["", "## Choices the paper leaves open", "", "Each is a training setting; this package used:", "",
                 "| setting | value | what it decides |", "| --- | --- | --- |"]
        for key, entry in silent.items():
            entry = entry if isinstance(entry, dict) else {"value": entry}
            body.append(f"| {key} | `{_cell(entry.get('value'))}` | {entry.get('decides', '')} |")
    body.append("")
    return "\n".join(lines + body)


def _rank_notes(adapter: dict, exported_from: str | None) -> list[str]:
    low, high = (adapter.get("rank_range") or ["?", "?"])[:2]
    rank = adapter.get("rank", "?")
    if adapter.get("type") == "dylora":
        trained = f"Trained with DyLoRA over ranks {low}-{high} in one run; these files hold rank {rank}."
    else:
        trained = (f"Trained with SoRA at rank {adapter.get('max_rank', '?')}; its gates left at most {high} live "
                   f"ranks per layer, and these files hold up to {rank}.")
    if exported_from:
        more = f"Exported from the package `{exported_from}`, which keeps the trained factors."
    else:
        more = (f"`{adapter.get('file')}` keeps the trained factors: `blockstudio export <this folder> --rank R "
                f"--out <new folder>` writes the package at any rank from {low} to {high}.")
    return ["## Rank", "", trained + " " + more, ""]


DESCRIPTIONS = {
    "content": "the content (subject) alone",
    "content_reembed": "the content's high-rank branch alone, for putting the subject in new prompts",
    "style": "the style alone",
}


def _cell(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _composition_notes(uses: dict, optional: list) -> list[str]:
    """Which file each use loads, as the package records it."""
    labels = {"mix": "mixing with another package's style", "content": "the content alone",
              "reembed": "the subject in new prompts", "style": "the style on any prompt"}
    lines = ["## Which file for what", "", "| use | file |", "| --- | --- |"]
    lines += [f"| {labels.get(use, use)} | `{part}.safetensors` |" for use, part in uses.items()]
    if optional:
        lines += ["", f"Loaded only when asked for: {', '.join(f'`{p}.safetensors`' for p in optional)} (at the "
                      "content scale, as an adapter of its own)."]
    return lines + [""]
