"""LoRA file formats: diffusers/PEFT and kohya/ComfyUI export, import from other tools, and validation.

Inside Block Studio an adapter is a PEFT state dict without a component prefix
(`up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`) whose scale is 1: any
`alpha / rank` factor from another tool is folded into `lora_B` on import. On disk:

- diffusers format: `unet.<module>.lora.down.weight` / `.lora.up.weight` (what diffusers' training scripts
  write and `pipe.load_lora_weights` reads), with `lora_adapter_metadata` for PEFT's config;
- kohya format: `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`, the form A1111,
  Forge and ComfyUI read (block names in diffusers form; SGM names such as `output_blocks_0_1` are read on
  import).

Only safetensors are read: pickled checkpoints are refused before they are opened.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipelines.errors import InvalidAdapter
from pipelines.storage import atomic_file

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
MAX_ADAPTER_BYTES = 2 * 1024**3

# -- reading --------------------------------------------------------------------------------------------


def read_safetensors(path: str | Path, max_bytes: int = MAX_ADAPTER_BYTES) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a safetensors file and its metadata; refuse anything else with a message that says why."""
    path = Path(path)
    if not path.is_file():
        raise InvalidAdapter(f"{path}: no such file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InvalidAdapter(
            f"{path.name}: pickled checkpoints ({path.suffix}) are not loaded for safety; convert it to .safetensors"
        )
    size = path.stat().st_size
    if size > max_bytes:
        raise InvalidAdapter(f"{path.name}: {size / 1e9:.1f} GB is too large for a LoRA adapter")
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        raise InvalidAdapter(f"{path.name}: not a safetensors file")
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as exc:
        raise InvalidAdapter(f"{path.name}: unreadable safetensors file ({exc})") from None
    if not tensors:
        raise InvalidAdapter(f"{path.name}: file holds no tensors")
    return tensors, metadata


# -- SGM (original SDXL) block names -------------------------------------------------------------------

_DIFFUSERS_TO_SGM = [
    (re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\."), lambda m: f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.1."),
    (re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\."), lambda m: f"output_blocks.{3 * int(m[1]) + int(m[2])}.1."),
    (re.compile(r"^mid_block\.attentions\.0\."), lambda m: "middle_block.1."),
]
_SGM_TO_DIFFUSERS = [
    (re.compile(r"^input_blocks\.(\d+)\.1\."),
     lambda m: f"down_blocks.{(int(m[1]) - 1) // 3}.attentions.{(int(m[1]) - 1) % 3}."),
    (re.compile(r"^output_blocks\.(\d+)\.1\."), lambda m: f"up_blocks.{int(m[1]) // 3}.attentions.{int(m[1]) % 3}."),
    (re.compile(r"^middle_block\.1\."), lambda m: "mid_block.attentions.0."),
]


def _rename_block(module: str, table) -> str:
    for pattern, repl in table:
        new, count = pattern.subn(repl, module, count=1)
        if count:
            return new
    return module


# -- conversions -----------------------------------------------------------------------------------------


def _split_lora_key(key: str) -> tuple[str, str] | None:
    """`<module>.lora_A.weight` -> (module, "A"); None for non-LoRA keys."""
    for suffix, kind in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    return None


def lora_modules(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A, B)} from a canonical state dict; raises if a module lacks one of its two factors."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        parsed = _split_lora_key(key)
        if parsed is None:
            raise InvalidAdapter(f"unexpected key {key!r}: not a LoRA factor")
        halves.setdefault(parsed[0], {})[parsed[1]] = value
    modules = {}
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise InvalidAdapter(f"module {module} has only lora_{''.join(pair)}; both factors are needed")
        modules[module] = (pair["A"], pair["B"])
    return modules


def to_diffusers(state_dict: Mapping[str, torch.Tensor], prefix: str = "unet") -> dict[str, torch.Tensor]:
    """Canonical -> diffusers file keys (`unet.<module>.lora.down.weight`)."""
    out = {}
    for module, (a, b) in lora_modules(state_dict).items():
        out[f"{prefix}.{module}.lora.down.weight"] = a.contiguous()
        out[f"{prefix}.{module}.lora.up.weight"] = b.contiguous()
    return out


def to_kohya(state_dict: Mapping[str, torch.Tensor], prefix: str = "lora_unet") -> dict[str, torch.Tensor]:
    """Canonical -> kohya keys (`lora_unet_up_blocks_0_attentions_0_..`) with `.alpha` equal to the rank.

    Block names stay in diffusers form, as diffusers' own `convert_state_dict_to_kohya` writes them: A1111,
    Forge and ComfyUI map these names, and diffusers reads them back exactly. SGM names
    (`output_blocks_0_1`) are accepted on import, but diffusers' converter cannot place a LoRA that covers
    only two blocks under SGM names, so they are not written.
    """
    out = {}
    for module, (a, b) in lora_modules(state_dict).items():
        name = prefix + "_" + module.replace(".", "_")
        out[f"{name}.lora_down.weight"] = a.contiguous()
        out[f"{name}.lora_up.weight"] = b.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(a.shape[0]))
    return out


def _fold_alpha(modules: dict[str, dict[str, torch.Tensor]], alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    out = {}
    for module, pair in modules.items():
        if set(pair) != {"A", "B"}:
            raise InvalidAdapter(f"module {module} has only one LoRA factor")
        a, b = pair["A"].float(), pair["B"].float()
        if module in alphas:
            b = b * (alphas[module] / a.shape[0])
        out[f"{module}.lora_A.weight"] = a.contiguous()
        out[f"{module}.lora_B.weight"] = b.contiguous()
    return out


def _kohya_module_name(flat: str, module_names: list[str]) -> str | None:
    """Map `output_blocks_0_1_transformer_blocks_0_attn1_to_q` back to a dotted module name of the model."""
    lookup = {}
    for name in module_names:
        lookup[name.replace(".", "_")] = name
        lookup[_rename_block(name, _DIFFUSERS_TO_SGM).replace(".", "_")] = name
    return lookup.get(flat)


def normalize_lora(
    state_dict: Mapping[str, torch.Tensor],
    module_names: list[str],
    component: str = "unet",
) -> dict[str, torch.Tensor]:
    """Any known LoRA layout -> canonical keys, with alpha folded in.

    Accepted: PEFT (`lora_A/lora_B`), diffusers (`lora.down/lora.up`, also old `processor.to_q_lora`), with or
    without `unet.` / `unet.unet.` / `transformer.` prefixes, and kohya (`lora_unet_*`, diffusers or SGM block
    names, `.alpha`). `module_names` are the Linear modules of the base model, used to resolve kohya names.
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    dropped_te = 0
    for raw_key, value in state_dict.items():
        key = raw_key
        if key.startswith(("lora_te", "text_encoder", "te1", "te2")):
            dropped_te += 1
            continue
        if key.startswith("lora_unet_") or key.startswith("lora_transformer_"):
            flat, _, rest = key.partition(".")
            flat = flat.split("_", 2)[2]
            module = _kohya_module_name(flat, module_names)
            if module is None:
                raise InvalidAdapter(f"key {raw_key!r} names no module of the base model")
            if rest == "alpha":
                alphas[module] = float(value)
                continue
            kind = {"lora_down.weight": "A", "lora_up.weight": "B"}.get(rest)
            if kind is None:
                raise InvalidAdapter(f"key {raw_key!r}: unsupported kohya tensor {rest!r} (LoCon/LoHa are not LoRA)")
            modules.setdefault(module, {})[kind] = value
            continue
        while key.startswith(f"{component}."):
            key = key[len(component) + 1:]
        key = key.replace(".processor.", ".").replace("_lora.down.", ".lora.down.").replace("_lora.up.", ".lora.up.")
        key = re.sub(r"\.to_out_lora\.", ".to_out.0.lora.", key)
        if key.endswith(".alpha"):
            alphas[key[: -len(".alpha")]] = float(value)
            continue
        match = re.match(r"^(.*)\.(lora_A|lora\.down|lora_down)(\.[^.]+)?\.weight$", key)
        kind = "A"
        if match is None:
            match = re.match(r"^(.*)\.(lora_B|lora\.up|lora_up)(\.[^.]+)?\.weight$", key)
            kind = "B"
        if match is None:
            raise InvalidAdapter(f"key {raw_key!r} is not a LoRA weight this importer understands")
        module = match.group(1)
        if module.endswith(".to_out"):
            module += ".0"
        modules.setdefault(module, {})[kind] = value
    if not modules:
        detail = " (only text-encoder keys, which B-LoRA does not use)" if dropped_te else ""
        raise InvalidAdapter(f"no {component} LoRA weights found{detail}")
    return _fold_alpha(modules, alphas)


def linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """{name: Linear} of a model, seeing through PEFT wrappers of adapters already loaded."""
    out = {}
    for name, module in model.named_modules():
        if ".base_layer" in name or ".lora_" in name:
            continue
        base = getattr(module, "base_layer", module)
        if isinstance(base, torch.nn.Linear):
            out[name] = base
    return out


def validate_against(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, int]:
    """Check every module exists as a Linear layer of `model` with matching shapes; return {module: rank}."""
    linear = linear_layers(model)
    ranks = {}
    for module, (a, b) in lora_modules(state_dict).items():
        layer = linear.get(module)
        if layer is None:
            raise InvalidAdapter(f"module {module} does not exist in the base model (wrong base model?)")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise InvalidAdapter(f"{module}: LoRA factors {tuple(a.shape)} and {tuple(b.shape)} do not pair")
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            raise InvalidAdapter(
                f"{module}: LoRA maps {a.shape[1]}->{b.shape[0]} but the base layer is "
                f"{layer.in_features}->{layer.out_features} (wrong base model?)"
            )
        ranks[module] = int(a.shape[0])
    return ranks


# -- writing ---------------------------------------------------------------------------------------------


def safetensors_metadata(fields: Mapping[str, object]) -> dict[str, str]:
    """Flatten `fields` into the string-only metadata safetensors allows."""
    out = {}
    for key, value in fields.items():
        if value is None:
            continue
        out[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return out


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object]) -> None:
    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=safetensors_metadata({"format": "pt", **metadata}))


def peft_metadata(state_dict: Mapping[str, torch.Tensor], prefix: str = "unet") -> dict[str, str]:
    """The `lora_adapter_metadata` diffusers reads to rebuild PEFT's LoraConfig (rank, alpha, targets)."""
    modules = lora_modules(state_dict)
    ranks = {m: int(a.shape[0]) for m, (a, _) in modules.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    config = {
        f"{prefix}.r": r,
        f"{prefix}.lora_alpha": r,
        f"{prefix}.target_modules": sorted(modules),
        f"{prefix}.rank_pattern": {m: k for m, k in ranks.items() if k != r},
        f"{prefix}.alpha_pattern": {m: k for m, k in ranks.items() if k != r},
    }
    return {"lora_adapter_metadata": json.dumps(config, sort_keys=True)}
