"""One small case per registered adapter method, for the registry-wide tests in test_adapters_core.py.

A case is a model factory, the config (with its target modules) and an input factory. A method that wraps
Linear layers uses the default tiny network; methods that need another shape of model bring their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class TinyNet(nn.Module):
    """Linear layers with the names a transformer block has, over token features (batch, tokens, 16)."""

    def __init__(self, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"fc1": nn.Linear(dim, hidden), "fc2": nn.Linear(hidden, dim)}) for _ in range(2)
        )
        self.head = nn.Linear(dim, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        for block in self.blocks:
            x = x + block["fc2"](torch.relu(block["fc1"](x)))
        return self.head(x)


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet()


def token_input() -> torch.Tensor:
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))


@dataclass
class Case:
    config: dict[str, Any]
    model: Callable[[], nn.Module] = tiny_net
    inputs: Callable[[], Any] = token_input
    targets: Any = field(default_factory=lambda: ["fc1", "fc2"])

    def call(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        return out.logits if hasattr(out, "logits") else out


CASES: dict[str, Case] = {
    "lora": Case({"rank": 4, "scale": 0.5}),
    "rank-constrained": Case({"rank": 4, "alpha": 2}),
    "visual-gated": Case({"content_rank": 3, "residual_rank": 2}),
    "dv-lora": Case({"rank": 4}),
    # 16 and 32 input features cut into 3 chunks: the last chunk is zero-padded.
    "block-lora": Case({"rank": 3, "num_blocks": 3}),
    "miss": Case({"rank": 4}),
    "mergevla": Case({"tasks": ["a", "b"], "router_k": 4}),
    "markboard": Case({"bits": 3, "rank": 2}),
}
