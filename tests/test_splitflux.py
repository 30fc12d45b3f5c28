"""SplitFlux on tiny-flux: block ranges and ranks, the gate in the model, two prompts, loss, export, CLI, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import formats
from pipelines.adapters import LoRALinear, RankConstrainedLinear, VisualGatedLoRALinear, adapter_layers
from pipelines.errors import BlockStudioError
from pipelines.splitflux import (
    SplitFluxRecipe,
    SplitFluxRequest,
    SplitFluxSettings,
    default_train_config,
    format_blocks,
    parse_blocks,
    train_splitflux,
)
from tests.conftest import EXAMPLES

TEXT_LEN = 16  # T5 tokens in recipe-level tests (packages use tiny-flux's default of 32)


@pytest.fixture(scope="session")
def flux_path(blockstudio_home) -> Path:
    from pipelines.models import model_path

    return model_path("tiny-flux")


@pytest.fixture()
def flux_pipe(flux_path):
    """A freshly loaded tiny-flux pipeline (function scope: tests put adapters on it)."""
    from pipelines.models import load_pipeline

    return load_pipeline("tiny-flux")


@pytest.fixture(scope="session")
def shared_pipe(flux_path):
    """One pipeline for the session's training runs (train_splitflux gives it back without adapters)."""
    from pipelines.models import load_pipeline

    return load_pipeline("tiny-flux")


def crop(name: str = "cat.jpg") -> Image.Image:
    from pipelines.images import center_crop_square, load_image

    return center_crop_square(load_image(EXAMPLES / name), 64)


def make_recipe(pipe, **overrides) -> SplitFluxRecipe:
    from accelerate import Accelerator

    from pipelines.training import _allow_new_precision

    options = dict(token="[c1]", style_token="[s1]", resolution=64, max_sequence_length=TEXT_LEN)
    options.update(overrides)
    config_options = {"gradient_checkpointing": options.pop("gradient_checkpointing", None),
                      "seed": options.pop("seed", 0)}
    recipe = SplitFluxRecipe(pipe, crop(), SplitFluxSettings(**options))
    _allow_new_precision("no")  # fp32, whatever an earlier test in this process chose
    recipe.setup(Accelerator(mixed_precision="no", cpu=True), default_train_config(**config_options))
    return recipe


@pytest.fixture()
def recipe(flux_pipe):
    made = make_recipe(flux_pipe)
    yield made
    made.remove_adapters()


def randomize_up_factors(recipe: SplitFluxRecipe, seed: int = 0, std: float = 0.05) -> None:
    """Give every adapter a non-zero update (lora_B starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in recipe.layers.values():
            for name, p in layer.named_parameters(recurse=False):
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * std)


def train_tiny_flux(out: Path, image: str = "cat.jpg", pipe=None, **overrides) -> Path:
    options = dict(model="tiny-flux", steps=12, learning_rate=1e-3, checkpoint_every=0, sample_steps=2,
                   samples=False)
    options.update(overrides)
    return train_splitflux(SplitFluxRequest(image=EXAMPLES / image, out=out, **options), pipe=pipe)


@pytest.fixture(scope="session")
def cat_flux_package(tmp_path_factory, shared_pipe) -> Path:
    return train_tiny_flux(tmp_path_factory.mktemp("flux") / "cat", "cat.jpg", pipe=shared_pipe, samples=True,
                           token="[c5]", style_token="[s5]")


@pytest.fixture(scope="session")
def coffee_flux_package(tmp_path_factory, shared_pipe) -> Path:
    return train_tiny_flux(tmp_path_factory.mktemp("flux") / "coffee", "coffee.jpg", pipe=shared_pipe)


def load_file(path: Path) -> dict[str, torch.Tensor]:
    tensors, _ = formats.read_safetensors(path)
    return tensors


def canonical(path: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(path)
    modules = sorted({k[len("transformer."):].rsplit(".lora.", 1)[0] for k in tensors})
    return formats.normalize_lora(tensors, modules, component="transformer")


def block_ranks(state: dict[str, torch.Tensor]) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for module, (a, _) in formats.lora_modules(state).items():
        assert module.startswith("single_transformer_blocks."), module
        out.setdefault(int(module.split(".")[1]), set()).add(int(a.shape[0]))
    return out


# -- tiny-flux ------------------------------------------------------------------------------------------


def test_tiny_flux_keeps_flux1_block_layout_and_both_text_encoders(flux_pipe):
    t = flux_pipe.transformer
    assert len(t.transformer_blocks) == 19 and len(t.single_transformer_blocks) == 38
    assert t.config.guidance_embeds and t.config.in_channels == 64
    assert sum(t.config.axes_dims_rope) == t.config.attention_head_dim
    assert type(flux_pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(flux_pipe.text_encoder_2).__name__ == "T5EncoderModel"
    assert flux_pipe.vae.config.latent_channels == 16 and flux_pipe.vae.config.shift_factor == pytest.approx(0.1159)
    assert type(flux_pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


def test_tiny_flux_tokenizers_handle_studio_prompts(flux_pipe):
    t5 = flux_pipe.tokenizer_2
    ids = t5("A [c12] object in [s3] style").input_ids
    assert t5.unk_token_id not in ids and ids[-1] == t5.eos_token_id
    assert t5("A [c1] object").input_ids != t5("A [s1] style").input_ids


def test_tiny_flux_build_is_deterministic():
    from pipelines.tiny import tiny_flux_components

    first = tiny_flux_components(0)["transformer"].state_dict()
    second = tiny_flux_components(0)["transformer"].state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


# -- settings -------------------------------------------------------------------------------------------


def test_block_ranges_parse_and_format():
    assert parse_blocks("0-9") == tuple(range(10))
    assert parse_blocks("10, 11") == (10, 11)
    assert parse_blocks("none") == () and parse_blocks("") == ()
    assert parse_blocks([3, 1, 1]) == (1, 3)
    assert format_blocks(parse_blocks("0-3,5,7-8")) == "0-3,5,7-8"
    with pytest.raises(BlockStudioError):
        parse_blocks("9-2")
    with pytest.raises(BlockStudioError):
        parse_blocks("blocks")


@pytest.mark.parametrize("overrides,message", [
    (dict(content_blocks=(0, 1), style_blocks=(1, 2)), "both a content and a style block"),
    (dict(style_blocks=(38,)), "does not exist"),
    (dict(content_blocks=(13,), boundary_blocks=(), style_blocks=(12,)), "must come after"),
    (dict(content_rank=64), "content rank"),
    (dict(rca_alpha=3), "divisor"),
    (dict(target_modules=("norm.linear",)), "token-wise"),
    (dict(resolution=72), "multiple of 16"),
    (dict(text_gate=1.5), "text gate"),
    (dict(style_blocks=()), "style blocks are empty"),
    (dict(quantize_base="int3"), "quantize base"),
])
def test_settings_reject_bad_values_with_one_line(overrides, message):
    with pytest.raises(BlockStudioError, match=message) as info:
        SplitFluxSettings(**overrides).validate()
    assert "\n" not in str(info.value)


# -- adapters on the model ------------------------------------------------------------------------------


def test_modules_touched_per_block_range_and_their_ranks(recipe):
    layers = adapter_layers(recipe.transformer)
    assert set(layers) == set(recipe.layers) and len(layers) == 38 * 3
    for name, layer in layers.items():
        prefix, index, target = name.split(".", 2)
        assert prefix == "single_transformer_blocks" and target in ("attn.to_q", "attn.to_k", "attn.to_v")
        index = int(index)
        if index <= 9:
            assert isinstance(layer, VisualGatedLoRALinear)
            assert layer.lora_A_content.shape[0] == 48 and layer.lora_A_residual.shape[0] == 16
        elif index <= 11:
            assert isinstance(layer, RankConstrainedLinear)
            assert layer.rank == 32 and layer.scale == 2.0
        else:
            assert type(layer) is LoRALinear
            assert layer.rank == 64 and layer.scale == 1.0
    trainable = {n for n, p in recipe.transformer.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(recipe.trainable_parameters()) == len(trainable)
    # The paper's count: rank 64 (48 + 16) on 10 blocks, 32 on 2, 64 on 26; d_in + d_out = 2 * 64 here.
    width = recipe.transformer.inner_dim
    expected = 3 * 2 * width * (10 * 64 + 2 * 32 + 26 * 64)
    assert sum(p.numel() for p in recipe.trainable_parameters()) == expected


def test_block_ranges_and_target_modules_are_parameters(flux_pipe):
    recipe = make_recipe(flux_pipe, content_blocks=(2, 3), boundary_blocks=(), style_blocks=(20, 21),
                         target_modules=("proj_out",), rank=8, content_rank=6)
    try:
        kinds = {name: type(layer).__name__ for name, layer in recipe.layers.items()}
        assert kinds == {
            "single_transformer_blocks.2.proj_out": "VisualGatedLoRALinear",
            "single_transformer_blocks.3.proj_out": "VisualGatedLoRALinear",
            "single_transformer_blocks.20.proj_out": "LoRALinear",
            "single_transformer_blocks.21.proj_out": "LoRALinear",
        }
        loss, _ = recipe.loss(torch.Generator().manual_seed(0))
        loss.backward()
    finally:
        recipe.remove_adapters()
    assert adapter_layers(flux_pipe.transformer) == {}


def test_no_autograd_graph_before_the_first_trained_block(recipe):
    seen = []
    transformer = recipe.transformer

    def spy(label):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            seen.append((label, torch.is_grad_enabled(), hidden.requires_grad))
        return hook

    handles = [transformer.transformer_blocks[0].register_forward_pre_hook(spy("double0"), with_kwargs=True),
               transformer.transformer_blocks[18].register_forward_pre_hook(spy("double18"), with_kwargs=True),
               transformer.single_transformer_blocks[0].register_forward_pre_hook(spy("single0"), with_kwargs=True),
               transformer.single_transformer_blocks[1].register_forward_pre_hook(spy("single1"), with_kwargs=True)]
    try:
        loss, _ = recipe.loss(torch.Generator().manual_seed(0))
    finally:
        for handle in handles:
            handle.remove()
    assert ("double0", False, False) in seen and ("double18", False, False) in seen
    # Single block 0 is entered by the content stream with grad on but an input outside any graph.
    assert ("single0", True, False) in seen
    assert ("single1", True, True) in seen
    loss.backward()
    assert all(p.grad is not None for p in recipe.trainable_parameters()[:6])


def test_split_forward_equals_diffusers_forward_when_both_prompts_agree(recipe, flux_pipe):
    recipe.prompt_embeds = recipe.prompt_embeds[:1].repeat(2, 1, 1)
    recipe.pooled = recipe.pooled[:1].repeat(2, 1)
    packed, _, timestep = recipe.sample_latents(torch.Generator().manual_seed(3))
    guidance = torch.full((1,), 1.0)
    with torch.no_grad():
        ours = recipe.predict(packed, timestep, guidance)
        reference = flux_pipe.transformer(
            hidden_states=packed, encoder_hidden_states=recipe.prompt_embeds[:1],
            pooled_projections=recipe.pooled[:1], timestep=timestep, img_ids=recipe.img_ids,
            txt_ids=recipe.txt_ids, guidance=guidance, return_dict=False)[0]
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def _capture_block_inputs(recipe: SplitFluxRecipe, indices) -> dict[int, dict[str, dict]]:
    """{block: {"content" | "style": the keyword arguments it was entered with}} for one prediction.

    The prediction runs with autograd on, so the streams tell themselves apart: the style stream runs
    without gradients, the content stream with them.
    """
    captured: dict[int, dict[str, dict]] = {i: {} for i in indices}
    handles = []
    for i in indices:
        def hook(module, args, kwargs, i=i):
            stream = "content" if torch.is_grad_enabled() else "style"
            assert stream not in captured[i]
            captured[i][stream] = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        handles.append(recipe.transformer.single_transformer_blocks[i].register_forward_pre_hook(
            hook, with_kwargs=True))
    try:
        packed, _, timestep = recipe.sample_latents(torch.Generator().manual_seed(0))
        recipe.predict(packed, timestep, torch.full((1,), 1.0))
    finally:
        for handle in handles:
            handle.remove()
    return captured


def test_style_prompt_reaches_the_style_blocks_and_only_them(recipe, flux_pipe):
    randomize_up_factors(recipe)
    first = _capture_block_inputs(recipe, [0, 11, 12])
    # The style stream runs beside the content stream up to the first style block, and no further.
    assert set(first[0]) == {"content", "style"} and set(first[11]) == {"content", "style"}
    assert set(first[12]) == {"content"}
    # Entering block 12, the text tokens are the style stream's as it leaves block 11; the image tokens are
    # the content stream's.
    with torch.no_grad():
        style_text, _ = recipe.transformer.single_transformer_blocks[11](**first[11]["style"])
        _, content_image = recipe.transformer.single_transformer_blocks[11](**first[11]["content"])
    torch.testing.assert_close(first[12]["content"]["encoder_hidden_states"], style_text)
    torch.testing.assert_close(first[12]["content"]["hidden_states"], content_image)
    # Another style prompt changes nothing the content stream sees before block 12, and changes the text
    # tokens (not the image tokens) entering block 12.
    with torch.no_grad():
        other_embeds, other_pooled, _ = flux_pipe.encode_prompt("A [s9] style", prompt_2=None,
                                                                max_sequence_length=TEXT_LEN)
    recipe.prompt_embeds = torch.cat([recipe.prompt_embeds[:1], other_embeds])
    recipe.pooled = torch.cat([recipe.pooled[:1], other_pooled])
    second = _capture_block_inputs(recipe, [0, 11, 12])
    for key in ("hidden_states", "encoder_hidden_states"):
        assert torch.equal(second[11]["content"][key], first[11]["content"][key])
    assert torch.equal(second[12]["content"]["hidden_states"], first[12]["content"]["hidden_states"])
    assert not torch.allclose(second[12]["content"]["encoder_hidden_states"],
                              first[12]["content"]["encoder_hidden_states"])


def test_gate_inside_the_model_is_per_image_token(recipe):
    randomize_up_factors(recipe)
    layer = recipe.layers["single_transformer_blocks.0.attn.to_q"]
    seen = {}
    original = layer.token_gate

    def spy(x):
        gate = original(x)
        seen.setdefault("gate", gate.detach().clone())
        seen.setdefault("x", x.shape)
        return gate

    layer.token_gate = spy
    try:
        recipe.loss(torch.Generator().manual_seed(0))
    finally:
        del layer.token_gate
    gate = seen["gate"][0, :, 0]
    tokens = seen["x"][1]
    assert tokens == TEXT_LEN + 16  # 64 px -> 8x8 latents -> 16 packed image tokens
    assert torch.equal(gate[:TEXT_LEN], torch.ones(TEXT_LEN))
    image = gate[TEXT_LEN:]
    assert bool((image > 0).all() and (image < 1).all()) and image.std() > 0.05
    assert layer.image_gate is None  # cleared after the block


@pytest.mark.parametrize("source", ["block_input", "layer_input"])
def test_gate_features_are_a_parameter(flux_pipe, source):
    from pipelines.adapters import visual_gate

    recipe = make_recipe(flux_pipe, gate_source=source, text_gate=0.25)
    seen = {}
    block = recipe.transformer.single_transformer_blocks[2]
    layer = recipe.layers["single_transformer_blocks.2.attn.to_k"]
    original = layer.token_gate

    # Only the content stream's call (the style stream runs without gradients).
    def spy(x):
        if torch.is_grad_enabled():
            seen["gate"], seen["x"] = original(x).detach(), x.detach()
        return original(x)

    def entering(module, args, kwargs):
        if torch.is_grad_enabled():
            seen["block"] = kwargs["hidden_states"].detach()

    handle = block.register_forward_pre_hook(entering, with_kwargs=True)
    layer.token_gate = spy
    try:
        recipe.loss(torch.Generator().manual_seed(0))
    finally:
        del layer.token_gate
        handle.remove()
        recipe.remove_adapters()
    gate = seen["gate"][0, :, 0]
    assert torch.equal(gate[:TEXT_LEN], torch.full((TEXT_LEN,), 0.25))
    features = seen["block"] if source == "block_input" else seen["x"][:, TEXT_LEN:]
    torch.testing.assert_close(gate[TEXT_LEN:], visual_gate(features)[0])


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "flux_shift"])
def test_flow_matching_input_target_and_timestep_follow_their_formulas(flux_pipe, sampling):
    from diffusers import FluxPipeline

    recipe = make_recipe(flux_pipe, timestep_sampling=sampling)
    try:
        packed, target, timestep = recipe.sample_latents(torch.Generator().manual_seed(11))
    finally:
        recipe.remove_adapters()
    # The same draws in the same order: latent sample, noise, then u.
    generator = torch.Generator().manual_seed(11)
    x0 = recipe.latents.sample(generator)
    noise = torch.randn(x0.shape, generator=generator)
    if sampling == "uniform":
        u = float(torch.rand(1, generator=generator))
    else:
        u = 1.0 / (1.0 + math.exp(-float(torch.randn(1, generator=generator))))
    if sampling == "flux_shift":
        tokens = x0.shape[-2] * x0.shape[-1] // 4  # packed 2x2 patches
        mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)  # FLUX.1's base/max shift and sequence lengths
        sigma = math.exp(mu) / (math.exp(mu) + 1.0 / u - 1.0)
    else:
        sigma = (1000 - math.floor(1000 * u)) / 1000  # the scheduler's table: sigma_i = 1 - i / 1000
    assert timestep.item() == pytest.approx(sigma, rel=1e-6)

    def pack(latents):
        b, c, h, w = latents.shape
        return FluxPipeline._pack_latents(latents, b, c, h, w)

    torch.testing.assert_close(packed, pack((1.0 - sigma) * x0 + sigma * noise))
    torch.testing.assert_close(target, pack(noise - x0))


def test_flux_shift_moves_sigma_towards_noise_for_large_images(flux_pipe):
    recipe = make_recipe(flux_pipe, timestep_sampling="flux_shift")
    try:
        small = [recipe.draw_sigma(torch.Generator().manual_seed(k), 16).item() for k in range(50)]
        large = [recipe.draw_sigma(torch.Generator().manual_seed(k), 4096).item() for k in range(50)]
    finally:
        recipe.remove_adapters()
    assert all(0.0 < s < 1.0 for s in small + large)
    assert all(b > a for a, b in zip(small, large, strict=True))  # the same u, shifted further at 1024 px


def test_complementary_loss_is_summed_over_the_gated_layers_and_averaging_is_a_setting(recipe):
    from pipelines.adapters import complementary_loss

    randomize_up_factors(recipe)
    layers = recipe.gated_layers()
    assert len(layers) == 30  # 10 content blocks x q, k, v
    with torch.no_grad():
        total = sum(float(complementary_loss(layer.lora_A_content, layer.lora_B_content, layer.lora_A_residual,
                                             layer.lora_B_residual)) for layer in layers)
    assert recipe.complementary_loss().item() == pytest.approx(total, rel=1e-5)
    loss, terms = recipe.loss(torch.Generator().manual_seed(0))
    assert terms["complementary"] == pytest.approx(total, rel=1e-5)
    assert loss.item() == pytest.approx(terms["mse"] + 0.1 * total, rel=1e-5)
    recipe.settings.complementary_reduction = "mean"
    assert recipe.complementary_loss().item() == pytest.approx(total / 30, rel=1e-5)


def _down_factors(pipe, seed: int, **overrides) -> dict[str, torch.Tensor]:
    recipe = make_recipe(pipe, seed=seed, **overrides)
    try:
        return {k: v.clone() for k, v in recipe.adapter_state_dict().items() if ".lora_A" in k}
    finally:
        recipe.remove_adapters()


def test_adapter_init_comes_from_the_runs_seed(flux_pipe):
    first, same, other = (_down_factors(flux_pipe, seed) for seed in (0, 0, 1))
    assert all(torch.equal(first[k], same[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first)
    # Gaussian down factors with std 1/rank in every kind of layer; up factors start at zero.
    for key, rank in (("single_transformer_blocks.2.attn.to_q.lora_A_content", 48),
                      ("single_transformer_blocks.2.attn.to_q.lora_A_residual", 16),
                      ("single_transformer_blocks.10.attn.to_q.lora_A", 32),
                      ("single_transformer_blocks.20.attn.to_q.lora_A", 64)):
        assert first[key].shape[0] == rank
        assert first[key].std().item() == pytest.approx(1 / rank, rel=0.1)
    kaiming = _down_factors(flux_pipe, 0, lora_init="kaiming")
    a = kaiming["single_transformer_blocks.20.attn.to_q.lora_A"]
    bound = 1 / math.sqrt(a.shape[1])  # Kaiming-uniform with a = sqrt(5), PEFT's default
    assert a.abs().max().item() <= bound and a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


def test_loss_has_the_complementary_term_with_its_weight(recipe):
    randomize_up_factors(recipe)
    loss, terms = recipe.loss(torch.Generator().manual_seed(0))
    assert terms["complementary"] > 0
    assert loss.item() == pytest.approx(terms["mse"] + 0.1 * terms["complementary"], rel=1e-5)
    recipe.settings.complementary_weight = 0.0
    _, terms = recipe.loss(torch.Generator().manual_seed(0))
    assert "complementary" not in terms


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(flux_pipe):
    results = []
    for checkpointing in (False, True):
        recipe = make_recipe(flux_pipe, gradient_checkpointing=checkpointing)
        try:
            assert recipe.checkpointing is checkpointing
            randomize_up_factors(recipe)
            loss, _ = recipe.loss(torch.Generator().manual_seed(0))
            loss.backward()
            results.append((loss.item(), [p.grad.clone() for p in recipe.trainable_parameters()]))
        finally:
            recipe.remove_adapters()
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_style_text_embedding_mode_is_cheaper_and_differs(flux_pipe):
    recipe = make_recipe(flux_pipe, style_text="embedding")
    try:
        randomize_up_factors(recipe)
        captured = _capture_block_inputs(recipe, [0, 12])
        assert set(captured[0]) == {"content"}  # no second stream
        with torch.no_grad():
            expected = recipe.transformer.context_embedder(recipe.prompt_embeds[1:2])
        torch.testing.assert_close(captured[12]["content"]["encoder_hidden_states"], expected)
    finally:
        recipe.remove_adapters()


def test_training_loss_falls(flux_pipe, tmp_path):
    from pipelines.training import train

    recipe = make_recipe(flux_pipe)

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(np.mean([recipe.loss(torch.Generator().manual_seed(100 + k))[1]["mse"] for k in range(6)]))

    try:
        before = held_out_loss()
        config = default_train_config(steps=30, learning_rate=2e-3, checkpoint_every=0)
        result = train(recipe, config, tmp_path / "work")
        after = held_out_loss()
    finally:
        recipe.remove_adapters()
    assert after < 0.9 * before
    assert np.mean(result.loss_history[-10:]) < np.mean(result.loss_history[:10])


def test_export_parts_follow_the_paper_and_bake_rca_alpha(recipe):
    randomize_up_factors(recipe)
    parts = recipe.export_parts()
    assert set(parts) == {"content", "content_reembed", "boundary", "style"}
    assert block_ranks(parts["content"]) == {i: {64} for i in range(10)}
    assert block_ranks(parts["content_reembed"]) == {i: {48} for i in range(10)}
    assert block_ranks(parts["boundary"]) == {10: {32}, 11: {32}}
    assert block_ranks(parts["style"]) == {i: {64} for i in range(12, 38)}
    boundary = recipe.layers["single_transformer_blocks.10.attn.to_k"]
    exported_b = parts["boundary"]["single_transformer_blocks.10.attn.to_k.lora_B.weight"]
    torch.testing.assert_close(exported_b, 2.0 * boundary.lora_B.detach())
    gated = recipe.layers["single_transformer_blocks.3.attn.to_v"]
    a = parts["content_reembed"]["single_transformer_blocks.3.attn.to_v.lora_A.weight"]
    b = parts["content_reembed"]["single_transformer_blocks.3.attn.to_v.lora_B.weight"]
    torch.testing.assert_close(b @ a, (gated.lora_B_content @ gated.lora_A_content).detach())
    a = parts["content"]["single_transformer_blocks.3.attn.to_v.lora_A.weight"]
    b = parts["content"]["single_transformer_blocks.3.attn.to_v.lora_B.weight"]
    torch.testing.assert_close(b @ a, (gated.lora_B_content @ gated.lora_A_content
                                       + gated.lora_B_residual @ gated.lora_A_residual).detach())
    style = recipe.layers["single_transformer_blocks.20.attn.to_q"]
    a = parts["style"]["single_transformer_blocks.20.attn.to_q.lora_A.weight"]
    b = parts["style"]["single_transformer_blocks.20.attn.to_q.lora_B.weight"]
    torch.testing.assert_close(b @ a, (style.lora_B @ style.lora_A).detach())


def test_no_boundary_blocks_means_no_boundary_part(flux_pipe):
    recipe = make_recipe(flux_pipe, boundary_blocks=(), style_blocks=tuple(range(10, 38)))
    try:
        assert set(recipe.export_parts()) == {"content", "content_reembed", "style"}
    finally:
        recipe.remove_adapters()


def test_fp8_base_trains_with_fp32_adapters(flux_pipe):
    recipe = make_recipe(flux_pipe, quantize_base="fp8")
    try:
        base = recipe.layers["single_transformer_blocks.0.attn.to_q"].base_layer
        assert base.weight.dtype == torch.float8_e4m3fn
        assert flux_pipe.transformer.transformer_blocks[0].ff.net[2].weight.dtype == torch.float8_e4m3fn
        assert all(p.dtype == torch.float32 for p in recipe.trainable_parameters())
        randomize_up_factors(recipe)
        loss, _ = recipe.loss(torch.Generator().manual_seed(0))
        loss.backward()
        assert torch.isfinite(loss) and recipe.trainable_parameters()[0].grad.abs().sum() > 0
    finally:
        recipe.remove_adapters()


def test_fp8_samples_use_own_layers_that_compute_what_diffusers_computes(cat_flux_package, flux_pipe):
    from pipelines.generation import sample_with_parts
    from pipelines.package import AdapterPackage
    from pipelines.splitflux import sample_with_own_layers

    package = AdapterPackage.open(cat_flux_package)
    parts = {"content": package.state_dict("content"), "style": package.state_dict("style")}
    spec = flux_pipe.blockstudio_model
    ours = np.asarray(sample_with_own_layers(flux_pipe, parts, "A [c5] object", 64, 2, 0, spec), dtype=float)
    assert adapter_layers(flux_pipe.transformer) == {}
    theirs = np.asarray(sample_with_parts(flux_pipe, parts, "A [c5] object", 64, 2, 0, spec), dtype=float)
    plain = np.asarray(sample_with_parts(flux_pipe, {}, "A [c5] object", 64, 2, 0, spec), dtype=float)
    assert np.abs(ours - theirs).max() <= 2
    assert np.abs(plain - theirs).max() > 10


def test_nf4_without_bitsandbytes_or_cuda_fails_in_one_line(tmp_path):
    from pipelines.splitflux import check_quantization

    try:
        import bitsandbytes  # noqa: F401
        has_bnb = torch.cuda.is_available()
    except ImportError:
        has_bnb = False
    if has_bnb:
        pytest.skip("bitsandbytes and CUDA are available here")
    with pytest.raises(BlockStudioError, match="nf4 needs") as info:
        check_quantization("nf4")
    assert "\n" not in str(info.value)
    out = tmp_path / "pkg"
    with pytest.raises(BlockStudioError, match="nf4"):
        train_tiny_flux(out, quantize_base="nf4")
    assert not out.exists() and not (tmp_path / "pkg.partial").exists()


# -- the package ----------------------------------------------------------------------------------------


def test_package_holds_every_part_and_describes_itself(cat_flux_package):
    names = {p.relative_to(cat_flux_package).as_posix() for p in cat_flux_package.rglob("*") if p.is_file()}
    for required in ("pytorch_lora_weights.safetensors", "content.safetensors", "content_reembed.safetensors",
                     "boundary.safetensors", "style.safetensors", "kohya/cat.safetensors",
                     "kohya/cat_content.safetensors", "kohya/cat_content_reembed.safetensors",
                     "kohya/cat_boundary.safetensors", "kohya/cat_style.safetensors", "adapter.json",
                     "README.md", "loss.json", "samples/input.png", "samples/full.png", "samples/mix.png",
                     "samples/content.png", "samples/content_reembed.png", "samples/style.png"):
        assert required in names, required
    info = json.loads((cat_flux_package / "adapter.json").read_text())
    assert info["method"] == "splitflux" and info["arch"] == "flux" and info["base_model"] == "tiny-flux"
    assert info["token"] == "[c5]" and info["style_token"] == "[s5]"
    assert info["content_prompt"] == "A [c5] object" and info["style_prompt"] == "A [s5] style"
    assert info["blocks"] == {"content": "single_transformer_blocks.0-9",
                              "boundary": "single_transformer_blocks.10-11",
                              "style": "single_transformer_blocks.12-37"}
    assert info["ranks"]["content_reembed"] == 48 and info["ranks"]["boundary"] == 32
    assert info["rca"] == {"alpha": 2, "rank": 32, "alpha_baked_into_lora_B": True}
    assert info["gate"]["text_tokens"] == 1.0 and info["steps"] == 12
    assert not cat_flux_package.with_name("cat.partial").exists()
    assert Image.open(cat_flux_package / "samples/input.png").size == (64, 64)
    card = (cat_flux_package / "README.md").read_text()
    assert "content_reembed.safetensors" in card and "FluxPipeline" in card
    # The card's diffusers example loads what mixing loads.
    assert 'weight_name="content_reembed.safetensors", adapter_name="content"' in card


def test_each_part_holds_what_the_paper_loads_read_from_its_files_alone(cat_flux_package):
    files = {part: canonical(cat_flux_package / f"{part}.safetensors")
             for part in ("content", "content_reembed", "boundary", "style")}
    # Re-embedding and mixing: dW_cnt alone, on the content blocks only.
    assert block_ranks(files["content_reembed"]) == {i: {48} for i in range(10)}
    # Disentangled content: dW_cnt (+) dW_res on the content blocks only, the very dW_cnt above at weight 1,
    # then the trained residual branch.
    assert block_ranks(files["content"]) == {i: {64} for i in range(10)}
    reembed = formats.lora_modules(files["content_reembed"])
    for module, (a, b) in formats.lora_modules(files["content"]).items():
        assert torch.equal(a[:48], reembed[module][0]) and torch.equal(b[:, :48], reembed[module][1])
        assert b[:, 48:].abs().sum() > 0
    # The boundary blocks, a part of their own; the style blocks.
    assert block_ranks(files["boundary"]) == {10: {32}, 11: {32}}
    assert block_ranks(files["style"]) == {i: {64} for i in range(12, 38)}
    # The whole adapter is content, boundary and style, nothing more or less.
    full = canonical(cat_flux_package / "pytorch_lora_weights.safetensors")
    union = {**files["content"], **files["boundary"], **files["style"]}
    assert len(union) == len(files["content"]) + len(files["boundary"]) + len(files["style"])
    assert sorted(full) == sorted(union) and all(torch.equal(full[k], union[k]) for k in full)


def test_adapter_json_records_the_composition_and_each_parts_blocks_branches_and_scales(cat_flux_package):
    info = json.loads((cat_flux_package / "adapter.json").read_text())
    assert info["composition"] == {"name": "paper", "optional": ["boundary"], "uses": {
        "mix": "content_reembed", "content": "content", "reembed": "content_reembed", "style": "style"}}
    parts = info["parts"]
    assert parts["content"]["branches"] == {"content": 1.0, "residual": 1.0}
    assert parts["content_reembed"]["branches"] == {"content": 1.0}
    assert parts["boundary"]["branches"] == {"rca": 2.0}
    assert parts["style"]["branches"] == {"style": 1.0}
    assert parts["full"]["parts"] == ["content", "boundary", "style"]
    # What adapter.json says each part holds is what its file holds.
    for part in ("content", "content_reembed", "boundary", "style"):
        ranks = block_ranks(canonical(cat_flux_package / f"{part}.safetensors"))
        assert parts[part]["blocks"] == f"single_transformer_blocks.{format_blocks(sorted(ranks))}"
        assert set().union(*ranks.values()) == {parts[part]["rank"]}
        _, metadata = formats.read_safetensors(cat_flux_package / f"{part}.safetensors")
        assert metadata["blockstudio.part"] == part
    assert info["complementary_reduction"] == "sum" and info["optimizer"] == "Adam, 32-bit state"
    assert info["lora_init"] == "gaussian"


def test_paper_silent_choices_are_named_settings_in_the_docstring_the_cli_and_the_card(cat_flux_package):
    import dataclasses

    import pipelines.splitflux as recipe_module
    from studio.cli import build_parser

    settings = {f.name: f.default for f in dataclasses.fields(SplitFluxSettings)}
    requested = {f.name for f in dataclasses.fields(SplitFluxRequest)}
    args = vars(build_parser().parse_args(["train", "splitflux", "--image", "x.png", "--out", "x"]))
    card = (cat_flux_package / "README.md").read_text()
    info = json.loads((cat_flux_package / "adapter.json").read_text())
    for name in recipe_module.PAPER_SILENT:
        default = settings[name]
        shown = (f"`{','.join(default)}`" if isinstance(default, tuple)
                 else f'"{default}"' if isinstance(default, str) else repr(default))
        assert f"- `{name}` ({shown})" in recipe_module.__doc__, name
        assert name in requested and {"guidance": "training_guidance"}.get(name, name) in args, name
        assert f"| {name} | `" in card, name
        assert name in info["paper_silent"], name


def test_package_files_have_the_right_blocks_and_ranks(cat_flux_package):
    full = canonical(cat_flux_package / "pytorch_lora_weights.safetensors")
    assert block_ranks(full) == {**{i: {64} for i in range(10)}, 10: {32}, 11: {32},
                                 **{i: {64} for i in range(12, 38)}}
    assert block_ranks(canonical(cat_flux_package / "content.safetensors")) == {i: {64} for i in range(10)}
    assert block_ranks(canonical(cat_flux_package / "content_reembed.safetensors")) == {i: {48} for i in range(10)}
    assert block_ranks(canonical(cat_flux_package / "boundary.safetensors")) == {10: {32}, 11: {32}}
    assert set(block_ranks(canonical(cat_flux_package / "style.safetensors"))) == set(range(12, 38))
    _, metadata = formats.read_safetensors(cat_flux_package / "style.safetensors")
    assert metadata["blockstudio.style_token"] == "[s5]" and metadata["blockstudio.method"] == "splitflux"


def test_kohya_files_name_each_module_and_round_trip(cat_flux_package):
    kohya = load_file(cat_flux_package / "kohya" / "cat.safetensors")
    assert all(k.startswith("lora_transformer_single_transformer_blocks_") for k in kohya)
    assert "lora_transformer_single_transformer_blocks_10_attn_to_q.lora_down.weight" in kohya
    _, style_meta = formats.read_safetensors(cat_flux_package / "kohya" / "cat_style.safetensors")
    assert style_meta["modelspec.trigger_phrase"] == "[s5]" and style_meta["ss_network_dim"] == "64"
    assert kohya["lora_transformer_single_transformer_blocks_10_attn_to_q.lora_up.weight"].shape == (64, 32)
    full = canonical(cat_flux_package / "pytorch_lora_weights.safetensors")
    back = formats.normalize_lora(kohya, sorted(formats.lora_modules(full)), component="transformer")
    assert sorted(back) == sorted(full)
    for key in full:
        torch.testing.assert_close(back[key], full[key])


def test_exported_loras_reload_in_plain_diffusers_with_their_scale(cat_flux_package, flux_path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_path)
    pipe.load_lora_weights(cat_flux_package, adapter_name="full")
    full = canonical(cat_flux_package / "pytorch_lora_weights.safetensors")
    for module in ("single_transformer_blocks.4.attn.to_q", "single_transformer_blocks.10.attn.to_v",
                   "single_transformer_blocks.30.attn.to_k"):
        layer = pipe.transformer.get_submodule(module)
        expected = full[f"{module}.lora_B.weight"] @ full[f"{module}.lora_A.weight"]
        torch.testing.assert_close(layer.get_delta_weight("full"), expected)
    # Without the file's metadata (as previews load parts) the mixed ranks still keep scale 1.
    pipe.load_lora_weights(formats.to_diffusers(full, "transformer"), adapter_name="bare")
    boundary = pipe.transformer.get_submodule("single_transformer_blocks.11.attn.to_q")
    torch.testing.assert_close(boundary.get_delta_weight("bare"), boundary.get_delta_weight("full"))


def _run_cli(argv: list[str]) -> int:
    from studio.cli import main

    return main(argv)


def test_cli_generate_mixes_packages_and_plain_diffusers_reproduces_it(cat_flux_package, coffee_flux_package, flux_path,
                                                                       tmp_path):
    from diffusers import FluxPipeline

    out = tmp_path / "mix.png"
    code = _run_cli(["generate", "--content", str(cat_flux_package), "--style", str(coffee_flux_package), "--prompt",
                     "A [c] object in [s] style", "--seed", "3", "--out", str(out)])
    assert code == 0 and out.is_file()
    coffee = json.loads((coffee_flux_package / "adapter.json").read_text())
    prompt = f"A [c5] object in {coffee['style_token']} style"
    pipe = FluxPipeline.from_pretrained(flux_path)
    # The paper's mix: the content branch of one package (the part mixing loads by default) and another's style.
    pipe.load_lora_weights(cat_flux_package, weight_name="content_reembed.safetensors", adapter_name="content")
    pipe.load_lora_weights(coffee_flux_package, weight_name="style.safetensors", adapter_name="style")
    pipe.set_adapters(["content", "style"], adapter_weights=[1.0, 1.0])
    image = pipe(prompt, num_inference_steps=4, guidance_scale=3.5, width=64, height=64,
                 generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(image))
    # The adapters do change the image.
    pipe.disable_lora()
    plain = pipe(prompt, num_inference_steps=4, guidance_scale=3.5, width=64, height=64,
                 generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(image))


def test_cli_generate_reembeds_a_subject_with_the_content_branch(cat_flux_package, tmp_path):
    outs = []
    for part in ("content_reembed", "content"):
        out = tmp_path / f"{part}.png"
        code = _run_cli(["generate", "--content", str(cat_flux_package), "--content-part", part, "--prompt",
                         "A [c] object wearing a hat", "--out", str(out)])
        assert code == 0
        outs.append(np.asarray(Image.open(out)))
    assert not np.array_equal(outs[0], outs[1])


def _adapter_blocks(transformer) -> dict[str, dict[int, set[int]]]:
    """{adapter name: {single block: ranks}} of the LoRA layers diffusers loaded into the transformer."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, dict[int, set[int]]] = {}
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer) and name.startswith("single_transformer_blocks."):
            for adapter, linear in module.lora_A.items():
                out.setdefault(adapter, {}).setdefault(int(name.split(".")[1]), set()).add(linear.out_features)
    return out


def _plain_flux(flux_path, loads: list[tuple[Path, str, str, float]], prompt: str, seed: int):
    """What a user writes with diffusers alone: load the files as named adapters, set scales, CPU generator."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_path)
    pipe.set_progress_bar_config(disable=True)
    for folder, weight_name, adapter, _ in loads:
        pipe.load_lora_weights(folder, weight_name=weight_name, adapter_name=adapter)
    pipe.set_adapters([a for _, _, a, _ in loads], adapter_weights=[w for *_, w in loads])
    return pipe(prompt, num_inference_steps=2, guidance_scale=3.5, width=64, height=64,
                generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def test_mix_loads_the_content_branch_and_style_and_the_boundary_only_when_asked(
        cat_flux_package, coffee_flux_package, flux_path):
    from dataclasses import replace

    from pipelines.generation import AdapterChoice, StudioPipeline
    from pipelines.package import AdapterPackage

    cat, coffee = AdapterPackage.open(cat_flux_package), AdapterPackage.open(coffee_flux_package)
    studio = StudioPipeline("tiny-flux")
    content, style = AdapterChoice.for_use(cat, "mix"), AdapterChoice.for_use(coffee, "style", 1.2)
    assert (content.part, style.part) == ("content_reembed", "style")
    prompt = "A [c] object in [s] style"
    studio.generate(prompt, content=content, style=style, steps=2)
    loaded = _adapter_blocks(studio.pipe.transformer)
    assert loaded == {"content": {i: {48} for i in range(10)}, "style": {i: {64} for i in range(12, 38)}}
    # The boundary blocks join as an adapter of their own, at the content scale, only when asked for.
    with_boundary = replace(content, scale=0.7, extras=("boundary",))
    image = studio.generate(prompt, content=with_boundary, style=style, seed=1, steps=2)[0]
    assert _adapter_blocks(studio.pipe.transformer)["content_boundary"] == {10: {32}, 11: {32}}
    expanded = prompt.replace("[c]", cat.token).replace("[s]", coffee.style_token)
    reference = _plain_flux(flux_path, [(cat_flux_package, "content_reembed.safetensors", "c", 0.7),
                                        (cat_flux_package, "boundary.safetensors", "b", 0.7),
                                        (coffee_flux_package, "style.safetensors", "s", 1.2)], expanded, seed=1)
    assert np.array_equal(np.asarray(image), np.asarray(reference))
    studio.generate(prompt, content=content, style=style, steps=2)
    assert set(_adapter_blocks(studio.pipe.transformer)) == {"content", "style"}


def test_package_in_the_old_layout_still_loads_mixes_and_says_so(cat_flux_package, coffee_flux_package, flux_path,
                                                                 tmp_path, capsys):
    from pipelines.model_card import render_model_card
    from pipelines.package import AdapterPackage
    from tests.legacy_packages import old_splitflux_layout

    old = old_splitflux_layout(cat_flux_package, tmp_path / "cat-old")
    assert block_ranks(canonical(old / "content.safetensors")) == {**{i: {64} for i in range(10)}, 10: {32}, 11: {32}}
    package = AdapterPackage.open(old)
    assert package.composition["recorded"] is False
    assert (package.part_for("mix"), package.part_for("reembed")) == ("content", "content_reembed")
    line = package.composition_line()
    assert line.startswith("older package") and "plus the boundary blocks" in line
    # It mixes as it always did: its content part, boundary blocks included, with another package's style.
    out = tmp_path / "mix.png"
    assert _run_cli(["generate", "--content", str(old), "--style", str(coffee_flux_package), "--prompt",
                     "A [c] object in [s] style", "--seed", "2", "--steps", "2", "--out", str(out)]) == 0
    style_token = json.loads((coffee_flux_package / "adapter.json").read_text())["style_token"]
    reference = _plain_flux(flux_path, [(old, "content.safetensors", "c", 1.0),
                                        (coffee_flux_package, "style.safetensors", "s", 1.0)],
                            f"A {package.token} object in {style_token} style", seed=2)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(reference))
    # Its boundary blocks are inside its content parts: asking for them apart says what the package has.
    code = _run_cli(["generate", "--content", str(old), "--with-boundary", "--out", str(tmp_path / "b.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no 'boundary' part" in err and "\n" not in err
    card = render_model_card(package.info)
    assert "content.safetensors" in card and "boundary.safetensors" not in card


# -- training runs --------------------------------------------------------------------------------------


def test_resume_equals_an_uninterrupted_run(tmp_path, shared_pipe):
    from pipelines.training import CancelToken, TrainingCancelled

    options = dict(steps=6, checkpoint_every=2, pipe=shared_pipe)
    straight = train_tiny_flux(tmp_path / "straight", **options)
    cancel = CancelToken()
    out = tmp_path / "resumed"

    def stop_at_three(event):
        if event.step == 3:
            cancel.cancel()

    with pytest.raises(TrainingCancelled):
        train_splitflux(SplitFluxRequest(image=EXAMPLES / "cat.jpg", out=out, model="tiny-flux", steps=6,
                                         learning_rate=1e-3, checkpoint_every=2, samples=False),
                        pipe=shared_pipe, on_progress=stop_at_three, cancel=cancel)
    assert not out.exists() and (tmp_path / "resumed.partial" / "checkpoint-000003").is_dir()
    assert adapter_layers(shared_pipe.transformer) == {}
    with pytest.raises(ValueError, match="--resume"):
        train_tiny_flux(out, **options)
    train_tiny_flux(out, resume=True, **options)
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(out / "pytorch_lora_weights.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((straight / "loss.json").read_text()) == json.loads((out / "loss.json").read_text())


def test_previews_during_training_reach_the_callback(tmp_path, shared_pipe):
    previews = []
    train_splitflux(SplitFluxRequest(image=EXAMPLES / "cat.jpg", out=tmp_path / "pkg", model="tiny-flux", steps=2,
                                     sample_every=1, sample_steps=1, checkpoint_every=0, samples=False),
                    pipe=shared_pipe, on_sample=lambda step, image: previews.append((step, image.size)))
    assert previews == [(1, (64, 64)), (2, (64, 64))]
    assert adapter_layers(shared_pipe.transformer) == {}


def test_gpu_memory_options_run_the_same_code_path_on_cpu(tmp_path):
    """bf16 mixed precision, gradient checkpointing, fp8 storage and previews (the GPU path) on a CPU."""
    from pipelines.models import load_pipeline

    previews = []
    package = train_splitflux(
        SplitFluxRequest(image=EXAMPLES / "cat.jpg", out=tmp_path / "p", model="tiny-flux", steps=4,
                         learning_rate=1e-3, mixed_precision="bf16", gradient_checkpointing=True,
                         quantize_base="fp8", sample_every=2, sample_steps=1, checkpoint_every=0),
        pipe=load_pipeline("tiny-flux"), on_sample=lambda step, image: previews.append((step, image.size)))
    assert previews == [(2, (64, 64)), (4, (64, 64))]
    weights = load_file(package / "pytorch_lora_weights.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora.up" in k)
    assert (package / "samples" / "full.png").is_file()


def test_resume_with_other_settings_is_refused(tmp_path, shared_pipe):
    from pipelines.training import CancelToken, TrainingCancelled

    cancel = CancelToken()
    out = tmp_path / "pkg"
    with pytest.raises(TrainingCancelled):
        train_splitflux(SplitFluxRequest(image=EXAMPLES / "cat.jpg", out=out, model="tiny-flux", steps=4,
                                         checkpoint_every=0, samples=False),
                        pipe=shared_pipe, on_progress=lambda e: cancel.cancel(), cancel=cancel)
    with pytest.raises(ValueError, match="rca_alpha"):
        train_tiny_flux(out, steps=4, rca_alpha=4, resume=True, pipe=shared_pipe)


def test_cli_trains_a_splitflux_package(tmp_path):
    out = tmp_path / "cli-pkg"
    code = _run_cli(["train", "splitflux", "--image", str(EXAMPLES / "rocket.jpg"), "--out", str(out), "--model",
                     "tiny-flux", "--steps", "2", "--no-samples", "--boundary-blocks", "none",
                     "--style-blocks", "10-37", "--rank", "8", "--content-rank", "6"])
    assert code == 0
    info = json.loads((out / "adapter.json").read_text())
    assert info["blocks"]["boundary"] == "single_transformer_blocks.none"
    assert block_ranks(canonical(out / "content.safetensors")) == {i: {8} for i in range(10)}


@pytest.mark.parametrize("argv,message", [
    (["--model", "tiny-sdxl"], "needs a Flux model"),
    (["--content-blocks", "0-12"], "both a content and a boundary block"),
    (["--rank", "64", "--content-rank", "64"], "content rank"),
    (["--target-modules", "attn.to_out.0"], "token-wise"),
    (["--token", "../x"], "not allowed"),
])
def test_cli_rejects_bad_input_in_one_line_and_writes_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "pkg"
    code = _run_cli(["train", "splitflux", "--image", str(EXAMPLES / "cat.jpg"), "--out", str(out),
                     "--model", "tiny-flux", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_corrupt_image_is_rejected_and_nothing_written(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    out = tmp_path / "pkg"
    code = _run_cli(["train", "splitflux", "--image", str(bad), "--out", str(out), "--model", "tiny-flux"])
    assert code == 2 and "bad.png" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.png"]
