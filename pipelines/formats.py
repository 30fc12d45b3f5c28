"""LoRA file formats: diffusers/PEFT and kohya/ComfyUI export, import from other tools, and validation.

Inside Block Studio an adapter is a PEFT state dict without a component prefix
(`up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`) whose scale is 1: any
`alpha / rank` factor from another tool is folded into `lora_B` on import. On disk:

- diffusers format: `unet.<module>.lora.down.weight` / `.lora.up.weight` (what diffusers' training scripts
  write and `pipe.load_lora_weights` reads), with `lora_adapter_metadata` for PEFT's config;
- kohya format: `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`, the form A1111,
  Forge and ComfyUI read (block names in diffusers form; SGM names such as `output_blocks_0_1` are read on
  import). For Flux, sd-scripts' names of the original (BFL) model:
  `lora_unet_single_blocks_N_linear1` holds to_q, to_k, to_v and proj_mlp fused, written losslessly with a
  block-diagonal `lora_up` (see `to_kohya_flux`).

Only safetensors are read: pickled checkpoints are refused before they are opened.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipelines.checks import check_weights
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


# -- kohya names of Flux (sd-scripts, the original BFL module names) --------------------------------------

# kohya module -> the diffusers modules it fuses, in the order their outputs are stacked.
_FLUX_SINGLE_KOHYA = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
_FLUX_DOUBLE_KOHYA = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_mod_lin": ("norm1_context.linear",),
}
_FLUX_KOHYA_KEY = re.compile(r"lora_unet_(single|double)_blocks_(\d+)_([a-z0-9_]+?)\.(lora_down\.weight|lora_up\.weight|alpha)")
_FLUX_BLOCKS = {"single": ("single_transformer_blocks", _FLUX_SINGLE_KOHYA),
                "double": ("transformer_blocks", _FLUX_DOUBLE_KOHYA)}


def _flux_fused_dims(kohya_module: str, width: int) -> list[int]:
    """Output sizes of the modules a kohya Flux module fuses (Flux's MLP is 4x the width)."""
    if kohya_module == "linear1":
        return [width, width, width, 4 * width]
    if kohya_module.endswith("_qkv"):
        return [width] * 3
    raise KeyError(kohya_module)


def to_kohya_flux(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical Flux LoRA -> sd-scripts keys (`lora_unet_single_blocks_3_linear1`), lossless, `.alpha` = rank.

    Fused kohya modules get one rank-R chunk per member module (R = the largest member rank; smaller ranks and
    absent members are zero-padded): `lora_down` stacks the chunks and `lora_up` is block-diagonal, so
    up @ down is exactly the members' updates stacked, and diffusers' `_convert_kohya_flux_lora_to_diffusers`
    splits it back into the same factors.
    """
    modules = lora_modules(state_dict)
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for kind, (diffusers_blocks, table) in _FLUX_BLOCKS.items():
        pattern = re.compile(rf"{diffusers_blocks}\.(\d+)\.(.+)")
        groups: dict[tuple[int, str], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for module, pair in modules.items():
            match = pattern.fullmatch(module)
            if not match:
                continue
            for kohya_name, members in table.items():
                if match[2] in members:
                    groups.setdefault((int(match[1]), kohya_name), {})[match[2]] = pair
                    done.add(module)
        for (index, kohya_name), present in sorted(groups.items()):
            members = table[kohya_name]
            name = f"lora_unet_{kind}_blocks_{index}_{kohya_name}"
            if len(members) == 1:
                a, b = present[members[0]]
            else:
                a, b = _fuse_block_diagonal(kohya_name, members, present)
            out[f"{name}.lora_down.weight"] = a.contiguous()
            out[f"{name}.lora_up.weight"] = b.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(a.shape[0]))
    left = sorted(set(modules) - done)
    if left:
        raise InvalidAdapter(f"module {left[0]} has no kohya name for Flux (only transformer blocks are exported)")
    return out


def _fuse_block_diagonal(kohya_name: str, members: tuple[str, ...],
                         present: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    rank = max(a.shape[0] for a, _ in present.values())
    width = next(iter(present.values()))[0].shape[1]
    dims = _flux_fused_dims(kohya_name, width)
    first_a = next(iter(present.values()))[0]
    down = first_a.new_zeros(rank * len(members), width)
    up = first_a.new_zeros(sum(dims), rank * len(members))
    row = 0
    for i, (member, dim) in enumerate(zip(members, dims, strict=True)):
        if member in present:
            a, b = present[member]
            if b.shape[0] != dim:
                raise InvalidAdapter(f"{member}: LoRA output size {b.shape[0]} does not fit Flux's {kohya_name}")
            down[i * rank: i * rank + a.shape[0]] = a
            up[row: row + dim, i * rank: i * rank + a.shape[0]] = b
        row += dim
    return down, up


def from_kohya_flux(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sd-scripts Flux keys -> canonical (alpha folded in, fused modules split, zero padding dropped)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        match = _FLUX_KOHYA_KEY.fullmatch(key)
        if match is None:
            raise InvalidAdapter(f"key {key!r} is not a kohya Flux LoRA weight")
        grouped.setdefault(f"{match[1]}|{match[2]}|{match[3]}", {})[match[4]] = value
    out: dict[str, torch.Tensor] = {}
    for group, tensors in grouped.items():
        kind, index, kohya_name = group.split("|")
        diffusers_blocks, table = _FLUX_BLOCKS[kind]
        if kohya_name not in table:
            raise InvalidAdapter(f"lora_unet_{kind}_blocks_{index}_{kohya_name}: unknown Flux module")
        if "lora_down.weight" not in tensors or "lora_up.weight" not in tensors:
            raise InvalidAdapter(f"lora_unet_{kind}_blocks_{index}_{kohya_name} lacks one of its two LoRA factors")
        down, up = tensors["lora_down.weight"].float(), tensors["lora_up.weight"].float()
        alpha = alpha_value(group, tensors["alpha"]) if "alpha" in tensors else float(down.shape[0])
        up = up * (alpha / down.shape[0])
        members = table[kohya_name]
        if len(members) == 1:
            pieces = {members[0]: (down, up)}
        else:
            pieces = _split_fused(kohya_name, members, down, up)
        for member, (a, b) in pieces.items():
            keep = (a.abs().sum(dim=1) > 0) | (b.abs().sum(dim=0) > 0)
            if not bool(keep.any()):
                continue  # zero padding for a module that had no LoRA
            module = f"{diffusers_blocks}.{index}.{member}"
            out[f"{module}.lora_A.weight"] = a[keep].contiguous()
            out[f"{module}.lora_B.weight"] = b[:, keep].contiguous()
    return out


def _split_fused(kohya_name: str, members: tuple[str, ...], down: torch.Tensor, up: torch.Tensor
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    dims = _flux_fused_dims(kohya_name, down.shape[1])
    if sum(dims) != up.shape[0]:
        raise InvalidAdapter(f"{kohya_name}: lora_up has {up.shape[0]} rows, expected {sum(dims)}")
    n = len(members)
    rank = down.shape[0]
    ups = torch.split(up, dims, dim=0)
    if rank % n == 0:
        chunk = rank // n
        sparse = all(
            not bool(ups[j][:, k * chunk:(k + 1) * chunk].any()) for j in range(n) for k in range(n) if j != k
        )
        if sparse:
            return {m: (down[i * chunk:(i + 1) * chunk], ups[i][:, i * chunk:(i + 1) * chunk])
                    for i, m in enumerate(members)}
    # A dense fused update: every member shares the down projection.
    return {m: (down, ups[i]) for i, m in enumerate(members)}


def alpha_value(key: str, value: torch.Tensor) -> float:
    """A kohya `.alpha`: one finite, positive number (an int or float tensor, never a bool or NaN)."""
    if value.dtype == torch.bool or value.numel() != 1 or value.is_complex():
        raise InvalidAdapter(f"{key}: alpha must be one number, not a {str(value.dtype).removeprefix('torch.')} "
                             f"tensor of shape {tuple(value.shape)}")
    alpha = float(value)
    if not math.isfinite(alpha) or alpha <= 0:
        raise InvalidAdapter(f"{key}: alpha is {alpha}; it must be a positive number (the file is broken)")
    return alpha


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
    names, `.alpha`; for Flux, sd-scripts' `lora_unet_single_blocks_*` / `lora_unet_double_blocks_*`). `module_names` are the Linear modules of the base model, used to resolve kohya names.
    """
    check_weights({k: v for k, v in state_dict.items() if not k.endswith(".alpha")}, "LoRA file")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    dropped_te = 0
    flux_kohya = {k: v for k, v in state_dict.items() if _FLUX_KOHYA_KEY.fullmatch(k)}
    if flux_kohya:
        for key, value in from_kohya_flux(flux_kohya).items():
            module, kind = _split_lora_key(key)
            modules.setdefault(module, {})[kind] = value
        state_dict = {k: v for k, v in state_dict.items() if k not in flux_kohya}
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
                alphas[module] = alpha_value(raw_key, value)
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
            alphas[key[: -len(".alpha")]] = alpha_value(raw_key, value)
            continue
        match = re.fullmatch(r"(.*)\.(lora_A|lora\.down|lora_down)(\.[^.]+)?\.weight", key)
        kind = "A"
        if match is None:
            match = re.fullmatch(r"(.*)\.(lora_B|lora\.up|lora_up)(\.[^.]+)?\.weight", key)
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
