"""What one training step must cost: FLOPs, memory and the floor time on a GPU, from shapes alone.

A step is run on the meta device (shapes, no storage, no arithmetic) under `torch.utils.flop_counter`'s
`FlopCounterMode`: the forward pass, then the backward pass exactly as autograd runs it, which is only as far
as the adapters need (a frozen base gets no weight gradients, and no input gradients flow below the first
adapter). The same pass records the bytes autograd keeps for the backward pass (saved tensors, each storage
counted once, parameters excluded), per checkpointing unit as well, so the activations with gradient
checkpointing can be estimated too. Attention is counted as the fused flash kernel computes it (its own
forward and backward formulas, no seq x seq matrix kept).

From the counts: the floor time of a step on a GPU is the larger of FLOPs / peak bf16 rate and bytes that
must move / memory bandwidth. A measured step is reported as a fraction of that floor (floor / measured: 1.0
is a step that could not be faster). `GPUS` holds datasheet figures (dense, no sparsity); they are leads, and
the benchmarks also measure both ceilings on the card at hand (`measure_ceilings`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

# -- GPUs ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPUSpec:
    name: str
    bf16_tflops: float  # dense tensor-core rate with fp32 accumulation (fp16 where the card has no bf16)
    bandwidth_gbs: float  # device memory bandwidth, GB/s
    memory_gb: float
    note: str = ""


# Matched in order against torch.cuda.get_device_name(); datasheet values, dense (sparsity not counted).
GPUS: tuple[tuple[str, GPUSpec], ...] = (
    (r"H200", GPUSpec("H200 SXM", 989.4, 4800, 141)),
    (r"H100.*NVL", GPUSpec("H100 NVL", 835.0, 3900, 94)),
    (r"H100.*PCIe", GPUSpec("H100 PCIe", 756.5, 2000, 80)),
    (r"H100", GPUSpec("H100 SXM", 989.4, 3350, 80)),
    (r"A100.*80GB.*PCIe|A100.*PCIe.*80GB", GPUSpec("A100 PCIe 80GB", 312.0, 1935, 80)),
    (r"A100.*PCIE|A100.*PCIe", GPUSpec("A100 PCIe 40GB", 312.0, 1555, 40)),
    (r"A100.*80GB", GPUSpec("A100 SXM 80GB", 312.0, 2039, 80)),
    (r"A100", GPUSpec("A100 SXM 40GB", 312.0, 1555, 40)),
    (r"L4\b", GPUSpec("L4", 121.0, 300, 24)),
    (r"A10G", GPUSpec("A10G", 125.0, 600, 24,
                      "AWS's A10 variant; NVIDIA publishes no A10G sheet, so the A10's figures stand in: measure")),
    (r"A10\b", GPUSpec("A10", 125.0, 600, 24)),
    (r"T4\b", GPUSpec("T4", 65.0, 320, 16, "no bf16 tensor cores: the rate is fp16's, and training runs in fp16")),
    (r"RTX 4090", GPUSpec("RTX 4090", 165.2, 1008, 24, "fp32 accumulation (GeForce halves it against fp16)")),
    (r"RTX 3090", GPUSpec("RTX 3090", 71.0, 936, 24, "fp32 accumulation (GeForce halves it against fp16)")),
)


def gpu_spec(device_name: str) -> GPUSpec | None:
    """The datasheet figures of a GPU by its CUDA name, or None for a card not in the table (measure it).

    A MIG slice (ZeroGPU's "H200 MIG 3g.71gb") has only part of the card's compute: it is not in the table.
    """
    if "MIG" in device_name:
        return None
    for pattern, spec in GPUS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return spec
    return None


def measure_ceilings(device: torch.device | str = "cuda", size: int = 8192, copy_mb: int = 1024,
                     repeats: int = 20) -> dict[str, float]:
    """The two ceilings of the card at hand: a bf16 matrix product's TFLOP/s and a device copy's GB/s
    (bytes read plus bytes written), each the median of `repeats` timed runs after warm-up, on random data."""
    import statistics

    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    src = torch.randn(copy_mb * 2**20 // 4, device=device)
    dst = torch.empty_like(src)

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        return statistics.median(times)

    matmul_s = timed(lambda: torch.mm(a, b))
    copy_s = timed(lambda: dst.copy_(src))
    return {"bf16_tflops": 2 * size**3 / matmul_s / 1e12, "bandwidth_gbs": 2 * src.numel() * 4 / copy_s / 1e9}


# -- a step's cost ------------------------------------------------------------------------------------------


@dataclass
class StepCost:
    """FLOPs and bytes of one training step; see the module docstring for how each is counted."""

    recipe: str
    model: str
    resolution: int
    forward_flops: int
    backward_flops: int
    recompute_flops: int  # forward work gradient checkpointing repeats in the backward pass
    frozen_params: int
    trainable_params: int
    weight_bytes: int  # the frozen base on the device (bf16, fp8 or NF4 storage)
    adapter_bytes: int  # fp32 adapter weights
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int  # kept for the backward pass without checkpointing
    checkpointed_activation_bytes: int  # the same with checkpointing (kept inputs + the largest unit's)
    backward_weight_bytes: int  # frozen weights the backward pass reads again (input gradients)
    details: dict = field(default_factory=dict)

    @property
    def flops(self) -> int:
        """The necessary FLOPs of a step: forward and backward, without recomputation."""
        return self.forward_flops + self.backward_flops

    def memory_bytes(self, checkpointing: bool) -> int:
        activations = self.checkpointed_activation_bytes if checkpointing else self.activation_bytes
        return self.weight_bytes + self.adapter_bytes + self.gradient_bytes + self.optimizer_bytes + activations

    @property
    def bytes_moved(self) -> int:
        """The fewest bytes a step moves through device memory: the frozen weights read in the forward pass and
        again where the backward pass runs, the kept activations written and read once, and AdamW's update
        (parameter, gradient and two moments read; parameter and moments written)."""
        optimizer_traffic = self.adapter_bytes * 3 + self.gradient_bytes + self.optimizer_bytes * 2
        return self.weight_bytes + self.backward_weight_bytes + 2 * self.activation_bytes + optimizer_traffic

    def floor(self, tflops: float, bandwidth_gbs: float) -> dict[str, float | str]:
        """Seconds a step cannot beat at `tflops` (bf16) and `bandwidth_gbs`, and which one binds."""
        compute = self.flops / (tflops * 1e12)
        memory = self.bytes_moved / (bandwidth_gbs * 1e9)
        return {"compute_s": compute, "memory_s": memory, "floor_s": max(compute, memory),
                "bound": "compute" if compute >= memory else "memory"}

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(flops=self.flops, bytes_moved=self.bytes_moved,
                   memory_bytes=self.memory_bytes(False), memory_bytes_checkpointing=self.memory_bytes(True))
        return out


def fraction_of_floor(floor_s: float, measured_s: float) -> float:
    """floor / measured: 1.0 is a step at the floor, 0.25 one four times slower than it."""
    return floor_s / measured_s if measured_s > 0 else 0.0


OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2}  # per trainable parameter: two moments
BASE_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "nf4": 0.5 + 4 / 64}  # per Linear weight (NF4: + absmax)


def _flash_sdpa(original: Callable) -> Callable:
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or kwargs.get("enable_gqa"):
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                  False, scale=scale)[0]

    return sdpa


@contextlib.contextmanager
def flash_attention_on_meta(enabled: bool = True):
    """Run `F.scaled_dot_product_attention` as the flash kernel while counting (meta otherwise takes the math
    path, which keeps the seq x seq attention matrix no GPU run keeps)."""
    if not enabled:
        yield
        return
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_sdpa(original)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def count_step(module: torch.nn.Module, step: Callable[[], torch.Tensor], units: Iterable[torch.nn.Module],
               trainable: list[torch.nn.Parameter]) -> dict:
    """Run `step()` (a forward pass returning the loss) and its backward pass under the FLOP counter.

    Returns forward/backward FLOPs, bytes kept for backward (in all, and inside each checkpointing unit, with
    the unit's input bytes), and the frozen weight bytes of modules whose output carries a gradient.
    """
    from torch.utils.flop_counter import FlopCounterMode

    units = list(units)
    param_keys = {_storage_key(p) for p in module.parameters()}
    seen: set[int] = set()
    kept = {"total": 0}
    unit_stats: dict[int, dict[str, int]] = {}
    current: list[int] = []
    counter = FlopCounterMode(display=False)

    def pack(tensor: torch.Tensor):
        key = _storage_key(tensor)
        if key not in param_keys and key not in seen:
            seen.add(key)
            nbytes = tensor.untyped_storage().nbytes()
            kept["total"] += nbytes
            if current:
                unit_stats[current[-1]]["kept"] += nbytes
        return tensor

    def before(unit, args, kwargs):
        if not torch.is_grad_enabled():
            return
        inputs = [t for t in (*args, *kwargs.values()) if torch.is_tensor(t)]
        stats = unit_stats.setdefault(id(unit), {"kept": 0, "inputs": 0, "flops": 0, "calls": 0})
        stats["inputs"] += sum(t.untyped_storage().nbytes() for t in inputs)
        stats["calls"] += 1
        stats["_start"] = counter.get_total_flops()
        current.append(id(unit))

    def after(unit, args, kwargs, output):
        if current and current[-1] == id(unit):
            current.pop()
            stats = unit_stats[id(unit)]
            stats["flops"] += counter.get_total_flops() - stats.pop("_start")

    backward_weights = {"bytes": 0}
    counted: set[int] = set()

    def grad_output(mod, args, output):
        outputs = output if isinstance(output, tuple) else (output,)
        if not any(torch.is_tensor(o) and o.requires_grad for o in outputs) or id(mod) in counted:
            return
        counted.add(id(mod))
        backward_weights["bytes"] += sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False)
                                         if not p.requires_grad)

    handles = [unit.register_forward_pre_hook(before, with_kwargs=True) for unit in units]
    handles += [unit.register_forward_hook(after, with_kwargs=True) for unit in units]
    handles += [m.register_forward_hook(grad_output) for m in module.modules()]
    try:
        with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = step()
        forward = counter.get_total_flops()
        with FlopCounterMode(display=False) as backward_counter:
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    for p in trainable:
        p.grad = None
    units_kept = sum(s["kept"] for s in unit_stats.values())
    largest = max((s["kept"] // max(s["calls"], 1) for s in unit_stats.values()), default=0)
    unit_inputs = sum(s["inputs"] for s in unit_stats.values())
    return {
        "forward_flops": forward,
        "backward_flops": backward_counter.get_total_flops(),
        "recompute_flops": sum(s["flops"] for s in unit_stats.values()),
        "activation_bytes": kept["total"],
        "checkpointed_activation_bytes": kept["total"] - units_kept + unit_inputs + largest,
        "backward_weight_bytes": backward_weights["bytes"],
        "units": len(unit_stats),
    }


def _base_bytes(module: torch.nn.Module, base: str) -> int:
    """Bytes of the frozen weights at `base` storage: Linear weights quantized, everything else bf16."""
    total = 0
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            if p.requires_grad:
                continue
            per = BASE_BYTES[base] if isinstance(mod, torch.nn.Linear) and name == "weight" else 2.0
            total += int(p.numel() * per)
    return total


def step_cost(recipe: str, model: str, resolution: int, module: torch.nn.Module, trainable, counts: dict, *,
              base: str, optimizer: str, details: dict) -> StepCost:
    """The `StepCost` of a recipe's step from `count_step`'s counts and the module's parameters."""
    n_trainable = sum(p.numel() for p in trainable)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    details = {**details, "checkpointing_units": counts.pop("units"), "base": base, "optimizer": optimizer}
    return StepCost(recipe=recipe, model=model, resolution=resolution, frozen_params=frozen,
                    trainable_params=n_trainable, weight_bytes=_base_bytes(module, base),
                    adapter_bytes=4 * n_trainable, gradient_bytes=4 * n_trainable,
                    optimizer_bytes=OPTIMIZER_STATE_BYTES[optimizer] * n_trainable, details=details, **counts)


def architecture_folder(model: str):
    """The folder whose configs describe `model`'s shapes: the shipped full-size configs for SDXL and FLUX.1
    (their Hub models and the random-weight ones share them), the built folder for the tiny models."""
    from pipelines.fullsize import config_folder
    from pipelines.models import model_path, resolve_model

    spec = resolve_model(model)
    if spec.tiny:
        return model_path(model)
    return config_folder("sdxl-random" if spec.arch == "sdxl" else "flux-random")


def meta_model(model: str, component: str, config) -> torch.nn.Module:
    """`model`'s component on the meta device in bf16, from a live model's `config` when one is given."""
    from pipelines.fullsize import build_component, component_class
    from pipelines.models import building_modules

    if config is None:
        built = build_component(architecture_folder(model), component)
    else:
        folder = architecture_folder("sdxl-random" if component == "unet" else "flux-random")
        _, cls = component_class(folder, component)
        with building_modules(), torch.device("meta"):
            built = cls.from_config(config)
    return built.to(torch.bfloat16)


def __getattr__(name: str):
    # Each recipe counts its own step, in its package; these names stay importable from here.
    if name == "blora_step_cost":
        from pipelines.blora.cost import blora_step_cost

        return blora_step_cost
    if name == "splitflux_step_cost":
        from pipelines.splitflux.cost import splitflux_step_cost

        return splitflux_step_cost
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
