"""ExPLoRA: extended self-supervised pre-training of a ViT on a new domain, parameter-efficiently.

    Delta_T = { all parameters of the unfrozen blocks U } + { LoRA on Q and V of the other L - U blocks }

Khanna et al., "ExPLoRA: Parameter-Efficient Extended Pre-Training to Adapt Vision Transformers under Domain
Shifts", ICML 2025 (arXiv 2406.10973); project page and repository samar-khanna/ExPLoRA. The recipe: start from
the source weights W_S (DinoV2 or MAE), "unfreeze all parameters of a subset U of the L ViT blocks (usually just
1 or 2)", put "LoRA with rank r on the Q and V weights in attention layers of all the remaining L - U frozen
blocks", and train these on unlabelled images of the target domain "with the same unsupervised objective as
what was used for W_S". The result is a foundation model for the target domain, then linear-probed or
fine-tuned with LoRA on its labelled task.

The pre-training code was not published in the snapshot read (the repository holds its linear-probe code), and
the paper's method section could not be read; what this follows:
- `unfrozen_blocks=[-1]`: the last block, as the official linear-probe script's checkpoint
  "explora_dino-rgb-blk23r64" (block 23 of ViT-L's 24) and `rank=64` ("r64"). Positions count the blocks
  named by `target_modules` in model order; negative positions count from the end.
- `lora_modules`: the query and value projections under the names transformers' ViT, DINOv2 and BERT-style
  models use (`q_proj`/`v_proj`, `query`/`value`); fused qkv projections are not split.
- The LoRA is the lab's (`LoRALinear`: A Gaussian with std 1/r, B zero, factor `scale`, 1 by default); the
  paper's alpha was not found.
- `unfreeze_norms=True`: the LoRA blocks' normalisation layers train too. The first version of the paper
  (arXiv 2406.10973v1) says ExPLoRA "only unfreezes 1-2 pre-trained ViT blocks and all normalization layers";
  the later versions' abstracts no longer mention the norms, so it is a setting.
- Everything outside the blocks (patch embedding, final norm) stays frozen; train the final norm yourself if
  "all normalization layers" should include it.

Each targeted block is wrapped whole (`wraps_linear = False`): an unfrozen block trains a copy of itself, a LoRA
block runs a view of itself that shares its frozen weights and carries the LoRA on Q and V. The model's own
blocks stay untouched underneath, so `disabled()` is the source model bit for bit and `remove_adapter` gives the
blocks back. A new adapter changes nothing (the copies start equal, the LoRA at zero). Merging is refused. `dino_loss`, `DinoHead`, `ema_update` and `update_center` beside the adapter
are the self-distillation objective (DINO's loss, which DinoV2 keeps for its [CLS] token) for the
extended pre-training, scaled down for small images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.adapters.block_views import (
    BlockViewLayer,
    block_view,
    check_plain_block,
    linear_names,
    replace_module,
)
from pipelines.adapters.core import AdapterConfig, AdapterError, module_slots, register_method
from pipelines.adapters.fields import check_int, check_number
from pipelines.adapters.lora import LoRAConfig, LoRALinear

QV_NAMES = ("q_proj", "v_proj", "query", "value")


@dataclass
class ExPLoRAConfig(AdapterConfig):
    """`target_modules` names the ViT's blocks (e.g. `repeated_layers(vit)`)."""

    method = "explora"

    unfrozen_blocks: list[int] = field(default_factory=lambda: [-1], metadata={
        "help": "positions of the blocks trained in full among the targeted ones (-1: the last, as blk23 of ViT-L)"})
    rank: int = field(default=64, metadata={"help": "LoRA rank on Q and V of the other blocks (official: 64)"})
    scale: float = field(default=1.0, metadata={"help": "the LoRA update's factor (not given in the paper)"})
    lora_modules: list[str] = field(default_factory=lambda: list(QV_NAMES), metadata={
        "help": "projections inside a block that get LoRA (suffixes): Q and V"})
    unfreeze_norms: bool = field(default=True, metadata={
        "help": "also train the normalisation layers of the LoRA blocks (the paper's first version: 'all "
                "normalization layers')"})

    def validate(self) -> None:
        check_int("ExPLoRA", "rank", self.rank)
        check_number("ExPLoRA", "scale", self.scale, 0.0, low_open=True)
        for label in ("unfrozen_blocks", "lora_modules"):
            if isinstance(getattr(self, label), tuple):
                setattr(self, label, list(getattr(self, label)))
        if (not isinstance(self.unfrozen_blocks, list)
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.unfrozen_blocks)):
            raise AdapterError("ExPLoRA unfrozen_blocks must be a list of block positions (whole numbers)")
        if not isinstance(self.lora_modules, list) or not all(isinstance(t, str) and t for t in self.lora_modules):
            raise AdapterError("ExPLoRA lora_modules must be a list of module names")
        if not isinstance(self.unfreeze_norms, bool):
            raise AdapterError(f"ExPLoRA unfreeze_norms must be true or false, not {self.unfreeze_norms!r}")

    def accepts(self, module: nn.Module) -> bool:
        return True

    def unfrozen_positions(self, count: int) -> set[int]:
        """The unfrozen blocks as positions 0 .. count - 1; an error naming a position that does not exist."""
        positions = set()
        for index in self.unfrozen_blocks:
            if not -count <= index < count:
                raise AdapterError(f"ExPLoRA unfrozen block {index} does not exist: the targets hold {count} blocks "
                                   f"(positions 0 to {count - 1}, or -1 for the last)")
            positions.add(index % count)
        if len(positions) != len(self.unfrozen_blocks):
            raise AdapterError(f"ExPLoRA unfrozen_blocks names a block twice: {self.unfrozen_blocks}")
        return positions

    def inject(self, model: nn.Module, name: str, modules: list[str]) -> list[str]:
        slots = {slot.name: slot for slot in module_slots(model)}
        unfrozen = self.unfrozen_positions(len(modules))
        layers = []
        for position, module_name in enumerate(modules):
            block = slots[module_name].occupant
            check_plain_block(module_name, block, "ExPLoRA")
            if position not in unfrozen and not linear_names(block, self.lora_modules):
                raise AdapterError(f"ExPLoRA lora_modules {self.lora_modules!r} names no Linear layer inside "
                                   f"{module_name}")
            layer = ExPLoRABlock(block, self, name, unfrozen=position in unfrozen)
            layer.train(block.training)
            layers.append((slots[module_name], layer))
        for slot, layer in layers:
            slot.put(layer)
        return modules


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's LayerNorm / GroupNorm / RMSNorm, or a model's own class named *Norm."""
    return (isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm))
            or type(module).__name__.lower().endswith("norm"))


class ExPLoRABlock(BlockViewLayer):
    """One ViT block under ExPLoRA: `view` is a trainable copy of the block (`unfrozen`) or the block's frozen
    weights with LoRA on its Q and V projections (and trainable copies of its norms' weights, `unfreeze_norms`)."""

    title = "ExPLoRA"

    def __init__(self, base_layer: nn.Module, config: ExPLoRAConfig | None = None, adapter_name: str = "default",
                 *, unfrozen: bool = False) -> None:
        super().__init__(base_layer, adapter_name)
        self.config = config = config or ExPLoRAConfig()
        self.unfrozen = unfrozen
        if unfrozen:
            copies = {n: nn.Parameter(p.detach().clone()) for n, p in base_layer.named_parameters()}
            self.view = block_view(base_layer, copies)
        else:
            norms = {n: nn.Parameter(p.detach().clone()) for n, p in base_layer.named_parameters()
                     if config.unfreeze_norms and is_norm(base_layer.get_submodule(n.rpartition(".")[0]))}
            view = block_view(base_layer, norms)
            lora = LoRAConfig(rank=config.rank, scale=config.scale)
            for module_name in linear_names(base_layer, config.lora_modules):
                view = replace_module(view, module_name, LoRALinear(view.get_submodule(module_name), lora))
            self.view = view
        for p in self.adapter_parameters():
            p.requires_grad_(True)


ExPLoRAConfig.layer_cls = ExPLoRABlock


# -- the self-distillation objective ----------------------------------------------------------------------------


class DinoHead(nn.Module):
    """DINO's projection head: an MLP to a bottleneck, L2-normalised, then a weight-normalised linear layer to
    `out_dim` prototypes (the last layer's norm fixed at 1, as DINO's `norm_last_layer`)."""

    def __init__(self, in_dim: int, out_dim: int = 256, hidden_dim: int = 256, bottleneck_dim: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1.0)
        self.last.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
              student_temp: float = 0.1, teacher_temp: float = 0.04) -> torch.Tensor:
    """DINO's cross-entropy between the teacher's centred, sharpened softmax of each view and the student's
    log-softmax of every other view, averaged over the pairs: sum_{i != j} H(P_t(v_i), P_s(v_j))."""
    targets = [F.softmax((t.detach() - center) / teacher_temp, dim=-1) for t in teacher]
    logs = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    terms = [-(target * log).sum(-1).mean() for i, target in enumerate(targets)
             for j, log in enumerate(logs) if i != j]
    if not terms:
        raise AdapterError("DINO's loss needs at least two views")
    return sum(terms) / len(terms)


@torch.no_grad()
def update_center(center: torch.Tensor, teacher: list[torch.Tensor], momentum: float = 0.9) -> torch.Tensor:
    """The running mean of the teacher's outputs that DINO subtracts to avoid collapse."""
    return momentum * center + (1 - momentum) * torch.cat(teacher).mean(0, keepdim=True)


@torch.no_grad()
def ema_update(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, tensor by tensor."""
    for t, s in zip(teacher, student, strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)


register_method(
    "explora", ExPLoRAConfig, title="ExPLoRA",
    paper="Khanna et al., ExPLoRA: Parameter-Efficient Extended Pre-Training to Adapt Vision Transformers under "
          "Domain Shifts, ICML 2025 (arXiv 2406.10973)",
    property="extended self-supervised pre-training on the new domain with one block unfrozen and LoRA on Q, V "
             "elsewhere: a better linear probe there for a small trainable fraction",
    mergeable=False,
)
