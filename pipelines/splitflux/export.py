"""SplitFlux's package: its parts as the paper's Figure 2 uses them, what adapter.json records of them, the samples
of a transformer stored in fp8, and the model card's notes.

Every part is a canonical PEFT state dict with every scale folded into `lora_B` (see the package docstring for
what each holds); `COMPOSITION` says which part each use loads.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from pipelines import formats
from pipelines.adapters import LoRAConfig, LoRALinear, inject_adapters, remove_adapters
from pipelines.models import building_modules
from pipelines.package_info import Composition
from pipelines.recipes import PartSpec, SampleSpec
from pipelines.splitflux.settings import PAPER_SILENT, ROLES, SINGLE_BLOCKS, SplitFluxSettings, format_blocks

# Which part the content slot loads for each use of a package (the paper's Figure 2). `optional` parts are
# loaded only when asked for, beside the chosen content part and at its scale.
COMPOSITION = Composition("paper", {"mix": "content_reembed", "content": "content", "reembed": "content_reembed",
                                    "style": "style"}, ["boundary"])
PARTS = (
    PartSpec("content", "disentangled content: both content branches"),
    PartSpec("content_reembed", "the content branch alone, for mixing and new prompts"),
    PartSpec("boundary", "the boundary blocks, loaded only when asked for", optional=True),
    PartSpec("style", "the style blocks"),
)
_MIX_PROMPT = "A {token} object in {style_token} style"
SAMPLES = (
    SampleSpec("full", ("content", "boundary", "style"), _MIX_PROMPT, "content + style"),
    SampleSpec("mix", (COMPOSITION.uses["mix"], "style"), _MIX_PROMPT, "mix"),
    SampleSpec("content", ("content",), "A {token} object", "content"),
    SampleSpec("content_reembed", ("content_reembed",), "A {token} object wearing a hat", "re-embedded content"),
    SampleSpec("style", ("style",), "A cat in {style_token} style", "style"),
)
PREVIEW_PROMPT = _MIX_PROMPT


def export_parts(layers: dict[str, Any], roles: dict[str, str], export_gate: float | None
                 ) -> dict[str, dict[str, torch.Tensor]]:
    """{"content", "content_reembed", "boundary", "style"}: canonical standard-LoRA state dicts of the trained
    layers (`roles`: layer name -> content, boundary or style). `boundary` is left out when there are no
    boundary blocks."""
    parts: dict[str, dict[str, torch.Tensor]] = {"content": {}, "content_reembed": {}, "boundary": {}, "style": {}}

    def put(part: str, module: str, factors: tuple[torch.Tensor, torch.Tensor]) -> None:
        parts[part][f"{module}.lora_A.weight"] = factors[0].cpu().contiguous()
        parts[part][f"{module}.lora_B.weight"] = factors[1].cpu().contiguous()

    for name, layer in layers.items():
        role = roles[name]
        if role == "content":
            put("content", name, layer.export_lora(export_gate))
            put("content_reembed", name, layer.export_content_branch())
        else:
            put(role, name, layer.export_lora())
    return {part: state for part, state in parts.items() if state}


def part_composition(s: SplitFluxSettings) -> dict[str, dict]:
    """adapter.json's `parts`: the blocks of every part, its branches with the scale folded into each, its rank.

    Branches: `content` is dW_cnt, `residual` dW_res, `rca` the boundary blocks' update (scale alpha), `style` dW_s.
    """
    def blocks(role: str) -> str:
        return f"{SINGLE_BLOCKS}.{format_blocks(getattr(s, f'{role}_blocks'))}"

    described = {p.name: p.description for p in PARTS}
    wc, wr = (1.0, 1.0) if s.export_gate is None else (float(s.export_gate), 1.0 - float(s.export_gate))
    parts = {
        "content": {"blocks": blocks("content"), "branches": {"content": wc, "residual": wr}, "rank": s.rank,
                    "description": described["content"]},
        "content_reembed": {"blocks": blocks("content"), "branches": {"content": 1.0}, "rank": s.content_rank,
                            "description": described["content_reembed"]},
        "boundary": {"blocks": blocks("boundary"), "branches": {"rca": float(s.rca_alpha)},
                     "rank": s.boundary_rank, "description": described["boundary"]},
        "style": {"blocks": blocks("style"), "branches": {"style": 1.0}, "rank": s.rank,
                  "description": described["style"]},
        "full": {"blocks": f"{SINGLE_BLOCKS}.{format_blocks(s.trained_blocks)}",
                 "parts": ["content", "boundary", "style"], "description": "every trained block"},
    }
    if not s.boundary_blocks:
        del parts["boundary"]
        parts["full"]["parts"].remove("boundary")
    return parts


def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def package_facts(s: SplitFluxSettings) -> dict[str, Any]:
    """What a SplitFlux package's adapter.json records beyond what every recipe's does."""
    from pipelines.splitflux.settings import optimizer_name

    gate_export = ("both branches at weight 1" if s.export_gate is None
                   else f"g * content + (1 - g) * residual with g = {s.export_gate}")
    return {
        "prompt": s.content_prompt,
        "content_prompt": s.content_prompt,
        "style_prompt": s.style_prompt,
        "blocks": {role: f"{SINGLE_BLOCKS}.{format_blocks(getattr(s, f'{role}_blocks'))}" for role in ROLES},
        "ranks": {"content": s.rank, "content_reembed": s.content_rank, "residual": s.residual_rank,
                  "boundary": s.boundary_rank, "style": s.rank},
        "rank": s.rank,
        "content_rank": s.content_rank,
        "rca_alpha": s.rca_alpha,
        "rca": {"alpha": s.rca_alpha, "rank": s.boundary_rank, "alpha_baked_into_lora_B": True},
        "gate": {
            "rule": "sigmoid((||e_n|| - mu) / sigma), mu and sigma over each image's image tokens",
            "features": s.gate_source,
            "text_tokens": s.text_gate,
            "exported_content": gate_export,
        },
        "style_text": s.style_text,
        "parts": part_composition(s),
        "target_modules": list(s.target_modules),
        "complementary_weight": s.complementary_weight,
        "complementary_reduction": s.complementary_reduction,
        "optimizer": optimizer_name(s.use_8bit_adam),
        "lora_init": s.lora_init,
        "paper_silent": {name: {"value": _json_value(getattr(s, name)), "decides": decides}
                         for name, decides in PAPER_SILENT.items()},
        "max_sequence_length": s.max_sequence_length,
        "training_guidance": s.guidance,
        "timestep_sampling": s.timestep_sampling,
        "quantize_base": s.quantize_base,
    }


def sample_with_own_layers(pipe, parts: dict[str, dict[str, torch.Tensor]], prompt: str, resolution: int,
                           steps: int, seed: int, spec) -> Image.Image:
    """`sample_with_parts` for a transformer stored in fp8: the parts as fp32 LoRA layers of our own.

    diffusers gives LoRA layers loaded into a layerwise-cast model the storage dtype (fp8), which cannot
    compute; these layers compute what the exported standard LoRA computes (`W x + B A x`) in fp32.
    """
    from pipelines.generation import preview_image

    transformer = pipe.transformer
    factors = {}
    for state in parts.values():
        for module, (a, b) in formats.lora_modules(state).items():
            factors[module] = (a, b)

    def make(base):
        return LoRALinear(base, LoRAConfig(rank=1))

    with building_modules():
        layers = inject_adapters(transformer, list(factors), make)
    try:
        for module, layer in layers.items():
            a, b = factors[module]
            device = layer.lora_A.device
            layer.lora_A = torch.nn.Parameter(a.float().to(device), requires_grad=False)
            layer.lora_B = torch.nn.Parameter(b.float().to(device), requires_grad=False)
        return preview_image(pipe, prompt, resolution, steps, seed, spec)
    finally:
        remove_adapters(transformer, list(layers))


def card_notes(info) -> list[str]:
    """The model card's section on SplitFlux's parts (`info`: the package's `PackageInfo`)."""
    gate = info.extra.get("gate") if isinstance(info.extra.get("gate"), dict) else {}
    notes = [
        "## SplitFlux parts",
        "",
        f"Content was trained with `{info.extra.get('content_prompt')}`, style with "
        f"`{info.extra.get('style_prompt')}`; the style token is `{info.style_token or '[s]'}`. The content branch "
        "alone (`content_reembed.safetensors`) puts the subject in new prompts (`A <token> object ...`) and, as in "
        "the paper, mixes with another package's style.",
        f"The content blocks' two gated branches are exported as {gate.get('exported_content', 'one LoRA')}; "
        "the gate depends on the input, so no fixed LoRA reproduces it exactly. Every scale, the boundary blocks' "
        "rank-constrained alpha included, is already multiplied into `lora_B`: load every file at scale 1.",
    ]
    if "boundary" in info.files:
        notes.append("The boundary blocks are a file of their own, `boundary.safetensors`; the paper loads no "
                     "adapter there at inference, so add it only to try it.")
    return notes + [""]
