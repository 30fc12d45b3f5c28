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


class TinyBlock(nn.Module):
    """A pre-norm transformer-like block: a gated mixing with q/v projections, then an MLP."""

    def __init__(self, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.v_proj(h) * torch.sigmoid(self.q_proj(h))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyStack(nn.Module):
    """Four identical blocks between an input projection and a head: a model whose layers can be tied."""

    def __init__(self, dim: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(TinyBlock(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def tiny_stack() -> nn.Module:
    torch.manual_seed(0)
    model = TinyStack()
    with torch.no_grad():  # norms that differ from layer to layer, as after training
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape))
    return model


STACK_LAYERS = [f"layers.{i}" for i in range(4)]


def token_input() -> torch.Tensor:
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))


class TinySpeechNet(TinyNet):
    """TinyNet whose forward also takes audio features (a speech LLM's shape): the speech adapter's switch."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_proj = nn.Linear(4, 16)

    def forward(self, x: torch.Tensor, input_features: torch.Tensor | None = None) -> torch.Tensor:
        if input_features is not None:
            x = x + self.audio_proj(input_features)
        return super().forward(x)


def tiny_speech_net() -> nn.Module:
    torch.manual_seed(0)
    return TinySpeechNet()


def speech_input() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"x": torch.randn(2, 5, 16, generator=generator), "input_features": torch.randn(2, 5, 4, generator=generator)}


def tiny_llama() -> nn.Module:
    """A random two-layer Llama (hidden 16, SwiGLU MLP), for methods that need a transformers model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def token_ids() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(1))}


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
    "dylora": Case({"rank": 4, "min_rank": 1, "alpha": 8.0}),
    "sora": Case({"rank": 4, "alpha": 8.0}),
    "dv-lora": Case({"rank": 4}),
    # 16 and 32 input features cut into 3 chunks: the last chunk is zero-padded.
    "block-lora": Case({"rank": 3, "num_blocks": 3}),
    "miss": Case({"rank": 4}),
    "lorid": Case({"role": "deep_reasoner", "rank": 4, "alpha": 8.0, "dropout": 0.0}),
    # Speech mode needs the audio features: the inputs carry them, so the adapter acts.
    "granite-speech": Case({"rank": 4, "alpha": 8.0}, model=tiny_speech_net, inputs=speech_input),
    "explora": Case({"rank": 2, "unfrozen_blocks": [-1]}, model=tiny_stack, targets=STACK_LAYERS),
    "gs-lora": Case({"rank": 4, "lora_alpha": 2.0}),
    "relaxed-recursive": Case({"loops": 2, "rank": 4}, model=tiny_stack, targets=STACK_LAYERS),
    "mergevla": Case({"tasks": ["a", "b"], "router_k": 4}),
    "markboard": Case({"bits": 3, "rank": 2}),
    "cbq": Case({"bits": 3, "rank": 2}),
    # NF3 in blocks of 16 with 4-bit scales; the 512-number weights end in a partial scale group.
    "lq-lora": Case({"rank": 4, "quant_format": "nf3-16-4-bf16-64", "num_iterations": 5}),
    "mixlora": Case({"num_experts": 4, "top_k": 2, "rank": 2, "dropout": 0.0}, model=tiny_llama, inputs=token_ids,
                    targets=["q_proj", "v_proj", "mlp"]),
    "smora": Case({"rank": 8, "activate_r": 2}),
    # Two experts that start fresh (no folders) and train with the classifier, so randomising changes outputs.
    "xlora": Case({"adapters": {"a": "", "b": ""}, "expert_ranks": [2, 3], "expert_scales": [1.0, 0.5],
                   "use_trainable_adapters": True, "xlora_depth": 2, "xlora_size": 8},
                  model=tiny_llama, inputs=token_ids, targets=["q_proj", "v_proj"]),
}
