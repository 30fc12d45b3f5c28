"""Generation and mixing: exported files reproduce the CLI's image in plain diffusers, warm swaps, prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.errors import BlockStudioError, InvalidAdapter
from pipelines.generation import AdapterChoice, StudioPipeline, expand_prompt
from pipelines.package import AdapterPackage
from studio.cli import main


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _plain_diffusers(path, files: list[tuple[str, str, str, float]], prompt: str, seed: int = 0):
    """What a user would write with diffusers alone: load the files, set scales, CPU generator."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    for folder, weight_name, name, _ in files:
        pipe.load_lora_weights(folder, weight_name=weight_name, adapter_name=name)
    if files:
        pipe.set_adapters([f[2] for f in files], adapter_weights=[f[3] for f in files])
    return pipe(prompt, num_inference_steps=4, guidance_scale=5.0, width=64, height=64,
                generator=torch.Generator("cpu").manual_seed(seed)).images[0]


def test_exported_files_in_plain_diffusers_reproduce_the_cli_image(cat_package, coffee_package, tiny_sdxl_path,
                                                                   tmp_path):
    out = tmp_path / "mix.png"
    rc = main(["generate", "--model", "tiny-sdxl", "--content", str(cat_package), "--style", str(coffee_package),
               "--content-scale", "0.8", "--style-scale", "1.2", "--prompt", "A [c] in [s] style",
               "--seed", "3", "--steps", "4", "--guidance", "5", "--width", "64", "--height", "64",
               "--out", str(out)])
    assert rc == 0
    cat, coffee = AdapterPackage.open(cat_package), AdapterPackage.open(coffee_package)
    reference = _plain_diffusers(
        tiny_sdxl_path,
        [(str(cat_package), "content.safetensors", "c", 0.8), (str(coffee_package), "style.safetensors", "s", 1.2)],
        f"A {cat.token} in {coffee.token} style", seed=3,
    )
    assert np.array_equal(_pixels(Image.open(out)), _pixels(reference))
    base = _plain_diffusers(tiny_sdxl_path, [], f"A {cat.token} in {coffee.token} style", seed=3)
    assert not np.array_equal(_pixels(base), _pixels(reference))


def test_kohya_file_gives_the_same_image_as_the_diffusers_file(cat_package, tiny_sdxl_path):
    token = AdapterPackage.open(cat_package).token
    diffusers_image = _plain_diffusers(tiny_sdxl_path, [(str(cat_package), "pytorch_lora_weights.safetensors",
                                                         "a", 1.0)], f"A {token}")
    kohya_image = _plain_diffusers(tiny_sdxl_path, [(str(cat_package / "kohya"), "cat.safetensors", "a", 1.0)],
                                   f"A {token}")
    base_image = _plain_diffusers(tiny_sdxl_path, [], f"A {token}")
    assert np.abs(_pixels(diffusers_image) - _pixels(kohya_image)).max() <= 1
    assert np.abs(_pixels(diffusers_image) - _pixels(base_image)).max() >= 4  # the LoRA did load


def test_kohya_file_round_trips_through_diffusers_converter(cat_package, tiny_sdxl_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.configuration_utils import FrozenDict

    from pipelines import formats

    ours = AdapterPackage.open(cat_package).state_dict("full")
    # The UNet's layout maps sd-scripts' block names (output_blocks_0_1) to diffusers' blocks, as
    # `load_lora_weights` does by passing it.
    unet_config = FrozenDict(UNet2DConditionModel.load_config(tiny_sdxl_path / "unet"))
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(str(cat_package / "kohya" / "cat.safetensors"),
                                                             unet_config=unet_config)
    names = sorted({k.rsplit(".lora_", 1)[0] for k in ours})
    back = formats.normalize_lora(converted, names)
    assert set(back) == set(ours)
    for key in ours:
        torch.testing.assert_close(back[key], ours[key])


def test_content_of_one_package_with_style_of_another(cat_package, coffee_package):
    studio = StudioPipeline("tiny-sdxl")
    cat, coffee = AdapterPackage.open(cat_package), AdapterPackage.open(coffee_package)
    prompt = "A [c] in [s] style"
    mixed = studio.generate(prompt, content=AdapterChoice(cat, "content"), style=AdapterChoice(coffee, "style"))[0]
    own = studio.generate(prompt, content=AdapterChoice(cat, "content"), style=AdapterChoice(cat, "style"))[0]
    assert not np.array_equal(_pixels(mixed), _pixels(own))
    # The active adapters are exactly the content part of one package and the style part of the other.
    active = studio.pipe.get_list_adapters()["unet"]
    assert sorted(active) == ["content", "style"]


def test_swapping_adapters_reuses_the_warm_pipeline_and_matches_a_fresh_one(cat_package, coffee_package):
    cat, coffee = AdapterPackage.open(cat_package), AdapterPackage.open(coffee_package)
    warm = StudioPipeline("tiny-sdxl")
    warm.generate("A [c]", content=AdapterChoice(cat, "content"))
    swapped = warm.generate("A [c]", content=AdapterChoice(coffee, "content"))[0]
    warm.generate("A [c]", content=AdapterChoice(coffee, "content"))  # same file again: nothing reloaded
    assert warm.base_loads == 1
    assert warm.adapter_loads == 2
    fresh = StudioPipeline("tiny-sdxl").generate("A [c]", content=AdapterChoice(coffee, "content"))[0]
    assert np.array_equal(_pixels(swapped), _pixels(fresh))


def test_hotswap_slots_swap_in_place(cat_package, coffee_package):
    cat, coffee = AdapterPackage.open(cat_package), AdapterPackage.open(coffee_package)
    warm = StudioPipeline("tiny-sdxl", hotswap_rank=8)
    warm.generate("A [c]", content=AdapterChoice(cat, "content"))
    hot = warm.generate("A [c]", content=AdapterChoice(coffee, "content"))[0]
    fresh = StudioPipeline("tiny-sdxl").generate("A [c]", content=AdapterChoice(coffee, "content"))[0]
    assert warm.base_loads == 1
    assert np.abs(_pixels(hot) - _pixels(fresh)).max() <= 2


def test_scale_zero_equals_no_adapter(cat_package):
    cat = AdapterPackage.open(cat_package)
    studio = StudioPipeline("tiny-sdxl")
    prompt = f"A {cat.token}"
    zero = studio.generate(prompt, content=AdapterChoice(cat, "content", scale=0.0))[0]
    none = studio.generate(prompt)[0]
    one = studio.generate(prompt, content=AdapterChoice(cat, "content", scale=1.0))[0]
    assert np.abs(_pixels(zero) - _pixels(none)).max() <= 1
    assert not np.array_equal(_pixels(one), _pixels(none))


def test_prompt_placeholders_expand_to_tokens():
    assert expand_prompt("A [c] in [s] style", "[v1]", "[v2]") == "A [v1] in [v2] style"
    assert expand_prompt("A [C] dog", "[v1]", None) == "A [v1] dog"
    with pytest.raises(BlockStudioError, match=r"\[s\].*style adapter"):
        expand_prompt("A [c] in [s] style", "[v1]", None)


def test_package_for_another_architecture_is_refused(cat_package, tmp_path):
    import json
    import shutil

    fake = tmp_path / "fluxy"
    shutil.copytree(cat_package, fake)
    info = json.loads((fake / "adapter.json").read_text())
    info["arch"] = "flux"
    (fake / "adapter.json").write_text(json.dumps(info))
    with pytest.raises(InvalidAdapter, match="FLUX"):
        StudioPipeline("tiny-sdxl").generate("A [c]", content=AdapterChoice(AdapterPackage.open(fake), "content"))


def test_sdxl_generates_at_the_official_50_steps_and_30_when_fast():
    from types import SimpleNamespace

    calls = []

    def pipe(**kwargs):
        calls.append(kwargs["num_inference_steps"])
        return SimpleNamespace(images=[None])

    studio = StudioPipeline("sdxl", pipe=pipe)
    studio.generate("A photo of a cat")
    studio.generate("A photo of a cat", fast=True)
    studio.generate("A photo of a cat", steps=12, fast=True)
    assert calls == [50, 30, 12]
