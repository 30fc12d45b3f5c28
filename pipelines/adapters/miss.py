"""MiSS (formerly Bone): PEFT's own implementation behind the registry, so every verb works on it.

    y = W0 x + D (x^(1) + x^(2) + ... + x^(g)),   x^(i) the i-th r-wide chunk of x,  D (d_out x r) from zero

Kang et al., "MiSS: Revisiting the Trade-off in LoRA with an Efficient Shard-Sharing Structure" (arXiv
2409.15371, formerly Bone / DiSHA); PEFT's `MissConfig` and `peft.tuners.miss.layer.MissLinear` (PEFT 0.17+).
The layer here holds PEFT's `MissLinear` and calls its forward, its initialisation and its weight updates; it
adds the studio's verbs: named adapters, `disabled()`, merge with an exact unmerge (the saved weight comes back
bit for bit, where PEFT inverts (I + D) for "bat"), save/load and remove.

PEFT's modes (`init_weights`), with PEFT's defaults r = 64, mini_r = 1, dropout 0:
- True (balanced MiSS): `miss_block` (r, d_out) from zero; the update adds D to every r-wide column block of W.
- "bat" (Bone's block-affine transform): W is cut into r x r blocks W_ij and `miss_block` (d_out / r, r, r)
  holds one D_i per row of blocks, W'_ij = W_ij + W_ij D_i + D_i; the forward rebuilds W' from the base weight,
  so both feature counts must be multiples of r.
- "mini": `miss_block` (r, mini_r) repeated d_out / mini_r times along the output: r * mini_r numbers a layer.
- False: the balanced shape drawn Kaiming-uniform (not an identity at the start).

Choices of this wrapper:
- The base module is registered once, inside PEFT's layer (`self.miss.base_layer`); `base_layer` here reads
  it through, so the model's state dict holds each base weight once.
- PEFT's adapter name inside each layer is always "default" (one adapter per layer here; several named
  adapters stack as layers), so the state keys do not depend on the name an adapter is loaded under.
- A "bat" adapter must be the first adapter on its module: its forward rebuilds the layer from the base weight
  and bias and would skip any adapter under it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipelines.adapters.base import AdapterLayer
from pipelines.adapters.core import AdapterConfig, AdapterError, register_method
from pipelines.adapters.fields import check_choice, check_int, check_number

INIT_MODES = (True, False, "bat", "mini")
PEFT_ADAPTER = "default"


@dataclass
class MissConfig(AdapterConfig):
    """The fields of PEFT's `MissConfig` that shape a layer, with PEFT's defaults."""

    method = "miss"

    rank: int = field(default=64, metadata={"help": "r: the width of the input chunks and of D (PEFT: 64)"})
    mini_r: int = field(default=1, metadata={"help": "output width of D in 'mini' mode (PEFT: 1)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input (PEFT: 0)"})
    init_weights: bool | str = field(default=True, metadata={
        "help": "True: balanced MiSS; 'bat': block-affine; 'mini': fewer parameters; False: random D",
        "choices": list(INIT_MODES)})

    def validate(self) -> None:
        check_int("MiSS", "rank", self.rank)
        check_int("MiSS", "mini_r", self.mini_r)
        check_number("MiSS", "dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_choice("MiSS", "init_weights", self.init_weights, INIT_MODES)

    def peft_config(self, **extra: Any):
        """The same settings as PEFT's own `MissConfig` (extra fields such as target_modules pass through)."""
        from peft import MissConfig as PeftMissConfig

        return PeftMissConfig(r=self.rank, mini_r=self.mini_r, miss_dropout=self.dropout,
                              init_weights=self.init_weights, **extra)

    def check_fits(self, in_features: int, out_features: int) -> None:
        """One clear line where PEFT would refuse (or silently misfit) a layer of these sizes."""
        size = f"{in_features} -> {out_features}"
        if self.rank > in_features:
            raise AdapterError(f"MiSS rank {self.rank} exceeds the {in_features} input features of a {size} layer")
        if self.init_weights == "bat" and (in_features % self.rank or out_features % self.rank):
            raise AdapterError(f"MiSS 'bat' needs both feature counts of a {size} layer to be multiples of the "
                               f"rank {self.rank}")
        if self.init_weights == "mini" and out_features % self.mini_r:
            raise AdapterError(f"MiSS 'mini' needs the {out_features} output features to be a multiple of "
                               f"mini_r {self.mini_r}")


def miss_parameter_count(in_features: int, out_features: int, rank: int, init_weights: bool | str = True,
                         mini_r: int = 1) -> int:
    """Trainable numbers of one MiSS layer: r * d_out (balanced and 'bat'), r * mini_r ('mini')."""
    return rank * mini_r if init_weights == "mini" else rank * out_features


class MissLinear(AdapterLayer):
    """Holds PEFT's `MissLinear` as `self.miss`; its `miss_block` is this adapter's one tensor."""

    def __init__(self, base_layer: nn.Module, config: MissConfig | None = None,
                 adapter_name: str = "default") -> None:
        from peft.tuners.miss.layer import MissLinear as PeftMissLinear

        super().__init__(base_layer, adapter_name)
        self.config = config = config or MissConfig()
        config.check_fits(int(base_layer.in_features), int(base_layer.out_features))
        if config.init_weights == "bat" and isinstance(base_layer, AdapterLayer):
            raise AdapterError("a MiSS 'bat' adapter must be the first adapter on its module: its forward rebuilds "
                               "the layer from the base weight; add it before the others")
        # PEFT's layer registers the base module; drop this layer's own registration so it is held once.
        del self._modules["base_layer"]
        try:
            self.miss = PeftMissLinear(base_layer, PEFT_ADAPTER, config.peft_config(), r=config.rank)
        except ValueError as exc:
            raise AdapterError(f"MiSS cannot adapt this layer: {exc}") from None

    @property
    def base_layer(self) -> nn.Module:
        return self.miss.base_layer

    def replace_base(self, module: nn.Module) -> None:
        self.miss.base_layer = module

    @property
    def block(self) -> nn.Parameter:
        return self.miss.miss_block[PEFT_ADAPTER]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.applies:
            return self.base_layer(x, *args, **kwargs)
        return self.miss(x, *args, **kwargs)

    def get_delta_weight(self) -> torch.Tensor:
        """The update PEFT's merge would add: expand(D) (balanced, 'mini'), W D + D per block ('bat')."""
        block = self.block
        if self.config.init_weights == "bat":
            weight = self._weight_module().weight.detach().to(block.dtype).clone()
            return self.miss.get_delta_weight(PEFT_ADAPTER, weight).float()
        # PEFT's merge adds expand(D) to the weight it is given; given zeros, it returns expand(D) alone.
        zeros = torch.zeros(self.out_features, self.in_features, dtype=block.dtype, device=block.device)
        return self.miss.get_delta_weight_miss(PEFT_ADAPTER, zeros).float()


MissConfig.layer_cls = MissLinear

register_method(
    "miss", MissConfig, title="MiSS (formerly Bone)", requires=("peft",),
    paper="Kang et al., MiSS: Revisiting the Trade-off in LoRA with an Efficient Shard-Sharing Structure "
          "(arXiv 2409.15371); PEFT's MissConfig",
    property="one small matrix D shared by every r-wide shard of the input: r * d_out numbers a layer",
)
