"""Import a B-LoRA made elsewhere into an adapter package.

Accepted: the official repository's files (`unet.<module>.lora.down.weight`), the `unet.unet.`-prefixed files
of the `lora-library` Hub models, diffusers' `--use_blora` script output (PEFT or diffusers keys), and kohya
files with diffusers or SGM (`output_blocks_0_1`) names. The file's keys and shapes are checked against the
base model's UNet, built empty from its config (no weights are loaded), before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipelines import formats
from pipelines.blora import BLOCKS, COMPOSITION, split_by_block
from pipelines.errors import InvalidAdapter, ModelNotAvailable
from pipelines.models import building_modules, model_path, resolve_model
from pipelines.package import PackageContents, check_name, check_token, write_package
from pipelines.storage import check_writable_target


def unet_skeleton(model: str) -> torch.nn.Module:
    """The model's UNet with its real shapes and names but no weights (meta device)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    spec = resolve_model(model)
    if spec.arch != "sdxl":
        raise InvalidAdapter(f"B-LoRA import needs an SDXL base model, not {model}")
    if spec.tiny or spec.repo_id is None:
        config_path = model_path(model) / "unet" / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        try:
            config_path = Path(hf_hub_download(spec.repo_id, "unet/config.json"))
        except Exception:
            try:
                config_path = Path(hf_hub_download(spec.repo_id, "unet/config.json", local_files_only=True))
            except Exception:
                raise ModelNotAvailable(
                    f"the UNet config of {spec.repo_id} is not cached and the Hub cannot be reached; "
                    "use --model tiny-sdxl offline or download the model once"
                ) from None
    config = json.loads(Path(config_path).read_text())
    with building_modules(), init_empty_weights():
        return UNet2DConditionModel.from_config(config)


def import_lora(file: str | Path, out: str | Path, *, model: str = "sdxl", token: str | None = None,
                method: str = "b-lora", pipe=None, force: bool = False) -> Path:
    """Check `file` against `model` and write it as a B-LoRA package at `out` (replacing one only with `force`)."""
    if method != "b-lora":
        raise InvalidAdapter(f"importing {method} adapters is not supported")
    out = check_writable_target(out, force=force)
    check_name(out.name)
    file = Path(file)
    tensors, metadata = formats.read_safetensors(file)
    unet = pipe.unet if pipe is not None else unet_skeleton(model)
    module_names = list(formats.linear_layers(unet))
    canonical = formats.normalize_lora(tensors, module_names, component="unet")
    ranks = formats.validate_against(canonical, unet)
    outside = sorted(m for m in ranks if not any(m.startswith(b + ".") for b in BLOCKS.values()))
    if outside:
        raise InvalidAdapter(
            f"{file.name} is not a B-LoRA: it has weights outside up_blocks.0.attentions.0/1, e.g. {outside[0]}"
        )
    parts = {role: state for role, state in split_by_block(canonical).items() if state}
    token = check_token(token or _token_from_metadata(metadata) or "[v]")
    spec = resolve_model(model)
    info = {
        "method": "b-lora",
        "base_model": spec.name if (spec.tiny or spec.repo_id) else Path(spec.name).name,
        "arch": "sdxl",
        "token": token,
        "prompt": f"A {token}",
        "blocks": {role: BLOCKS[role] for role in parts},
        "composition": COMPOSITION,
        "ranks": {role: max(ranks[m.rsplit(".lora_", 1)[0]] for m in state) for role, state in parts.items()},
        "imported_from": file.name,
        "source_metadata": {k: v for k, v in metadata.items() if len(v) < 2000},
    }
    write_package(out, PackageContents(name=out.name, info=info, full=canonical, parts=parts), replace=force)
    return out


def _token_from_metadata(metadata: dict[str, str]) -> str | None:
    value = metadata.get("blockstudio.token")
    if value:
        try:
            return json.loads(value) if value.startswith('"') else value
        except json.JSONDecodeError:
            return None
    return None
