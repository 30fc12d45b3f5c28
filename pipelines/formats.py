"""LoRA file formats: diffusers/PEFT and kohya/ComfyUI export, import from other tools, and validation.

Inside Block Studio an adapter is a PEFT state dict without a component prefix
(`up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`) whose scale is 1: any
`alpha / rank` factor from another tool is folded into `lora_B` on import. On disk:

- diffusers format: `unet.<module>.lora.down.weight` / `.lora.up.weight` (what diffusers' training scripts
  write and `pipe.load_lora_weights` reads), with `lora_adapter_metadata` for PEFT's config;
- kohya format: `<prefix>_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`, the form sd-scripts,
  A1111, Forge and ComfyUI read. For SDXL the modules carry the SGM (original UNet) names sd-scripts itself
  writes (`lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q`); files with diffusers block names
  (`lora_unet_up_blocks_0_attentions_0_...`) are read on import too. For Flux each diffusers module keeps its
  own factors under `lora_transformer_<module>` (see `to_kohya_flux`); sd-scripts' fused Flux names
  (`lora_unet_single_blocks_N_linear1`) are read on import.

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

# SDXL's UNet as its original (SGM) code numbers it: input_blocks.0 is conv_in, then each level has
# `layers_per_block` (2) blocks and a slot for its down- or upsampler, 3 in all; inside a block the resnet is
# child 0 and the attention (`Transformer2DModel`) child 1.
_SDXL_BLOCKS_PER_LEVEL = 3
_DIFFUSERS_TO_SGM = [
    (re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\."),
     lambda m: f"input_blocks.{_SDXL_BLOCKS_PER_LEVEL * int(m[1]) + int(m[2]) + 1}.1."),
    (re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\."),
     lambda m: f"output_blocks.{_SDXL_BLOCKS_PER_LEVEL * int(m[1]) + int(m[2])}.1."),
    (re.compile(r"^mid_block\.attentions\.0\."), lambda m: "middle_block.1."),
]


def sgm_module_name(module: str) -> str | None:
    """`up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q` -> `output_blocks.1.1.transformer_blocks...`.

    The attention modules of SDXL's UNet under the names of the original model, which sd-scripts, ComfyUI,
    A1111 and Forge use; None for a module outside the attention blocks.
    """
    for pattern, repl in _DIFFUSERS_TO_SGM:
        new, count = pattern.subn(repl, module, count=1)
        if count:
            return new
    return None


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


def _kohya_factors(name: str, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """One module's kohya tensors; alpha equals the rank, so the file's scale is 1 as in Block Studio."""
    return {f"{name}.lora_down.weight": a.contiguous(), f"{name}.lora_up.weight": b.contiguous(),
            f"{name}.alpha": torch.tensor(float(a.shape[0]))}


def to_kohya(state_dict: Mapping[str, torch.Tensor], prefix: str = "lora_unet") -> dict[str, torch.Tensor]:
    """Canonical SDXL LoRA -> the keys sd-scripts writes for SDXL (`lora_unet_output_blocks_0_1_...`).

    sd-scripts names its modules after the original UNet, and its merge tool and `--network_weights` resume
    match those names exactly (a diffusers-named key is skipped without a word). ComfyUI, A1111 and Forge map
    them to their own UNets, and diffusers' `load_lora_weights` maps them back to its blocks.
    """
    out = {}
    for module, (a, b) in lora_modules(state_dict).items():
        sgm = sgm_module_name(module)
        if sgm is None:
            raise InvalidAdapter(f"module {module} has no sd-scripts SDXL name (only attention blocks are exported)")
        out.update(_kohya_factors(prefix + "_" + sgm.replace(".", "_"), a, b))
    return out


# -- kohya names of Flux ---------------------------------------------------------------------------------

# sd-scripts' names of the original (BFL) Flux modules, as its files and ComfyUI use them, read on import.
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
FLUX_KOHYA_PREFIX = "lora_transformer"


def _flux_fused_dims(kohya_module: str, width: int) -> list[int]:
    """Output sizes of the modules a kohya Flux module fuses (Flux's MLP is 4x the width)."""
    if kohya_module == "linear1":
        return [width, width, width, 4 * width]
    if kohya_module.endswith("_qkv"):
        return [width] * 3
    raise KeyError(kohya_module)


def to_kohya_flux(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical Flux LoRA -> kohya keys with one entry per diffusers module (`lora_transformer_<module>`).

    The original Flux fuses q, k, v (and, in a single block, the MLP input) into one Linear. sd-scripts' names
    address that fused module, so a LoRA on q, k and v alone needs a block-diagonal `lora_up` over all fused
    outputs, several times the size of the factors themselves (sd-scripts' own `split_qkv` option trains split
    factors but still saves them fused and padded). Under the diffusers module names each factor is stored as
    it is, in its own dtype, and ComfyUI and Forge place it at its offset in the fused weight. diffusers'
    `load_lora_weights` reads these names for the attention projections (`attn.*`); for other modules use the
    diffusers file.
    """
    return {key: value for module, (a, b) in lora_modules(state_dict).items()
            for key, value in _kohya_factors(f"{FLUX_KOHYA_PREFIX}_{module.replace('.', '_')}", a, b).items()}


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


def _kohya_module_lookup(module_names: list[str]) -> dict[str, str]:
    """{flat kohya name: module} for a model's modules, under diffusers and SGM block names.

    `up_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q` and `output_blocks_0_1_transformer_blocks_0_attn1_to_q`
    both name the module `up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    """
    lookup = {}
    for name in module_names:
        lookup[name.replace(".", "_")] = name
        sgm = sgm_module_name(name)
        if sgm is not None:
            lookup[sgm.replace(".", "_")] = name
    return lookup


def normalize_lora(
    state_dict: Mapping[str, torch.Tensor],
    module_names: list[str],
    component: str = "unet",
) -> dict[str, torch.Tensor]:
    """Any known LoRA layout -> canonical keys, with alpha folded in.

    Accepted: PEFT (`lora_A/lora_B`), diffusers (`lora.down/lora.up`, also old `processor.to_q_lora`), with or
    without `unet.` / `unet.unet.` / `transformer.` prefixes, and kohya (`lora_unet_*` with diffusers or SGM
    block names, `lora_transformer_*`, `.alpha`; for Flux also sd-scripts' fused `lora_unet_single_blocks_*` /
    `lora_unet_double_blocks_*`). `module_names` are the Linear modules of the base model, used to resolve
    kohya names.
    """
    check_weights({k: v for k, v in state_dict.items() if not k.endswith(".alpha")}, "LoRA file")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    dropped_te = 0
    kohya_lookup: dict[str, str] | None = None
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
            if kohya_lookup is None:
                kohya_lookup = _kohya_module_lookup(module_names)
            module = kohya_lookup.get(flat)
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
