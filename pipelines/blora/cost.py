"""What one B-LoRA training step costs: its FLOPs and memory counted on the meta device (`pipelines.cost`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipelines.cost import StepCost, count_step, flash_attention_on_meta, meta_model, step_cost


def blora_step_cost(model: str = "sdxl-random", resolution: int = 1024, *, rank: int = 64, base: str = "bf16",
                    optimizer: str = "adamw", flash: bool = True, unet_config=None) -> StepCost:
    """One B-LoRA step on `model`'s UNet (or one with `unet_config`) at `resolution` px, batch 1: the recipe's
    `loss` on the meta device."""
    from pipelines.blora import BLoRASettings, add_blora_adapter, checkpointing_units

    unet = meta_model(model, "unet", unet_config)
    unet.requires_grad_(False)
    add_blora_adapter(unet, BLoRASettings(rank=rank, resolution=resolution), seed=0)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    config = unet.config
    latent = resolution // 8
    meta = {"device": "meta", "dtype": torch.bfloat16}
    text_dim = config.cross_attention_dim
    pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim

    def step() -> torch.Tensor:
        noisy = torch.empty(1, config.in_channels, latent, latent, **meta)
        prediction = unet(noisy, torch.zeros(1, dtype=torch.long, device="meta"),
                          encoder_hidden_states=torch.empty(1, 77, text_dim, **meta),
                          added_cond_kwargs={"text_embeds": torch.empty(1, pooled_dim, **meta),
                                             "time_ids": torch.empty(1, 6, **meta)},
                          return_dict=False)[0]
        return F.mse_loss(prediction.float(), torch.empty(prediction.shape, device="meta"))

    with flash_attention_on_meta(flash):
        counts = count_step(unet, step, checkpointing_units(unet), trainable)
    return step_cost("b-lora", model, resolution, unet, trainable, counts, base=base, optimizer=optimizer,
                     details={"rank": rank, "latent": [latent, latent]})
