"""Deterministic tiny models built from configs, for tests and offline use.

`tiny-sdxl` keeps SDXL's UNet topology (block types, three attention blocks in `up_blocks.0`, two text
encoders feeding a text-time conditioning) at a width small enough to train on a CPU in seconds. The weights
are random but seeded, so every build is bit-identical. The folder written is a normal diffusers folder:
`DiffusionPipeline.from_pretrained(folder)` loads it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from pipelines.storage import home_dir

TINY_SDXL_VERSION = 1
TINY_SDXL_RESOLUTION = 64

# One shared text vocabulary for every tiny model: byte-level symbols with and without the end-of-word
# marker, plus CLIP's two special tokens. No merges, so any string tokenizes (one token per character).


def _bytes_to_unicode() -> list[str]:
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def _write_clip_tokenizer(folder: Path, model_max_length: int = 77) -> int:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt, configs) into `folder`; return its vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2)
    )
    return len(vocab)


def tiny_sdxl_components(seed: int = 0) -> dict:
    """Build the tiny SDXL components in memory (seeded)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab_size = 256 * 2 + 2
    te_hidden, te2_hidden, te2_proj = 32, 32, 32
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=te_hidden,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
            hidden_act="quick_gelu",
            projection_dim=te_hidden,
        )
    )
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=te2_hidden,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
            hidden_act="gelu",
            projection_dim=te2_proj,
        )
    )
    torch.manual_seed(seed + 2)
    # SDXL: DownBlock2D then two cross-attention down blocks; the mirror on the way up. transformer depth
    # (1, 1, 2) stands in for SDXL's (1, 2, 10); up_blocks.0 therefore has three attention blocks of two
    # transformer layers each, the same names B-LoRA targets on the real model.
    unet = UNet2DConditionModel(
        sample_size=TINY_SDXL_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=te_hidden + te2_hidden,
        norm_num_groups=16,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + te2_proj,
    )
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_SDXL_RESOLUTION,
        scaling_factor=0.13025,
        force_upcast=False,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "scheduler": scheduler,
    }


def _write_tiny_sdxl(folder: Path, seed: int = 0) -> None:
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    staging = folder / "_tokenizer"
    _write_clip_tokenizer(staging)
    tokenizer = CLIPTokenizer.from_pretrained(staging)
    shutil.rmtree(staging)
    pipe = StableDiffusionXLPipeline(
        tokenizer=tokenizer, tokenizer_2=tokenizer, force_zeros_for_empty_prompt=True, add_watermarker=False,
        **tiny_sdxl_components(seed),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "blockstudio.json").write_text(
        json.dumps({"name": "tiny-sdxl", "version": TINY_SDXL_VERSION, "seed": seed,
                    "resolution": TINY_SDXL_RESOLUTION}, indent=2)
    )


TINY_BUILDERS = {
    "tiny-sdxl": (TINY_SDXL_VERSION, _write_tiny_sdxl),
}


def tiny_model_path(name: str) -> Path:
    """Return the folder of a tiny model, building it once (atomically) if it is not there yet."""
    if name not in TINY_BUILDERS:
        raise KeyError(f"unknown tiny model {name!r}; choose from {sorted(TINY_BUILDERS)}")
    version, build = TINY_BUILDERS[name]
    root = home_dir() / "models"
    folder = root / f"{name}-v{version}"
    if (folder / "model_index.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        build(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:
            # Another process finished first; its folder is identical (seeded build).
            if not (folder / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
