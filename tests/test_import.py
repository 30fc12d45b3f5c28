"""Importing B-LoRAs made elsewhere: every known key layout, and refusals that say what is wrong."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pipelines import formats
from pipelines.errors import InvalidAdapter
from pipelines.importer import import_lora
from pipelines.package import AdapterPackage


@pytest.fixture(scope="module")
def canonical(cat_package) -> dict[str, torch.Tensor]:
    return AdapterPackage.open(cat_package).state_dict("full")


def _official(canonical):
    """The official repository's layout: diffusers 0.25 `lora.down/up`, `unet.` prefix."""
    return formats.to_diffusers(canonical)


def _lora_library(canonical):
    """The lora-library Hub models: a doubled `unet.unet.` prefix."""
    return {"unet." + k: v for k, v in formats.to_diffusers(canonical).items()}


def _peft_script(canonical):
    """diffusers' advanced script with --use_blora saving PEFT keys under `unet.`."""
    return {f"unet.{k}": v for k, v in canonical.items()}


def _kohya(canonical):
    """Block Studio's own kohya export: sd-scripts' SDXL names (`lora_unet_output_blocks_0_1_...`)."""
    return formats.to_kohya(canonical)


def _kohya_diffusers_names(canonical):
    """kohya keys with diffusers block names (`lora_unet_up_blocks_0_attentions_0_...`), alpha = rank, as
    Block Studio wrote them before it used sd-scripts' names."""
    out = {}
    for module, (a, b) in formats.lora_modules(canonical).items():
        name = "lora_unet_" + module.replace(".", "_")
        out.update({f"{name}.lora_down.weight": a, f"{name}.lora_up.weight": b,
                    f"{name}.alpha": torch.tensor(float(a.shape[0]))})
    return out


def _kohya_diffusers_names_with_alpha(canonical):
    """convert_state_dict_to_kohya output (diffusers block names) with alpha = rank / 2, B doubled to match."""
    from diffusers.utils import convert_state_dict_to_kohya

    peft = {f"unet.{k}": (v * 2 if ".lora_B." in k else v) for k, v in canonical.items()}
    kohya = convert_state_dict_to_kohya(peft)
    return {k: (torch.tensor(v.item() / 2) if k.endswith(".alpha") else v) for k, v in kohya.items()}


@pytest.mark.parametrize("layout", [_official, _lora_library, _peft_script, _kohya, _kohya_diffusers_names,
                                    _kohya_diffusers_names_with_alpha])
def test_import_reads_every_known_layout(layout, canonical, tmp_path):
    source = tmp_path / "in.safetensors"
    save_file({k: v.contiguous() for k, v in layout(canonical).items()}, str(source))
    package = AdapterPackage.open(import_lora(source, tmp_path / "imported", model="tiny-sdxl", token="[v18]"))
    assert package.token == "[v18]" and package.method == "b-lora"
    assert package.info["imported_from"] == "in.safetensors"
    imported = package.state_dict("full")
    assert set(imported) == set(canonical)
    for key in canonical:
        torch.testing.assert_close(imported[key], canonical[key])
    assert package.has("content") and package.has("style")


def test_import_refuses_wrong_shapes_naming_the_module(canonical, tmp_path):
    bad = dict(canonical)
    key = next(k for k in bad if k.endswith("lora_A.weight"))
    bad[key] = torch.zeros(bad[key].shape[0], bad[key].shape[1] + 3)
    source = tmp_path / "bad.safetensors"
    save_file(formats.to_diffusers(bad), str(source))
    with pytest.raises(InvalidAdapter, match=key.rsplit(".lora_A", 1)[0].replace(".", r"\.")):
        import_lora(source, tmp_path / "out", model="tiny-sdxl")
    assert not (tmp_path / "out").exists()


def test_import_refuses_keys_the_model_does_not_have(canonical, tmp_path):
    source = tmp_path / "bad.safetensors"
    save_file({"unet.up_blocks.9.attentions.0.proj.lora.down.weight": torch.zeros(4, 8),
               "unet.up_blocks.9.attentions.0.proj.lora.up.weight": torch.zeros(8, 4)}, str(source))
    with pytest.raises(InvalidAdapter, match="up_blocks.9.attentions.0.proj does not exist"):
        import_lora(source, tmp_path / "out", model="tiny-sdxl")


def test_import_refuses_a_lora_outside_the_blora_blocks(canonical, tmp_path, tiny_sdxl_pipe):
    layer = tiny_sdxl_pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    extra = {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, layer.in_features),
             "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(layer.out_features, 4)}
    source = tmp_path / "whole_unet.safetensors"
    save_file(formats.to_diffusers({**canonical, **extra}), str(source))
    with pytest.raises(InvalidAdapter, match="not a B-LoRA.*down_blocks.1"):
        import_lora(source, tmp_path / "out", model="tiny-sdxl")


@pytest.mark.parametrize("name", ["model.bin", "model.pt", "model.ckpt"])
def test_pickles_are_refused_unopened(name, tmp_path):
    source = tmp_path / name
    source.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(InvalidAdapter, match="pickled"):
        import_lora(source, tmp_path / "out", model="tiny-sdxl")


def test_a_non_safetensors_file_is_refused(tmp_path):
    source = tmp_path / "fake.safetensors"
    source.write_text("hello, not tensors")
    with pytest.raises(InvalidAdapter, match="not a safetensors file"):
        import_lora(source, tmp_path / "out", model="tiny-sdxl")


def test_a_lone_lora_factor_is_refused(canonical, tmp_path):
    only_a = {k: v for k, v in formats.to_diffusers(canonical).items() if "lora.down" in k}
    source = tmp_path / "half.safetensors"
    save_file(only_a, str(source))
    with pytest.raises(InvalidAdapter, match="one LoRA factor"):
        import_lora(source, tmp_path / "out", model="tiny-sdxl")
