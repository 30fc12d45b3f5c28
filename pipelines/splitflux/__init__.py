"""SplitFlux on Flux: content and style adapters on the single-stream blocks, trained from one image.

Yang et al., "SplitFlux: Learning to Decouple Content and Style from a Single Image" (CVPR 2026). In FLUX.1 the
single-stream blocks carry content early and style later, so the 38 `single_transformer_blocks` are split
(diffusers indices; the paper counts all 57 blocks from 1, so its B20-29 are our 0-9):

- content blocks 0-9: visual-gated LoRA, a rank-48 content branch dW_cnt and a rank-16 residual branch dW_res
  mixed per image token by `sigmoid((||x|| - mu) / sigma)` (`pipelines/adapters/visual_gated.py`);
- boundary blocks 10-11: rank-constrained adaptation, rank r/alpha with its update times alpha
  (`pipelines/adapters/rca.py`);
- style blocks 12-37: a rank-64 LoRA dW_s;
- the 19 double-stream blocks and everything before single block 0 stay frozen and run without autograd.

Two prompts. The content path sees `A [c] object`, the style blocks `A [s] style`. Inside a single-stream
block the text tokens are the first part of the joint sequence, and every block updates them. So the style
prompt reaches the style blocks as a second text stream, as in the paper's prompt-replacement probe. With
`style_text="stream"` (the default) the style prompt runs through the same model beside the content prompt,
with the same noisy image, the same timestep and the adapters as they are, but without gradients. Entering the
first style block, the content stream's text tokens are replaced by the style stream's text tokens at that
point. From there on the joint sequence is [style text, content image] and the text evolves with it. The
timestep/pooled-CLIP vector stays the content prompt's, because the probe swaps token embeddings only. Both
streams share the frozen prefix in one batch. `style_text="embedding"` is the cheap approximation: it swaps in
the style prompt's `context_embedder` output and runs no second stream. Generation needs none of this: the
exported files are plain LoRAs, used with one prompt such as `A [c] object in [s] style`.

Loss: flow matching (noisy input `(1 - sigma) x0 + sigma noise`, target `noise - x0`) plus 0.1 times the
complementary loss between the two content branches, summed over the gated layers: the paper adds one term
per layer at weight 0.1 (`complementary_reduction="mean"` averages them instead, which makes each layer's term
as many times weaker as there are gated layers, 30 by default). Adam at 1e-4 with 32-bit state (AdamW without
weight decay, which is Adam), batch 1, 1000 steps; 8-bit optimizer state is an opt-in memory option
(`use_8bit_adam=True`). The adapters' initial factors are drawn from the run's seed.

Choices the paper leaves open, each a setting (`PAPER_SILENT` lists them; the package's adapter.json and model
card record their values):
- `text_gate` (1.0): the gate of the text tokens in the content blocks; 1.0 routes them through dW_cnt, the
  branch re-embedding loads.
- `gate_source` ("block_input"): the features whose norms gate the image tokens, the block's input (the
  residual stream) or each projection's own input (just after AdaLN's LayerNorm, which flattens the norms).
- `style_text` ("stream"): how the style prompt reaches the style blocks (above).
- `timestep_sampling` ("uniform"): sigma drawn uniformly from the scheduler's table, as diffusers'
  `weighting_scheme="none"`; "logit_normal" draws u = sigmoid(N(0, 1)); "flux_shift" draws u the same way and
  shifts it by the image's token count, `exp(mu) / (exp(mu) + 1/u - 1)` with mu from FLUX.1's scheduler config
  (sd-scripts' `--timestep_sampling flux_shift`). The draws use diffusers' `compute_density_for_timestep_sampling`.
- `guidance` (1.0): the guidance-embedding value while training, as diffusers' and sd-scripts' Flux LoRA
  examples train FLUX.1-dev.
- `max_sequence_length` (512): T5 tokens of both prompts (FLUX.1's length).
- `resolution` (1024): the training crop.
- `target_modules` (`attn.to_q,attn.to_k,attn.to_v`): what diffusers' Flux LoRA script adapts in a single
  block; it reproduces the paper's parameter counts exactly (as `proj_out` alone would).
- `lora_init` ("gaussian"): down factors N(0, 1/rank) and up factors zero, as PEFT's `init_lora_weights=
  "gaussian"`; "kaiming" is PEFT's default (Kaiming-uniform down factors).
- `export_gate` (None): the weights of dW_cnt and dW_res in the `content` part; None is the plain sum.

Exported parts (canonical PEFT state dicts, every scale folded into `lora_B`), after the paper's Figure 2:
- `content`: disentangled content, dW_cnt + dW_res on the content blocks as one rank-64 LoRA at weight 1 each.
- `content_reembed`: dW_cnt alone on the content blocks (rank 48). Re-embedding loads it, and so does mixing:
  the paper mixes the content branch of one image with the style of another.
- `boundary`: the boundary blocks with alpha multiplied in. The paper draws no adapter on them at inference,
  so no use loads this part unless asked (`--with-boundary`, the Mix tab's checkbox).
- `style`: the style blocks.
`COMPOSITION` says which part each use loads; adapter.json records it with the blocks, branches and scales of
every part. The parts touch disjoint blocks (the two content parts the same ones), so the content of one
package mixes with the style of another.

The package: `settings.py` (the request, its defaults and checks, block ranges), `recipe.py` (the adapters and
what the training loop calls), `forward.py` (the transformer's forward with the style stream and the gates),
`export.py` (the parts, adapter.json's record of them, the card's notes). This module registers the recipe.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.recipes import RecipeSpec, register_recipe, train_package
from pipelines.splitflux.export import (
    COMPOSITION,
    PARTS,
    PREVIEW_PROMPT,
    SAMPLES,
    card_notes,
    part_composition,
    sample_with_own_layers,
)
from pipelines.splitflux.forward import _latent_image_ids, _pack, split_forward
from pipelines.splitflux.recipe import SplitFluxRecipe, load_flux_pipeline
from pipelines.splitflux.settings import (
    COMPLEMENTARY_REDUCTIONS,
    DEFAULT_TARGETS,
    GATE_SOURCES,
    LORA_INITS,
    NUM_SINGLE_BLOCKS,
    PAPER_SILENT,
    QUANTIZE_CHOICES,
    ROLES,
    SINGLE_BLOCKS,
    STYLE_TEXT_CHOICES,
    TIMESTEP_SAMPLING,
    TINY_TEXT_LENGTH,
    TOKEN_TARGETS,
    QuantizationUnavailable,
    SplitFluxRequest,
    SplitFluxSettings,
    check_quantization,
    default_train_config,
    format_blocks,
    job_fields,
    optimizer_name,
    parse_blocks,
    parse_targets,
    settings_for,
    train_config,
)

__all__ = ["COMPLEMENTARY_REDUCTIONS", "COMPOSITION", "DEFAULT_TARGETS", "GATE_SOURCES", "LORA_INITS",
           "NUM_SINGLE_BLOCKS", "PAPER_SILENT", "QUANTIZE_CHOICES", "ROLES", "SINGLE_BLOCKS", "SPEC",
           "STYLE_TEXT_CHOICES", "TIMESTEP_SAMPLING", "TINY_TEXT_LENGTH", "TOKEN_TARGETS", "QuantizationUnavailable",
           "SplitFluxRecipe", "SplitFluxRequest", "SplitFluxSettings", "_latent_image_ids", "_pack",
           "check_quantization", "default_train_config", "format_blocks", "load_flux_pipeline", "optimizer_name",
           "parse_blocks", "parse_targets", "part_composition", "prepare_request", "sample_with_own_layers",
           "split_forward", "train_config", "train_splitflux"]


def prepare_request(request: SplitFluxRequest):
    """Validate every input before any model is loaded (`pipelines.recipes.prepare_run`)."""
    from pipelines.recipes import prepare_run

    return prepare_run(SPEC, request)


def train_splitflux(request: SplitFluxRequest, *, on_progress=None, on_sample=None, cancel=None, pipe=None) -> Path:
    """Train SplitFlux adapters from one image and write their package to `request.out`. Returns its path.

    `on_sample(step, image)` receives a preview every `sample_every` steps. Raises `TrainingCancelled` if
    `cancel` is set; the last checkpoint stays in `<out>.partial` for `resume=True`. A `pipe` passed in is
    given back without adapters (with `quantize_base="fp8"` its transformer keeps fp8 storage).
    """
    return train_package(SPEC, request, on_progress=on_progress, on_sample=on_sample, cancel=cancel, pipe=pipe)


def _load_pipeline(request: SplitFluxRequest, settings: SplitFluxSettings):
    return load_flux_pipeline(request.model, quantize_base=settings.quantize_base)


def _content_rank_for(rank: int, defaults: dict) -> dict:
    """The Train form asks for one rank; SplitFlux divides its content LoRA into a content branch and a residual
    one, so the content branch keeps the recipe's share of it (48 of 64)."""
    if rank < 2:
        raise ValueError("SplitFlux needs a rank of at least 2: its content adapter has two branches")
    ratio = defaults["content_rank"] / defaults["rank"]
    return {"content_rank": min(rank - 1, max(1, round(rank * ratio)))}


SPEC = register_recipe(RecipeSpec(
    key="splitflux",
    command="splitflux",
    name="SplitFlux",
    label="SplitFlux · Flux",
    arch="flux",
    blurb="Content and style from Flux's single-stream blocks, with a re-embedding content part.",
    cli_help="SplitFlux on Flux (content and style single-stream blocks)",
    settings=SplitFluxRequest,
    train=train_splitflux,
    settings_for=settings_for,
    make_recipe=SplitFluxRecipe,
    train_config=train_config,
    job_fields=job_fields,
    load_pipeline=_load_pipeline,
    parts=PARTS,
    composition=COMPOSITION,
    samples=SAMPLES,
    preview_prompt=PREVIEW_PROMPT,
    subject="[c] object",
    token_format="[c{number}]",
    style_token_format="[s{number}]",
    token_hint="content token, automatic, e.g. [c42] (style token [s42])",
    extras=_content_rank_for,
    card_notes=card_notes,
    card_settings=("content_rank", "rca_alpha", "complementary_weight", "complementary_reduction", "optimizer",
                   "style_text"),
))
