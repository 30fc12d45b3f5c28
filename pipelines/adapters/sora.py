"""SoRA: a LoRA whose ranks are switched off by a sparse gate; zero gates are pruned into a smaller plain LoRA.

Ding et al., "Sparse Low-rank Adaptation of Pre-trained Language Models", EMNLP 2023 (arXiv 2311.11696); official
code TsinghuaC3I/SoRA (`src/lora.py`, `src/sparse_optimizer.py`, `src/trainer.py`, `run_glue.py`).

    y = W0 x + (alpha / r_max) * B (g ⊙ (A x)),   A Kaiming-uniform, B zeros, g ~ N(0, 1) (one gate per rank)
    loss = task loss + eta * ||g||_1 / |g|          (|g|: the number of gate entries of the whole adapter)
    gates: an Adam step, then the proximal step of the L1 norm with threshold xi (`SparseAdamW`)
    after training: the ranks whose gate is exactly zero are dropped; g is folded into B -> a plain LoRA

The gates have their own optimiser in the official code (`SparseAdamW`, transformers' AdamW with eps 1e-6, no
weight decay and bias correction, at the main learning rate); the L1 term's gradient enters the Adam step and the
threshold xi is then applied to the parameters as it is, not multiplied by the learning rate. The sparsifying
schedule raises xi in stages (`sparsifying_schedule`: linear, log_linear or exp_linear from xi to
`max_threshold` in `schedule_stages` values); the official script trains first at the initial xi, then 15 epochs
per further stage. `SparseAdamW` takes the schedule as the steps spent at the first value and the steps per stage
(or advances by `step_threshold()` as the official optimiser's `step_lambda()`).

Choices the paper leaves open or where the code differs from the paper's formula, each a setting:
- `proximal`: "official" applies the code's three in-place steps in order (values above xi lose xi, below -xi gain
  xi, then every value whose magnitude is now below xi becomes zero), so a gate between xi and 2 xi goes to zero
  and one exactly at +-xi stays; "soft" is the textbook soft threshold sign(g) max(|g| - xi, 0) of the paper.
- Defaults from the released no-schedule GLUE script: r_max 8, alpha 16, eta 10, xi 3e-4 (the argument defaults
  are r 16, eta 1e-3, xi 1e-3); the schedule from the scheduled script: linear up to 7e-4 in 7 stages.
- The gate is a vector of r_max entries (the code stores it as a 1 x r row; the values are the same).
- `SoRALinear.export_lora(rank)` keeps the `rank` live ranks with the largest |g| (magnitude pruning, for a fixed
  file size); without a rank it keeps every live rank, which gives the layer's outputs exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.adapters.base import AdapterLayer
from pipelines.adapters.core import (
    AdapterConfig,
    AdapterError,
    exact_targets,
    is_integer,
    is_number,
    method_layers,
    register_method,
    replace_adapter,
    trainable_parameters,
)
from pipelines.adapters.lora import LoRAConfig

PROXIMAL_MODES = ("official", "soft")
SCHEDULES = ("none", "linear", "log_linear", "exp_linear")


@dataclass
class SoRAConfig(AdapterConfig):
    """r_max, the update's alpha (scale alpha / r_max), and the L1 penalty, threshold and schedule of the gates."""

    method = "sora"

    rank: int = field(default=8, metadata={"help": "r_max, the rank before pruning (scripts: 8)"})
    alpha: float = field(default=16.0, metadata={"help": "the update is scaled by alpha / r_max (scripts: 16)"})
    l1_weight: float = field(default=10.0, metadata={"help": "eta, the weight of ||g||_1 / |g| in the loss"})
    threshold: float = field(default=3e-4, metadata={"help": "xi, the proximal threshold after each gate step"})
    proximal: str = field(default="official", metadata={
        "help": "official: the code's in-place steps; soft: sign(g) max(|g| - xi, 0)", "choices": list(PROXIMAL_MODES)})
    schedule: str = field(default="none", metadata={
        "help": "how xi rises in stages (none, linear, log_linear, exp_linear)", "choices": list(SCHEDULES)})
    max_threshold: float = field(default=7e-4, metadata={"help": "the last xi of the schedule"})
    schedule_stages: int = field(default=7, metadata={"help": "how many xi values the schedule holds"})

    def validate(self) -> None:
        if not is_integer(self.rank) or self.rank < 1:
            raise AdapterError(f"SoRA rank must be at least 1, not {self.rank}")
        if not is_number(self.alpha) or self.alpha == 0:
            raise AdapterError(f"SoRA alpha must be a finite non-zero number, not {self.alpha}")
        for label in ("l1_weight", "threshold", "max_threshold"):
            value = getattr(self, label)
            if not is_number(value) or value < 0:
                raise AdapterError(f"SoRA {label} must be a finite number >= 0, not {value}")
        if self.proximal not in PROXIMAL_MODES:
            raise AdapterError(f"SoRA proximal must be one of {', '.join(PROXIMAL_MODES)}, not {self.proximal!r}")
        if self.schedule not in SCHEDULES:
            raise AdapterError(f"SoRA schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if not is_integer(self.schedule_stages) or not 1 <= self.schedule_stages <= 1000:
            raise AdapterError(f"SoRA schedule_stages must lie in [1, 1000], not {self.schedule_stages}")
        if self.schedule == "exp_linear" and (self.threshold <= 0 or self.max_threshold <= 0):
            raise AdapterError("SoRA's exp_linear schedule needs threshold and max_threshold above 0")

    # -- export from saved tensors (a package holds the factors, not the layers) ---------------------------

    def export_ranks(self, states: dict[str, dict[str, torch.Tensor]]) -> tuple[int, int]:
        """The ranks a plain LoRA can be cut at: 1 up to the most live ranks any layer kept."""
        return 1, max(int(torch.count_nonzero(state["lora_gate"])) for state in states.values())

    def check_export_rank(self, rank: int, states: dict[str, dict[str, torch.Tensor]]) -> int:
        live = self.export_ranks(states)[1]
        if not is_integer(rank) or rank < 1:
            raise AdapterError(f"rank {rank!r} must be a whole number of at least 1")
        if rank > live:
            raise AdapterError(f"rank {rank} is more than this SoRA adapter kept: no layer has more than {live} "
                               f"live ranks (of r_max {self.rank}); choose a rank up to {live}")
        return rank

    def lora_factors(self, state: dict[str, torch.Tensor], rank: int | None = None, *, fold_scale: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's `{"lora_A", "lora_B", "lora_gate"}` pruned as LoRA factors: the gate folded into B, and
        alpha / r_max too unless `fold_scale` is False.

        Without `rank` every live rank stays (the same outputs); with it, the `rank` live ranks of largest |g|.
        """
        gate = state["lora_gate"].detach()
        keep = kept_ranks(gate, rank)
        down = state["lora_A"].detach()[keep].float()
        up = state["lora_B"].detach()[:, keep].float() * gate[keep].float()
        scale = self.alpha / self.rank if fold_scale else 1.0
        return down.contiguous(), (scale * up).contiguous()

    def thresholds(self) -> list[float]:
        """The xi values the schedule steps through (just [xi] without a schedule)."""
        if self.schedule == "none":
            return [float(self.threshold)]
        return sparsifying_schedule(self.threshold, self.max_threshold, self.schedule_stages, self.schedule)


def sparsifying_schedule(start: float, maximum: float, stages: int, kind: str = "linear") -> list[float]:
    """The official `SparseAdamW._build_lambda_list`: `stages` thresholds from `start` to `maximum`."""
    if kind == "linear":
        values = np.linspace(start, maximum, stages)
    elif kind == "log_linear":
        values = np.log(np.linspace(np.exp(start), np.exp(maximum), stages))
    elif kind == "exp_linear":
        values = np.exp(np.linspace(np.log(start), np.log(maximum), stages))
    else:
        raise AdapterError(f"unknown SoRA schedule {kind!r} (use linear, log_linear or exp_linear)")
    return [float(v) for v in values]


@torch.no_grad()
def proximal_step_(param: torch.Tensor, threshold: float, mode: str = "official") -> torch.Tensor:
    """The proximal step of the L1 norm on `param`, in place (see the module docstring for the two modes)."""
    if threshold <= 0:
        return param
    if mode == "soft":
        param.copy_(torch.sign(param) * torch.clamp(param.abs() - threshold, min=0.0))
    elif mode == "official":
        param[param > threshold] -= threshold
        param[param < -threshold] += threshold
        param[param.abs() < threshold] = 0.0
    else:
        raise AdapterError(f"SoRA proximal must be one of {', '.join(PROXIMAL_MODES)}, not {mode!r}")
    return param


class SparseAdamW(torch.optim.Optimizer):
    """SoRA's gate optimiser: transformers' AdamW step, then the proximal step with the group's threshold.

    Group options: `lr`, `betas`, `eps` (1e-6, transformers' default), `weight_decay` (0, decoupled, computed
    from the weights before the step as the official code does), `correct_bias`, `thresholds` (the schedule; a
    group with [0.0] is a plain AdamW group, so a model's other adapter weights can share the optimiser),
    `proximal`, `schedule_start` (steps at the first threshold) and `stage_steps` (steps per later threshold; 0:
    only `step_threshold()` advances). The step count and stage live in the groups, so `state_dict` holds them.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True,
                 thresholds: Iterable[float] = (0.0,), proximal: str = "official", schedule_start: int = 0,
                 stage_steps: int = 0) -> None:
        thresholds = [float(t) for t in thresholds]
        if not thresholds or not all(math.isfinite(t) and t >= 0 for t in thresholds):
            raise AdapterError("SparseAdamW thresholds must be finite numbers >= 0")
        if proximal not in PROXIMAL_MODES:
            raise AdapterError(f"SparseAdamW proximal must be one of {', '.join(PROXIMAL_MODES)}, not {proximal!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        thresholds=thresholds, proximal=proximal, schedule_start=int(schedule_start),
                        stage_steps=int(stage_steps), stage=0, steps=0)
        super().__init__(params, defaults)

    @staticmethod
    def threshold_of(group: dict) -> float:
        """The threshold a group applies at its current stage."""
        thresholds = group["thresholds"]
        return thresholds[min(group["stage"], len(thresholds) - 1)]

    def step_threshold(self) -> None:
        """Move every group to its schedule's next threshold (the official `step_lambda`)."""
        for group in self.param_groups:
            group["stage"] = min(group["stage"] + 1, len(group["thresholds"]) - 1)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["steps"] += 1
            if group["stage_steps"] > 0:
                after = group["steps"] - group["schedule_start"]
                stage = 0 if after <= 0 else 1 + (after - 1) // group["stage_steps"]
                group["stage"] = min(stage, len(group["thresholds"]) - 1)
            beta1, beta2 = group["betas"]
            threshold = self.threshold_of(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                grad = p.grad
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size *= math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                update = (exp_avg / denom) * (-step_size)
                if group["weight_decay"] > 0:
                    update.add_(p, alpha=-group["lr"] * group["weight_decay"])
                p.add_(update)
                proximal_step_(p, threshold, group["proximal"])
        return loss


class SoRALinear(AdapterLayer):
    """A rank-r_max LoRA with a gate between its down and up projections."""

    def __init__(self, base_layer: nn.Module, config: SoRAConfig | None = None, adapter_name: str = "default") -> None:
        super().__init__(base_layer, adapter_name)
        self.config = config = config or SoRAConfig()
        self.scale = float(config.alpha) / config.rank
        # Initialised on the CPU in fp32 from the global RNG (A, then the gate), then moved beside the base.
        down = torch.empty(config.rank, self.in_features)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        gate = torch.randn(config.rank)
        device = self.original_module().weight.device
        self.lora_A = nn.Parameter(down.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.rank, device=device))
        self.lora_gate = nn.Parameter(gate.to(device))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x.to(self.lora_A.dtype), self.lora_A) * self.lora_gate
        return self.scale * F.linear(hidden, self.lora_B)

    def get_delta_weight(self) -> torch.Tensor:
        return self.scale * ((self.lora_B.float() * self.lora_gate.float()) @ self.lora_A.float())

    def live_ranks(self) -> torch.Tensor:
        """Indices of the ranks whose gate is not zero."""
        return kept_ranks(self.lora_gate.detach())

    def export_lora(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept ranks as LoRA factors with the gate and alpha / r_max folded into B."""
        return self.config.lora_factors(self.adapter_state_dict(), rank)


def kept_ranks(gate: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """Indices of the non-zero entries of `gate`, or of the `rank` of them with the largest |g|, in order."""
    live = torch.nonzero(gate.flatten() != 0).flatten()
    if rank is not None and rank < live.numel():
        order = torch.argsort(gate.flatten()[live].abs(), descending=True, stable=True)
        live = torch.sort(live[order[:rank]]).values
    return live


SoRAConfig.layer_cls = SoRALinear


# -- training and pruning on a model ----------------------------------------------------------------------------


def sora_layers(model: nn.Module, name: str = "default") -> dict[str, SoRALinear]:
    """{module: layer} of SoRA adapter `name`; an error naming the adapter if it is missing or not SoRA."""
    return method_layers(model, name, SoRALinear, "SoRA")


def gate_parameters(model: nn.Module, name: str = "default") -> list[nn.Parameter]:
    return [layer.lora_gate for layer in sora_layers(model, name).values()]


def factor_parameters(model: nn.Module, name: str = "default") -> list[nn.Parameter]:
    """Adapter `name`'s parameters other than its gates: what the ordinary optimiser trains."""
    gates = {id(p) for p in gate_parameters(model, name)}
    return [p for p in trainable_parameters(model, name) if id(p) not in gates]


def sparsity_loss(model: nn.Module, name: str = "default") -> torch.Tensor:
    """eta * ||g||_1 / |g| over every gate of adapter `name` (the official trainer's extra loss term)."""
    gates = gate_parameters(model, name)
    config = next(iter(sora_layers(model, name).values())).config
    total = sum(g.abs().sum() for g in gates)
    return config.l1_weight * total / sum(g.numel() for g in gates)


def gate_optimizer(model: nn.Module, name: str = "default", lr: float = 1e-3, *, schedule_start: int = 0,
                   stage_steps: int = 0, **options) -> SparseAdamW:
    """A `SparseAdamW` over the gates of adapter `name` with its config's threshold (schedule) and mode."""
    config = next(iter(sora_layers(model, name).values())).config
    return SparseAdamW(gate_parameters(model, name), lr=lr, thresholds=config.thresholds(),
                       proximal=config.proximal, schedule_start=schedule_start, stage_steps=stage_steps, **options)


def sora_optimizer(model: nn.Module, name: str = "default", lr: float = 1e-3, *,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                   gate_lr: float | None = None, schedule_start: int = 0, stage_steps: int = 0) -> SparseAdamW:
    """One optimiser for the whole of SoRA adapter `name`: its factors as AdamW (`eps`, `weight_decay`), its
    gates as the official gate optimiser (eps 1e-6, no weight decay, the config's threshold schedule) at
    `gate_lr` (default `lr`, the official `sparse_lr` default)."""
    config = next(iter(sora_layers(model, name).values())).config
    groups = [
        {"params": factor_parameters(model, name), "eps": eps, "weight_decay": weight_decay, "thresholds": [0.0]},
        {"params": gate_parameters(model, name), "lr": lr if gate_lr is None else gate_lr, "eps": 1e-6,
         "weight_decay": 0.0, "thresholds": config.thresholds(), "proximal": config.proximal},
    ]
    return SparseAdamW(groups, lr=lr, betas=betas, schedule_start=schedule_start, stage_steps=stage_steps)


def live_ranks(model: nn.Module, name: str = "default") -> dict[str, int]:
    """{module: the number of its non-zero gates}."""
    return {module: int(layer.live_ranks().numel()) for module, layer in sora_layers(model, name).items()}


def export_pruned(model: nn.Module, name: str = "default") -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """SoRA adapter `name` with its zero-gate ranks dropped and the gate folded into B, as a plain LoRA.

    Each layer keeps its own live rank (the config's `rank_pattern`); layers with no live rank are left out.
    The scale alpha / r_max stays in the config, so the LoRA gives the SoRA adapter's outputs.
    """
    layers = sora_layers(model, name)
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module, layer in layers.items():
        down, up = layer.config.lora_factors(layer.adapter_state_dict(), fold_scale=False)
        if down.shape[0] == 0:
            continue
        ranks[module] = int(down.shape[0])
        state[f"{module}.lora_A"] = down.to(layer.lora_A.dtype)
        state[f"{module}.lora_B"] = up.to(layer.lora_B.dtype)
    if not ranks:
        raise AdapterError(f"every gate of adapter {name!r} is zero: the pruned adapter would change nothing")
    rank = max(ranks.values())
    scale = next(iter(layers.values())).scale
    config = LoRAConfig(rank=rank, scale=scale, rank_pattern={m: r for m, r in ranks.items() if r != rank},
                        target_modules=exact_targets(ranks))
    return config, state


def prune(model: nn.Module, name: str = "default") -> LoRAConfig:
    """Replace SoRA adapter `name` by its pruned plain LoRA (same name, same outputs); return the LoRA config."""
    config, state = export_pruned(model, name)
    if any(layer.merged for layer in sora_layers(model, name).values()):
        raise AdapterError(f"unmerge adapter {name!r} before pruning it")
    replace_adapter(model, name, config, state)
    return config


register_method(
    "sora", SoRAConfig, title="SoRA",
    paper="Ding et al., Sparse Low-rank Adaptation of Pre-trained Language Models, EMNLP 2023 (arXiv 2311.11696)",
    property="an L1-gated rank: zero gates are pruned into a smaller LoRA that gives the same outputs",
)
