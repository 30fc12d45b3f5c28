"""Merge style packages into one: TALL-masked task arithmetic over their weight deltas (MergeVLA's masks), or a
plain weighted sum, written as an ordinary package that plain diffusers loads.

Every style adapter is a task vector tau_p = B_p A_p per module (its weight delta at scale 1). With weights
w_p the multi-task vector is tau = sum_p w_p tau_p.

- `mode="sum"`: the merged delta is tau.
- `mode="masked"`: each style's TALL mask m_p = 1[|w_p tau_p| > lambda |tau - w_p tau_p|] marks the entries that
  carry that style rather than the others (MergeVLA, lambda 0.6), and each style adds its delta on its own mask:
  merged = sum_p m_p * w_p tau_p. MergeVLA retrieves one task at a time (theta_0 + m_t * tau); one package
  serves every style at once, so here every style is retrieved and the retrievals are added. A style's small
  contribution to an entry another style dominates is left out (less interference than the sum); an entry on
  no mask (with three styles or more, where none stands out) is dropped, as TALL drops it for every task.

A merged delta is no longer low-rank in general (an elementwise mask breaks the product form), and a package
must stay a LoRA that diffusers loads. The choice here, exposed as `rank`: each module's merged delta is
factored back by a truncated SVD, B = U_r S_r, A = V_r^T, keeping `rank` singular values (default: the sum of
the inputs' ranks on that module, at most min(d_out, d_in)); the share of the delta's energy kept is recorded per
module. A plain sum at that default rank is exact and is written as the inputs' factors side by side instead
(B = [w_1 B_1, ..., w_P B_P], A = [A_1; ...; A_P]), with no SVD at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pipelines import formats
from pipelines.errors import BlockStudioError
from pipelines.package import AdapterPackage, PackageContents, PackageInfo, check_name, write_package

MODES = ("masked", "sum")
MAX_PACKAGES = 8
MAX_RANK = 1024


class MergeError(BlockStudioError):
    """Packages or options that cannot be merged; the message says why."""


@dataclass
class MergeOptions:
    mode: str = "masked"
    mask_lambda: float = 0.6  # MergeVLA's TALL lambda
    weights: tuple[float, ...] | None = None  # one per package; None: 1 each (task arithmetic)
    rank: int | None = None  # None: the sum of the inputs' ranks (per module)

    def checked(self, count: int) -> MergeOptions:
        if self.mode not in MODES:
            raise MergeError(f"merge mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if not _finite(self.mask_lambda) or not 0 <= self.mask_lambda <= 100:
            raise MergeError(f"mask lambda must be a number between 0 and 100, not {self.mask_lambda!r}")
        weights = tuple(self.weights) if self.weights is not None else (1.0,) * count
        if len(weights) != count:
            raise MergeError(f"give one weight per package: {count} packages, {len(weights)} weights")
        if not all(_finite(w) and -10 <= w <= 10 for w in weights):
            raise MergeError("each weight must be a number between -10 and 10")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int)
                                      or not 1 <= self.rank <= MAX_RANK):
            raise MergeError(f"rank must be a whole number from 1 to {MAX_RANK}, not {self.rank!r}")
        return MergeOptions(self.mode, float(self.mask_lambda), weights, self.rank)


def parse_weights(text: str | None) -> tuple[float, ...] | None:
    """'1, 0.5' -> (1.0, 0.5); None or blank -> None (1 each). Ranges are checked by `MergeOptions.checked`."""
    if text is None or not str(text).strip():
        return None
    try:
        return tuple(float(v) for v in str(text).replace(";", ",").split(",") if v.strip())
    except ValueError:
        raise MergeError("weights must be numbers separated by commas, e.g. 1, 0.5") from None


def _finite(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclass
class ModuleReport:
    rank: int
    energy_kept: float  # |merged delta as written|^2 / |merged delta|^2
    kept_entries: float  # share of the styles' entries their masks keep (1 for a sum)


@dataclass
class MergeResult:
    state: dict[str, torch.Tensor]
    modules: dict[str, ModuleReport] = field(default_factory=dict)

    @property
    def energy_kept(self) -> float:
        return min((r.energy_kept for r in self.modules.values()), default=1.0)

    @property
    def kept_entries(self) -> float:
        reports = list(self.modules.values())
        return sum(r.kept_entries for r in reports) / len(reports) if reports else 1.0


# -- the arithmetic ------------------------------------------------------------------------------------------


def masked_delta(deltas: torch.Tensor, mask_lambda: float) -> tuple[torch.Tensor, float]:
    """sum_p m_p * delta_p over the weighted deltas (P, out, in) with their TALL masks, and the share of the
    styles' entries the masks keep."""
    masks = deltas.abs() > mask_lambda * (deltas.sum(0).unsqueeze(0) - deltas).abs()
    return (deltas * masks).sum(0), float(masks.float().mean())


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B) with B A the best rank-`rank` approximation of `delta` (truncated SVD), and the energy it keeps."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(rank, s.numel())
    total = float((s**2).sum())
    kept = float((s[:rank] ** 2).sum()) / total if total > 0 else 1.0
    return vh[:rank].contiguous(), (u[:, :rank] * s[:rank]).contiguous(), kept


def merge_states(states: list[dict[str, torch.Tensor]], options: MergeOptions) -> MergeResult:
    """Merge canonical LoRA state dicts (scale folded into lora_B) module by module."""
    options = options.checked(len(states))
    factors = [formats.lora_modules(state) for state in states]
    modules = sorted({m for f in factors for m in f})
    result = MergeResult({})
    for module in modules:
        present = [(w, f[module]) for w, f in zip(options.weights, factors, strict=True) if module in f]
        shapes = {(b.shape[0], a.shape[1]) for _, (a, b) in present}
        if len(shapes) != 1:
            raise MergeError(f"the packages disagree on the shape of {module}; they are not for the same model")
        out_features, in_features = shapes.pop()
        rank = options.rank or min(sum(a.shape[0] for _, (a, _) in present), out_features, in_features)
        if options.mode == "sum" and options.rank is None:
            down = torch.cat([a.float() for _, (a, _) in present])
            up = torch.cat([w * b.float() for w, (_, b) in present], dim=1)
            report = ModuleReport(int(down.shape[0]), 1.0, 1.0)
        else:
            deltas = torch.stack([w * (b.float() @ a.float()) for w, (a, b) in present])
            if options.mode == "masked":
                merged, kept_entries = masked_delta(deltas, options.mask_lambda)
            else:
                merged, kept_entries = deltas.sum(0), 1.0
            down, up, energy = low_rank(merged, rank)
            report = ModuleReport(int(down.shape[0]), energy, kept_entries)
        dtype = present[0][1][0].dtype
        result.state[f"{module}.lora_A.weight"] = down.to(dtype).contiguous()
        result.state[f"{module}.lora_B.weight"] = up.to(dtype).contiguous()
        result.modules[module] = report
    return result


# -- packages ------------------------------------------------------------------------------------------------


def check_mergeable(packages: list[AdapterPackage]) -> None:
    """The packages must be two or more, made for the same base model by the same method, each with a style."""
    if len(packages) < 2:
        raise MergeError("choose at least two style packages to merge")
    if len(packages) > MAX_PACKAGES:
        raise MergeError(f"merge at most {MAX_PACKAGES} packages at a time")
    names = [p.name for p in packages]
    if len(set(names)) != len(names):
        raise MergeError("each package can be merged only once; choose different packages")
    models = sorted({p.base_model for p in packages})
    if len(models) > 1:
        raise MergeError(f"cannot merge packages made for different base models ({', '.join(models)}); "
                         "merge styles of one base model")
    methods = sorted({p.method for p in packages})
    if len(methods) > 1:
        raise MergeError(f"cannot merge packages made by different methods ({', '.join(methods)}); "
                         "merge styles trained the same way")
    for package in packages:
        try:
            package.part_for("style")
        except BlockStudioError:
            raise MergeError(f"package {package.name} has no style part to merge") from None


def merge_packages(packages: list[AdapterPackage], out, name: str, options: MergeOptions | None = None, *,
                   replace: bool = False):
    """Merge the style parts of `packages` into a new package at `out` named `name`; return its path.

    The new package holds the merged style as its `style` part and as its whole adapter (the diffusers file
    `pytorch_lora_weights.safetensors` and kohya files), and records how it was made in adapter.json.
    """
    check_name(name)
    check_mergeable(packages)
    options = (options or MergeOptions()).checked(len(packages))
    states = [p.state_dict(p.part_for("style")) for p in packages]
    result = merge_states(states, options)
    first = packages[0]
    ranks = sorted({r.rank for r in result.modules.values()})
    info = {
        "method": first.method,
        "base_model": first.base_model,
        "arch": first.meta.arch,
        "base_model_id": first.meta.base_model_id or "",
        "token": first.token,
        "style_token": first.style_token,
        "prompt": f"A lighthouse in {first.style_token} style",
        "rank": max(ranks),
        "ranks": {"style": max(ranks)},
        "blocks": {"style": _style_blocks(packages)},
        "parts": {"style": {"blocks": _style_blocks(packages), "rank": max(ranks),
                            "description": f"the styles of {', '.join(p.name for p in packages)}, merged"}},
        "composition": {"name": "merged style", "optional": [], "uses": {"style": "style"}},
        "sample_prompts": {},
        "merge": {
            "mode": options.mode,
            "mask_lambda": options.mask_lambda if options.mode == "masked" else None,
            "weights": list(options.weights),
            "rank": options.rank,
            "factorization": "factors side by side (exact)" if options.mode == "sum" and options.rank is None
            else "truncated SVD of each module's merged delta",
            "energy_kept_min": round(result.energy_kept, 6),
            "entries_kept": round(result.kept_entries, 6),
            "sources": [{"name": p.name, "token": p.style_token, "part": p.part_for("style")} for p in packages],
        },
    }
    contents = PackageContents(name=name, info=info, full=result.state, parts={"style": result.state})
    return write_package(out, contents, card=merged_card(PackageInfo.from_dict({**info, "name": name})),
                         replace=replace)


def merged_card(info: PackageInfo) -> str:
    """README.md of a merged style package: what was merged and how, and how to load the style."""
    from pipelines.model_card import BASE_IDS, _yaml_str
    from pipelines.models import ARCHITECTURES

    merge = info.extra.get("merge") if isinstance(info.extra.get("merge"), dict) else {}
    arch = ARCHITECTURES.get(info.arch, ARCHITECTURES["sdxl"])
    base = info.base_model or arch.default_model
    base_id = BASE_IDS.get(base, base)
    name, token = info.name or "merged-style", info.style_token or info.token
    prompt = info.prompt or f"A lighthouse in {token} style"
    tiny = base.startswith("tiny-")
    sources = [s.get("name", "?") for s in merge.get("sources", []) if isinstance(s, dict)]
    how = ("each style's weight delta added on its TALL mask (MergeVLA), lambda "
           f"{merge.get('mask_lambda')}" if merge.get("mode") == "masked" else "the weighted sum of the styles' deltas")
    load = ([f"from pipelines.models import model_path  # {base} is built by Block Studio, not on the Hub", "",
             f'pipe = {arch.pipeline}.from_pretrained(model_path("{base}"))'] if tiny else
            ["", f'pipe = {arch.pipeline}.from_pretrained("{base_id}", torch_dtype=torch.{arch.dtype}).to("cuda")'])
    lines = ["---", *([] if tiny else [f"base_model: {_yaml_str(base_id)}"]), "library_name: diffusers",
             f"license: {arch.license}", f"instance_prompt: {_yaml_str(prompt)}", "tags:",
             *[f"- {t}" for t in ("text-to-image", "lora", "diffusers", "template:sd-lora", info.method or "adapter",
                                  "blockstudio", "merged", arch.hub_tag)], "---", "",
             f"# {name}", "",
             f"The styles of {', '.join(f'`{s}`' for s in sources) or 'several packages'} merged into one "
             f"**{info.method}** style adapter for `{base_id}` by Block Studio: {how}, weights "
             f"{merge.get('weights')}, factored back into a LoRA of rank {info.rank} "
             f"({merge.get('factorization', '')}; at least {float(merge.get('energy_kept_min', 1.0)):.1%} of each "
             f"layer's merged delta kept). Style token: `{token}`.", "",
             "## Use with diffusers", "", "```python", "import torch", f"from diffusers import {arch.pipeline}", *load,
             f'pipe.load_lora_weights("{name}", weight_name="style.safetensors", adapter_name="style")',
             f'image = pipe("{prompt}", generator=torch.Generator("cpu").manual_seed(0)).images[0]', "```", "",
             "`pytorch_lora_weights.safetensors` holds the same style (diffusers' default file name).", "",
             "## Use with ComfyUI, A1111 or Forge", "",
             f"Load `kohya/{name}_style.safetensors` with a LoRA loader node on the same base model, and put "
             f"`{token}` in the prompt.", ""]
    return "\n".join(lines)


def _style_blocks(packages: list[AdapterPackage]) -> str:
    blocks = []
    for package in packages:
        recorded = package.info.get("blocks")
        part = package.part_for("style")
        value = recorded.get(part) if isinstance(recorded, dict) else None
        if isinstance(value, str) and value not in blocks:
            blocks.append(value)
    return ", ".join(blocks) or "style"
