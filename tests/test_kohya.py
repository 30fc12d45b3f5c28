"""kohya files: SDXL under sd-scripts' own module names, Flux as small as the diffusers file, metadata that is true."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipelines import formats
from pipelines.errors import InvalidAdapter
from pipelines.package import AdapterPackage, PackageContents, write_package

KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
FLUX_WIDTH = 64  # tiny-flux: 2 heads of 32


def _read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return formats.read_safetensors(path)


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _modules(canonical: dict[str, torch.Tensor]) -> list[str]:
    return sorted(formats.lora_modules(canonical))


# -- SDXL: sd-scripts' names ------------------------------------------------------------------------------


def _sd_scripts_output_blocks(unet_config: dict) -> dict[tuple[int, int], int]:
    """(diffusers up block, attention index) -> the number of sd-scripts' `output_blocks.N`.

    The original SDXL UNet counts its output blocks across levels: each up level holds layers_per_block + 1
    blocks, and a block with attention has its resnet at child 0 and its transformer at child 1.
    """
    numbers, count = {}, 0
    for level, kind in enumerate(unet_config["up_block_types"]):
        for layer in range(unet_config["layers_per_block"] + 1):
            if "CrossAttn" in kind:
                numbers[(level, layer)] = count
            count += 1
    return numbers


def _sd_scripts_name(module: str, numbers: dict[tuple[int, int], int]) -> str:
    """`up_blocks.0.attentions.1.<rest>` -> `lora_unet_output_blocks_1_1_<rest>` by the numbering above."""
    _, level, attentions, layer, rest = module.split(".", 4)
    assert attentions == "attentions", module
    return f"lora_unet_output_blocks_{numbers[(int(level), int(layer))]}_1_{rest.replace('.', '_')}"


def test_sdxl_kohya_keys_are_the_names_sd_scripts_writes(cat_package, tiny_sdxl_path):
    unet_config = json.loads((tiny_sdxl_path / "unet" / "config.json").read_text())
    numbers = _sd_scripts_output_blocks(unet_config)
    package = AdapterPackage.open(cat_package)
    for part, file in (("full", "kohya/cat.safetensors"), ("content", "kohya/cat_content.safetensors"),
                       ("style", "kohya/cat_style.safetensors")):
        canonical = package.state_dict(part)
        kohya, metadata = _read(cat_package / file)
        names = {module: _sd_scripts_name(module, numbers) for module in _modules(canonical)}
        assert set(kohya) == {name + suffix for name in names.values() for suffix in KOHYA_SUFFIXES}
        for module, (a, b) in formats.lora_modules(canonical).items():
            assert torch.equal(kohya[f"{names[module]}.lora_down.weight"], a)
            assert torch.equal(kohya[f"{names[module]}.lora_up.weight"], b)
            assert float(kohya[f"{names[module]}.alpha"]) == a.shape[0]
        assert metadata["ss_network_module"] == "networks.lora"
        assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == "4"
    content, _ = _read(cat_package / "kohya" / "cat_content.safetensors")
    style, _ = _read(cat_package / "kohya" / "cat_style.safetensors")
    assert "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in content
    assert all(k.startswith("lora_unet_output_blocks_0_1_") for k in content)
    assert all(k.startswith("lora_unet_output_blocks_1_1_") for k in style)


def test_diffusers_loads_the_sdxl_kohya_file_as_the_diffusers_file(cat_package, tiny_sdxl_pipe):
    pipe = tiny_sdxl_pipe
    pipe.load_lora_weights(str(cat_package / "kohya"), weight_name="cat.safetensors", adapter_name="kohya")
    pipe.load_lora_weights(str(cat_package), adapter_name="diffusers")
    canonical = AdapterPackage.open(cat_package).state_dict("full")
    for module in _modules(canonical):
        layer = pipe.unet.get_submodule(module)
        torch.testing.assert_close(layer.get_delta_weight("kohya"), layer.get_delta_weight("diffusers"))
    images = []
    for adapter in ("kohya", "diffusers"):
        pipe.set_adapters(adapter)
        images.append(pipe("A [v1]", num_inference_steps=2, height=64, width=64, output_type="np",
                           generator=torch.Generator().manual_seed(0)).images[0])
    assert np.abs(images[0] - images[1]).max() < 1e-5


def test_sdxl_kohya_export_refuses_modules_without_an_sd_scripts_name():
    state = {"conv_in.lora_A.weight": torch.zeros(2, 4), "conv_in.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(InvalidAdapter, match="conv_in has no sd-scripts SDXL name"):
        formats.to_kohya(state)


# -- Flux: one entry per module, no padding ---------------------------------------------------------------


def _lora(blocks, rank: int, targets=("attn.to_q", "attn.to_k", "attn.to_v"), *, seed: int,
          dtype=torch.float32, kind: str = "single_transformer_blocks") -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for block in blocks:
        for target in targets:
            out_features = 4 * FLUX_WIDTH if target == "proj_mlp" else FLUX_WIDTH
            in_features = 5 * FLUX_WIDTH if target == "proj_out" else FLUX_WIDTH
            module = f"{kind}.{block}.{target}"
            out[f"{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator).to(dtype)
            out[f"{module}.lora_B.weight"] = (0.1 * torch.randn(out_features, rank, generator=generator)).to(dtype)
    return out


def _flux_package(folder, dtype=torch.float32):
    """A package of Flux LoRA factors: ranks 64 and 32 on some single blocks, 64 on others."""
    content = {**_lora(range(0, 3), 64, seed=1, dtype=dtype), **_lora((3,), 32, seed=2, dtype=dtype)}
    style = _lora(range(4, 8), 64, seed=3, dtype=dtype)
    info = {"method": "splitflux", "arch": "flux", "base_model": "tiny-flux", "token": "[c1]",
            "style_token": "[s1]"}
    write_package(folder, PackageContents(name=folder.name, info=info, full={**content, **style},
                                          parts={"content": content, "style": style}, prefix="transformer"))
    return folder


@pytest.fixture(scope="module")
def tiny_flux_pipe(blockstudio_home):
    from diffusers import FluxPipeline

    from pipelines.models import model_path

    return FluxPipeline.from_pretrained(model_path("tiny-flux"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flux_kohya_file_is_no_larger_than_the_diffusers_file(tmp_path, dtype):
    package = _flux_package(tmp_path / "ink", dtype)
    for part, diffusers_file in (("", "pytorch_lora_weights"), ("_content", "content"), ("_style", "style")):
        diffusers, _ = _read(package / f"{diffusers_file}.safetensors")
        kohya, _ = _read(package / "kohya" / f"ink{part}.safetensors")
        factors = {k: v for k, v in kohya.items() if not k.endswith(".alpha")}
        assert {v.dtype for v in factors.values()} == {v.dtype for v in diffusers.values()} == {dtype}
        # The same factors, byte for byte in size; only one scalar alpha per module is added.
        assert _tensor_bytes(factors) == _tensor_bytes(diffusers)
        assert len(kohya) - len(factors) == len(diffusers) // 2
        size = (package / "kohya" / f"ink{part}.safetensors").stat().st_size
        assert size <= 1.03 * (package / f"{diffusers_file}.safetensors").stat().st_size


def test_flux_kohya_metadata_says_what_the_tensors_hold(tmp_path):
    package = _flux_package(tmp_path / "ink")
    for part, dim in (("", "Dynamic"), ("_content", "Dynamic"), ("_style", "64")):
        kohya, metadata = _read(package / "kohya" / f"ink{part}.safetensors")
        ranks = {int(v.shape[0]) for k, v in kohya.items() if k.endswith(".lora_down.weight")}
        alphas = {float(v) for k, v in kohya.items() if k.endswith(".alpha")}
        assert alphas == ranks  # alpha = rank: every module at scale 1
        assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == dim
        assert (dim == "Dynamic") == (len(ranks) > 1)
        assert "ss_network_module" not in metadata  # not sd-scripts' fused networks.lora_flux names
        assert metadata["ss_base_model_version"] == "flux1"
    _, style_meta = _read(package / "kohya" / "ink_style.safetensors")
    assert style_meta["modelspec.trigger_phrase"] == "[s1]"


def test_flux_kohya_file_round_trips_through_the_importer_and_diffusers(tmp_path, tiny_flux_pipe):
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    package = _flux_package(tmp_path / "ink")
    full = AdapterPackage.open(package).state_dict("full")
    kohya, _ = _read(package / "kohya" / "ink.safetensors")
    assert all(k.startswith("lora_transformer_single_transformer_blocks_") for k in kohya)
    assert "lora_transformer_single_transformer_blocks_3_attn_to_q.lora_down.weight" in kohya

    module_names = list(formats.linear_layers(tiny_flux_pipe.transformer))
    imported = formats.normalize_lora(kohya, module_names, component="transformer")
    assert set(imported) == set(full)
    for key, value in full.items():
        assert torch.equal(imported[key], value)

    converted = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    tiny_flux_pipe.load_lora_weights(str(package / "kohya"), weight_name="ink.safetensors", adapter_name="kohya")
    for module, (a, b) in formats.lora_modules(full).items():
        expected = b @ a
        delta = converted[f"transformer.{module}.lora_B.weight"] @ converted[f"transformer.{module}.lora_A.weight"]
        torch.testing.assert_close(delta, expected)
        torch.testing.assert_close(tiny_flux_pipe.transformer.get_submodule(module).get_delta_weight("kohya"),
                                   expected)
    tiny_flux_pipe.delete_adapters("kohya")


def test_flux_kohya_names_every_module_the_importer_reads_back(tiny_flux_pipe):
    state = {**_lora((5,), 8, ("attn.to_q", "proj_mlp", "proj_out"), seed=4),
             **_lora((2,), 4, ("attn.to_k", "attn.add_v_proj", "attn.to_out.0"), seed=5, kind="transformer_blocks")}
    kohya = formats.to_kohya_flux(state)
    assert "lora_transformer_transformer_blocks_2_attn_to_out_0.alpha" in kohya
    module_names = list(formats.linear_layers(tiny_flux_pipe.transformer))
    back = formats.normalize_lora(kohya, module_names, component="transformer")
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_sd_scripts_fused_flux_files_still_import():
    """sd-scripts (and earlier Block Studio) write q, k, v and the MLP input of a single block as one module
    (`linear1`), with a block-diagonal lora_up; the importer splits it into the diffusers modules."""
    members = _lora((7,), 4, seed=6)
    rank, width = 4, FLUX_WIDTH
    down = torch.cat([members[f"single_transformer_blocks.7.attn.{p}.lora_A.weight"] for p in ("to_q", "to_k", "to_v")]
                     + [torch.zeros(rank, width)])
    up = torch.zeros(7 * width, 4 * rank)
    for i, p in enumerate(("to_q", "to_k", "to_v")):
        up[i * width:(i + 1) * width, i * rank:(i + 1) * rank] = members[f"single_transformer_blocks.7.attn.{p}.lora_B.weight"]
    fused = {"lora_unet_single_blocks_7_linear1.lora_down.weight": down,
             "lora_unet_single_blocks_7_linear1.lora_up.weight": up * 2,
             "lora_unet_single_blocks_7_linear1.alpha": torch.tensor(8.0)}  # alpha / rank = 1/2
    back = formats.normalize_lora(fused, [], component="transformer")
    assert set(back) == set(members)
    for module, (a, b) in formats.lora_modules(members).items():
        got_a, got_b = back[f"{module}.lora_A.weight"], back[f"{module}.lora_B.weight"]
        torch.testing.assert_close(got_b @ got_a, b @ a)


def test_flux_kohya_at_full_size_matches_the_diffusers_bytes_and_converts_exactly():
    """FLUX.1 width 3072, bf16: the kohya tensors take the bytes the diffusers ones take (the fused,
    block-diagonal layout took over five times as many), and diffusers' converter gives the same deltas."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    generator = torch.Generator().manual_seed(0)
    state = {}
    for block, rank in ((11, 32), (20, 64)):
        for target in ("to_q", "to_k", "to_v"):
            module = f"single_transformer_blocks.{block}.attn.{target}"
            state[f"{module}.lora_A.weight"] = torch.randn(rank, 3072, generator=generator).bfloat16()
            state[f"{module}.lora_B.weight"] = torch.randn(3072, rank, generator=generator).bfloat16()
    kohya = formats.to_kohya_flux(state)
    diffusers = formats.to_diffusers(state, "transformer")
    alphas = _tensor_bytes({k: v for k, v in kohya.items() if k.endswith(".alpha")})
    assert _tensor_bytes(kohya) - alphas == _tensor_bytes(diffusers)
    assert alphas == 4 * len(diffusers) // 2
    converted = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    for module, (a, b) in formats.lora_modules(state).items():
        delta = converted[f"transformer.{module}.lora_B.weight"].float() @ converted[f"transformer.{module}.lora_A.weight"].float()
        torch.testing.assert_close(delta, b.float() @ a.float())
