"""SplitFlux's forward pass through a Flux transformer: the style prompt as a second text stream that enters at the
first style block, and the visual gate of the content blocks, set per image token before each block runs.

`split_forward` is what training predicts with (the package docstring says why the style prompt travels as a
stream of its own); `install_gates` hooks the content blocks so that their gated layers know, for each call,
where the text tokens end and how strongly each image token is gated.
"""

from __future__ import annotations

from typing import Any

import torch

from pipelines.adapters import VisualGatedLoRALinear, visual_gate


def _block_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(image tokens, text tokens) entering a Flux single-stream block, called by keyword or by position."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
    return hidden, text


def gate_hook(layers: list[VisualGatedLoRALinear], source: str):
    """Before a content block: the text/image split of its sequence, and (with `source="block_input"`) the gate
    of each image token from the norms of the block's input."""

    def hook(module, args, kwargs):
        hidden, text = _block_inputs(args, kwargs)
        gate = visual_gate(hidden, layers[0].config.eps) if source == "block_input" else None
        for layer in layers:
            layer.set_token_layout(text.shape[1], image_gate=gate)

    return hook


def clear_hook(layers: list[VisualGatedLoRALinear]):
    """After a content block: its layers forget the call's layout."""

    def hook(module, args, output):
        for layer in layers:
            layer.clear_token_layout()

    return hook


def install_gates(blocks: torch.nn.ModuleList, gated: dict[int, list[VisualGatedLoRALinear]],
                  source: str) -> list[Any]:
    """Hook the gate onto each content block (`gated`: block index -> its gated layers); return the handles."""
    handles = []
    for index, layers in gated.items():
        block = blocks[index]
        handles.append(block.register_forward_pre_hook(gate_hook(layers, source), with_kwargs=True))
        handles.append(block.register_forward_hook(clear_hook(layers)))
    return handles


def split_forward(transformer: torch.nn.Module, settings: Any, packed: torch.Tensor, timestep: torch.Tensor,
                  guidance: torch.Tensor | None, *, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
                  txt_ids: torch.Tensor, img_ids: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
    """The transformer's forward with SplitFlux's two prompts; the packed prediction.

    `prompt_embeds` and `pooled` hold the content prompt first, the style prompt second. With
    `settings.style_text == "stream"` both run as a batch of two through the frozen prefix and the blocks before
    the first style block (the style stream without gradients); entering the first style block, the content
    stream's text tokens are replaced by the style stream's. With "embedding" only the content stream runs and
    the style prompt's `context_embedder` output is swapped in there. The embedders, the double-stream blocks
    and the single blocks before the first trained one run under `torch.no_grad()`, so no autograd graph exists
    before the first trained block; with `checkpointing` each later block is recomputed in the backward pass.
    """
    t = transformer
    blocks = t.single_transformer_blocks
    streams = 2 if settings.style_text == "stream" else 1
    first_trained = min(settings.trained_blocks)
    style_entry = min(settings.style_blocks)
    with torch.no_grad():
        hidden = t.x_embedder(packed.repeat(streams, 1, 1))
        steps = timestep.to(hidden.dtype).repeat(streams) * 1000
        pooled = pooled[:streams]
        if guidance is not None:
            temb = t.time_text_embed(steps, guidance.to(hidden.dtype).repeat(streams) * 1000, pooled)
        else:
            temb = t.time_text_embed(steps, pooled)
        text = t.context_embedder(prompt_embeds[:streams])
        rotary = t.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        for block in t.transformer_blocks:
            text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb,
                                 image_rotary_emb=rotary)
        for index in range(first_trained):
            text, hidden = blocks[index](hidden_states=hidden, encoder_hidden_states=text, temb=temb,
                                         image_rotary_emb=rotary)
    content_text, content_hidden, content_temb = text[:1], hidden[:1], temb[:1]
    style_text, style_hidden, style_temb = text[1:], hidden[1:], temb[1:]
    for index in range(first_trained, len(blocks)):
        if index == style_entry:
            if streams == 2:
                content_text = style_text
            else:
                with torch.no_grad():
                    content_text = t.context_embedder(prompt_embeds[1:2])
        block = blocks[index]
        if streams == 2 and index < style_entry:
            with torch.no_grad():
                style_text, style_hidden = block(hidden_states=style_hidden, encoder_hidden_states=style_text,
                                                 temb=style_temb, image_rotary_emb=rotary)
        if checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            content_text, content_hidden = checkpoint(block, content_hidden, content_text, content_temb, rotary,
                                                      use_reentrant=False)
        else:
            content_text, content_hidden = block(hidden_states=content_hidden, encoder_hidden_states=content_text,
                                                 temb=content_temb, image_rotary_emb=rotary)
    return t.proj_out(t.norm_out(content_hidden, content_temb))


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens, FluxPipeline's packing."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def _latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)
