"""Adapter methods on any PyTorch model, with the same verbs for every method, and their registry.

    from pipelines.adapters import add_adapter, save_adapter, load_adapter, METHODS, LoRAConfig
    add_adapter(model, LoRAConfig(rank=8, target_modules=["q_proj", "v_proj"]), name="task")

Verbs: `add_adapter`, `set_active`, `disabled`, `merge` / `unmerge`, `adapter_state_dict` /
`load_adapter_state_dict`, `save_adapter` / `load_adapter`, `remove_adapter`; `METHODS` maps each method's name
to its config class, title, paper and the property its lab demo shows. Each method lives in one module of
this package (config, layer, and the method's own losses or steps beside them) and registers itself there.

The studio's own training layers are here too: LoRA, the rank-constrained and the visual-gated layers of
SplitFlux. Their layers offer `export_lora` (standard LoRA factors with every scale folded into `lora_B`).
"""

from pipelines.adapters.base import AdapterLayer, adapter_layers, inject_adapters, remove_adapters
from pipelines.adapters.block_lora import BlockLoRAConfig, BlockLoRALinear, block_lora_parameter_count
from pipelines.adapters.core import (
    METHODS,
    AdapterConfig,
    AdapterError,
    MethodInfo,
    active_adapters,
    adapter_config,
    adapter_names,
    adapter_state_dict,
    add_adapter,
    count_parameters,
    disabled,
    layers_of,
    load_adapter,
    load_adapter_state_dict,
    merge,
    read_adapter_config,
    register_method,
    remove_adapter,
    save_adapter,
    set_active,
    trainable_parameters,
    unmerge,
)
from pipelines.adapters.dvlora import DVLoRAConfig, DVLoRALinear, get_phase, phase_at_step, set_phase
from pipelines.adapters.lora import LoRAConfig, LoRALinear
from pipelines.adapters.markboard import (
    MarkBoardConfig,
    MarkBoardLinear,
    decode_signature,
    deobfuscate,
    get_signature,
    obfuscate,
    set_signature,
    trigger_labels,
)
from pipelines.adapters.mergevla import (
    MergeVLAConfig,
    MergeVLALinear,
    mask_density,
    merge_task_adapters,
    merge_task_vectors,
    route,
    select_task,
)
from pipelines.adapters.miss import MissConfig, MissLinear, miss_parameter_count
from pipelines.adapters.rca import RankConstrainedConfig, RankConstrainedLinear
from pipelines.adapters.visual_gated import (
    VisualGatedConfig,
    VisualGatedLoRALinear,
    complementary_loss,
    visual_gate,
)

__all__ = [
    "METHODS",
    "AdapterConfig",
    "AdapterError",
    "AdapterLayer",
    "BlockLoRAConfig",
    "BlockLoRALinear",
    "DVLoRAConfig",
    "DVLoRALinear",
    "LoRAConfig",
    "LoRALinear",
    "MarkBoardConfig",
    "MarkBoardLinear",
    "MergeVLAConfig",
    "MergeVLALinear",
    "MethodInfo",
    "MissConfig",
    "MissLinear",
    "RankConstrainedConfig",
    "RankConstrainedLinear",
    "VisualGatedConfig",
    "VisualGatedLoRALinear",
    "active_adapters",
    "adapter_config",
    "adapter_layers",
    "adapter_names",
    "adapter_state_dict",
    "add_adapter",
    "block_lora_parameter_count",
    "complementary_loss",
    "count_parameters",
    "decode_signature",
    "deobfuscate",
    "disabled",
    "get_phase",
    "get_signature",
    "inject_adapters",
    "layers_of",
    "load_adapter",
    "load_adapter_state_dict",
    "mask_density",
    "merge",
    "merge_task_adapters",
    "merge_task_vectors",
    "miss_parameter_count",
    "obfuscate",
    "phase_at_step",
    "read_adapter_config",
    "register_method",
    "remove_adapter",
    "remove_adapters",
    "route",
    "save_adapter",
    "select_task",
    "set_active",
    "set_phase",
    "set_signature",
    "trainable_parameters",
    "trigger_labels",
    "unmerge",
    "visual_gate",
]
