"""Visual-gated LoRA (SplitFlux's content blocks): two LoRA branches mixed per image token by a saliency gate.

    y = W x + g * B_c A_c x + (1 - g) * B_r A_r x,   g_n = sigmoid((||e_n||_2 - mu) / sigma)

The content branch (rank 48) takes salient image tokens, the residual branch (rank 16) the rest; mu and sigma
are the mean and standard deviation of the token norms over the image tokens of each image, so the gate is per
token, lies in (0, 1), needs no saliency model and is differentiable.

Choices where the method leaves details open (each is a setting):
- Text tokens, which share the single-stream sequence with the image tokens, get the fixed gate `text_gate`,
  1.0 by default: they carry the prompt `A [c] object`, whose subject the content branch holds, and when the
  subject is re-embedded only the content branch is loaded, so the text tokens see at inference exactly the
  branch they were trained through.
- The gated features e_n are the image tokens entering the block (the residual stream), set by a pre-hook of
  the block through `set_token_layout`. The projections' own input has just passed AdaLN's LayerNorm, which
  gives every token nearly the same norm and would flatten the gate. Without a hook the layer falls back to
  its own input.
- As one standard LoRA, both branches are exported at weight 1 (`export_gate=None`, the plain sum the paper
  loads for disentangled content), or at a fixed gate g as `g * B_c A_c + (1 - g) * B_r A_r`. The gate depends on
  the input, so no fixed LoRA reproduces the gated layer exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.adapters.base import _MERGE_ORDER, AdapterLayer
from pipelines.adapters.core import AdapterConfig, AdapterError, register_method
from pipelines.adapters.lora import init_down


@dataclass
class VisualGatedConfig(AdapterConfig):
    method = "visual-gated"

    content_rank: int = field(default=48, metadata={"help": "rank of the content branch (salient tokens)"})
    residual_rank: int = field(default=16, metadata={"help": "rank of the residual branch (the rest)"})
    text_gate: float = field(default=1.0, metadata={"help": "the gate of text tokens (see the module docstring)"})
    eps: float = field(default=1e-6, metadata={"help": "added to sigma: identical norms give g = 0.5, not NaN"})

    def validate(self) -> None:
        if self.content_rank < 1 or self.residual_rank < 1:
            raise AdapterError(f"both branch ranks must be at least 1, not {self.content_rank}/{self.residual_rank}")
        if not 0.0 <= self.text_gate <= 1.0:
            raise AdapterError(f"text gate must lie in [0, 1], not {self.text_gate}")


def visual_gate(image_features: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-token gate (batch, tokens) from image-token features (batch, tokens, dim), statistics per image."""
    norms = image_features.float().norm(dim=-1)
    mu = norms.mean(dim=-1, keepdim=True)
    sigma = norms.std(dim=-1, unbiased=False, keepdim=True)
    return torch.sigmoid((norms - mu) / (sigma + eps))


def complementary_loss(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """L = ||A C^T||_F^2 + ||B^T D||_F^2 + sum |BA * DC| for branches (A, B) and (C, D) of one layer.

    The first two terms push the branches' down and up directions apart; the last penalises both updates
    touching the same weight entries. |.| is read as the elementwise absolute sum. Zero exactly when the
    branches are orthogonal and their updates have disjoint support.
    """
    a, b, c, d = a.float(), b.float(), c.float(), d.float()
    directions = (a @ c.T).pow(2).sum() + (b.T @ d).pow(2).sum()
    overlap = ((b @ a) * (d @ c)).abs().sum()
    return directions + overlap


class VisualGatedLoRALinear(AdapterLayer):
    def __init__(self, base_layer: nn.Module, config: VisualGatedConfig | None = None,
                 adapter_name: str = "default") -> None:
        super().__init__(base_layer, adapter_name)
        self.config = config = config or VisualGatedConfig()
        # Initialised on the CPU in fp32 (the same factors whatever the device), then moved beside the base.
        device = self.original_module().weight.device
        content_down = torch.empty(config.content_rank, self.in_features)
        residual_down = torch.empty(config.residual_rank, self.in_features)
        init_down(content_down)
        init_down(residual_down)
        self.lora_A_content = nn.Parameter(content_down.to(device))
        self.lora_B_content = nn.Parameter(torch.zeros(self.out_features, config.content_rank, device=device))
        self.lora_A_residual = nn.Parameter(residual_down.to(device))
        self.lora_B_residual = nn.Parameter(torch.zeros(self.out_features, config.residual_rank, device=device))
        self.text_len = 0
        self.image_gate: torch.Tensor | None = None

    # -- the gate ------------------------------------------------------------------------------------------

    def set_token_layout(self, text_len: int, image_features: torch.Tensor | None = None,
                         image_gate: torch.Tensor | None = None) -> None:
        """Say how many leading tokens are text, and what gates the image tokens: features to compute the gate
        from, a gate computed already (shared by the layers of one block), or neither (the layer's own input)."""
        self.text_len = int(text_len)
        if image_gate is None and image_features is not None:
            image_gate = visual_gate(image_features, self.config.eps)
        self.image_gate = image_gate

    def clear_token_layout(self) -> None:
        self.text_len = 0
        self.image_gate = None

    def token_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The gate of every token of `x` (batch, tokens, dim) as (batch, tokens, 1)."""
        if x.ndim != 3:
            raise ValueError(f"the visual gate needs token features (batch, tokens, dim), not shape {tuple(x.shape)}")
        text_len = self.text_len
        image_gate = self.image_gate
        if image_gate is None:
            image_gate = visual_gate(x[:, text_len:], self.config.eps)
        if image_gate.shape != (x.shape[0], x.shape[1] - text_len):
            raise ValueError(f"gate for {tuple(image_gate.shape)} image tokens does not fit input {tuple(x.shape)}"
                             f" with {text_len} text tokens")
        text = image_gate.new_full((x.shape[0], text_len), self.config.text_gate)
        return torch.cat([text, image_gate], dim=1).unsqueeze(-1)

    # -- forward and weights -------------------------------------------------------------------------------

    def branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.lora_A_content.dtype)
        content = F.linear(F.linear(x, self.lora_A_content), self.lora_B_content)
        residual = F.linear(F.linear(x, self.lora_A_residual), self.lora_B_residual)
        return content, residual

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.token_gate(x).to(self.lora_A_content.dtype)
        content, residual = self.branches(x)
        return gate * content + (1.0 - gate) * residual

    def branch_weights(self, export_gate: float | None) -> tuple[float, float]:
        if export_gate is None:
            return 1.0, 1.0
        if not 0.0 <= export_gate <= 1.0:
            raise ValueError(f"export gate must lie in [0, 1], not {export_gate}")
        return float(export_gate), 1.0 - float(export_gate)

    def get_delta_weight(self, export_gate: float | None = None) -> torch.Tensor:
        wc, wr = self.branch_weights(export_gate)
        return (wc * self.lora_B_content.float() @ self.lora_A_content.float()
                + wr * self.lora_B_residual.float() @ self.lora_A_residual.float())

    @torch.no_grad()
    def merge(self, export_gate: float | None = None) -> None:
        """Merge both branches at fixed weights (see `branch_weights`); exact unmerge restores the base."""
        if self.merged:
            return
        weight = self._weight_module().weight
        self._weight_before_merge = weight.data.clone()
        weight.data = (weight.data.float() + self.get_delta_weight(export_gate).to(weight.device)).to(weight.dtype)
        self.merged = True
        self.merge_order = next(_MERGE_ORDER)

    def export_lora(self, export_gate: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Both branches as one LoRA of rank content + residual: A stacked, B side by side with the weights."""
        wc, wr = self.branch_weights(export_gate)
        a = torch.cat([self.lora_A_content.detach().float(), self.lora_A_residual.detach().float()], dim=0)
        b = torch.cat([wc * self.lora_B_content.detach().float(), wr * self.lora_B_residual.detach().float()], dim=1)
        return a.contiguous(), b.contiguous()

    def export_content_branch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The content branch alone at weight 1: what re-embeds the subject in new prompts."""
        return self.lora_A_content.detach().float().clone(), self.lora_B_content.detach().float().clone()

    def complementary_loss(self) -> torch.Tensor:
        return complementary_loss(self.lora_A_content, self.lora_B_content, self.lora_A_residual,
                                  self.lora_B_residual)


VisualGatedConfig.layer_cls = VisualGatedLoRALinear

register_method(
    "visual-gated", VisualGatedConfig, title="Visual-gated LoRA (SplitFlux)", studio=True, mergeable=False,
    paper="Yang et al., SplitFlux: Learning to Decouple Content and Style from a Single Image, CVPR 2026",
    property="two LoRA branches mixed per token by a saliency gate, so the update depends on the input",
)
