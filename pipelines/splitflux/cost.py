"""What one SplitFlux training step costs: its FLOPs and memory counted on the meta device (`pipelines.cost`)."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from pipelines.cost import StepCost, count_step, flash_attention_on_meta, meta_model, step_cost


def splitflux_step_cost(model: str = "flux-random", resolution: int = 1024, *, settings=None,
                        text_length: int | None = None, base: str = "bf16", optimizer: str = "adamw",
                        flash: bool = True, transformer_config=None) -> StepCost:
    """One SplitFlux step on `model`'s transformer (or one with `transformer_config`) at `resolution` px: the
    recipe's `predict` and losses on the meta device."""
    from pipelines.splitflux import SplitFluxRecipe, SplitFluxSettings

    settings = settings or SplitFluxSettings(resolution=resolution)
    transformer = meta_model(model, "transformer", transformer_config)
    transformer.requires_grad_(False)
    recipe = SplitFluxRecipe(types.SimpleNamespace(transformer=transformer), None, settings)
    recipe.add_adapters()
    trainable = recipe.trainable_parameters()
    config = transformer.config
    text_length = text_length or settings.max_sequence_length
    side = resolution // 16  # 8x VAE, then 2x2 packing
    meta = {"device": "meta", "dtype": torch.bfloat16}
    streams = 2 if settings.style_text == "stream" else 1
    recipe.prompt_embeds = torch.empty(2, text_length, config.joint_attention_dim, **meta)
    recipe.pooled = torch.empty(2, config.pooled_projection_dim, **meta)
    recipe.txt_ids = torch.zeros(text_length, 3, **meta)
    recipe.img_ids = torch.zeros(side * side, 3, **meta)
    recipe.checkpointing = False
    recipe.accelerator = None

    def step() -> torch.Tensor:
        packed = torch.empty(1, side * side, config.in_channels, **meta)
        guidance = torch.ones(1, device="meta") if config.guidance_embeds else None
        prediction = recipe.predict(packed, torch.ones(1, device="meta"), guidance)
        loss = F.mse_loss(prediction.float(), torch.empty(prediction.shape, device="meta"))
        if settings.complementary_weight > 0 and recipe.gated_layers():
            loss = loss + settings.complementary_weight * recipe.complementary_loss()
        return loss

    units = [transformer.single_transformer_blocks[i] for i in range(min(settings.trained_blocks),
                                                                      len(transformer.single_transformer_blocks))]
    try:
        with flash_attention_on_meta(flash):
            counts = count_step(transformer, step, units, trainable)
    finally:
        recipe.remove_adapters()
    return step_cost("splitflux", model, resolution, transformer, trainable, counts, base=base,
                     optimizer=optimizer, details={"rank": settings.rank, "text_length": text_length,
                                                   "image_tokens": side * side, "streams": streams})
