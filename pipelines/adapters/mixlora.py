"""MixLoRA: LoRA experts inside each feed-forward block behind a top-k router, its load-balance loss, and LoRA on
attention.

Li et al., "MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based Mixture of Experts" (arXiv
2404.15159). Official code: TUDB-Labs/MixLoRA (the inference package, `mixlora/model.py`) and TUDB-Labs/MoE-PEFT
(training, `moe_peft/adapters/mixlora/`, the "mixlora" routing strategy); this module follows both.

For a SwiGLU feed-forward block (Llama's `gate_proj`, `up_proj`, `down_proj`), whose frozen weights W_g, W_u, W_d
all E experts share, and a token's hidden state h:

    p = softmax(W_r h)                         W_r (E x d), no bias, drawn N(0, router_init_range^2)
    S = top-k(p),   w_e = p_e / sum_{e' in S} p_e'
    y = sum_{e in S} w_e (W_d + s B^d_e A^d_e) [act((W_g + s B^g_e A^g_e) h) * (W_u + s B^u_e A^u_e) h]

W_g h and W_u h are computed once for every token and shared by the experts (the official code's form). The
attention projections named in `target_modules` get an ordinary LoRA (`MixLoRALinear`). The auxiliary
load-balance loss is computed over the router logits of every MoE layer together (concatenated, as MoE-PEFT):

    L_aux = c * E * sum_{slot, e} f_{slot, e} P_e

with f_{slot, e} the share of tokens whose slot-th choice is expert e and P_e the mean router probability of e
(padding left out when an attention mask is given). It is added to the task loss by the caller:
`loss = task_loss + mixlora_aux_loss(model, name, attention_mask)`.

Defaults are MoE-PEFT's: the code's `router_aux_loss_coef` 0.001 (the MixLoRA README example uses 0.01),
`router_init_range` 0.02, `jitter_noise` 0, `top_k` 2, Kaiming-uniform A ("original") and zero B, scale alpha / r
(alpha / sqrt(r) with `use_rslora`); and its template `templates/mixlora.json`: 8 experts, r 16, alpha 32,
dropout 0.05, every attention and feed-forward projection adapted.

Choices of this implementation (each a field where it is a choice):
- Only SwiGLU blocks with `gate_proj`, `up_proj`, `down_proj` (Llama, Mistral, Qwen2, Gemma); the official
  code's Phi (fc1/fc2) and Phi-3 (fused gate_up_proj) forms are not implemented. `act_fn=None` uses the
  block's own activation, as the official code does when its `act_fn` is left blank.
- `expert_modules` names the projections each expert adapts (MoE-PEFT: those of gate/up/down named in its
  target modules); the experts share the attention LoRA's rank, alpha and dropout unless `expert_rank`,
  `expert_alpha`, `expert_dropout` are set (MoE-PEFT's optional `expert_lora` block).
- Jitter noise (h <- h * U(1 - eps, 1 + eps) before routing) is drawn in training mode only, as MoE-PEFT does,
  from torch's global generator, and not in place.
- Only the "mixlora" (top-k) strategy; MoE-PEFT's "mixlora-dynamic" (top-p) and "mixlora-switch" are not.
- The router and the experts compute in fp32 (as upstream); the block's output takes the input's dtype.
- A new adapter leaves the outputs unchanged up to rounding, not bit for bit: with B = 0 each chosen expert
  computes the base block, and the k weights sum to one. It cannot be merged (the routing depends on the token).
- A MixLoRA feed-forward layer must be the first adapter on its block (it calls the block's projections
  itself); a plain target inside a targeted block (its `gate_proj`, say) is refused, since its experts adapt it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.adapters.base import AdapterLayer
from pipelines.adapters.core import AdapterConfig, AdapterError, layers_of, module_slots, register_method
from pipelines.adapters.fields import check_choice, check_int, check_number

SWIGLU = ("gate_proj", "up_proj", "down_proj")
INITS = ("original", "gaussian")


@dataclass
class MixLoRAConfig(AdapterConfig):
    """Experts, router and LoRA shapes; `target_modules` names feed-forward blocks (experts) and Linear layers
    (plain LoRA), e.g. `["q_proj", "k_proj", "v_proj", "o_proj", "mlp"]`."""

    method = "mixlora"

    num_experts: int = field(default=8, metadata={"help": "E, LoRA experts per feed-forward block (template: 8)"})
    top_k: int = field(default=2, metadata={"help": "experts each token is routed to (MoE-PEFT: 2)"})
    rank: int = field(default=16, metadata={"help": "LoRA rank r (template: 16)"})
    alpha: float = field(default=32.0, metadata={
        "help": "lora_alpha; the update is scaled by alpha / r (template: 32)"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input (template: 0.05)"})
    expert_rank: int | None = field(default=None, metadata={"help": "the experts' rank (None: rank)"})
    expert_alpha: float | None = field(default=None, metadata={"help": "the experts' lora_alpha (None: alpha)"})
    expert_dropout: float | None = field(default=None, metadata={"help": "the experts' dropout (None: dropout)"})
    expert_modules: list[str] = field(default_factory=lambda: list(SWIGLU), metadata={
        "help": "projections of the feed-forward block each expert adapts", "choices": list(SWIGLU)})
    router_aux_loss_coef: float = field(default=0.001, metadata={
        "help": "c of the load-balance loss (MoE-PEFT code: 0.001; MixLoRA README: 0.01)"})
    router_loss: bool = field(default=True, metadata={"help": "whether mixlora_aux_loss returns the loss (else 0)"})
    router_init_range: float = field(default=0.02, metadata={"help": "std of the router's normal init (0.02)"})
    jitter_noise: float = field(default=0.0, metadata={"help": "eps of the multiplicative jitter in training (0)"})
    init: str = field(default="original", metadata={
        "help": "A's init: 'original' Kaiming-uniform (MoE-PEFT default) or 'gaussian' (std 1/r)",
        "choices": list(INITS)})
    use_rslora: bool = field(default=False, metadata={"help": "scale by alpha / sqrt(r) instead of alpha / r"})
    act_fn: str | None = field(default=None, metadata={"help": "activation name (None: the block's own act_fn)"})

    def validate(self) -> None:
        check_int("MixLoRA", "num_experts", self.num_experts)
        if isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and isinstance(self.num_experts, int) \
                and self.top_k > self.num_experts:
            raise AdapterError(f"MixLoRA top_k must be at most num_experts ({self.num_experts}), not {self.top_k}")
        check_int("MixLoRA", "top_k", self.top_k)
        check_int("MixLoRA", "rank", self.rank)
        check_number("MixLoRA", "alpha", self.alpha, 0.0, low_open=True)
        check_number("MixLoRA", "dropout", self.dropout, 0.0, 1.0, high_open=True)
        if self.expert_rank is not None:
            check_int("MixLoRA", "expert_rank", self.expert_rank)
        if self.expert_alpha is not None:
            check_number("MixLoRA", "expert_alpha", self.expert_alpha, 0.0, low_open=True)
        if self.expert_dropout is not None:
            check_number("MixLoRA", "expert_dropout", self.expert_dropout, 0.0, 1.0, high_open=True)
        if isinstance(self.expert_modules, tuple):
            self.expert_modules = list(self.expert_modules)
        if not isinstance(self.expert_modules, list) or not self.expert_modules:
            raise AdapterError(f"MixLoRA expert_modules must name one or more of {', '.join(SWIGLU)}")
        for name in self.expert_modules:
            check_choice("MixLoRA", "expert_modules", name, SWIGLU)
        check_number("MixLoRA", "router_aux_loss_coef", self.router_aux_loss_coef, 0.0)
        check_choice("MixLoRA", "router_loss", self.router_loss, (True, False))
        check_number("MixLoRA", "router_init_range", self.router_init_range, 0.0)
        check_number("MixLoRA", "jitter_noise", self.jitter_noise, 0.0, 1.0, high_open=True)
        check_choice("MixLoRA", "init", self.init, INITS)
        check_choice("MixLoRA", "use_rslora", self.use_rslora, (True, False))
        if self.act_fn is not None:
            from transformers.activations import ACT2FN

            if not isinstance(self.act_fn, str) or self.act_fn not in ACT2FN:
                raise AdapterError(f"MixLoRA act_fn must be None or a transformers activation name, "
                                   f"not {self.act_fn!r}")

    # -- the experts' LoRA shape -----------------------------------------------------------------------------

    def expert_shape(self) -> tuple[int, float, float]:
        """(rank, alpha, dropout) of the experts' LoRAs."""
        return (self.rank if self.expert_rank is None else self.expert_rank,
                self.alpha if self.expert_alpha is None else self.expert_alpha,
                self.dropout if self.expert_dropout is None else self.expert_dropout)

    # -- targets ---------------------------------------------------------------------------------------------

    def accepts(self, module: nn.Module) -> bool:
        return is_swiglu(module, self.act_fn is None) or (
            hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight"))

    def make_layer(self, base: nn.Module, name: str, module: str = "") -> AdapterLayer:
        if is_swiglu(base, self.act_fn is None):
            return MixLoRAMoE(base, self, adapter_name=name)
        return MixLoRALinear(base, self, adapter_name=name)

    def inject(self, model: nn.Module, name: str, modules: list[str]) -> list[str]:
        self.validate()  # a config changed after it was made is checked again before the model is touched
        slots = {slot.name: slot for slot in module_slots(model)}
        blocks = [m for m in modules if is_swiglu(slots[m].original, self.act_fn is None)]
        for m in modules:
            inside = next((b for b in blocks if m.startswith(b + ".")), None)
            if inside is not None:
                raise AdapterError(f"MixLoRA targets both the feed-forward block {inside} and {m} inside it; its "
                                   f"experts adapt {', '.join(self.expert_modules)} already, leave {m} out")
        return super().inject(model, name, modules)


def is_swiglu(module: nn.Module, needs_act_fn: bool = True) -> bool:
    """A gated feed-forward block with Llama's projection names (and its own `act_fn` where one is needed)."""
    return all(isinstance(getattr(module, n, None), nn.Module) for n in SWIGLU) and (
        not needs_act_fn or callable(getattr(module, "act_fn", None)))


# -- the pieces ---------------------------------------------------------------------------------------------


class LoRABranch(nn.Module):
    """`scale * B A dropout(x)` as MoE-PEFT's `Lora`: A Kaiming-uniform (a = sqrt 5) or normal (std 1/r), B zero,
    both fp32, made on the CPU from torch's global generator and then moved to `device`."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float,
                 init: str = "original", use_rslora: bool = False, device: torch.device | None = None) -> None:
        super().__init__()
        down = torch.empty(rank, in_features)
        if init == "gaussian":
            nn.init.normal_(down, std=1.0 / rank)
        else:
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        self.lora_A = nn.Parameter(down.to(device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * F.linear(F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A), self.lora_B)


def topk_routing(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MixLoRA's routing of (tokens, E) logits: softmax in fp32, the top-k probabilities renormalised to sum to one.
    Returns (weights, experts), both (tokens, k), the experts in decreasing order of probability."""
    probabilities = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probabilities, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), experts


def load_balancing_loss(router_logits: torch.Tensor | list[torch.Tensor], num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_{slot, e} f_{slot, e} P_e over (tokens, E) logits (a list is concatenated, one entry per layer):
    f_{slot, e} the share of tokens whose slot-th choice is e, P_e the mean probability of e. With an attention
    mask (batch, seq), padding tokens count in neither; the logits then hold layers x batch x seq rows."""
    logits = torch.cat(list(router_logits), 0) if isinstance(router_logits, (list, tuple)) else router_logits
    probabilities = F.softmax(logits.float(), dim=-1)
    _, chosen = torch.topk(probabilities, top_k, dim=-1)
    slots = F.one_hot(chosen, num_experts).float()  # (tokens, k, E)
    if attention_mask is None:
        tokens_per_expert = slots.mean(0)
        probability_per_expert = probabilities.mean(0)
    else:
        mask = attention_mask.reshape(-1).to(probabilities)
        if logits.shape[0] % mask.numel():
            raise ValueError(f"{logits.shape[0]} router rows do not fit an attention mask of {mask.numel()} tokens")
        mask = mask.repeat(logits.shape[0] // mask.numel())
        tokens_per_expert = (slots * mask[:, None, None]).sum(0) / mask.sum()
        probability_per_expert = (probabilities * mask[:, None]).sum(0) / mask.sum()
    return num_experts * torch.sum(tokens_per_expert * probability_per_expert.unsqueeze(0))


class MixLoRALinear(AdapterLayer):
    """The plain LoRA MixLoRA puts on the attention projections (or any other Linear it is given)."""

    def __init__(self, base_layer: nn.Module, config: MixLoRAConfig | None = None,
                 adapter_name: str = "default") -> None:
        super().__init__(base_layer, adapter_name)
        self.config = config = config or MixLoRAConfig()
        device = self.original_module().weight.device
        self.lora = LoRABranch(self.in_features, self.out_features, config.rank, config.alpha, config.dropout,
                               config.init, config.use_rslora, device)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora(x)


class MixLoRAMoE(AdapterLayer):
    """A SwiGLU feed-forward block with E LoRA experts and the top-k router in front of them."""

    wraps_linear = False

    def __init__(self, base_layer: nn.Module, config: MixLoRAConfig | None = None,
                 adapter_name: str = "default") -> None:
        if isinstance(base_layer, AdapterLayer):
            raise AdapterError("a MixLoRA adapter must be the first adapter on its feed-forward block: its forward "
                               "calls the block's projections itself; add it before the others")
        config = config or MixLoRAConfig()
        if not is_swiglu(base_layer, config.act_fn is None):
            raise AdapterError(f"MixLoRA experts need a gated feed-forward block with {', '.join(SWIGLU)}"
                               f"{' and act_fn' if config.act_fn is None else ''}, not {type(base_layer).__name__}")
        super().__init__(base_layer, adapter_name)
        self.config = config
        self.num_experts, self.top_k, self.jitter_noise = config.num_experts, config.top_k, config.jitter_noise
        if config.act_fn is None:
            self.act = base_layer.act_fn
        else:
            from transformers.activations import ACT2FN

            self.act = ACT2FN[config.act_fn]
        weight = base_layer.gate_proj.weight
        hidden, inner = int(weight.shape[1]), int(weight.shape[0])
        sizes = {"gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}
        rank, alpha, dropout = config.expert_shape()
        router = torch.empty(config.num_experts, hidden)
        nn.init.normal_(router, mean=0.0, std=config.router_init_range)
        self.router = nn.Linear(hidden, config.num_experts, bias=False, device=weight.device)
        with torch.no_grad():
            self.router.weight.copy_(router)
        self.experts = nn.ModuleList(
            nn.ModuleDict({name: LoRABranch(*sizes[name], rank, alpha, dropout, config.init, config.use_rslora,
                                            weight.device) for name in config.expert_modules})
            for _ in range(config.num_experts))
        self.last_router_logits: torch.Tensor | None = None  # (tokens, E) of the last forward, for the aux loss

    @property
    def in_features(self) -> int:
        return int(self.base_layer.gate_proj.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.base_layer.down_proj.weight.shape[0])

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        block = self.base_layer
        if not self.applies:
            return block(hidden_states, *args, **kwargs)
        if self.training and self.jitter_noise > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        shape = hidden_states.shape
        h = hidden_states.reshape(-1, shape[-1])
        logits = self.router(h.to(self.router.weight.dtype))
        self.last_router_logits = logits
        weights, chosen = topk_routing(logits, self.top_k)
        common_gate, common_up = block.gate_proj(h), block.up_proj(h)  # shared by every expert
        out = torch.zeros(h.shape[0], self.out_features, dtype=torch.float32, device=h.device)
        for index, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == index)
            if rows.numel() == 0:
                continue
            x = h[rows]
            gate, up = common_gate[rows], common_up[rows]
            if "gate_proj" in expert:
                gate = gate + expert["gate_proj"](x).to(gate.dtype)
            if "up_proj" in expert:
                up = up + expert["up_proj"](x).to(up.dtype)
            inner = self.act(gate) * up
            y = block.down_proj(inner)
            if "down_proj" in expert:
                y = y + expert["down_proj"](inner).to(y.dtype)
            out.index_add_(0, rows, y.float() * weights[rows, slot, None])
        return out.reshape(*shape[:-1], self.out_features).to(hidden_states.dtype)


MixLoRAConfig.layer_cls = MixLoRAMoE


# -- what the router did ------------------------------------------------------------------------------------


def _moe_layers(model: nn.Module, name: str) -> dict[str, MixLoRAMoE]:
    layers = {module: stack[0] for module, stack in layers_of(model, name).items()
              if isinstance(stack[0], MixLoRAMoE)}
    if not layers:
        raise AdapterError(f"the model has no MixLoRA feed-forward experts named {name!r}")
    return layers


def mixlora_router_logits(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """{feed-forward block: its router logits (tokens, E) in the last forward pass} of adapter `name`."""
    logits = {module: layer.last_router_logits for module, layer in _moe_layers(model, name).items()}
    missing = [module for module, value in logits.items() if value is None]
    if missing:
        raise AdapterError(f"MixLoRA adapter {name!r} has not routed any tokens yet; run the model first")
    return logits


def mixlora_aux_loss(model: nn.Module, name: str = "default",
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The load-balance loss of the last forward pass, c * L_aux over every MoE layer of adapter `name` (zero when
    the config's `router_loss` is off); add it to the task loss before `backward()`."""
    layers = _moe_layers(model, name)
    config = next(iter(layers.values())).config
    logits = list(mixlora_router_logits(model, name).values())
    if not config.router_loss:
        return logits[0].new_zeros(())
    loss = load_balancing_loss(logits, config.num_experts, config.top_k, attention_mask)
    return config.router_aux_loss_coef * loss


@torch.no_grad()
def mixlora_expert_loads(model: nn.Module, name: str = "default",
                         attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{feed-forward block: the share of token slots (tokens x k) routed to each expert in the last forward pass},
    each an (E,) tensor summing to one; padding is left out when `attention_mask` (batch, seq) is given."""
    layers, loads = _moe_layers(model, name), {}
    for module, logits in mixlora_router_logits(model, name).items():
        layer = layers[module]
        _, chosen = topk_routing(logits, layer.top_k)
        counts = F.one_hot(chosen, layer.num_experts).float().sum(1)  # (tokens, E)
        if attention_mask is not None:
            counts = counts * attention_mask.reshape(-1, 1).to(counts)
        loads[module] = counts.sum(0) / counts.sum().clamp_min(1.0)
    return loads


register_method(
    "mixlora", MixLoRAConfig, title="MixLoRA", mergeable=False, identity_at_init=False,
    paper="Li et al., MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based Mixture of Experts "
          "(arXiv 2404.15159); TUDB-Labs/MixLoRA and MoE-PEFT",
    property="LoRA experts in each feed-forward block behind a top-k router kept balanced by an auxiliary loss",
)
