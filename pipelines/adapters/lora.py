"""Plain LoRA over a frozen Linear: `y = W x + scale * B A x`, the style blocks' adapter in SplitFlux.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022). `A` starts Gaussian with std
1/rank (PEFT's `init_lora_weights="gaussian"`) and `B` at zero, so a new adapter changes nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.adapters.base import AdapterLayer
from pipelines.adapters.core import AdapterConfig, AdapterError, is_integer, register_method


@dataclass
class LoRAConfig(AdapterConfig):
    """rank of the update and the factor it is multiplied by (diffusers' `lora_alpha / r`).

    `rank_pattern` gives some modules another rank (PEFT's field of that name): its keys are module names or
    suffixes at a dot boundary, as in a `target_modules` list. Pruned or truncated adapters whose layers kept
    different ranks (SoRA) are plain LoRA adapters this way.
    """

    method = "lora"

    rank: int = field(default=64, metadata={"help": "rank r of the update B A"})
    scale: float = field(default=1.0, metadata={"help": "the update's factor (lora_alpha / r in PEFT)"})
    rank_pattern: dict[str, int] = field(default_factory=dict,
                                         metadata={"help": "{module name or suffix: rank} where it is not `rank`"})

    def validate(self) -> None:
        if not _is_rank(self.rank):
            raise AdapterError(f"LoRA rank must be at least 1, not {self.rank}")
        if not torch.isfinite(torch.tensor(float(self.scale))):
            raise AdapterError(f"LoRA scale must be a finite number, not {self.scale}")
        if not isinstance(self.rank_pattern, dict):
            raise AdapterError("LoRA rank_pattern must map module names to ranks")
        for module, rank in self.rank_pattern.items():
            if not isinstance(module, str) or not module or not _is_rank(rank):
                raise AdapterError(f"LoRA rank_pattern entry {module!r}: {rank!r} must name a module and a rank >= 1")

    def rank_for(self, module: str) -> int:
        """The rank of the layer on `module` (original module name)."""
        if module in self.rank_pattern:
            return self.rank_pattern[module]
        for key, rank in self.rank_pattern.items():
            if module.endswith("." + key):
                return rank
        return self.rank

    def make_layer(self, base: nn.Module, name: str, module: str = "") -> AdapterLayer:
        rank = self.rank_for(module)
        config = self if rank == self.rank else dataclasses.replace(self, rank=rank, rank_pattern={})
        return LoRALinear(base, config, adapter_name=name)


def _is_rank(value: object) -> bool:
    return is_integer(value) and value >= 1


def init_down(weight: torch.Tensor) -> None:
    """Gaussian down-projection with std 1/rank, as PEFT's `init_lora_weights="gaussian"` (up starts at zero)."""
    nn.init.normal_(weight, std=1.0 / weight.shape[0])


class LoRALinear(AdapterLayer):
    def __init__(self, base_layer: nn.Module, config: LoRAConfig | None = None, adapter_name: str = "default") -> None:
        super().__init__(base_layer, adapter_name)
        self.config = config = config or LoRAConfig()
        self.rank = config.rank
        self.scale = float(config.scale)
        # Initialised on the CPU in fp32 (the same factors whatever the device), then moved beside the base.
        down = torch.empty(config.rank, self.in_features)
        init_down(down)
        device = self.original_module().weight.device
        self.lora_A = nn.Parameter(down.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.rank, device=device))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)

    def get_delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    def export_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.detach().float().clone(), (self.scale * self.lora_B.detach().float()).contiguous()


LoRAConfig.layer_cls = LoRALinear

register_method(
    "lora", LoRAConfig, title="LoRA", studio=True,
    paper="Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022 (arXiv 2106.09685)",
    property="a rank-r update B A beside each frozen weight, mergeable into it",
)
