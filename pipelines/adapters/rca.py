"""Rank-constrained adaptation (SplitFlux's boundary blocks): rank r/alpha, update multiplied by alpha.

`dW = alpha * B A` with A of shape (r/alpha, d_in) and B of shape (d_out, r/alpha). Dividing the rank narrows the
subspace the boundary blocks can use, which keeps content from leaking into the style blocks; multiplying by
alpha gives back the magnitude. Exported factors carry alpha inside `lora_B`, so any LoRA loader reproduces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from pipelines.adapters.core import AdapterConfig, AdapterError, register_method
from pipelines.adapters.lora import LoRAConfig, LoRALinear


@dataclass
class RankConstrainedConfig(AdapterConfig):
    """`rank` is the unconstrained rank r (64 in SplitFlux); `alpha` divides it and scales the update (2)."""

    method = "rank-constrained"

    rank: int = field(default=64, metadata={"help": "the unconstrained rank r"})
    alpha: int = field(default=2, metadata={"help": "divides the rank and multiplies the update"})

    def validate(self) -> None:
        if self.alpha < 1:
            raise AdapterError(f"rank-constrained alpha must be at least 1, not {self.alpha}")
        if self.rank % self.alpha or self.rank // self.alpha < 1:
            raise AdapterError(f"rank {self.rank} is not divisible by alpha {self.alpha}")

    @property
    def effective_rank(self) -> int:
        return self.rank // self.alpha


class RankConstrainedLinear(LoRALinear):
    def __init__(self, base_layer: nn.Module, config: RankConstrainedConfig | None = None,
                 adapter_name: str = "default") -> None:
        config = config or RankConstrainedConfig()
        super().__init__(base_layer, LoRAConfig(rank=config.effective_rank, scale=float(config.alpha)), adapter_name)
        self.rca_config = config
        self.alpha = config.alpha


RankConstrainedConfig.layer_cls = RankConstrainedLinear

register_method(
    "rank-constrained", RankConstrainedConfig, title="Rank-constrained adaptation (SplitFlux)", studio=True,
    paper="Yang et al., SplitFlux: Learning to Decouple Content and Style from a Single Image, CVPR 2026",
    property="rank r/alpha with the update scaled by alpha: a narrower subspace at the same magnitude",
)
