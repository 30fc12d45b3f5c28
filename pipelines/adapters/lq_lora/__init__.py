"""LQ-LoRA: low-rank plus quantised decomposition of each weight, with a bit budget spread by an integer program.

`layer.py` holds the config and the layer (and registers the method), `decompose.py` the iterative
decomposition and the empirical Fisher, `plan.py` the budget's integer program, `quant.py` the quantiser.
"""

from pipelines.adapters.lq_lora.decompose import Decomposition, fisher_information, lq_decompose
from pipelines.adapters.lq_lora.layer import LQLoRAConfig, LQLoRALinear, lq_lora_report
from pipelines.adapters.lq_lora.plan import AllocationTable, allocation_table, plan_lq_lora, solve_assignment
from pipelines.adapters.lq_lora.quant import QuantFormat, dequantize, paper_grid, quantize

__all__ = [
    "AllocationTable",
    "Decomposition",
    "LQLoRAConfig",
    "LQLoRALinear",
    "QuantFormat",
    "allocation_table",
    "dequantize",
    "fisher_information",
    "lq_decompose",
    "lq_lora_report",
    "paper_grid",
    "plan_lq_lora",
    "quantize",
    "solve_assignment",
]
