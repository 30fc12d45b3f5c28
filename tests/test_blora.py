"""B-LoRA on tiny-sdxl: which modules are trained, that training learns, and what the package holds."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from pipelines.blora import (
    CONTENT_BLOCK,
    STYLE_BLOCK,
    BLoRARecipe,
    BLoRASettings,
    default_train_config,
    split_by_block,
    target_modules,
)
from pipelines.images import center_crop_square, load_image
from pipelines.training import train
from tests.conftest import EXAMPLES


def _recipe(pipe, rank=4):
    crop = center_crop_square(load_image(EXAMPLES / "cat.jpg"), 64)
    return BLoRARecipe(pipe, crop, BLoRASettings(token="[v1]", rank=rank, resolution=64))


def test_lora_touches_exactly_the_attention_projections_of_the_two_blocks(tiny_sdxl_pipe, tmp_path):
    recipe = _recipe(tiny_sdxl_pipe)
    train(recipe, default_train_config(steps=1, checkpoint_every=0), tmp_path)
    from peft.tuners.lora import LoraLayer

    wrapped = {n for n, m in tiny_sdxl_pipe.unet.named_modules() if isinstance(m, LoraLayer)}
    expected = set()
    for block in (CONTENT_BLOCK, STYLE_BLOCK):
        for layer in range(2):  # tiny-sdxl: two transformer layers per block in up_blocks.0
            for attn in ("attn1", "attn2"):
                for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                    expected.add(f"{block}.transformer_blocks.{layer}.{attn}.{proj}")
    assert wrapped == expected
    trainable = {n for n, p in tiny_sdxl_pipe.unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(n.startswith((CONTENT_BLOCK + ".", STYLE_BLOCK + ".")) for n in trainable)


def test_target_modules_skip_the_third_attention_block_and_feed_forward(tiny_sdxl_pipe):
    names = target_modules(tiny_sdxl_pipe.unet)
    assert not any("attentions.2" in n or ".ff." in n or "proj_in" in n for n in names)
    assert len(names) == 2 * 2 * 2 * 4


def test_training_loss_on_one_image_falls(tiny_sdxl_pipe, tmp_path):
    """Same image, same noise and timestep every step: the loss must go down steadily.

    A random-weight model gives the LoRA a weak signal, so the draw is fixed to make the fall visible and
    the test deterministic; the real recipe draws fresh noise every step.
    """
    recipe = _recipe(tiny_sdxl_pipe)
    draw = recipe.loss
    recipe.loss = lambda generator: draw(torch.Generator().manual_seed(5))
    result = train(recipe, default_train_config(steps=30, learning_rate=3e-3, checkpoint_every=0), tmp_path)
    losses = result.loss_history
    assert losses[-1] < 0.97 * losses[0]
    assert sum(b < a for a, b in zip(losses, losses[1:], strict=False)) >= 25


def test_base_weights_are_untouched_by_training(tiny_sdxl_pipe, tmp_path):
    before = {k: v.clone() for k, v in tiny_sdxl_pipe.unet.state_dict().items() if "lora" not in k}
    recipe = _recipe(tiny_sdxl_pipe)
    train(recipe, default_train_config(steps=5, learning_rate=1e-2, checkpoint_every=0), tmp_path)
    recipe.remove_adapter()
    after = tiny_sdxl_pipe.unet.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_content_file_holds_only_block_0_and_style_file_only_block_1(cat_package):
    for part, block, other in (("content", CONTENT_BLOCK, STYLE_BLOCK), ("style", STYLE_BLOCK, CONTENT_BLOCK)):
        with safe_open(str(cat_package / f"{part}.safetensors"), framework="pt") as f:
            keys = list(f.keys())
        assert keys
        assert all(k.startswith(f"unet.{block}.") for k in keys), keys[0]
        assert not any(other in k for k in keys)
    with safe_open(str(cat_package / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        full = list(f.keys())
    assert len(full) == 2 * len(keys)


def test_split_by_block_partitions_the_full_adapter(cat_package):
    from pipelines.package import AdapterPackage

    full = AdapterPackage.open(cat_package).state_dict("full")
    parts = split_by_block(full)
    assert set(parts["content"]) | set(parts["style"]) == set(full)
    assert not set(parts["content"]) & set(parts["style"])


def test_package_metadata_and_adapter_json(cat_package):
    info = json.loads((cat_package / "adapter.json").read_text())
    assert info["method"] == "b-lora" and info["base_model"] == "tiny-sdxl"
    assert info["blocks"] == {"content": CONTENT_BLOCK, "style": STYLE_BLOCK}
    assert info["ranks"] == {"content": 4, "style": 4}
    assert info["prompt"] == f"A {info['token']}"
    assert info["steps"] == 30 and info["seed"] == 0 and "diffusers" in info["versions"]
    with safe_open(str(cat_package / "content.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["blockstudio.method"] == "b-lora"
    assert meta["blockstudio.token"] == info["token"]
    assert meta["blockstudio.part"] == "content"
    assert json.loads(meta["lora_adapter_metadata"])["unet.r"] == 4
    with safe_open(str(cat_package / "kohya" / "cat_style.safetensors"), framework="pt") as f:
        kmeta = f.metadata()
    assert kmeta["ss_network_dim"] == "4" and kmeta["modelspec.trigger_phrase"] == info["token"]


def test_model_card_has_hub_front_matter_and_sample_widgets(cat_package):
    card = (cat_package / "README.md").read_text()
    front = card.split("---")[1]
    # tiny-sdxl is not SDXL: the card names no Hub base model, and says how to load the tiny one.
    assert "base_model:" not in front and 'from_pretrained(model_path("tiny-sdxl"))' in card
    assert "b-lora" in front and "widget:" in front and "samples/full.png" in front
    assert "tiny random-weight model" in card
    for sample in ("input", "full", "content", "style"):
        assert (cat_package / "samples" / f"{sample}.png").is_file()


def test_token_is_unique_to_the_image():
    from pipelines.package import token_for_image

    cat = center_crop_square(load_image(EXAMPLES / "cat.jpg"), 64)
    coffee = center_crop_square(load_image(EXAMPLES / "coffee.jpg"), 64)
    assert token_for_image(cat) == token_for_image(cat.copy())
    assert token_for_image(cat) != token_for_image(coffee)
    assert token_for_image(cat).startswith("[v")


@pytest.mark.parametrize("bad", ["../x", "a b", "[c]", "", "x" * 40, "tok;rm"])
def test_unsafe_tokens_are_refused(bad):
    from pipelines.errors import UnsafeName
    from pipelines.package import check_token

    with pytest.raises(UnsafeName):
        check_token(bad)


def test_fp16_training_beside_bf16_keeps_fp32_lora_on_an_fp16_unet(tmp_path):
    """The official command trains in fp16: the UNet runs in fp16, the LoRA factors and the package stay fp32."""
    from pipelines.blora import TrainRequest, train_blora
    from pipelines.models import load_pipeline

    pipe = load_pipeline("tiny-sdxl")
    dtypes = set()

    def record(module, args, kwargs):
        dtypes.add((args[0] if args else kwargs["sample"]).dtype)

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        package = train_blora(TrainRequest(image=EXAMPLES / "cat.jpg", out=tmp_path / "cat", model="tiny-sdxl",
                                           steps=3, rank=4, learning_rate=1e-3, checkpoint_every=0,
                                           sample_steps=1, mixed_precision="fp16"), pipe=pipe)
    finally:
        handle.remove()
    assert torch.float16 in dtypes
    with safe_open(str(package / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if ".lora.up." in k)
    assert (package / "samples" / "full.png").is_file()
