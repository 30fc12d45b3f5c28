"""Hot-Swap MarkBoard: an n-bit owner signature held by LoRA branches, changed by swapping branches without
retraining, read back by black-box queries, and entangled with the base weights so that removing it hurts.

    branches   bit i has two LoRA branches, (B_i0, A_i0) and (B_i1, A_i1), each rank r
    signature  s in {0, 1}^n selects one branch per bit:  y = W x + scale * sum_i B_{i,s_i} A_{i,s_i} x
    training   branch (i, b) learns to answer bit i's secret trigger inputs T_i with label y_ib (y_i0 != y_i1)
               while keeping the clean task
    swap       changing bit i is selecting its other branch: no training
    verify     query the model on T_i (outputs only); bit i = b where most answers are y_ib
    obfuscate  W <- W - E with E = sum_i P_i Q_i (random, rank `obfuscation_rank` per bit); both branches of
               bit i carry P_i Q_i, so the shipped model equals the marked one while the base without its
               branches is damaged

Zhang, Lv et al., "Hot-Swap MarkBoard: An Efficient Black-box Watermarking Approach for Large-scale Model
Distribution" (ACM MM 2025, arXiv 2507.20650). No official code exists, and the stored copies of the paper stop
after its abstract, which says the method "encodes user-specific n-bit binary signatures by independently
embedding multiple watermarks into a multi-branch Low-Rank Adaptation (LoRA) module, enabling efficient
watermark customization without retraining through branch swapping", that "a parameter obfuscation mechanism
further entangles the watermark weights with those of the base model, preventing removal without degrading
model performance", and that verification is black-box. Everything above the abstract's words is OUR READING:
- two branches per bit, each answering the bit's trigger set with its own label (`two branches per bit`: a
  removed or damaged branch then reads as "undecided", not as a 0);
- `training="independent"` trains each branch alone (`training_branch`: only its factors learn), as the
  abstract's "independently embedding" may be read; `"joint"` trains all bits at once under a random signature
  each step, so every combination is seen in training (on the lab's tiny ViT, branches trained one at a time
  interfere when switched on together more often than jointly trained ones; its experiment defaults to joint);
- the obfuscation: a random low-rank E (Frobenius norm `strength` times the base weight's) is taken out of
  the base weight and spread over the bits, each bit's two branches carrying the same share. Selected branches
  therefore always add E back (any signature, same model), while the base weight alone, or with a bit's branch
  dropped, is W minus (part of) E;
- the targets y_i0, y_i1 and the triggers come from the owner's key (a seed); `trigger_labels` draws them,
  optionally avoiding labels the unmarked model already gives to a bit's triggers (so it reads no bit).

The signature is the layer's state and is saved with the adapter (`signature`, one float per bit: 0, 1, or -1
for a bit whose branches are both off). Keys of the state: `lora_A` (n, 2, r, d_in), `lora_B` (n, 2, d_out, r),
`obfuscation_A` (n, r_o, d_in), `obfuscation_B` (n, d_out, r_o), `signature` (n,).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.adapters.base import AdapterLayer
from pipelines.adapters.core import AdapterConfig, AdapterError, layers_of, register_method
from pipelines.adapters.fields import check_choice, check_int, check_number
from pipelines.adapters.lora import init_down

TRAININGS = ("independent", "joint")
OFF = -1
MAX_BITS = 256


@dataclass
class MarkBoardConfig(AdapterConfig):
    method = "markboard"

    bits: int = field(default=8, metadata={"help": "n: signature length, one pair of branches per bit"})
    rank: int = field(default=2, metadata={"help": "rank r of each branch"})
    scale: float = field(default=1.0, metadata={"help": "the branches' factor (lora_alpha / r)"})
    obfuscation_rank: int = field(default=1, metadata={
        "help": "rank of each bit's share of the base weight the branches carry after obfuscate()"})
    training: str = field(default="independent", metadata={
        "help": "'independent': each branch trained alone (the abstract); 'joint': all bits under random "
                "signatures", "choices": list(TRAININGS)})

    def validate(self) -> None:
        check_int("MarkBoard", "bits", self.bits, 1, MAX_BITS)
        check_int("MarkBoard", "rank", self.rank)
        check_number("MarkBoard", "scale", self.scale, 0.0, low_open=True)
        check_int("MarkBoard", "obfuscation_rank", self.obfuscation_rank, 1)
        check_choice("MarkBoard", "training", self.training, TRAININGS)


class MarkBoardLinear(AdapterLayer):
    """Two rank-r branches per bit; `signature` picks one per bit (or none, -1)."""

    def __init__(self, base_layer: nn.Module, config: MarkBoardConfig | None = None,
                 adapter_name: str = "default") -> None:
        super().__init__(base_layer, adapter_name)
        self.config = config = config or MarkBoardConfig()
        self.scale = float(config.scale)
        n, r, r_o = config.bits, config.rank, config.obfuscation_rank
        down = torch.empty(n, 2, r, self.in_features)
        for branch in down.view(n * 2, r, self.in_features):
            init_down(branch)  # PEFT's gaussian: std 1/r; B starts at zero, so a new adapter changes nothing
        device = self.original_module().weight.device
        self.lora_A = nn.Parameter(down.to(device))
        self.lora_B = nn.Parameter(torch.zeros(n, 2, self.out_features, r, device=device))
        self.register_buffer("obfuscation_A", torch.zeros(n, r_o, self.in_features, device=device))
        self.register_buffer("obfuscation_B", torch.zeros(n, self.out_features, r_o, device=device))
        self.register_buffer("signature", torch.zeros(n, device=device))

    def selected(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors in use, concatenated over the bits that are on: (A (k, d_in), B (d_out, k)), the
        obfuscation shares included and `scale` folded into B."""
        on = (self.signature >= 0).nonzero().flatten()
        choice = self.signature[on].long()
        down = self.lora_A[on, choice]  # (m, r, d_in)
        up = self.lora_B[on, choice]  # (m, d_out, r)
        downs = [down.reshape(-1, self.in_features), self.obfuscation_A[on].reshape(-1, self.in_features)]
        ups = [self.scale * up.permute(1, 0, 2).reshape(self.out_features, -1),
               self.obfuscation_B[on].permute(1, 0, 2).reshape(self.out_features, -1)]
        return torch.cat(downs), torch.cat(ups, dim=1)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.selected()
        return F.linear(F.linear(x.to(down.dtype), down), up)

    def get_delta_weight(self) -> torch.Tensor:
        down, up = self.selected()
        return up.detach().float() @ down.detach().float()

    def export_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        down, up = self.selected()
        return down.detach().float().clone(), up.detach().float().contiguous()


MarkBoardConfig.layer_cls = MarkBoardLinear


def _mark_layers(model: nn.Module, name: str) -> list[MarkBoardLinear]:
    layers = [stack[0] for stack in layers_of(model, name).values()]
    if not layers:
        raise AdapterError(f"the model has no adapter named {name!r}")
    if not all(isinstance(layer, MarkBoardLinear) for layer in layers):
        raise AdapterError(f"adapter {name!r} is not a MarkBoard adapter")
    return layers


# -- signatures -----------------------------------------------------------------------------------------------


def parse_signature(signature: str | Sequence[int | None], bits: int | None = None) -> list[int]:
    """A signature as a list of 0/1 (or -1 for "no branch"): from "1011", or a list of 0, 1 and None.

    With `bits`, a signature longer than that is refused (the branches hold `bits` bits); a shorter one is
    padded with -1 (those bits' branches off).
    """
    if isinstance(signature, str):
        text = signature.replace(" ", "").replace("_", "")
        if not text or any(c not in "01" for c in text):
            raise AdapterError(f"a signature is a string of 0 and 1 (e.g. 10110010), not {signature[:40]!r}")
        values = [int(c) for c in text]
    else:
        values = []
        for bit in signature:
            if bit is None or (not isinstance(bit, bool) and isinstance(bit, int) and bit == OFF):
                values.append(OFF)
            elif isinstance(bit, bool) or bit in (0, 1):
                values.append(int(bit))
            else:
                raise AdapterError(f"signature bits are 0, 1 or None, not {bit!r}")
        if not values:
            raise AdapterError("the signature is empty; give at least one bit")
    if bits is not None:
        if len(values) > bits:
            raise AdapterError(f"the signature has {len(values)} bits but the branches hold {bits} (one pair per bit);"
                               f" shorten it or add an adapter with bits={len(values)}")
        values += [OFF] * (bits - len(values))
    return values


def signature_text(signature: Sequence[int | None]) -> str:
    """[1, 0, None] -> "10-": unreadable or absent bits as '-'."""
    return "".join("-" if b is None or b == OFF else str(int(b)) for b in signature)


def set_signature(model: nn.Module, name: str, signature: str | Sequence[int | None]) -> list[int]:
    """Select one branch per bit (the hot swap: nothing is trained). Returns the signature as set.

    A signature longer than the adapter's bits is refused before anything changes; a shorter one leaves the
    remaining bits' branches off.
    """
    layers = _mark_layers(model, name)
    values = parse_signature(signature, layers[0].config.bits)
    if any(layer.merged for layer in layers):
        raise AdapterError("unmerge the model before swapping branches")
    for layer in layers:
        layer.signature.copy_(torch.tensor(values, dtype=layer.signature.dtype))
    return values


def get_signature(model: nn.Module, name: str) -> list[int]:
    return [int(v) for v in _mark_layers(model, name)[0].signature.tolist()]


@contextlib.contextmanager
def training_branch(model: nn.Module, name: str, bit: int, value: int) -> Iterator[list[nn.Parameter]]:
    """Train one branch alone (MarkBoard's independent embedding): inside, branch (`bit`, `value`) is the only one
    selected and only its rows of `lora_A` / `lora_B` receive gradients; yields the parameters to optimise.

    The gradients of the other branches are zeroed by hooks, so an optimiser without weight decay leaves them
    exactly as they were. The signature before the block comes back after it.
    """
    layers = _mark_layers(model, name)
    bits = layers[0].config.bits
    if isinstance(bit, bool) or not isinstance(bit, int) or not 0 <= bit < bits:
        raise AdapterError(f"bit must be a whole number from 0 to {bits - 1}, not {bit!r}")
    if isinstance(value, bool) or value not in (0, 1):
        raise AdapterError(f"a branch value is 0 or 1, not {value!r}")
    if any(layer.merged for layer in layers):
        raise AdapterError("unmerge the model before training a branch")
    saved = [layer.signature.clone() for layer in layers]
    hooks, params = [], []
    try:
        for layer in layers:
            layer.signature.fill_(OFF)
            layer.signature[bit] = value
            for param in (layer.lora_A, layer.lora_B):
                keep = torch.zeros(param.shape[:2], dtype=param.dtype, device=param.device)
                keep[bit, value] = 1
                keep = keep.view(*keep.shape, 1, 1)
                hooks.append(param.register_hook(lambda grad, keep=keep: grad * keep))
                params.append(param)
        yield params
    finally:
        for hook in hooks:
            hook.remove()
        for layer, signature in zip(layers, saved, strict=True):
            layer.signature.copy_(signature)


# -- the owner's secrets: trigger labels and decoding -----------------------------------------------------------


def trigger_labels(bits: int, num_labels: int, seed: int, avoid: torch.Tensor | None = None) -> torch.Tensor:
    """(bits, 2) target labels, y_i0 != y_i1, drawn from the owner's seed.

    `avoid` (bits, num_labels) bool marks labels not to use for a bit, typically the ones the unmarked model
    already gives to that bit's triggers, so that an unmarked model reads no bit; each bit needs two left.
    """
    if num_labels < 2:
        raise AdapterError("a MarkBoard signature needs a task with at least two labels")
    generator = torch.Generator().manual_seed(seed)
    if avoid is None:
        first = torch.randint(num_labels, (bits,), generator=generator)
        offset = torch.randint(1, num_labels, (bits,), generator=generator)
        return torch.stack([first, (first + offset) % num_labels], dim=1)
    if tuple(avoid.shape) != (bits, num_labels):
        raise AdapterError(f"avoid must have shape ({bits}, {num_labels}), not {tuple(avoid.shape)}")
    labels = []
    for row in avoid.bool():
        allowed = (~row).nonzero().flatten()
        if len(allowed) < 2:
            raise AdapterError("every bit needs two labels it does not avoid")
        labels.append(allowed[torch.randperm(len(allowed), generator=generator)[:2]])
    return torch.stack(labels)


@dataclass
class Decoded:
    """What black-box queries read: per bit the value (None when neither label wins) and the share of the
    trigger queries answered with each bit's label for 1 and for 0."""

    bits: list[int | None]
    ones: list[float]
    zeros: list[float]

    @property
    def text(self) -> str:
        return signature_text(self.bits)


def decode_signature(answers: Sequence[torch.Tensor], labels: torch.Tensor, threshold: float = 0.5) -> Decoded:
    """Read bit i from the model's answers (predicted labels) to trigger set i: the branch whose label gets more
    than `threshold` of the answers wins; otherwise the bit is unreadable (None)."""
    bits, ones, zeros = [], [], []
    for i, predicted in enumerate(answers):
        predicted = predicted.flatten()
        share0 = float((predicted == labels[i, 0]).float().mean()) if len(predicted) else 0.0
        share1 = float((predicted == labels[i, 1]).float().mean()) if len(predicted) else 0.0
        zeros.append(share0)
        ones.append(share1)
        bits.append(1 if share1 > threshold else 0 if share0 > threshold else None)
    return Decoded(bits, ones, zeros)


# -- obfuscation ------------------------------------------------------------------------------------------------


@torch.no_grad()
def obfuscate(model: nn.Module, name: str, strength: float = 1.0, seed: int = 0) -> None:
    """Take a random low-rank E out of each adapted base weight and give every bit's branches a share of it.

    E_i = P_i Q_i per bit (rank `obfuscation_rank`), sum_i E_i scaled to `strength` times the base weight's
    Frobenius norm. The base weight becomes W - E (written into the model on purpose: this is the model as
    shipped); any signature's branches add their bits' shares back, so outputs stay those of W plus the
    watermark, while the base alone (`disabled`, or the branches removed) computes with W - E. A bit whose
    branches are off loses its share. `deobfuscate` puts E back.
    """
    check_number("MarkBoard", "strength", strength, 0.0, low_open=True)
    layers = _mark_layers(model, name)
    if any(layer.merged for layer in layers):
        raise AdapterError("unmerge the model before obfuscating")
    if any(bool(layer.obfuscation_B.abs().sum() > 0) for layer in layers):
        raise AdapterError(f"adapter {name!r} is obfuscated already; deobfuscate it first")
    generator = torch.Generator().manual_seed(seed)
    for layer in layers:
        weight = layer.original_module().weight
        n, r_o = layer.config.bits, layer.config.obfuscation_rank
        left = torch.randn(n, layer.out_features, r_o, generator=generator)
        right = torch.randn(n, r_o, layer.in_features, generator=generator)
        shares = left @ right
        factor = strength * weight.detach().float().norm() / shares.sum(0).norm().clamp_min(1e-12)
        left, right = left * factor.sqrt(), right * factor.sqrt()
        layer.obfuscation_B.copy_(left.to(layer.obfuscation_B.device))
        layer.obfuscation_A.copy_(right.to(layer.obfuscation_A.device))
        total = (layer.obfuscation_B @ layer.obfuscation_A).sum(0)
        weight.data = (weight.data.float() - total.to(weight.device)).to(weight.dtype)


@torch.no_grad()
def deobfuscate(model: nn.Module, name: str) -> None:
    """Give the base weights their E back and empty the branches' shares."""
    layers = _mark_layers(model, name)
    if any(layer.merged for layer in layers):
        raise AdapterError("unmerge the model before deobfuscating")
    for layer in layers:
        weight = layer.original_module().weight
        total = (layer.obfuscation_B @ layer.obfuscation_A).sum(0)
        weight.data = (weight.data.float() + total.to(weight.device)).to(weight.dtype)
        layer.obfuscation_A.zero_()
        layer.obfuscation_B.zero_()


register_method(
    "markboard", MarkBoardConfig, title="Hot-Swap MarkBoard",
    paper="Zhang, Lv et al., Hot-Swap MarkBoard: An Efficient Black-box Watermarking Approach for Large-scale "
          "Model Distribution, ACM MM 2025 (arXiv 2507.20650)",
    property="an n-bit signature in LoRA branches, changed by swapping branches, read by black-box queries",
)
