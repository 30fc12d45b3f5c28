"""DyLoRA: one training run over a range of ranks; afterwards any rank in the range is a plain LoRA.

Valipour et al., "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank
Adaptation", EACL 2023 (arXiv 2210.07558); official code huawei-noah/Efficient-NLP, `DyLoRA/loralib`.

    W_dw in R^{r x d_in} (down, Kaiming-uniform as loralib), W_up in R^{d_out x r} (up, zeros)
    each training step:  b ~ p_B over [r_min, r_max], the same b for every layer of the adapter
    h = W0 x + (alpha / b) * W_up[:, :b] W_dw[:b, :] x

In the "frozen" mode (what the official `run_glue.py` trains with, `set_rank(rank, frozen=True)`) the rows of
W_dw and columns of W_up below b are detached, so only the b-th row/column learns in that step, which orders the
ranks as nested dropout does; in the "updating" mode all first b rows/columns learn. At evaluation any b in the
range is used without retraining, and `export_rank` / `truncate` cut it out as a plain LoRA giving the same
outputs.

Choices the paper leaves open, each a setting:
- `min_rank` (r_min): the code samples b from 1..r, so 1 by default.
- `rank_weights` (p_B): the paper's "pre-defined categorical distribution"; None is the uniform one the paper
  and code use (`torch.randint(0, r)`). `sample_rank` draws from a generator the caller seeds.
- One b per step for the whole adapter, as the code's model-wide `set_rank`; `sample_rank` draws it.
- Scale alpha / b on the product (the paper's equation 7, which the authors confirm; the code reaches the same
  alpha / b as sqrt(r / b) on each factor times alpha / r). Defaults r_max = 8, alpha = 16 from the released
  GLUE scripts (the code has no defaults of its own).
- `init`: "kaiming" (loralib's Kaiming-uniform with a = sqrt(5)) or "gaussian" (std 1 / r, the studio's LoRA).
- A training forward before any rank was sampled uses r_max with every row learning (a plain LoRA step); the
  evaluation rank (`set_rank`) is r_max until set, and `merge` folds the update at that rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
)
from pipelines.adapters.lora import LoRAConfig, init_down

MODES = ("frozen", "updating")
INITS = ("kaiming", "gaussian")


@dataclass
class DyLoRAConfig(AdapterConfig):
    """A rank range [min_rank, rank], the update's alpha (scale alpha / b), and how the range is trained."""

    method = "dylora"

    rank: int = field(default=8, metadata={"help": "r_max, the largest rank (the official scripts: 8)"})
    min_rank: int = field(default=1, metadata={"help": "r_min, the smallest rank sampled (the code: 1)"})
    alpha: float = field(default=16.0, metadata={"help": "the update at rank b is scaled by alpha / b (scripts: 16)"})
    mode: str = field(default="frozen", metadata={
        "help": "frozen: only the b-th row/column learns per step (the code); updating: all first b learn",
        "choices": list(MODES)})
    rank_weights: list[float] | None = field(default=None, metadata={
        "help": "p_B: one weight per rank min_rank..rank; None is uniform (the paper and code)"})
    init: str = field(default="kaiming", metadata={
        "help": "down-projection init: kaiming (loralib) or gaussian (std 1/r)", "choices": list(INITS)})

    def validate(self) -> None:
        if not is_integer(self.rank) or self.rank < 1:
            raise AdapterError(f"DyLoRA rank must be at least 1, not {self.rank}")
        if not is_integer(self.min_rank) or not 1 <= self.min_rank <= self.rank:
            raise AdapterError(f"DyLoRA min_rank must lie in [1, rank={self.rank}], not {self.min_rank}")
        if not is_number(self.alpha) or self.alpha == 0:
            raise AdapterError(f"DyLoRA alpha must be a finite non-zero number, not {self.alpha}")
        if self.mode not in MODES:
            raise AdapterError(f"DyLoRA mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.init not in INITS:
            raise AdapterError(f"DyLoRA init must be one of {', '.join(INITS)}, not {self.init!r}")
        if self.rank_weights is not None:
            weights = self.rank_weights
            count = self.rank - self.min_rank + 1
            if isinstance(weights, tuple):
                weights = self.rank_weights = list(weights)
            if not isinstance(weights, list) or len(weights) != count:
                raise AdapterError(f"DyLoRA rank_weights must hold {count} weights, one per rank "
                                   f"{self.min_rank}..{self.rank}")
            if not all(is_number(w) and w >= 0 for w in weights) or sum(weights) <= 0:
                raise AdapterError("DyLoRA rank_weights must be finite, non-negative and not all zero")

    @property
    def ranks(self) -> range:
        return range(self.min_rank, self.rank + 1)

    def rank_probabilities(self) -> torch.Tensor:
        """p_B as probabilities over `ranks` (float64)."""
        if self.rank_weights is None:
            return torch.full((len(self.ranks),), 1.0 / len(self.ranks), dtype=torch.float64)
        weights = torch.tensor(self.rank_weights, dtype=torch.float64)
        return weights / weights.sum()

    def check_rank(self, rank: int, what: str = "rank") -> int:
        if not is_integer(rank) or not self.min_rank <= rank <= self.rank:
            raise AdapterError(f"{what} {rank!r} is outside the DyLoRA range [{self.min_rank}, {self.rank}]")
        return rank

    # -- export from saved tensors (a package holds the factors, not the layers) ---------------------------

    def export_ranks(self, states: dict[str, dict[str, torch.Tensor]]) -> tuple[int, int]:
        """The ranks a plain LoRA can be cut at: the trained range."""
        return self.min_rank, self.rank

    def check_export_rank(self, rank: int, states: dict[str, dict[str, torch.Tensor]]) -> int:
        return self.check_rank(rank)

    def lora_factors(self, state: dict[str, torch.Tensor], rank: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's `{"lora_A", "lora_B"}` cut to `rank` (default r_max) as LoRA factors, alpha / rank in B."""
        rank = self.rank if rank is None else rank
        down, up = state["lora_A"][:rank], state["lora_B"][:, :rank]
        return down.detach().float().contiguous(), ((self.alpha / rank) * up.detach().float()).contiguous()


class DyLoRALinear(AdapterLayer):
    """A LoRA of rank r_max whose forward uses only its first b ranks, at scale alpha / b."""

    def __init__(self, base_layer: nn.Module, config: DyLoRAConfig | None = None,
                 adapter_name: str = "default") -> None:
        super().__init__(base_layer, adapter_name)
        self.config = config = config or DyLoRAConfig()
        self.max_rank = config.rank
        self.min_rank = config.min_rank
        self.alpha = float(config.alpha)
        self.frozen = config.mode == "frozen"
        # Initialised on the CPU in fp32 (the same factors whatever the device), then moved beside the base.
        down = torch.empty(config.rank, self.in_features)
        if config.init == "kaiming":
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        else:
            init_down(down)
        device = self.original_module().weight.device
        self.lora_A = nn.Parameter(down.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.rank, device=device))
        self.train_rank: int | None = None  # b of the current training step (sample_rank)
        self.eval_rank = config.rank  # b outside training (set_rank)

    @property
    def rank(self) -> int:
        """The rank the next forward pass uses."""
        if self.training and self.train_rank is not None:
            return self.train_rank
        return self.max_rank if self.training else self.eval_rank

    def factors(self, rank: int, *, frozen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_dw[:b], W_up[:, :b]); with `frozen`, every row/column but the b-th cut from the graph."""
        down, up = self.lora_A[:rank], self.lora_B[:, :rank]
        if frozen and rank > 1:
            down = torch.cat([down[: rank - 1].detach(), down[rank - 1:]], dim=0)
            up = torch.cat([up[:, : rank - 1].detach(), up[:, rank - 1:]], dim=1)
        return down, up

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        rank = self.rank
        frozen = self.frozen and self.training and self.train_rank is not None
        down, up = self.factors(rank, frozen=frozen)
        return (self.alpha / rank) * F.linear(F.linear(x.to(down.dtype), down), up)

    def get_delta_weight(self) -> torch.Tensor:
        down, up = self.factors(self.eval_rank)
        return (self.alpha / self.eval_rank) * (up.float() @ down.float())

    def export_lora(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `rank` ranks (default: the evaluation rank) as LoRA factors, alpha / rank folded into B."""
        return self.config.lora_factors(self.adapter_state_dict(), self.eval_rank if rank is None else rank)


DyLoRAConfig.layer_cls = DyLoRALinear


# -- the model-level steps: sample a rank, set the evaluation rank, cut a rank out ------------------------------


def dylora_layers(model: nn.Module, name: str = "default") -> dict[str, DyLoRALinear]:
    """{module: layer} of DyLoRA adapter `name`; an error naming the adapter if it is missing or not DyLoRA."""
    return method_layers(model, name, DyLoRALinear, "DyLoRA")


def _config_of(model: nn.Module, name: str) -> DyLoRAConfig:
    layer = next(iter(dylora_layers(model, name).values()))
    return layer.config


def sample_rank(model: nn.Module, name: str = "default", generator: torch.Generator | None = None) -> int:
    """Draw b from p_B for the next training step and give it to every layer of adapter `name`; return b."""
    config = _config_of(model, name)
    if config.rank_weights is None:
        rank = int(torch.randint(config.min_rank, config.rank + 1, (1,), generator=generator).item())
    else:
        index = int(torch.multinomial(config.rank_probabilities(), 1, generator=generator).item())
        rank = config.min_rank + index
    for layer in dylora_layers(model, name).values():
        layer.train_rank = rank
    return rank


def set_rank(model: nn.Module, rank: int, name: str = "default") -> None:
    """Use the first `rank` ranks of adapter `name` outside training (evaluation, merge, export)."""
    layers = dylora_layers(model, name)
    _config_of(model, name).check_rank(rank)
    if any(layer.merged for layer in layers.values()):
        raise AdapterError(f"unmerge adapter {name!r} before changing its rank")
    for layer in layers.values():
        layer.eval_rank = rank


def export_rank(model: nn.Module, name: str, rank: int) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """The first `rank` ranks of DyLoRA adapter `name` as a plain LoRA: its config and its state dict.

    The config carries the scale alpha / rank and the factors are the DyLoRA ones cut to `rank`, so
    `add_adapter(model, config)` plus `load_adapter_state_dict` give the outputs of the DyLoRA adapter at that
    rank. (Package export folds the scale into B instead, for loaders that know no scale.)
    """
    config = _config_of(model, name)
    config.check_rank(rank)
    state: dict[str, torch.Tensor] = {}
    for module, layer in dylora_layers(model, name).items():
        down, up = layer.factors(rank)
        state[f"{module}.lora_A"] = down.detach().clone()
        state[f"{module}.lora_B"] = up.detach().clone()
    lora = LoRAConfig(rank=rank, scale=config.alpha / rank, target_modules=exact_targets(dylora_layers(model, name)))
    return lora, state


def truncate(model: nn.Module, name: str, rank: int) -> LoRAConfig:
    """Replace DyLoRA adapter `name` by the plain LoRA of its first `rank` ranks (same name, same outputs).

    Refused, with the model untouched, for a rank outside the range or a merged adapter.
    """
    lora, state = export_rank(model, name, rank)
    if any(layer.merged for layer in dylora_layers(model, name).values()):
        raise AdapterError(f"unmerge adapter {name!r} before truncating it")
    replace_adapter(model, name, lora, state)
    return lora


register_method(
    "dylora", DyLoRAConfig, title="DyLoRA",
    paper="Valipour et al., DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free "
          "Low-Rank Adaptation, EACL 2023 (arXiv 2210.07558)",
    property="one training run serves every rank in a range: any rank cut out afterwards is a working LoRA",
)
