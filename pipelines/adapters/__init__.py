"""Adapter methods on any PyTorch model, with the same verbs for every method, and their registry.

    from pipelines.adapters import add_adapter, save_adapter, load_adapter, METHODS, LoRAConfig
    add_adapter(model, LoRAConfig(rank=8, target_modules=["q_proj", "v_proj"]), name="task")

Verbs: `add_adapter`, `set_active`, `disabled`, `merge` / `unmerge`, `adapter_state_dict` /
`load_adapter_state_dict`, `save_adapter` / `load_adapter`, `remove_adapter`; `METHODS` maps each method's name
to its config class, title, paper and the property its lab demo shows. Each method lives in one module of
this package (config, layer, and the method's own losses or steps beside them) and registers itself there.

DyLoRA (`sample_rank`, `set_rank`, `export_rank`, `truncate`) and SoRA (`sparsity_loss`, `gate_optimizer`,
`live_ranks`, `export_pruned`, `prune`) bring their own training steps and ways out as plain LoRA adapters.

The studio's own training layers are here too: LoRA, the rank-constrained and the visual-gated layers of
SplitFlux. Their layers offer `export_lora` (standard LoRA factors with every scale folded into `lora_B`).
"""

from pipelines.adapters.base import AdapterLayer, adapter_layers, inject_adapters, remove_adapters
from pipelines.adapters.block_lora import BlockLoRAConfig, BlockLoRALinear, block_lora_parameter_count
from pipelines.adapters.cbq import CBQConfig, CBQLinear, block_output_errors, cbq_calibrate
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
    replace_adapter,
    save_adapter,
    set_active,
    trainable_parameters,
    unmerge,
)
from pipelines.adapters.dvlora import DVLoRAConfig, DVLoRALinear, get_phase, phase_at_step, set_phase
from pipelines.adapters.dylora import DyLoRAConfig, DyLoRALinear, export_rank, sample_rank, set_rank, truncate
from pipelines.adapters.lora import LoRAConfig, LoRALinear
from pipelines.adapters.lq_lora import (
    LQLoRAConfig,
    LQLoRALinear,
    QuantFormat,
    fisher_information,
    lq_decompose,
    lq_lora_report,
    plan_lq_lora,
)
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
from pipelines.adapters.mixlora import (
    MixLoRAConfig,
    MixLoRALinear,
    MixLoRAMoE,
    mixlora_aux_loss,
    mixlora_expert_loads,
    mixlora_router_logits,
)
from pipelines.adapters.rca import RankConstrainedConfig, RankConstrainedLinear
from pipelines.adapters.smora import SMoRAConfig, SMoRALinear, smora_rank_activations, smora_rank_bias
from pipelines.adapters.sora import (
    SoRAConfig,
    SoRALinear,
    SparseAdamW,
    export_pruned,
    factor_parameters,
    gate_optimizer,
    gate_parameters,
    live_ranks,
    proximal_step_,
    prune,
    sora_optimizer,
    sparsifying_schedule,
    sparsity_loss,
)
from pipelines.adapters.visual_gated import (
    VisualGatedConfig,
    VisualGatedLoRALinear,
    complementary_loss,
    visual_gate,
)
from pipelines.adapters.xlora import XLoRAConfig, XLoRALinear, xlora_experts, xlora_scalings

__all__ = [
    "AdapterConfig",
    "AdapterError",
    "AdapterLayer",
    "BlockLoRAConfig",
    "BlockLoRALinear",
    "CBQConfig",
    "CBQLinear",
    "DVLoRAConfig",
    "DVLoRALinear",
    "DyLoRAConfig",
    "DyLoRALinear",
    "LoRAConfig",
    "LoRALinear",
    "LQLoRAConfig",
    "LQLoRALinear",
    "METHODS",
    "MarkBoardConfig",
    "MarkBoardLinear",
    "MergeVLAConfig",
    "MergeVLALinear",
    "MethodInfo",
    "MissConfig",
    "MissLinear",
    "MixLoRAConfig",
    "MixLoRALinear",
    "MixLoRAMoE",
    "QuantFormat",
    "RankConstrainedConfig",
    "RankConstrainedLinear",
    "SMoRAConfig",
    "SMoRALinear",
    "SoRAConfig",
    "SoRALinear",
    "SparseAdamW",
    "VisualGatedConfig",
    "VisualGatedLoRALinear",
    "XLoRAConfig",
    "XLoRALinear",
    "active_adapters",
    "adapter_config",
    "adapter_layers",
    "adapter_names",
    "adapter_state_dict",
    "add_adapter",
    "block_lora_parameter_count",
    "block_output_errors",
    "cbq_calibrate",
    "complementary_loss",
    "count_parameters",
    "decode_signature",
    "deobfuscate",
    "disabled",
    "export_pruned",
    "export_rank",
    "factor_parameters",
    "fisher_information",
    "gate_optimizer",
    "gate_parameters",
    "get_phase",
    "get_signature",
    "inject_adapters",
    "layers_of",
    "live_ranks",
    "load_adapter",
    "load_adapter_state_dict",
    "lq_decompose",
    "lq_lora_report",
    "mask_density",
    "merge",
    "merge_task_adapters",
    "merge_task_vectors",
    "miss_parameter_count",
    "mixlora_aux_loss",
    "mixlora_expert_loads",
    "mixlora_router_logits",
    "obfuscate",
    "phase_at_step",
    "plan_lq_lora",
    "proximal_step_",
    "prune",
    "read_adapter_config",
    "register_method",
    "remove_adapter",
    "remove_adapters",
    "replace_adapter",
    "route",
    "sample_rank",
    "save_adapter",
    "select_task",
    "set_active",
    "set_phase",
    "set_rank",
    "set_signature",
    "smora_rank_activations",
    "smora_rank_bias",
    "sora_optimizer",
    "sparsifying_schedule",
    "sparsity_loss",
    "trainable_parameters",
    "trigger_labels",
    "truncate",
    "unmerge",
    "visual_gate",
    "xlora_experts",
    "xlora_scalings",
]
