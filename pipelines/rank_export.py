"""Packages trained with a DyLoRA or SoRA adapter: their trained factors, and export at the rank a user picks.

A package trained with `--adapter dylora` or `--adapter sora` (B-LoRA's `adapters`; any recipe that lists them
in its spec) is an ordinary package: its diffusers and kohya
files hold a plain LoRA (DyLoRA at its largest rank, SoRA pruned to its live ranks) that any LoRA loader reads.
Beside them it keeps the trained factors in `<type>.safetensors` (keys as `pipelines.adapters` names them,
`<module>.lora_A`, `<module>.lora_B`, `<module>.lora_gate`) and records the adapter in `adapter.json`:

    "adapter": {"type": "dylora", "rank_range": [1, 64], "rank": 64, "max_rank": 64, "config": {...}}

`export_package(source, rank, out)` writes the package again at `rank`, as an ordinary package without the
trained factors: one training, the file size the user chooses. DyLoRA takes any rank in its range (the first
`rank` ranks at scale alpha / rank); SoRA takes ranks up to the most live ranks a layer kept (below that, each
layer keeps its `rank` live ranks of largest gate; at it, the pruned adapter's outputs exactly).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipelines import formats
from pipelines.adapters import METHODS, AdapterConfig
from pipelines.errors import InvalidAdapter
from pipelines.images import load_image
from pipelines.package import AdapterPackage, PackageContents, check_name, write_package
from pipelines.storage import check_writable_target

RANK_ADAPTERS = ("dylora", "sora")
LAYER_TENSORS = {"dylora": ("lora_A", "lora_B"), "sora": ("lora_A", "lora_B", "lora_gate")}


def trained_file(adapter_type: str) -> str:
    return f"{adapter_type}.safetensors"


def group_by_module(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`{"<module>.<tensor>": t}` -> `{module: {tensor: t}}`."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, tensor = key.rpartition(".")
        modules.setdefault(module, {})[tensor] = value
    return modules


def lora_state(config: AdapterConfig, modules: dict[str, dict[str, torch.Tensor]], rank: int | None = None
               ) -> dict[str, torch.Tensor]:
    """The plain LoRA at `rank` (None: the method's own) as a canonical state dict, every scale in lora_B.

    Layers left with no rank (a SoRA layer whose gates are all zero) are not in it: they change nothing.
    """
    state = {}
    for module, tensors in sorted(modules.items()):
        down, up = config.lora_factors(tensors, rank)
        if down.shape[0]:
            state[f"{module}.lora_A.weight"] = down
            state[f"{module}.lora_B.weight"] = up
    return state


def adapter_info(config: AdapterConfig, modules: dict[str, dict[str, torch.Tensor]], rank: int) -> dict:
    """What adapter.json records of a package's rank adapter (the config without its long module list)."""
    low, high = config.export_ranks(modules)
    saved = config.to_dict()
    saved.pop("target_modules", None)
    saved.pop("exclude_modules", None)
    return {"type": config.method, "rank_range": [low, high], "rank": rank, "max_rank": config.rank,
            "file": trained_file(config.method), "config": saved}


def part_ranks(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, int]:
    return {role: max(int(a.shape[0]) for a, _ in formats.lora_modules(state).values())
            for role, state in parts.items()}


def read_trained(package: AdapterPackage) -> tuple[AdapterConfig, dict[str, dict[str, torch.Tensor]]]:
    """A package's adapter config and trained factors, checked; one clear error if it has none."""
    adapter = package.info.get("adapter")
    kind = adapter.get("type") if isinstance(adapter, dict) else "lora"
    if kind not in RANK_ADAPTERS:
        raise InvalidAdapter(f"{package.name} is a plain LoRA package of rank {package.info.get('rank', '?')}: only "
                             "packages trained with --adapter dylora or sora can be exported at another rank")
    path = package.path / trained_file(kind)
    if not path.is_file() or path.is_symlink():
        raise InvalidAdapter(f"{package.name} has no {path.name} (an exported copy keeps only its one rank); "
                             "export from the package that training wrote")
    try:
        config = METHODS[kind].config_cls.from_dict(dict(adapter.get("config") or {}))
    except (TypeError, ValueError) as exc:
        raise InvalidAdapter(f"{package.name}: its adapter config is not valid ({exc})") from None
    tensors, _ = formats.read_safetensors(path)
    modules = group_by_module(tensors)
    wanted = LAYER_TENSORS[kind]
    for module, layer in modules.items():
        if sorted(layer) != sorted(wanted) or not all(t.is_floating_point() for t in layer.values()):
            raise InvalidAdapter(f"{path.name}: module {module} does not hold {', '.join(wanted)}")
        down, up = layer["lora_A"], layer["lora_B"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != config.rank or up.shape[1] != config.rank or (
                kind == "sora" and tuple(layer["lora_gate"].shape) != (config.rank,)):
            raise InvalidAdapter(f"{path.name}: module {module} does not fit rank {config.rank}")
    return config, modules


def export_package(source: str | Path, rank: int, out: str | Path, *, force: bool = False) -> Path:
    """Write the package in `source` at `rank` into `out` as an ordinary package; return `out`.

    Everything is checked before anything is written. An existing package (or folder of other files) at `out`
    is replaced only with `force`, and never the source package itself. The package's recipe splits the whole
    adapter into its parts again (`RecipeSpec.split`).
    """
    import dataclasses

    from pipelines.recipes import recipe_of

    package = AdapterPackage.open(source)
    recipe = recipe_of(package.method)
    if recipe is None or recipe.split is None:
        raise InvalidAdapter(f"{package.name} is a {package.method or 'unknown'} package, which this build cannot "
                             "write at another rank")
    config, modules = read_trained(package)
    config.check_export_rank(rank, modules)
    out = check_writable_target(out, force=force)
    check_name(out.name)
    if out.exists() and out.resolve() == package.path.resolve():
        raise ValueError(f"{out} is the package being exported; export into another folder")
    empty = out.is_dir() and not any(out.iterdir())
    full = lora_state(config, modules, rank)
    parts = recipe.split(full, package.meta)
    empty_parts = sorted(role for role, state in parts.items() if not state)
    if empty_parts:
        raise InvalidAdapter(f"at rank {rank} the {empty_parts[0]} part of {package.name} keeps no rank at all")
    ranks = part_ranks(parts)
    info = dataclasses.replace(
        package.meta, name="", files={}, created=None, versions=None, sample_prompts={}, rank=rank, ranks=ranks,
        exported_from=package.name, adapter={**adapter_info(config, modules, rank), "file": None},
        parts={role: dataclasses.replace(entry, rank=ranks.get(role, entry.rank))
               for role, entry in package.meta.parts.items()})
    crop = package.sample("input")
    samples = {"input": load_image(crop, min_side=1)} if crop is not None and not crop.is_symlink() else {}
    loss_file = package.path / "loss.json"
    losses = []
    if loss_file.is_file() and not loss_file.is_symlink():
        try:
            losses = [float(v) for v in json.loads(loss_file.read_text()).get("loss", [])]
        except (ValueError, TypeError, AttributeError):
            losses = []
    contents = PackageContents(name=out.name, info=info, full=full, parts=parts, samples=samples,
                               loss_history=losses)
    return write_package(out, contents, replace=force or empty)
