"""Rank-constrained adaptation (SplitFlux's boundary blocks): rank r/alpha, update multiplied by alpha.

`dW = alpha * B A` with A of shape (r/alpha, d_in) and B of shape (d_out, r/alpha). Dividing the rank narrows the
subspace the boundary blocks can use, which keeps content from leaking into the style blocks; multiplying by
alpha gives back the magnitude. Exported factors carry alpha inside `lora_B`, so any LoRA loader reproduces it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pipelines.adapters.lora import LoRAConfig, LoRALinear


@dataclass
class RankConstrainedConfig:
    """`rank` is the unconstrained rank r (64 in SplitFlux); `alpha` divides it and scales the update (2)."""

    rank: int = 64
    alpha: int = 2

    def __post_init__(self) -> None:
        if self.alpha < 1:
            raise ValueError(f"rank-constrained alpha must be at least 1, not {self.alpha}")
        if self.rank % self.alpha or self.rank // self.alpha < 1:
            raise ValueError(f"rank {self.rank} is not divisible by alpha {self.alpha}")

    @property
    def effective_rank(self) -> int:
        return self.rank // self.alpha


class RankConstrainedLinear(LoRALinear):
    def __init__(self, base_layer: nn.Module, config: RankConstrainedConfig | None = None) -> None:
        config = config or RankConstrainedConfig()
        super().__init__(base_layer, LoRAConfig(rank=config.effective_rank, scale=float(config.alpha)))
        self.rca_config = config
        self.alpha = config.alpha
