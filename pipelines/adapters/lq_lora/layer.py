"""LQ-LoRA: each weight becomes a frozen quantised matrix Q plus a trainable low-rank L1 L2, W ~ Q + L1 L2.

    y = Q x + (alpha / r) B A x + b,   with B = L1 / sqrt(alpha / r) and A = L2 / sqrt(alpha / r) at the start

Guo et al., "LQ-LoRA: Low-rank Plus Quantized Matrix Decomposition for Efficient Language Model Finetuning",
ICLR 2024 (arXiv 2311.12023); official code HanGuo97/lq-lora (models/lora_utils.py `transform_lora_layer_lpq`
maps L1, L2 onto PEFT's lora_B, lora_A this way). Adding the adapter decomposes each target weight by the
paper's iterative algorithm (`lq_decompose`); Q is stored in its quantised form (codes, scale codes, group
scales: `quant.py`) as buffers of the adapter, so a saved adapter holds the quantised model part it replaces.
Fine-tuning trains A and B only. `plan_lq_lora` spreads a memory budget (bits a parameter) across the matrices
with the paper's integer program, optionally Fisher-weighted (`fisher_information`).

Defaults follow the official README and code: rank 64, lora_alpha 16, dropout 0, NF4 with 8-bit scales in
blocks of 64 and fp32 second-level scales in blocks of 256 (its "nf4" setting), 100 iterations at most,
randomised SVD with 10 extra columns, "two-sided" Fisher weighting.

Choices left open, each a setting or documented:
- `init="qlora"` is the baseline the paper compares against: Q = quantize(W), A Kaiming-uniform and B zero
  (PEFT's LoRA initialisation), so the adapter starts as plain quantisation.
- `return_best`, the SVD size on small matrices and zero-Fisher rows: see `decompose.py`.
- `backend="auto"` lets bitsandbytes quantise on a GPU the format it implements (see `quant.py`); "torch"
  always uses the code here. Codes are kept one a byte in memory; `storage_bits` counts them packed.
- `fisher` ({module: F}) is used when the adapter is added and is not saved; `formats` ({module: format}, from
  `plan_lq_lora`) is saved, so a loaded adapter rebuilds the same shapes. Loading skips the decomposition.
- The layer computes the quantised path itself, so it must be the first adapter on its module; the original
  weight stays in the model untouched, so `disabled()` and `remove_adapter` give the base model back exactly,
  and `merge` writes Q + (alpha / r) B A into the weight (unmerge restores the saved original).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.adapters.base import AdapterLayer
from pipelines.adapters.core import (
    AdapterConfig,
    AdapterError,
    method_layers,
    module_slots,
    register_method,
    restoring_state,
)
from pipelines.adapters.fields import check_choice, check_int, check_number
from pipelines.adapters.lq_lora.decompose import WEIGHTINGS, lq_decompose
from pipelines.adapters.lq_lora.quant import FormatError, QuantFormat, dequantize, stored_names, stored_shapes

INITS = ("lq", "qlora")
BACKENDS = ("auto", "torch")


@dataclass
class LQLoRAConfig(AdapterConfig):
    method = "lq-lora"

    rank: int = field(default=64, metadata={"help": "rank r of L1 L2 (official README: 64)"})
    alpha: float = field(default=16.0, metadata={"help": "the update is multiplied by alpha / r (official: 16)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the low-rank branch's input (official: 0)"})
    quant_format: str = field(default="nf4-64-8-fp32-256", metadata={
        "help": "format of Q where `formats` names none: grid+bits-B0-b0-b1-B1 (official 'nf4')"})
    formats: dict[str, str] | None = field(default=None, metadata={
        "help": "{module: format} from plan_lq_lora's integer program (saved with the adapter)"})
    init: str = field(default="lq", metadata={
        "help": "'lq': the iterative decomposition; 'qlora': Q = quantize(W), B = 0 (the baseline)",
        "choices": list(INITS)})
    num_iterations: int = field(default=100, metadata={"help": "most decomposition iterations (official: 100)"})
    num_oversampling: int = field(default=10, metadata={"help": "extra columns of the randomised SVD (official: 10)"})
    randomized: bool = field(default=True, metadata={"help": "randomised SVD (official) or an exact one"})
    fisher_weighting: str = field(default="two-sided", metadata={
        "help": "how a Fisher matrix weights the SVD (official: 'two-sided')", "choices": list(WEIGHTINGS)})
    return_best: bool = field(default=True, metadata={
        "help": "keep the best iteration (True) or the official last one, whose error rose (False)"})
    backend: str = field(default="auto", metadata={
        "help": "'auto': bitsandbytes on a GPU for the format it implements; 'torch': always ours",
        "choices": list(BACKENDS)})
    fisher: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False, metadata={
        "help": "{module: empirical Fisher} weighting the decomposition when added (not saved)"})

    def validate(self) -> None:
        check_int("LQ-LoRA", "rank", self.rank, minimum=1)
        check_number("LQ-LoRA", "alpha", self.alpha, 0.0, low_open=True)
        check_number("LQ-LoRA", "dropout", self.dropout, 0.0, 1.0, high_open=True)
        for value in [self.quant_format, *(self.formats or {}).values()]:
            try:
                QuantFormat.parse(value)
            except FormatError as exc:
                raise AdapterError(f"LQ-LoRA {exc}") from None
        if self.formats is not None and (not isinstance(self.formats, dict)
                                         or not all(isinstance(k, str) and k for k in self.formats)):
            raise AdapterError("LQ-LoRA formats must map module names to format names")
        check_choice("LQ-LoRA", "init", self.init, INITS)
        check_int("LQ-LoRA", "num_iterations", self.num_iterations, minimum=1, maximum=10_000)
        check_int("LQ-LoRA", "num_oversampling", self.num_oversampling, minimum=0, maximum=1_000)
        check_choice("LQ-LoRA", "randomized", self.randomized, (True, False))
        check_choice("LQ-LoRA", "fisher_weighting", self.fisher_weighting, WEIGHTINGS)
        check_choice("LQ-LoRA", "return_best", self.return_best, (True, False))
        check_choice("LQ-LoRA", "backend", self.backend, BACKENDS)
        if self.fisher is not None:
            if not isinstance(self.fisher, dict) or not all(isinstance(v, torch.Tensor) for v in self.fisher.values()):
                raise AdapterError("LQ-LoRA fisher must map module names to tensors")
            for name, value in self.fisher.items():
                if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
                    raise AdapterError(f"LQ-LoRA fisher of {name} must be finite and non-negative")

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def format_of(self, module: str) -> QuantFormat:
        return QuantFormat.parse((self.formats or {}).get(module, self.quant_format))

    def decompose_options(self) -> dict[str, Any]:
        return {"num_iterations": self.num_iterations, "num_oversampling": self.num_oversampling,
                "randomized": self.randomized, "weighting": self.fisher_weighting,
                "return_best": self.return_best, "backend": self.backend}

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data.pop("fisher")  # data for this model's decomposition, not part of the adapter
        return data

    def inject(self, model: nn.Module, name: str, modules: list[str]) -> list[str]:
        slots = {slot.name: slot for slot in module_slots(model)}
        unknown = sorted(set(self.formats or {}) - set(modules))
        if unknown:
            raise AdapterError(f"LQ-LoRA formats name {unknown[0]}, which target_modules does not adapt")
        for module in modules:
            slot = slots[module]
            if isinstance(slot.occupant, AdapterLayer):
                raise AdapterError(f"LQ-LoRA replaces the weight of {module} by Q + L1 L2 and must be the first "
                                   "adapter on it; remove the other adapter first")
            weight = slot.original.weight
            if self.rank > min(weight.shape):
                raise AdapterError(f"LQ-LoRA rank {self.rank} exceeds the smaller side of {module}'s "
                                   f"{tuple(weight.shape)} weight")
            fisher = (self.fisher or {}).get(module)
            if fisher is not None and tuple(fisher.shape) != tuple(weight.shape):
                raise AdapterError(f"LQ-LoRA fisher of {module} has shape {tuple(fisher.shape)}, expected "
                                   f"{tuple(weight.shape)}")
        return super().inject(model, name, modules)

    def make_layer(self, base: nn.Module, name: str, module: str = "") -> AdapterLayer:
        return LQLoRALinear(base, self, adapter_name=name, module=module)  # the module name picks its format


class LQLoRALinear(AdapterLayer):
    """`lora_A` (r, d_in) and `lora_B` (d_out, r) trained; Q stored as buffers `quant_codes`, `quant_scales`
    and, with double quantisation, `quant_scale_scales` and `quant_offset`."""

    def __init__(self, base_layer: nn.Module, config: LQLoRAConfig | None = None, adapter_name: str = "default", *,
                 module: str = "") -> None:
        super().__init__(base_layer, adapter_name)
        self.config = config = config or LQLoRAConfig()
        self.module_name = module
        self.format = config.format_of(module)
        self.scale = config.scale
        weight = self.original_module().weight
        device = weight.device
        rank = config.rank
        self.decomposition_errors: list[float] = []
        if restoring_state():  # load_adapter overwrites every tensor; the decomposition would be wasted
            stored = {key: torch.zeros(shape, dtype=dtype) for key, (shape, dtype) in
                      stored_shapes(self.format, weight.numel()).items()}
            down, up = torch.zeros(rank, self.in_features), torch.zeros(self.out_features, rank)
        elif config.init == "qlora":
            result = lq_decompose(weight, 0, self.format, backend=config.backend)
            stored, self.decomposition_errors = result.stored, result.errors
            down = torch.empty(rank, self.in_features)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # PEFT's LoRA A; B starts at zero
            up = torch.zeros(self.out_features, rank)
        else:
            fisher = (config.fisher or {}).get(module)
            result = lq_decompose(weight, rank, self.format, fisher=fisher, **config.decompose_options())
            stored, self.decomposition_errors = result.stored, result.errors
            root = math.sqrt(self.scale)
            down, up = result.L2 / root, result.L1 / root
        for key in stored_names(self.format):
            self.register_buffer(f"quant_{key}", stored[key].detach().to(device).contiguous())
        self.lora_A = nn.Parameter(down.float().contiguous().to(device))
        self.lora_B = nn.Parameter(up.float().contiguous().to(device))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    # -- Q -------------------------------------------------------------------------------------------------

    def stored(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, f"quant_{key}") for key in stored_names(self.format)}

    def quantized_weight(self) -> torch.Tensor:
        """Q, dequantised (fp32, the weight's shape)."""
        try:
            return dequantize(self.stored(), self.format, (self.out_features, self.in_features))
        except ValueError as exc:
            raise AdapterError(f"LQ-LoRA adapter on {self.module_name or 'this layer'}: {exc}") from None

    def storage_bits(self) -> int:
        return self.format.storage_bits(self.out_features * self.in_features)

    # -- forward and merge ---------------------------------------------------------------------------------

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))
        return self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.applies:
            return self.base_layer(x, *args, **kwargs)
        out = F.linear(x, self.quantized_weight().to(x.dtype), getattr(self.original_module(), "bias", None))
        return out + self.delta(x).to(out.dtype)

    def low_rank_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    def get_delta_weight(self) -> torch.Tensor:
        """Q + (alpha / r) B A - W: merging turns the weight into the adapted one."""
        weight = self.original_module().weight.float()
        return self.quantized_weight().to(weight.device) + self.low_rank_weight().to(weight.device) - weight


LQLoRAConfig.layer_cls = LQLoRALinear


def lq_lora_report(model: nn.Module, name: str = "default") -> dict[str, dict[str, Any]]:
    """Per adapted module: its format, bits a parameter of Q, the relative error ||W - (Q + s B A)|| / ||W||
    now, and the decomposition error of each iteration when the adapter was added."""
    report = {}
    for module, layer in method_layers(model, name, LQLoRALinear, "LQ-LoRA").items():
        with torch.no_grad():
            weight = layer.original_module().weight.float()
            approx = layer.quantized_weight() + layer.low_rank_weight()
            relative = float(torch.linalg.norm(weight - approx) / torch.linalg.norm(weight).clamp_min(1e-12))
        report[module] = {"format": layer.format.name, "numel": weight.numel(),
                          "bits_per_parameter": layer.storage_bits() / weight.numel(),
                          "relative_error": relative, "iteration_errors": list(layer.decomposition_errors)}
    return report


register_method(
    "lq-lora", LQLoRAConfig, title="LQ-LoRA", identity_at_init=False,
    paper="Guo et al., LQ-LoRA: Low-rank Plus Quantized Matrix Decomposition for Efficient Language Model "
          "Finetuning, ICLR 2024 (arXiv 2311.12023)",
    property="each weight as quantised Q plus trainable L1 L2, formats chosen by an integer program under a "
             "bit budget",
)
