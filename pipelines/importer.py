"""Import a LoRA made elsewhere into an adapter package of a recipe that says it can read it.

Each recipe's `ImportSpec` names the layouts it reads and splits the LoRA into its parts; B-LoRA's reads the
official repository's files (`unet.<module>.lora.down.weight`), the `unet.unet.`-prefixed files of the
`lora-library` Hub models, diffusers' `--use_blora` script output (PEFT or diffusers keys), and kohya files with
diffusers or SGM (`output_blocks_0_1`) names. The file's keys and shapes are checked against the base model's
denoiser, built empty from its config (no weights are loaded), before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipelines import formats
from pipelines.errors import InvalidAdapter, ModelNotAvailable
from pipelines.models import architecture, building_modules, model_path, resolve_model
from pipelines.package import PackageContents, check_name, check_token, write_package
from pipelines.storage import check_writable_target


def denoiser_skeleton(model: str) -> torch.nn.Module:
    """The model's UNet or transformer with its real shapes and names but no weights (meta device)."""
    import diffusers
    from accelerate import init_empty_weights

    spec = resolve_model(model)
    arch = architecture(spec.arch)
    if spec.tiny or spec.repo_id is None:
        config_path = model_path(model) / arch.denoiser / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        member = f"{arch.denoiser}/config.json"
        try:
            config_path = Path(hf_hub_download(spec.repo_id, member))
        except Exception:
            try:
                config_path = Path(hf_hub_download(spec.repo_id, member, local_files_only=True))
            except Exception:
                raise ModelNotAvailable(
                    f"the {arch.denoiser} config of {spec.repo_id} is not cached and the Hub cannot be reached; "
                    f"use --model {arch.tiny_model} offline or download the model once"
                ) from None
    config = json.loads(Path(config_path).read_text())
    with building_modules(), init_empty_weights():
        return getattr(diffusers, arch.denoiser_class).from_config(config)


def unet_skeleton(model: str) -> torch.nn.Module:
    """`denoiser_skeleton` of an SDXL model (its UNet)."""
    return denoiser_skeleton(model)


def import_lora(file: str | Path, out: str | Path, *, model: str | None = None, token: str | None = None,
                method: str | None = None, pipe=None, force: bool = False) -> Path:
    """Check `file` against `model` and write it as a package of `method` at `out` (replacing one only with
    `force`). `method` None is the first recipe that imports; `model` None that recipe's default model."""
    from pipelines.recipes import all_recipes, recipe_for

    if method is None:
        method = next((spec.key for spec in all_recipes() if spec.importer is not None), "")
    spec = recipe_for(method)
    if spec.importer is None:
        raise InvalidAdapter(f"importing {spec.name} adapters is not supported")
    model = model or spec.defaults()["model"]
    base = resolve_model(model)
    arch = architecture(spec.arch)
    if base.arch != spec.arch:
        raise InvalidAdapter(f"{spec.name} import needs {arch.a_label} base model, not {model}")
    out = check_writable_target(out, force=force)
    check_name(out.name)
    file = Path(file)
    tensors, metadata = formats.read_safetensors(file)
    denoiser = getattr(pipe, arch.denoiser) if pipe is not None else denoiser_skeleton(model)
    module_names = list(formats.linear_layers(denoiser))
    canonical = formats.normalize_lora(tensors, module_names, component=arch.denoiser)
    ranks = formats.validate_against(canonical, denoiser)
    try:
        parts = spec.importer.split(canonical)
    except InvalidAdapter as exc:
        raise InvalidAdapter(f"{file.name}: {exc}") from None
    token = check_token(token or _token_from_metadata(metadata) or spec.importer.default_token)
    part_ranks = {role: max(ranks[m.rsplit(".lora_", 1)[0]] for m in state) for role, state in parts.items()}
    info = {
        "method": spec.key,
        "base_model": base.name if (base.tiny or base.repo_id) else Path(base.name).name,
        "arch": spec.arch,
        "token": token,
        "prompt": f"A {spec.subject.replace('[c]', token)}",
        "blocks": {role: spec.importer.blocks[role] for role in parts if role in spec.importer.blocks},
        "composition": spec.composition.to_json(),
        "ranks": part_ranks,
        "parts": {role: {k: v for k, v in {"blocks": spec.importer.blocks.get(role), "rank": part_ranks[role],
                                           "description": getattr(spec.part(role), "description", None)}.items()
                         if v is not None} for role in parts},
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
