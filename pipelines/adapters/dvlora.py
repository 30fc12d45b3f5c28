"""DV-LoRA (EndoDAC): LoRA with trainable scaling vectors, trained in two phases.

    y = W0 x + (alpha / r) * diag(v) B diag(u) A x

Cui et al., "EndoDAC: Efficient Adapting Foundation Model for Self-Supervised Depth Estimation from Any
Endoscopic Camera", MICCAI 2024 (arXiv 2405.08672); official code BeileiCui/EndoDAC, `DVLinear` in
models/backbones/mylora/layers.py and the schedule in trainer_end_to_end.py. Phase 1 trains the matrices A and
B with the vectors held at their initial values; after `warmup_steps` steps phase 2 freezes A and B and trains
only u (one entry per rank) and v (one per output feature), a few hundred numbers per layer. The update is
a product of matrices, so it merges into the base weight.

Defaults follow the official code: rank 4 and alpha = rank (EndoDAC builds every DVLinear with
`lora_alpha=r`, so the factor is 1); A Kaiming-uniform with a = sqrt(5) (bound 1/sqrt(d_in)), B zero (a new
adapter changes nothing); u and v Kaiming-uniform with a = sqrt(5) on (n, 1) tensors, which is uniform in
[-1, 1]; no dropout; phase 2 from step 20,000.

Choices left open, each a setting:
- `alpha=None` means alpha = rank (EndoDAC's use); `DVLinear`'s own default alpha 1 is `alpha=1`.
- `vector_init`: "kaiming-uniform" (official: phase 1 trains B diag(u) A with random, fixed u and v, whose
  signs B and A absorb) or "ones" (phase 1 is then exactly LoRA).
- EndoDAC also trains convolutional necks and the depth head in both phases; those are the model's own
  modules, not the adapter's, and stay the caller's choice.
- The phase is the layer's state, not the config's: a loaded adapter starts in phase 1; call `set_phase`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.adapters.base import AdapterLayer
from pipelines.adapters.core import AdapterConfig, AdapterError, layers_of, register_method
from pipelines.adapters.fields import check_choice, check_int, check_number

PHASES = (1, 2)
VECTOR_INITS = ("kaiming-uniform", "ones")


@dataclass
class DVLoRAConfig(AdapterConfig):
    method = "dv-lora"

    rank: int = field(default=4, metadata={"help": "rank r of B A (EndoDAC: 4)"})
    alpha: float | None = field(default=None, metadata={
        "help": "the update is multiplied by alpha / r; None means alpha = r (EndoDAC's use, factor 1)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input (EndoDAC: 0)"})
    vector_init: str = field(default="kaiming-uniform", metadata={
        "help": "initial u and v: 'kaiming-uniform' (official, uniform in [-1, 1]) or 'ones'",
        "choices": list(VECTOR_INITS)})
    warmup_steps: int = field(default=20_000, metadata={
        "help": "steps of phase 1 (A, B) before phase 2 (u, v only); EndoDAC's warm_up_step"})

    def validate(self) -> None:
        check_int("DV-LoRA", "rank", self.rank)
        if self.alpha is not None:
            check_number("DV-LoRA", "alpha", self.alpha, 0.0, low_open=True)
        check_number("DV-LoRA", "dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_choice("DV-LoRA", "vector_init", self.vector_init, VECTOR_INITS)
        check_int("DV-LoRA", "warmup_steps", self.warmup_steps, minimum=0)

    @property
    def scale(self) -> float:
        alpha = self.rank if self.alpha is None else self.alpha
        return float(alpha) / self.rank


def _kaiming_uniform(*shape: int) -> torch.Tensor:
    """nn.Linear's default initialisation (Kaiming-uniform, a = sqrt(5)) of a tensor of `shape`."""
    tensor = torch.empty(*shape)
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
    return tensor


class DVLoRALinear(AdapterLayer):
    """`lora_A` (r, d_in), `lora_B` (d_out, r), `lora_u` (r,), `lora_v` (d_out,); `phase` 1 or 2."""

    def __init__(self, base_layer: nn.Module, config: DVLoRAConfig | None = None,
                 adapter_name: str = "default") -> None:
        super().__init__(base_layer, adapter_name)
        self.config = config = config or DVLoRAConfig()
        self.scale = config.scale
        # Drawn on the CPU in fp32 in the official order (A, B, u, v), then moved beside the base weight.
        down = _kaiming_uniform(config.rank, self.in_features)
        up = torch.zeros(self.out_features, config.rank)
        if config.vector_init == "ones":
            u, v = torch.ones(config.rank), torch.ones(self.out_features)
        else:
            u = _kaiming_uniform(config.rank, 1).flatten()
            v = _kaiming_uniform(self.out_features, 1).flatten()
        device = self.original_module().weight.device
        self.lora_A = nn.Parameter(down.to(device))
        self.lora_B = nn.Parameter(up.to(device))
        self.lora_u = nn.Parameter(u.to(device))
        self.lora_v = nn.Parameter(v.to(device))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.phase = 1
        self.set_phase(1)

    # -- phases --------------------------------------------------------------------------------------------

    def phase_parameters(self, phase: int) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B] if phase == 1 else [self.lora_u, self.lora_v]

    def set_phase(self, phase: int) -> None:
        if phase not in PHASES:
            raise AdapterError(f"DV-LoRA phase must be 1 (train A and B) or 2 (train u and v), not {phase!r}")
        self.phase = phase
        trained = {id(p) for p in self.phase_parameters(phase)}
        for p in (self.lora_A, self.lora_B, self.lora_u, self.lora_v):
            p.requires_grad_(id(p) in trained)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The parameters the current phase trains (the state dict still holds all four)."""
        return self.phase_parameters(self.phase)

    # -- the update ----------------------------------------------------------------------------------------

    def scaled_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(diag(u) A, diag(v) B), the factors of the update without the alpha / r factor."""
        return self.lora_u[:, None] * self.lora_A, self.lora_v[:, None] * self.lora_B

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.scaled_factors()
        x = self.dropout(x.to(down.dtype))
        return self.scale * F.linear(F.linear(x, down), up)

    def get_delta_weight(self) -> torch.Tensor:
        down, up = self.scaled_factors()
        return self.scale * (up.float() @ down.float())

    def export_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        down, up = self.scaled_factors()
        return down.detach().float().clone(), (self.scale * up.detach().float()).contiguous()


DVLoRAConfig.layer_cls = DVLoRALinear


def _dv_layers(model: nn.Module, name: str) -> list[DVLoRALinear]:
    layers = [layer for stack in layers_of(model, name).values() for layer in stack]
    if not layers:
        raise AdapterError(f"the model has no adapter named {name!r}")
    if not all(isinstance(layer, DVLoRALinear) for layer in layers):
        raise AdapterError(f"adapter {name!r} is not a DV-LoRA adapter")
    return layers


def set_phase(model: nn.Module, name: str, phase: int) -> None:
    """Phase 1 trains A and B of adapter `name`; phase 2 freezes them and trains only u and v.

    `trainable_parameters(model, name)` follows the phase, so an optimiser built after the switch gets
    exactly the parameters the phase trains.
    """
    # The first layer refuses a bad phase before any layer changes.
    for layer in _dv_layers(model, name):
        layer.set_phase(phase)


def get_phase(model: nn.Module, name: str) -> int:
    return _dv_layers(model, name)[0].phase


def phase_at_step(model: nn.Module, name: str, step: int) -> int:
    """Set and return the phase EndoDAC's schedule gives at training step `step` (0-based)."""
    warmup = _dv_layers(model, name)[0].config.warmup_steps
    phase = 1 if step < warmup else 2
    set_phase(model, name, phase)
    return phase


register_method(
    "dv-lora", DVLoRAConfig, title="DV-LoRA (EndoDAC)",
    paper="Cui et al., EndoDAC: Efficient Adapting Foundation Model for Self-Supervised Depth Estimation from "
          "Any Endoscopic Camera, MICCAI 2024 (arXiv 2405.08672)",
    property="LoRA with scaling vectors: phase 1 trains the matrices, phase 2 only the vectors",
)
