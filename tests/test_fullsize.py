"""sdxl-random and flux-random: the real architectures from the shipped configs, random weights, never offered.

The full-size models are only ever built on the meta device here (shapes, no storage); the writer that makes
their folders is exercised on the tiny models' configs.
"""

from __future__ import annotations

import hashlib
import json
import types

import pytest
import torch

from pipelines.fullsize import FULLSIZE, config_folder, meta_components, write_random_model


def _config(name: str, component: str) -> dict:
    return json.loads((config_folder(name) / component / "config.json").read_text())


def _trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def sdxl_meta():
    return meta_components("sdxl-random")


@pytest.fixture(scope="module")
def flux_meta():
    return meta_components("flux-random")


def test_full_size_models_have_the_real_sizes(sdxl_meta, flux_meta):
    sizes = {f"{name}/{c}": sum(p.numel() for p in m.parameters())
             for name, meta in (("sdxl", sdxl_meta), ("flux", flux_meta)) for c, m in meta.items()}
    # The published sizes: SDXL's UNet 2.6 B, CLIP ViT-bigG's text tower 0.69 B, FLUX.1's transformer 12 B,
    # T5 v1.1 XXL's encoder 4.8 B, CLIP ViT-L's text tower 123 M.
    assert round(sizes["sdxl/unet"] / 1e9, 1) == 2.6
    assert round(sizes["sdxl/text_encoder_2"] / 1e9, 2) == 0.69
    assert round(sizes["flux/transformer"] / 1e9) == 12
    assert round(sizes["flux/text_encoder_2"] / 1e9, 1) == 4.8
    assert round(sizes["flux/text_encoder"] / 1e6) == round(sizes["sdxl/text_encoder"] / 1e6) == 123
    assert all(p.device.type == "meta" for m in (*sdxl_meta.values(), *flux_meta.values()) for p in m.parameters())


def test_blora_on_full_size_sdxl_trains_the_parameters_its_config_implies(sdxl_meta):
    from pipelines.blora import BLOCKS, BLoRASettings, add_blora_adapter

    unet = sdxl_meta["unet"]
    unet.requires_grad_(False)
    settings = BLoRASettings()
    names = add_blora_adapter(unet, settings, seed=0)
    try:
        config = _config("sdxl-random", "unet")
        width = config["block_out_channels"][-1]  # up_blocks.0 runs at the deepest width
        text = config["cross_attention_dim"]
        layers = config["transformer_layers_per_block"][-1]  # up_blocks.0 mirrors the deepest down block
        r = settings.rank
        self_attention = 4 * r * (width + width)  # to_q, to_k, to_v, to_out.0: width -> width
        cross_attention = 2 * r * (width + width) + 2 * r * (text + width)  # to_k, to_v read the text
        expected = len(BLOCKS) * layers * (self_attention + cross_attention)
        assert _trainable(unet) == expected
        assert len(names) == len(BLOCKS) * layers * 8
        assert all(n.startswith(tuple(BLOCKS.values())) for n in names)
    finally:
        unet.delete_adapters("blora")


def test_splitflux_on_full_size_flux_trains_the_parameters_its_config_implies(flux_meta):
    from pipelines.splitflux import SplitFluxRecipe, SplitFluxSettings

    transformer = flux_meta["transformer"]
    transformer.requires_grad_(False)
    settings = SplitFluxSettings()
    recipe = SplitFluxRecipe(types.SimpleNamespace(transformer=transformer), None, settings)
    recipe.add_adapters()
    try:
        config = _config("flux-random", "transformer")
        inner = config["num_attention_heads"] * config["attention_head_dim"]
        assert len(transformer.single_transformer_blocks) == config["num_single_layers"]
        per_rank = len(settings.target_modules) * (inner + inner)  # to_q, to_k, to_v: inner -> inner
        ranks = {"content": settings.content_rank + settings.residual_rank, "boundary": settings.boundary_rank,
                 "style": settings.rank}
        expected = sum(len(getattr(settings, f"{role}_blocks")) * ranks[role] * per_rank for role in ranks)
        assert _trainable(transformer) == sum(p.numel() for p in recipe.trainable_parameters()) == expected
        assert round(expected / 1e6, 2) == 43.65  # the count the SplitFlux paper reports
    finally:
        recipe.remove_adapters()
    assert _trainable(transformer) == 0


def _tree_digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_random_model_folder_is_sharded_bf16_deterministic_and_loads(tiny_sdxl_path, tmp_path):
    from diffusers import DiffusionPipeline

    components = ("unet", "vae", "text_encoder", "text_encoder_2")
    tokenizers = {"tokenizer": "clip", "tokenizer_2": "clip"}
    for build in ("a", "b"):
        write_random_model(tiny_sdxl_path, tmp_path / build, components, tokenizers, seed=3, shard_bytes=64_000)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    index = json.loads((tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (tmp_path / "a" / "text_encoder" / "model.safetensors.index.json").is_file()

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "a", torch_dtype=torch.bfloat16)
    unet = pipe.unet
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    assert all(torch.isfinite(p.float()).all() for p in unet.parameters())
    norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert all(torch.equal(m.weight.float(), torch.ones_like(m.weight.float())) for m in norms)
    ids = pipe.tokenizer("A [v1] photo").input_ids
    assert max(ids) < pipe.text_encoder.config.vocab_size


def test_models_path_builds_a_random_model_on_demand(tiny_sdxl_path, monkeypatch, capsys):
    import pipelines.fullsize as fullsize
    from studio.cli import main

    monkeypatch.setattr(fullsize, "config_folder", lambda name: tiny_sdxl_path)
    assert main(["models", "path", "sdxl-random"]) == 0
    folder = fullsize.fullsize_model_path("sdxl-random")
    assert capsys.readouterr().out.strip() == str(folder)
    marker = json.loads((folder / "blockstudio.json").read_text())
    assert marker["name"] == "sdxl-random" and marker["config_of"] == FULLSIZE["sdxl-random"].repo_id


def test_random_weight_models_are_never_offered(tmp_path, monkeypatch):
    from studio.app import default_models
    from studio.methods import check_model, models_for

    offered = {s.name for arch in ("sdxl", "flux") for s in models_for(arch)}
    assert offered and not offered & set(FULLSIZE)
    for name in FULLSIZE:
        with pytest.raises(ValueError, match="choose one of the list"):
            check_model(name, "sdxl" if name.startswith("sdxl") else "flux")
    monkeypatch.setenv("BLOCKSTUDIO_MODEL", "sdxl-random")
    assert default_models(True)["sdxl"] == "sdxl"
