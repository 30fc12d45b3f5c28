"""CBQ: post-training quantisation of a model's Linear layers, with learned step sizes and LoRA-Rounding.

    W_q = S (clamp(floor(W' / S) + 1[V >= 0] + z, 0, 2^b - 1) - z),   W' = clip(W, +-t) diag(s)
    V = V0 + A1 A2,   V0 = -log((zeta - gamma) / (rest - gamma) - 1),   rest = W' / S - floor(W' / S)
    y = quant_act(x / s) W_q^T + bias

Ding et al., "CBQ: Cross-Block Quantization for Large Language Models", ICLR 2025 (arXiv 2312.07950). The layer
here is the quantised linear layer; `cbq_calibrate` (calibrate.py) learns its step sizes S and rounding
factors A1 (d_out x r), A2 (r x d_in) by cross-block reconstruction, after the coarse-to-fine preprocessing
(CFP) has set the weight clip t and the activation scales s.

No official code was found, and the stored copies of the paper stop before its method section: the equations
follow the abstract and two third-party summaries (research note, section 8), and the pieces they leave open
follow the methods CBQ builds on, named below. What the summaries give: a sliding window of blocks (two
blocks, overlap one) whose quantisation steps and rounding are learned jointly, the loss ||h_fp - h_q||^2 +
KL(softmax(h_fp) || softmax(h_q)), LoRA-Rounding as AdaRound's rectified sigmoid h(V) = clamp(sigmoid(V)
(zeta - gamma) + gamma, 0, 1) of a low-rank V = A1 A2 (d_in d_out learned numbers become (d_in + d_out) r)
with AdaRound's regulariser, and CFP's outlier threshold Q3 + 1.5 IQR refined by an inter-set against
intra-set measure, truncating weight outliers and scaling activation outlier channels.

Choices of ours, each a setting:
- LoRA-Rounding's low-rank factors are learned offsets on AdaRound's initial logits V0, which AdaRound stores
  per weight and which follow here from W' and S: h(V0) is each weight's fractional part, so 1[V0 >= 0] is
  round-to-nearest and a new adapter (A1 = 0, A2 Kaiming-uniform as a LoRA down-projection) starts at RTN. A
  rank-r V alone cannot start there.
- `relaxation="ste"` reconstructs with the hard rounding and h(V)'s gradient (straight through), so what is
  optimised is what is kept; "soft" is AdaRound's: h(V) while reconstructing, with the regulariser
  round_weight * mean(1 - |2 h - 1|^beta) (AdaRound sums it; the mean keeps it on the scale of a small model's
  reconstruction loss), hardened afterwards.
- Weights: uniform asymmetric, per output channel (`group_size=0`) or in groups along the input, initialised
  by min-max and its zero point kept; the step size S is learned (`learn_step`).
- `rounding`: "lora" (LoRA-Rounding, rank `rank`, default 4), "full" (AdaRound's dense V, the block-wise
  baseline of the research note) or "nearest" (no learned rounding: RTN, or step sizes only). zeta = 1.1 and
  gamma = -0.1 are AdaRound's.
- Activations (`act_bits` < 16): dynamic per-token asymmetric quantisation with a straight-through gradient
  (OmniQuant's activation setting); the paper learns an activation step S^X, not read. Such an adapter cannot
  be merged; a weight-only one merges W_q diag(1/s) into the weight.
- Outside calibration the rounding is hard, so a loaded adapter gives the calibrated model exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.adapters.base import AdapterLayer
from pipelines.adapters.core import AdapterConfig, AdapterError, module_slots, register_method
from pipelines.adapters.fields import check_choice, check_int, check_number

ROUNDINGS = ("lora", "full", "nearest")
RELAXATIONS = ("ste", "soft")
TARGETS = ("homologous", "full-precision")


@dataclass
class CBQConfig(AdapterConfig):
    method = "cbq"

    # -- the quantised layer -----------------------------------------------------------------------------------
    bits: int = field(default=4, metadata={"help": "weight bits (the paper: W4A16, W4A8, W4A4, W2A16)"})
    group_size: int = field(default=0, metadata={
        "help": "input features sharing one step size; 0: one step per output channel"})
    act_bits: int = field(default=16, metadata={"help": "activation bits; 16 leaves activations unquantised"})
    rounding: str = field(default="lora", metadata={
        "help": "'lora': LoRA-Rounding; 'full': AdaRound's dense V; 'nearest': round to nearest",
        "choices": list(ROUNDINGS)})
    rank: int = field(default=4, metadata={"help": "rank r of LoRA-Rounding's V = A1 A2 (not read: ours)"})
    relaxation: str = field(default="ste", metadata={
        "help": "while reconstructing: 'ste' rounds hard with h(V)'s gradient; 'soft' uses h(V) (AdaRound)",
        "choices": list(RELAXATIONS)})
    zeta: float = field(default=1.1, metadata={"help": "rectified sigmoid stretch zeta (AdaRound: 1.1)"})
    gamma: float = field(default=-0.1, metadata={"help": "rectified sigmoid stretch gamma (AdaRound: -0.1)"})
    # -- cross-block reconstruction (cbq_calibrate) ------------------------------------------------------------
    window_size: int = field(default=2, metadata={"help": "blocks reconstructed together (secondary: 2)"})
    overlap: int = field(default=1, metadata={"help": "blocks two windows share (secondary: 1)"})
    steps: int = field(default=200, metadata={"help": "optimiser steps a window (scaled down: ours)"})
    learning_rate: float = field(default=1e-2, metadata={"help": "Adam learning rate of the rounding (ours)"})
    step_learning_rate: float = field(default=1e-4, metadata={"help": "Adam learning rate of the step sizes"})
    learn_step: bool = field(default=True, metadata={"help": "learn the weight step sizes S^W too"})
    round_weight: float = field(default=0.01, metadata={
        "help": "weight of the rounding regulariser with relaxation 'soft' (AdaRound: 0.01)"})
    beta_start: float = field(default=20.0, metadata={"help": "regulariser exponent at the start (AdaRound)"})
    beta_end: float = field(default=2.0, metadata={"help": "regulariser exponent at the end (AdaRound)"})
    warmup: float = field(default=0.2, metadata={"help": "share of a window's steps without the regulariser"})
    kl_weight: float = field(default=1.0, metadata={"help": "weight of the KL term of the loss"})
    target: str = field(default="homologous", metadata={
        "help": "'homologous': the full-precision window on the quantised window's own inputs; "
                "'full-precision': on the full-precision model's inputs", "choices": list(TARGETS)})
    cfp: bool = field(default=True, metadata={"help": "coarse-to-fine preprocessing of outliers first"})
    iqr_factor: float = field(default=1.5, metadata={"help": "CFP's coarse threshold Q3 + k IQR"})
    cfp_lambda: float = field(default=1.0, metadata={"help": "CFP's weight of the intra-set variance"})
    act_migration: float = field(default=0.5, metadata={
        "help": "activation outlier channels are divided by (max / threshold)^alpha (SmoothQuant's 0.5)"})

    def validate(self) -> None:
        check_int("CBQ", "bits", self.bits, minimum=2, maximum=8)
        check_int("CBQ", "group_size", self.group_size, minimum=0)
        check_int("CBQ", "act_bits", self.act_bits, minimum=2, maximum=16)
        check_choice("CBQ", "rounding", self.rounding, ROUNDINGS)
        check_int("CBQ", "rank", self.rank, minimum=1)
        check_choice("CBQ", "relaxation", self.relaxation, RELAXATIONS)
        check_number("CBQ", "zeta", self.zeta, 1.0, 10.0, low_open=True)
        check_number("CBQ", "gamma", self.gamma, -10.0, 0.0, high_open=True)
        check_int("CBQ", "window_size", self.window_size, minimum=1)
        check_int("CBQ", "overlap", self.overlap, minimum=0)
        if self.overlap >= self.window_size:
            raise AdapterError(f"CBQ overlap must be smaller than window_size {self.window_size}, not {self.overlap}")
        check_int("CBQ", "steps", self.steps, minimum=0, maximum=1_000_000)
        check_number("CBQ", "learning_rate", self.learning_rate, 0.0, 10.0, low_open=True)
        check_number("CBQ", "step_learning_rate", self.step_learning_rate, 0.0, 10.0, low_open=True)
        check_choice("CBQ", "learn_step", self.learn_step, (True, False))
        check_number("CBQ", "round_weight", self.round_weight, 0.0)
        check_number("CBQ", "beta_start", self.beta_start, 0.0, low_open=True)
        check_number("CBQ", "beta_end", self.beta_end, 0.0, low_open=True)
        check_number("CBQ", "warmup", self.warmup, 0.0, 1.0, high_open=True)
        check_number("CBQ", "kl_weight", self.kl_weight, 0.0)
        check_choice("CBQ", "target", self.target, TARGETS)
        check_choice("CBQ", "cfp", self.cfp, (True, False))
        check_number("CBQ", "iqr_factor", self.iqr_factor, 0.0)
        check_number("CBQ", "cfp_lambda", self.cfp_lambda, 0.0)
        check_number("CBQ", "act_migration", self.act_migration, 0.0, 1.0)

    def inject(self, model: nn.Module, name: str, modules: list[str]) -> list[str]:
        slots = {slot.name: slot for slot in module_slots(model)}
        for module in modules:
            slot = slots[module]
            if isinstance(slot.occupant, AdapterLayer):
                raise AdapterError(f"CBQ quantises the weight of {module} itself and must be the first adapter on "
                                   "it; remove the other adapter first")
            in_features = slot.original.in_features
            if self.group_size and in_features % self.group_size:
                raise AdapterError(f"CBQ group_size {self.group_size} does not divide the {in_features} input "
                                   f"features of {module}; use a divisor or 0 (one step per output channel)")
            if self.rounding == "lora" and self.rank > min(in_features, slot.original.out_features):
                raise AdapterError(f"CBQ rank {self.rank} exceeds the smaller side of {module}")
        return super().inject(model, name, modules)


def rectified_sigmoid(v: torch.Tensor, zeta: float, gamma: float) -> torch.Tensor:
    """AdaRound's h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)."""
    return (torch.sigmoid(v) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def adaround_init(rest: torch.Tensor, zeta: float, gamma: float) -> torch.Tensor:
    """V with h(V) = rest (the fractional part of W / S, in [0, 1)): AdaRound's initialisation."""
    return -torch.log((zeta - gamma) / (rest - gamma) - 1.0)


def quantize_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token asymmetric fake quantisation with a straight-through gradient."""
    top = 2.0**bits - 1.0
    low, high = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    step = ((high - low) / top).clamp_min(1e-8)
    zero = torch.round(-low / step)
    quantized = (torch.clamp(torch.round(x / step) + zero, 0, top) - zero) * step
    return x + (quantized - x).detach()


class CBQLinear(AdapterLayer):
    """Learned: `step` (d_out, groups) and the rounding offsets, `round_A` (d_out, r) and `round_B` (r, d_in)
    (or `round_V` (d_out, d_in) for "full"). Buffers: `zero_point` (d_out, groups), `weight_clip` (1,) and
    `act_scale` (d_in,), the last two set by CFP."""

    def __init__(self, base_layer: nn.Module, config: CBQConfig | None = None, adapter_name: str = "default") -> None:
        super().__init__(base_layer, adapter_name)
        self.config = config = config or CBQConfig()
        self.top = 2.0**config.bits - 1.0
        self.group = config.group_size or self.in_features
        groups = self.in_features // self.group
        weight = self.original_module().weight.detach().float()
        device = weight.device
        self.relaxation: str | None = None  # cbq_calibrate sets "ste" or "soft" while it reconstructs
        self.step = nn.Parameter(torch.ones(self.out_features, groups, device=device))
        self.register_buffer("zero_point", torch.zeros(self.out_features, groups, device=device))
        # No clipping until CFP finds outliers: the largest |w| (a finite number, as saved states must hold).
        self.register_buffer("weight_clip", weight.abs().amax().reshape(1).to(device))
        self.register_buffer("act_scale", torch.ones(self.in_features, device=device))
        if config.rounding == "lora":
            # A1 from zero and A2 as LoRA's down-projection (Kaiming-uniform), drawn on the CPU in fp32.
            a2 = torch.empty(config.rank, self.in_features)
            nn.init.kaiming_uniform_(a2, a=math.sqrt(5))
            self.round_A = nn.Parameter(torch.zeros(self.out_features, config.rank, device=device))
            self.round_B = nn.Parameter(a2.to(device))
        elif config.rounding == "full":
            self.round_V = nn.Parameter(torch.zeros(self.out_features, self.in_features, device=device))
        self.reset_quantizer()

    # -- the quantiser -------------------------------------------------------------------------------------

    def scaled_weight(self) -> torch.Tensor:
        """W' = clip(W, +-t) diag(s): the weight the grid quantises (fp32)."""
        weight = self.original_module().weight.float()
        clip = self.weight_clip.float()
        return torch.maximum(torch.minimum(weight, clip), -clip) * self.act_scale.float()[None, :]

    def _per_weight(self, values: torch.Tensor) -> torch.Tensor:
        return values.repeat_interleave(self.group, dim=1)

    @torch.no_grad()
    def reset_quantizer(self) -> None:
        """Min-max step sizes and zero points of W' (round to nearest there)."""
        weight = self.scaled_weight().view(self.out_features, -1, self.group)
        low, high = weight.amin(dim=-1), weight.amax(dim=-1)
        step = ((high - low) / self.top).clamp_min(1e-8)
        self.step.copy_(step)
        self.zero_point.copy_(torch.round(-low / step))

    def learned_offsets(self) -> torch.Tensor | None:
        """The learned part of V: A1 A2 for LoRA-Rounding, the dense offsets for "full", None for RTN."""
        if self.config.rounding == "lora":
            return self.round_A @ self.round_B
        if self.config.rounding == "full":
            return self.round_V
        return None

    def rounding_logits(self, rest: torch.Tensor) -> torch.Tensor | None:
        """V = V0(rest) + learned offsets, V0 AdaRound's initialisation: h(V0) is the fractional part itself."""
        offsets = self.learned_offsets()
        if offsets is None:
            return None
        return adaround_init(rest.detach(), self.config.zeta, self.config.gamma) + offsets

    def rounding_offsets(self, ratio: torch.Tensor) -> torch.Tensor:
        """What is added to floor(W' / S): 1[V >= 0] (round to nearest while the learned offsets are zero);
        h(V) when calibrating with "soft"; the hard value with h(V)'s gradient when calibrating with "ste"."""
        rest = ratio - torch.floor(ratio)
        v = self.rounding_logits(rest)
        if v is None:
            return (rest >= 0.5).to(ratio.dtype).detach()
        hard = (v >= 0).to(ratio.dtype)
        if self.relaxation is None:
            return hard
        soft = rectified_sigmoid(v, self.config.zeta, self.config.gamma)
        return soft if self.relaxation == "soft" else hard + (soft - soft.detach())

    def rounding_regularizer(self, beta: float) -> torch.Tensor:
        """AdaRound's 1 - |2 h(V) - 1|^beta, averaged over the weights (zero for round to nearest)."""
        step = self._per_weight(self.step.abs().clamp_min(1e-8))
        ratio = self.scaled_weight() / step
        v = self.rounding_logits(ratio - torch.floor(ratio))
        if v is None:
            return self.step.new_zeros(())
        h = rectified_sigmoid(v, self.config.zeta, self.config.gamma)
        return (1 - (2 * h - 1).abs().pow(beta)).mean()

    def integer_weight(self) -> torch.Tensor:
        """The grid indices clamp(floor(W'/S) + offset + z, 0, 2^b - 1) (fractional while rounding is soft)."""
        step = self._per_weight(self.step.abs().clamp_min(1e-8))
        ratio = self.scaled_weight() / step
        base = torch.floor(ratio).detach()
        return torch.clamp(base + self.rounding_offsets(ratio) + self._per_weight(self.zero_point), 0, self.top)

    def quantized_weight(self) -> torch.Tensor:
        """W_q = S (q - z), the quantised W' (fp32)."""
        step = self._per_weight(self.step.abs().clamp_min(1e-8))
        return (self.integer_weight() - self._per_weight(self.zero_point)) * step

    def rounding_parameter_count(self) -> int:
        """The learned rounding's numbers: r (d_out + d_in) for LoRA-Rounding, d_out d_in for AdaRound's V."""
        return sum(p.numel() for n, p in self.named_parameters(recurse=False) if n.startswith("round_"))

    # -- forward and merge ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.applies:
            return self.base_layer(x, *args, **kwargs)
        inputs = x.float() / self.act_scale.float()
        if self.config.act_bits < 16:
            inputs = quantize_activations(inputs, self.config.act_bits)
        bias = getattr(self.original_module(), "bias", None)
        out = F.linear(inputs, self.quantized_weight(), None if bias is None else bias.float())
        return out.to(x.dtype)

    def get_delta_weight(self) -> torch.Tensor:
        if self.config.act_bits < 16:
            raise AdapterError(f"a CBQ adapter that quantises activations to {self.config.act_bits} bits cannot be "
                               "merged into the weights (the quantiser sits in the forward pass)")
        weight = self.original_module().weight.float()
        return self.quantized_weight() / self.act_scale.float()[None, :] - weight


CBQConfig.layer_cls = CBQLinear

register_method(
    "cbq", CBQConfig, title="CBQ", identity_at_init=False,
    paper="Ding et al., CBQ: Cross-Block Quantization for Large Language Models, ICLR 2025 (arXiv 2312.07950)",
    property="post-training quantisation reconstructed over windows of blocks, with low-rank learned rounding",
)
