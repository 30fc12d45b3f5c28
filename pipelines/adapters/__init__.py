"""Adapter methods as modules over a frozen `nn.Linear`, one file per method (LoRA, rank-constrained, visual-gated).

Every layer offers the same verbs: `forward`, `merge`, `unmerge`, `get_delta_weight`, `export_lora` (standard LoRA
factors with every scale folded into `lora_B`), and `adapter_state_dict` / `load_adapter_state_dict` for checkpoints.
"""

from pipelines.adapters.base import AdapterLayer, adapter_layers, inject_adapters, remove_adapters
from pipelines.adapters.lora import LoRAConfig, LoRALinear
from pipelines.adapters.rca import RankConstrainedConfig, RankConstrainedLinear
from pipelines.adapters.visual_gated import (
    VisualGatedConfig,
    VisualGatedLoRALinear,
    complementary_loss,
    visual_gate,
)

__all__ = [
    "AdapterLayer",
    "LoRAConfig",
    "LoRALinear",
    "RankConstrainedConfig",
    "RankConstrainedLinear",
    "VisualGatedConfig",
    "VisualGatedLoRALinear",
    "adapter_layers",
    "complementary_loss",
    "inject_adapters",
    "remove_adapters",
    "visual_gate",
]
