"""A LoRA branch initialised as PEFT's `LoraConfig(init_lora_weights=True)` does, for methods built on plain PEFT LoRA.

    y = W x + (alpha / r) * B A dropout(x)

`A` (r, d_in) is Kaiming-uniform with a = sqrt(5) (nn.Linear's default, bound 1/sqrt(d_in)) and `B` (d_out, r)
starts at zero, so a new adapter changes nothing; dropout acts on the branch's input only, as in PEFT. LoRID
(trained with LLaMA-Factory, which builds PEFT LoRAs) and Granite-speech (a PEFT LoRA inside transformers) use it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.adapters.base import AdapterLayer


class PeftLoRALinear(AdapterLayer):
    """`lora_A` (r, d_in), `lora_B` (d_out, r); the update is multiplied by `alpha / rank`."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float,
                 adapter_name: str = "default") -> None:
        super().__init__(base_layer, adapter_name)
        self.rank = rank
        self.scale = float(alpha) / rank
        # Drawn on the CPU in fp32 (the same factors on every device), then moved beside the base weight.
        down = torch.empty(rank, self.in_features)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        device = self.original_module().weight.device
        self.lora_A = nn.Parameter(down.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))
        return self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def get_delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    def export_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.detach().float().clone(), (self.scale * self.lora_B.detach().float()).contiguous()
