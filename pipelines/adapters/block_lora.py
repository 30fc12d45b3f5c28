"""Block-LoRA: LoRA whose down-projection is split into column blocks that all share one matrix.

    x = [x_1; ...; x_n]  (the input cut into n equal chunks),  A = [A_s, A_s, ..., A_s]
    y = W0 x + s * B A x = W0 x + s * B A_s (x_1 + x_2 + ... + x_n)

Zhou et al., "One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot Learning"
(arXiv 2501.16720). The abstract says the method "partitions the original low-rank decomposition matrix of
LoRA into a series of sub-matrices while sharing all down-projection sub-matrices" and "transforms certain
complex matrix multiplication operations into simpler matrix addition". No official code was found, and the
stored copies of the paper stop before its method section, so the formulation above is OUR READING of the
abstract, not the paper's equations: the down-projection A (r x d_in) is partitioned into n column blocks,
every block is the one shared A_s (r x d_in/n), and A x becomes a sum of input chunks followed by one small
product. One shared "head" A_s, n "arms" reading the chunks of the input. Trainable parameters per layer:
d_out * r + r * ceil(d_in / n), against (d_out + d_in) * r for LoRA. The update is B times a tiled A_s, so it
merges into the base weight and is exactly a LoRA whose A has tied blocks (`tied_down`).

The paper builds on CLIP-LoRA (Zanella and Ben Ayed, CVPRW 2024), whose code gives the defaults here: rank
2, alpha 1 with the factor s = alpha / sqrt(r), dropout 0.25 on the adapter's input, A Kaiming-uniform
(a = sqrt(5)) and B zero, on the q, k, v projections of both CLIP encoders.

Choices the unread method section leaves open, each a setting:
- `num_blocks` n = 8, after the title's "eight arms" (inferred).
- `down_init_fan_in`: "input" draws A_s with the bound of LoRA's full A (1/sqrt(d_in)), so the tied A starts
  like CLIP-LoRA's; "block" uses A_s's own fan-in (bound sqrt(n/d_in)).
- `rank_scaling`: "sqrt" (CLIP-LoRA's alpha / sqrt(r)) or "linear" (LoRA's alpha / r).
- A d_in that n does not divide is zero-padded to n * ceil(d_in / n): the last chunk meets only the first
  columns of A_s.
- `share_down=False` keeps n independent blocks, which is plain CLIP-LoRA: the baseline at the same
  initialisation, factor and dropout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.adapters.base import AdapterLayer
from pipelines.adapters.core import AdapterConfig, register_method
from pipelines.adapters.fields import check_choice, check_int, check_number

RANK_SCALINGS = ("sqrt", "linear")
FAN_INS = ("input", "block")


@dataclass
class BlockLoRAConfig(AdapterConfig):
    method = "block-lora"

    rank: int = field(default=2, metadata={"help": "rank r of the update (CLIP-LoRA: 2)"})
    num_blocks: int = field(default=8, metadata={"help": "n: the input is cut into n chunks sharing one A_s"})
    alpha: float = field(default=1.0, metadata={"help": "the update's factor is alpha / sqrt(r) (CLIP-LoRA: 1)"})
    rank_scaling: str = field(default="sqrt", metadata={
        "help": "'sqrt': factor alpha / sqrt(r) as CLIP-LoRA; 'linear': alpha / r as LoRA",
        "choices": list(RANK_SCALINGS)})
    dropout: float = field(default=0.25, metadata={"help": "dropout on the adapter's input (CLIP-LoRA: 0.25)"})
    share_down: bool = field(default=True, metadata={
        "help": "share one down-projection block across the n chunks (False: plain CLIP-LoRA)"})
    down_init_fan_in: str = field(default="input", metadata={
        "help": "fan-in of A_s's Kaiming-uniform init: 'input' (d_in, as LoRA's A) or 'block' (d_in / n)",
        "choices": list(FAN_INS)})

    def validate(self) -> None:
        check_int("Block-LoRA", "rank", self.rank)
        check_int("Block-LoRA", "num_blocks", self.num_blocks)
        check_number("Block-LoRA", "alpha", self.alpha, 0.0, low_open=True)
        check_choice("Block-LoRA", "rank_scaling", self.rank_scaling, RANK_SCALINGS)
        check_number("Block-LoRA", "dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_choice("Block-LoRA", "share_down", self.share_down, (True, False))
        check_choice("Block-LoRA", "down_init_fan_in", self.down_init_fan_in, FAN_INS)

    @property
    def scale(self) -> float:
        divisor = math.sqrt(self.rank) if self.rank_scaling == "sqrt" else self.rank
        return float(self.alpha) / divisor


def block_lora_parameter_count(in_features: int, out_features: int, rank: int, num_blocks: int,
                               share_down: bool = True) -> int:
    """Trainable numbers of one layer: d_out * r + r * ceil(d_in / n) shared, (d_out + d_in) * r if not."""
    down = math.ceil(in_features / num_blocks) if share_down else in_features
    return out_features * rank + rank * down


class BlockLoRALinear(AdapterLayer):
    """`lora_A` (r, ceil(d_in / n)) shared by every chunk (or (r, d_in) unshared), `lora_B` (d_out, r)."""

    def __init__(self, base_layer: nn.Module, config: BlockLoRAConfig | None = None,
                 adapter_name: str = "default") -> None:
        super().__init__(base_layer, adapter_name)
        self.config = config = config or BlockLoRAConfig()
        self.scale = config.scale
        self.num_blocks = config.num_blocks
        self.block_size = math.ceil(self.in_features / config.num_blocks)
        width = self.block_size if config.share_down else self.in_features
        fan_in = self.in_features if config.down_init_fan_in == "input" else self.block_size
        # Kaiming-uniform with a = sqrt(5) is uniform in +-1/sqrt(fan_in); drawn on the CPU in fp32.
        bound = 1.0 / math.sqrt(fan_in)
        down = torch.empty(config.rank, width).uniform_(-bound, bound)
        device = self.original_module().weight.device
        self.lora_A = nn.Parameter(down.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.rank, device=device))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def chunk_sum(self, x: torch.Tensor) -> torch.Tensor:
        """x_1 + ... + x_n over the n chunks of the last dimension (zero-padded to n equal chunks)."""
        pad = self.num_blocks * self.block_size - x.shape[-1]
        if pad:
            x = F.pad(x, (0, pad))
        return x.reshape(*x.shape[:-1], self.num_blocks, self.block_size).sum(dim=-2)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))
        if self.config.share_down:
            x = self.chunk_sum(x)
        return self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def tied_down(self) -> torch.Tensor:
        """The full down-projection A (r, d_in): A_s repeated over the n blocks (or the unshared A)."""
        if not self.config.share_down:
            return self.lora_A
        return self.lora_A.repeat(1, self.num_blocks)[:, : self.in_features]

    def get_delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B.float() @ self.tied_down().float())

    def export_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tied_down().detach().float().clone(), (self.scale * self.lora_B.detach().float()).contiguous()


BlockLoRAConfig.layer_cls = BlockLoRALinear

register_method(
    "block-lora", BlockLoRAConfig, title="Block-LoRA",
    paper="Zhou et al., One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot "
          "Learning (arXiv 2501.16720)",
    property="one down-projection block shared by every chunk of the input: fewer parameters than LoRA",
)
