"""Deterministic tiny models built from configs, for tests and offline use.

`tiny-sdxl` keeps SDXL's UNet topology (block types, three attention blocks in `up_blocks.0`, two text
encoders feeding a text-time conditioning) at a width small enough to train on a CPU in seconds. `tiny-flux`
keeps FLUX.1-dev's 19 double-stream and 38 single-stream blocks, its CLIP + T5 text encoders, guidance
embedding, 16-channel VAE and flow-matching scheduler, scaled down only in width, so a block index means the
same as in FLUX.1. The weights are random but seeded, so every build is bit-identical. The folder written is
a normal diffusers folder: `DiffusionPipeline.from_pretrained(folder)` loads it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
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


CLIP_VOCAB_SIZE = 256 * 2 + 2  # the byte-level vocabulary written by _write_clip_tokenizer


def _clip_config(hidden: int, act: str, projection: int):
    """A two-layer CLIP text encoder over the tiny byte-level vocabulary."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=CLIP_VOCAB_SIZE - 2,
        eos_token_id=CLIP_VOCAB_SIZE - 1,
        pad_token_id=CLIP_VOCAB_SIZE - 1,
        hidden_act=act,
        projection_dim=projection,
    )


def tiny_sdxl_components(seed: int = 0) -> dict:
    """Build the tiny SDXL components in memory (seeded)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    te_hidden, te2_hidden, te2_proj = 32, 32, 32
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(te_hidden, "quick_gelu", te_hidden))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(te2_hidden, "gelu", te2_proj))
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


def _clip_tokenizer(folder: Path):
    """The tiny CLIP tokenizer, written to a scratch folder inside `folder` and loaded back."""
    from transformers import CLIPTokenizer

    staging = folder / "_tokenizer"
    _write_clip_tokenizer(staging)
    tokenizer = CLIPTokenizer.from_pretrained(staging)
    shutil.rmtree(staging)
    return tokenizer


def _write_marker(folder: Path, name: str, version: int, seed: int, resolution: int) -> None:
    """blockstudio.json: which tiny model, build version, seed and native resolution a folder holds."""
    (folder / "blockstudio.json").write_text(
        json.dumps({"name": name, "version": version, "seed": seed, "resolution": resolution}, indent=2)
    )


def _write_tiny_sdxl(folder: Path, seed: int = 0) -> None:
    from diffusers import StableDiffusionXLPipeline

    tokenizer = _clip_tokenizer(folder)
    pipe = StableDiffusionXLPipeline(
        tokenizer=tokenizer, tokenizer_2=tokenizer, force_zeros_for_empty_prompt=True, add_watermarker=False,
        **tiny_sdxl_components(seed),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    _write_marker(folder, "tiny-sdxl", TINY_SDXL_VERSION, seed, TINY_SDXL_RESOLUTION)


TINY_FLUX_VERSION = 1
TINY_FLUX_RESOLUTION = 64
TINY_FLUX_T5_PIECES = "".join(chr(c) for c in range(ord("!"), ord("~") + 1))  # printable ASCII


def _t5_tokenizer():
    """A T5 (Unigram) tokenizer over single characters, built in code: any ASCII prompt tokenizes."""
    from transformers import T5TokenizerFast

    # T5's layout: <pad>=0, </s>=1, <unk>=2, then the pieces. Each character exists alone and with the
    # word-start marker, so the Unigram model always finds a segmentation without unknown pieces.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in TINY_FLUX_T5_PIECES:
        vocab.append((ch, -3.0))
        vocab.append(("\u2581" + ch, -3.0))
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def tiny_flux_components(seed: int = 0, t5_vocab_size: int | None = None) -> dict:
    """Build the tiny Flux components in memory (seeded)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    clip_hidden, t5_hidden = 32, 32
    if t5_vocab_size is None:
        t5_vocab_size = len(_t5_tokenizer())
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(clip_hidden, "quick_gelu", clip_hidden))
    torch.manual_seed(seed + 1)
    # T5 v1.1 as in FLUX.1 (gated GELU, no tied embeddings), two layers wide enough to tell prompts apart.
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=t5_vocab_size,
            d_model=t5_hidden,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    torch.manual_seed(seed + 2)
    # FLUX.1-dev's layout (19 double, 38 single blocks, guidance embedding, 64 packed input channels);
    # width 2 heads x 32 = 64 instead of 24 x 128, RoPE axes (8, 12, 12) sum to the head size as (16, 56, 56).
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=t5_hidden,
        pooled_projection_dim=clip_hidden,
        guidance_embeds=True,
        axes_dims_rope=(8, 12, 12),
    )
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=TINY_FLUX_RESOLUTION,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "scheduler": scheduler,
    }


def _write_tiny_flux(folder: Path, seed: int = 0) -> None:
    from diffusers import FluxPipeline

    tokenizer = _clip_tokenizer(folder)
    tokenizer_2 = _t5_tokenizer()
    pipe = FluxPipeline(tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                        **tiny_flux_components(seed, t5_vocab_size=len(tokenizer_2)))
    pipe.save_pretrained(folder, safe_serialization=True)
    _write_marker(folder, "tiny-flux", TINY_FLUX_VERSION, seed, TINY_FLUX_RESOLUTION)


TINY_BUILDERS = {
    "tiny-sdxl": (TINY_SDXL_VERSION, _write_tiny_sdxl),
    "tiny-flux": (TINY_FLUX_VERSION, _write_tiny_flux),
}


def tiny_model_path(name: str) -> Path:
    """Return the folder of a tiny model, building it once (atomically) if it is not there yet."""
    if name not in TINY_BUILDERS:
        raise KeyError(f"unknown tiny model {name!r}; choose from {sorted(TINY_BUILDERS)}")
    version, build = TINY_BUILDERS[name]
    return built_model_folder(f"{name}-v{version}", build)


def built_model_folder(folder_name: str, build: Callable[[Path], None]) -> Path:
    """`$BLOCKSTUDIO_HOME/models/<folder_name>`, made by `build(staging)` and moved in whole on first use."""
    root = home_dir() / "models"
    folder = root / folder_name
    if (folder / "model_index.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder_name}-", dir=root))
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
