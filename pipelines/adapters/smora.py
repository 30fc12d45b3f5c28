"""SMoRA: every rank of one LoRA is an expert; a router activates k of the r ranks per token, kept balanced by a
bias that is not trained but nudged after each training step.

Zhao et al., "Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA for Multi-Task Learning" (arXiv
2501.15103; KDD 2026). Official code: StyxXuan/smora, a fork of PEFT with the `srmole` tuner
(`packages/peft/src/peft/tuners/srmole/layer.py`, `SRMoLELinear`); this module follows it.

    s = sigmoid(W_g dropout(x))  repeated p times     W_g ((r/p) x d_in), p = rank_partition
    s~ = s + b                                        b (r,), a buffer: not trained
    I = top-k(s~), k = activate_r
    g_i = k * v_i / sum_{j in I} v_j for i in I, else 0   with v = s~ (the code), or v = s (bias_in_gate=False)
    y = W0 x + (alpha / k) * B diag(g) A dropout(x)
After the forward pass in training mode, with c_i the number of tokens that activated rank i in the batch:
    b_i <- b_i + u * sign(mean(c) - c_i),            u = bias_update_rate

Defaults are the official code's: A Kaiming-uniform (a = sqrt 5), B zero, the router an `nn.Linear` without bias
in torch's default init, b zero, `bias_update_rate` 1e-5, `rank_partition` 1, dropout 0, scale alpha / k; and its
training config (`llama2_7b_lora_srmole.yaml`): rank 64, activate_r 8, alpha 16.

Choices of this implementation (each a field where it is a choice):
- In the official code the bias enters the gate values as well as the choice of ranks (v = s + b). Whether that
  is intended is not stated; `bias_in_gate=False` takes the gates from s alone (only the choice is biased, as in
  auxiliary-loss-free balancing elsewhere). The default follows the code.
- The counts c include every token of the batch, padding too: the layer does not see the attention mask (nor does
  the official one).
- The official layer computes only the k chosen ranks with custom indexed kernels (or densely with
  `dense_compute`); here all r ranks are computed and the others multiplied by zero gates: the same numbers.
- The official config's `epsilon_greedy` flag is not read by its forward pass and is left out.
- Inputs of any shape (..., d_in) are accepted (the official forward assumes (batch, seq, d_in)).
- The gates depend on the token, so SMoRA cannot be merged into the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.adapters.base import AdapterLayer
from pipelines.adapters.core import AdapterConfig, AdapterError, method_layers, register_method
from pipelines.adapters.fields import check_choice, check_int, check_number


@dataclass
class SMoRAConfig(AdapterConfig):
    """The fields of the official `SRMoLEConfig` that shape a layer, with its defaults."""

    method = "smora"

    rank: int = field(default=64, metadata={"help": "r, the ranks (experts) of the LoRA (official config: 64)"})
    activate_r: int = field(default=8, metadata={"help": "k, the ranks each token activates (official: 8)"})
    alpha: float = field(default=16.0, metadata={"help": "lora_alpha; the update is scaled by alpha / k (16)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the input of the router and of A (0)"})
    rank_partition: int = field(default=1, metadata={
        "help": "p: the router scores r / p groups of p consecutive ranks (official: 1, one score a rank)"})
    bias_update_rate: float = field(default=1e-5, metadata={
        "help": "u, the step of the balancing bias after each training forward pass (official: 1e-5)"})
    bias_in_gate: bool = field(default=True, metadata={
        "help": "whether the bias enters the gate values as well as the choice (the official code: True)"})

    def validate(self) -> None:
        check_int("SMoRA", "rank", self.rank)
        if isinstance(self.activate_r, int) and not isinstance(self.activate_r, bool) \
                and isinstance(self.rank, int) and self.activate_r > self.rank:
            raise AdapterError(f"SMoRA activate_r (the top-k) must be at most rank ({self.rank}), "
                               f"not {self.activate_r}")
        check_int("SMoRA", "activate_r", self.activate_r)
        check_number("SMoRA", "alpha", self.alpha, 0.0, low_open=True)
        check_number("SMoRA", "dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_int("SMoRA", "rank_partition", self.rank_partition)
        if self.rank % self.rank_partition:
            raise AdapterError(f"SMoRA rank_partition must divide the rank {self.rank}, not {self.rank_partition}")
        check_number("SMoRA", "bias_update_rate", self.bias_update_rate, 0.0)
        check_choice("SMoRA", "bias_in_gate", self.bias_in_gate, (True, False))

    def inject(self, model: nn.Module, name: str, modules: list[str]) -> list[str]:
        self.validate()  # a config changed after it was made is checked again before the model is touched
        return super().inject(model, name, modules)


def smora_gates(scores: torch.Tensor, bias: torch.Tensor, k: int,
                bias_in_gate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """SMoRA's gates over the last dimension of `scores` (the sigmoid router scores, r of them): the k ranks of
    largest score + bias are chosen and given k * v_i / sum of the chosen v, the others zero (v = score + bias, or
    the score alone without `bias_in_gate`). Returns (gates shaped like scores, chosen indices (..., k))."""
    biased = scores + bias.to(scores)
    top, chosen = biased.topk(k, dim=-1)
    values = top if bias_in_gate else scores.gather(-1, chosen)
    gates = torch.zeros_like(scores).scatter(-1, chosen, values)
    return k * gates / gates.sum(dim=-1, keepdim=True), chosen


def smora_bias_update(bias: torch.Tensor, chosen: torch.Tensor, rate: float) -> torch.Tensor:
    """The bias after one training step: b + u * sign(mean(c) - c), c_i the number of times rank i is in `chosen`."""
    counts = torch.bincount(chosen.reshape(-1), minlength=bias.numel()).to(bias.dtype)
    return bias + rate * torch.sign(counts.mean() - counts)


class SMoRALinear(AdapterLayer):
    """A Linear with one rank-r LoRA whose ranks a router switches on k at a time for each token."""

    def __init__(self, base_layer: nn.Module, config: SMoRAConfig | None = None,
                 adapter_name: str = "default") -> None:
        super().__init__(base_layer, adapter_name)
        self.config = config = config or SMoRAConfig()
        if config.rank % config.rank_partition:
            raise AdapterError(f"SMoRA rank_partition must divide the rank {config.rank}")
        device = self.original_module().weight.device
        down = torch.empty(config.rank, self.in_features)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        router = nn.Linear(self.in_features, config.rank // config.rank_partition, bias=False)  # torch's own init
        self.lora_A = nn.Parameter(down.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.rank, device=device))
        self.router = router.to(device)
        self.register_buffer("rank_bias", torch.zeros(config.rank, device=device))  # saved, never trained
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.alpha / config.activate_r
        self.last_chosen: torch.Tensor | None = None  # (..., k) ranks chosen in the last forward pass

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        config = self.config
        x = self.dropout(x.to(self.lora_A.dtype))
        scores = torch.sigmoid(self.router(x)).repeat_interleave(config.rank_partition, dim=-1)
        gates, chosen = smora_gates(scores, self.rank_bias, config.activate_r, config.bias_in_gate)
        self.last_chosen = chosen.detach()
        if self.training and config.bias_update_rate > 0:
            with torch.no_grad():
                self.rank_bias.copy_(smora_bias_update(self.rank_bias, chosen, config.bias_update_rate))
        return self.scaling * F.linear(F.linear(x, self.lora_A) * gates, self.lora_B)


SMoRAConfig.layer_cls = SMoRALinear


def smora_layers(model: nn.Module, name: str = "default") -> dict[str, SMoRALinear]:
    return method_layers(model, name, SMoRALinear, "SMoRA")


@torch.no_grad()
def smora_rank_activations(model: nn.Module, name: str = "default",
                           attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{module: the share of tokens that activated each rank in the last forward pass}, each an (r,) tensor in
    [0, 1] summing to k; padding is left out when `attention_mask` (the input's leading shape) is given."""
    shares = {}
    for module, layer in smora_layers(model, name).items():
        if layer.last_chosen is None:
            raise AdapterError(f"SMoRA adapter {name!r} has not routed any tokens yet; run the model first")
        chosen = layer.last_chosen.reshape(-1, layer.config.activate_r)
        hits = F.one_hot(chosen, layer.config.rank).sum(1).float()  # (tokens, r)
        if attention_mask is not None:
            mask = attention_mask.reshape(-1, 1).to(hits)
            hits, tokens = hits * mask, mask.sum()
        else:
            tokens = torch.tensor(float(hits.shape[0]))
        shares[module] = hits.sum(0) / tokens.clamp_min(1.0)
    return shares


def smora_rank_bias(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """{module: a copy of its balancing bias b}."""
    return {module: layer.rank_bias.detach().clone() for module, layer in smora_layers(model, name).items()}


register_method(
    "smora", SMoRAConfig, title="SMoRA", mergeable=False,
    paper="Zhao et al., Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA for Multi-Task "
          "Learning (arXiv 2501.15103); StyxXuan/smora",
    property="each rank of one LoRA an expert: a router activates k of r ranks per token, balanced by a bias",
)
