"""Plain LoRA over a frozen Linear: `y = W x + scale * B A x`, the style blocks' adapter in SplitFlux."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.adapters.base import AdapterLayer


@dataclass
class LoRAConfig:
    """rank of the update and the factor it is multiplied by (diffusers' `lora_alpha / r`)."""

    rank: int = 64
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, not {self.rank}")


def init_down(weight: torch.Tensor) -> None:
    """Gaussian down-projection with std 1/rank, as PEFT's `init_lora_weights="gaussian"` (up starts at zero)."""
    nn.init.normal_(weight, std=1.0 / weight.shape[0])


class LoRALinear(AdapterLayer):
    def __init__(self, base_layer: nn.Module, config: LoRAConfig | None = None) -> None:
        super().__init__(base_layer)
        self.config = config = config or LoRAConfig()
        self.rank = config.rank
        self.scale = float(config.scale)
        # Initialised on the CPU in fp32 (the same factors whatever the device), then moved beside the base.
        down = torch.empty(config.rank, self.in_features)
        init_down(down)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(down.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.rank, device=device))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)

    def get_delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    def export_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.detach().float().clone(), (self.scale * self.lora_B.detach().float()).contiguous()
