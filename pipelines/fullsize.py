"""SDXL-base and FLUX.1-dev at full size with random weights, for benchmarks and shape tests.

`sdxl-random` and `flux-random` have the real architectures: the configuration files of
`stabilityai/stable-diffusion-xl-base-1.0` and `black-forest-labs/FLUX.1-dev` ship in `assets/configs/`, the
tokenizers are the tiny models' in-code ones (any prompt tokenizes; token ids stay inside the real
vocabularies), and the weights are random, drawn per tensor from a seed and the tensor's name, so every build
is bit-identical. They make noise, not pictures: they exist so that speed and memory are measured on the
shapes that matter without a download or a licence.

Building never holds a whole model in memory. Each component is created on the meta device (shapes only),
then one module at a time is given CPU storage, initialised, cast to bf16 and written into safetensors shards;
the FLUX.1 transformer (24 GB in bf16) builds in a few GB of RAM. `meta_components(name)` gives the same
modules without any storage, which is what the tests and the cost model use.
"""

from __future__ import annotations

import importlib
import json
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "assets" / "configs"
FULLSIZE_VERSION = 1
SHARD_BYTES = 2 * 2**30  # one safetensors file per 2 GB of bf16 weights
WEIGHT_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class FullSizeModel:
    name: str
    config_folder: str  # under assets/configs/
    repo_id: str  # the repository whose configuration it copies
    models: tuple[str, ...]  # components with weights
    tokenizers: dict  # component -> "clip" or "t5"


FULLSIZE: dict[str, FullSizeModel] = {
    model.name: model
    for model in (
        FullSizeModel("sdxl-random", "sdxl-base-1.0", "stabilityai/stable-diffusion-xl-base-1.0",
                      ("unet", "vae", "text_encoder", "text_encoder_2"),
                      {"tokenizer": "clip", "tokenizer_2": "clip"}),
        FullSizeModel("flux-random", "flux-1-dev", "black-forest-labs/FLUX.1-dev",
                      ("transformer", "vae", "text_encoder", "text_encoder_2"),
                      {"tokenizer": "clip", "tokenizer_2": "t5"}),
    )
}


def config_folder(name: str) -> Path:
    return CONFIG_ROOT / FULLSIZE[name].config_folder


def component_class(folder: Path, component: str) -> tuple[str, type]:
    """(library, class) of a component, from the folder's model_index.json."""
    library, class_name = json.loads((folder / "model_index.json").read_text())[component]
    return library, getattr(importlib.import_module(library), class_name)


def build_component(folder: Path, component: str, device: str | torch.device = "meta") -> torch.nn.Module:
    """One model component from `folder/<component>/config.json`, created on `device` (default: meta)."""
    from pipelines.models import building_modules

    library, cls = component_class(folder, component)
    with building_modules(), torch.device(device):
        if library == "diffusers":
            return cls.from_config(cls.load_config(folder / component))
        config = cls.config_class.from_pretrained(folder / component)
        return cls(config)


def meta_components(name: str) -> dict[str, torch.nn.Module]:
    """Every weighted component of a full-size model on the meta device: shapes, no storage."""
    model = FULLSIZE[name]
    folder = config_folder(name)
    return {component: build_component(folder, component) for component in model.models}


# -- random weights ---------------------------------------------------------------------------------------


def _seed_for(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _initialise(module: torch.nn.Module, name: str, seed: int) -> None:
    """Give one module's own parameters CPU storage and values drawn from `seed` and its name."""
    module.to_empty(device="cpu", recurse=False)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(_seed_for(seed, name))
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()  # Linear, Conv, Embedding and norms: PyTorch's own initialisation
            return
        for param_name, param in module.named_parameters(recurse=False):
            if param.ndim == 1 and param_name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:
                param.fill_(1.0)  # a norm's scale
            else:
                param.normal_(0.0, 0.02)


def _owned_tensors(module: torch.nn.Module) -> list[str]:
    """Names of the parameters a module holds itself. Saved buffers would need values of their own, and no
    component of SDXL or FLUX.1 has one, so a module with one is refused rather than written with garbage."""
    saved = [n for n, _ in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
    if saved:
        raise NotImplementedError(f"{type(module).__name__} saves a buffer ({saved[0]}); random weights cannot fill it")
    return [n for n, _ in module.named_parameters(recurse=False)]


def _shard_plan(model: torch.nn.Module, shard_bytes: int) -> list[list[tuple[str, torch.nn.Module, list[str]]]]:
    """(module name, module, its parameter names) grouped into shards of about `shard_bytes` of bf16 weights,
    in state-dict order. A tied parameter is listed once, under its first name."""
    seen: set[int] = set()
    shards: list[list[tuple[str, torch.nn.Module, list[str]]]] = [[]]
    size = 0
    for name, module in model.named_modules():
        owned = [n for n in _owned_tensors(module) if id(getattr(module, n)) not in seen]
        if not owned:
            continue
        seen.update(id(getattr(module, n)) for n in owned)
        nbytes = sum(getattr(module, n).numel() for n in owned) * torch.finfo(WEIGHT_DTYPE).bits // 8
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, module, owned))
        size += nbytes
    return shards


def _shard_tensors(modules: list[tuple[str, torch.nn.Module, list[str]]], seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    for name, module, owned in modules:
        _initialise(module, name, seed)
        for tensor_name in owned:
            tensor = getattr(module, tensor_name)
            key = f"{name}.{tensor_name}" if name else tensor_name
            yield key, tensor.detach().to(WEIGHT_DTYPE if tensor.is_floating_point() else tensor.dtype).contiguous()
        module.to("meta")  # give the memory back before the next module


def write_weights(model: torch.nn.Module, folder: Path, stem: str, seed: int, shard_bytes: int = SHARD_BYTES) -> None:
    """Write `model`'s random bf16 weights as `<stem>.safetensors` or sharded with an index, as diffusers and
    transformers save them (`<stem>-00001-of-0000N.safetensors` + `<stem>.safetensors.index.json`)."""
    from safetensors.torch import save_file

    plan = _shard_plan(model, shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for number, modules in enumerate(plan, start=1):
        filename = f"{stem}.safetensors" if len(plan) == 1 else f"{stem}-{number:05d}-of-{len(plan):05d}.safetensors"
        tensors = dict(_shard_tensors(modules, seed))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, folder / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, filename))
        del tensors
    if len(plan) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_random_model(source: Path, target: Path, components: tuple[str, ...], tokenizers: dict, *,
                       seed: int = 0, shard_bytes: int = SHARD_BYTES) -> None:
    """A diffusers folder at `target`: `source`'s configs, random bf16 weights, in-code tokenizers."""
    from pipelines.tiny import _clip_tokenizer, _t5_tokenizer

    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "model_index.json", target / "model_index.json")
    shutil.copytree(source / "scheduler", target / "scheduler", dirs_exist_ok=True)
    for component in components:
        out = target / component
        out.mkdir(parents=True, exist_ok=True)
        library, _ = component_class(source, component)
        model = build_component(source, component)
        if library == "diffusers":
            model.save_config(out)
            stem = "diffusion_pytorch_model"
        else:
            model.config.torch_dtype = WEIGHT_DTYPE
            model.config.save_pretrained(out)
            stem = "model"
        write_weights(model, out, stem, seed + len(component), shard_bytes)
    for component, kind in tokenizers.items():
        tokenizer = _clip_tokenizer(target) if kind == "clip" else _t5_tokenizer()
        tokenizer.save_pretrained(target / component)


def fullsize_model_path(name: str, seed: int = 0) -> Path:
    """The folder of a full-size random model, built once (atomically) on first use."""
    from pipelines.tiny import built_model_folder

    if name not in FULLSIZE:
        raise KeyError(f"unknown full-size model {name!r}; choose from {sorted(FULLSIZE)}")
    model = FULLSIZE[name]

    def build(staging: Path) -> None:
        write_random_model(config_folder(name), staging, model.models, model.tokenizers, seed=seed)
        (staging / "blockstudio.json").write_text(json.dumps(
            {"name": name, "version": FULLSIZE_VERSION, "seed": seed, "config_of": model.repo_id,
             "weights": "random"}, indent=2))

    return built_model_folder(f"{name}-v{FULLSIZE_VERSION}", build)
