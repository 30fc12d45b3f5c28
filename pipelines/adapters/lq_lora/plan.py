"""LQ-LoRA's memory budget: one quantisation format per matrix, chosen by an integer linear program.

    minimise    sum_i sum_c err(i, c) x_ic
    subject to  sum_i sum_c bits(i, c) x_ic <= budget * sum_i numel_i,   sum_c x_ic = 1,   x_ic in {0, 1}

err(i, c) is the squared (Fisher-weighted) Frobenius error of matrix i decomposed as Q + L1 L2 in format c, and
bits(i, c) what Q takes (`QuantFormat.storage_bits`); the budget is in bits a number, over the adapted matrices,
the low-rank factors not counted (they are the same whatever the formats). As the official
`compute_qconfig_assignments` and `mip_solve` (models/lq_utils.py, models/allocation_utils.py), errors are
scaled by 1000 / ||err|| before solving. The official code solves with Gurobi (60 s limit) or SciPy's `milp`;
here SciPy's `milp` (HiGHS) with a zero optimality gap, which is exact at the size of these problems.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipelines.adapters.core import AdapterError, module_slots, target_names
from pipelines.adapters.lq_lora.decompose import lq_decompose
from pipelines.adapters.lq_lora.quant import QuantFormat, paper_grid


@dataclass
class AllocationTable:
    """The error and the bits of every (matrix, format) pair, from which any budget is solved."""

    modules: list[str]
    formats: list[str]
    errors: torch.Tensor  # (matrices, formats): squared (Fisher-weighted) Frobenius error
    bits: torch.Tensor  # (matrices, formats): bits Q takes
    numels: list[int]

    @property
    def total_numel(self) -> int:
        return sum(self.numels)

    def minimum_bits(self) -> float:
        """The fewest bits a number any assignment reaches: the smallest format of every matrix."""
        return float(self.bits.min(dim=1).values.sum()) / self.total_numel

    def solve(self, budget: float) -> dict[str, str]:
        """{module: format} with the least total error whose bits a number stay within `budget`."""
        if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not np.isfinite(budget):
            raise AdapterError(f"LQ-LoRA budget must be a finite number of bits a parameter, not {budget!r}")
        least = self.minimum_bits()
        if budget < least - 1e-9:
            raise AdapterError(f"LQ-LoRA budget {budget:g} bits a parameter is below the {least:.3f} that the "
                               f"smallest of the {len(self.formats)} formats needs on these matrices; raise the "
                               "budget or add a smaller format")
        choice = solve_assignment(self.errors.numpy(), self.bits.numpy(), budget * self.total_numel)
        return {module: self.formats[c] for module, c in zip(self.modules, choice, strict=True)}

    def average_bits(self, assignment: dict[str, str]) -> float:
        index = {f: j for j, f in enumerate(self.formats)}
        total = sum(float(self.bits[i, index[assignment[m]]]) for i, m in enumerate(self.modules))
        return total / self.total_numel

    def total_error(self, assignment: dict[str, str]) -> float:
        index = {f: j for j, f in enumerate(self.formats)}
        return sum(float(self.errors[i, index[assignment[m]]]) for i, m in enumerate(self.modules))


def solve_assignment(errors: np.ndarray, bits: np.ndarray, capacity: float) -> list[int]:
    """The exact 0/1 program: one column per row, least total error, total bits <= capacity."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    rows, columns = errors.shape
    norm = float(np.linalg.norm(errors))
    cost = (errors / norm * 1000.0 if norm > 0 else errors).reshape(-1)
    one_each = np.zeros((rows, rows * columns))
    for i in range(rows):
        one_each[i, i * columns:(i + 1) * columns] = 1.0
    # Bits are counted in units of the largest entry so the constraint is well scaled; integers stay exact.
    unit = float(bits.max()) or 1.0
    constraints = [LinearConstraint(bits.reshape(1, -1) / unit, 0, capacity / unit + 1e-9),
                   LinearConstraint(one_each, 1, 1)]
    result = milp(cost, constraints=constraints, integrality=np.ones_like(cost), bounds=Bounds(0, 1),
                  options={"mip_rel_gap": 0.0})
    if result.x is None:
        raise AdapterError(f"LQ-LoRA found no assignment within the budget ({result.message})")
    chosen = result.x.reshape(rows, columns).argmax(axis=1)
    return [int(c) for c in chosen]


def allocation_table(model: nn.Module, config, formats: Sequence[str | QuantFormat], *,
                     fisher: dict[str, torch.Tensor] | None = None,
                     callback: Callable[[float, str], None] | None = None) -> AllocationTable:
    """Decompose every matrix `config` targets in every format (`config.rank`, iterations and weighting; Q alone
    for `init="qlora"`) and record the errors and bits. `fisher` ({module: F}) weights the errors and the SVD, as in the data-aware
    LQ-LoRA. `callback(fraction, message)` hears of each matrix (a lab Progress can stop the work there)."""
    parsed = [f if isinstance(f, QuantFormat) else QuantFormat.parse(f) for f in formats]
    if not parsed:
        raise AdapterError("LQ-LoRA needs at least one quantisation format to choose from")
    names = target_names(model, config)
    slots = {slot.name: slot for slot in module_slots(model)}
    weights = {n: slots[n].original.weight for n in names}
    fisher = fisher or {}
    rank = 0 if config.init == "qlora" else config.rank  # a QLoRA adapter starts as Q alone
    errors = torch.zeros(len(names), len(parsed), dtype=torch.float64)
    bits = torch.zeros(len(names), len(parsed), dtype=torch.float64)
    for i, name in enumerate(names):
        if callback is not None:
            callback(i / len(names), f"decomposing {name} in {len(parsed)} formats")
        weight = weights[name]
        for j, fmt in enumerate(parsed):
            result = lq_decompose(weight, rank, fmt, fisher=fisher.get(name), **config.decompose_options())
            errors[i, j] = result.error ** 2
            bits[i, j] = fmt.storage_bits(weight.numel())
    if callback is not None:
        callback(1.0, "decomposed every matrix")
    return AllocationTable(names, [f.name for f in parsed], errors, bits, [int(weights[n].numel()) for n in names])


def plan_lq_lora(model: nn.Module, config, budget: float, formats: Sequence[str | QuantFormat] | None = None, *,
                 fisher: dict[str, torch.Tensor] | None = None,
                 callback: Callable[[float, str], None] | None = None):
    """`config` with one format per matrix (its `formats` field) meeting `budget` bits a parameter, and the
    table it was solved from. `formats` defaults to the paper's grid of 432 NormalFloat formats (every
    matrix is decomposed in each); `fisher` is kept in the returned config for `add_adapter`."""
    table = allocation_table(model, config, formats if formats is not None else paper_grid(), fisher=fisher,
                             callback=callback)
    assignment = table.solve(budget)
    return dataclasses.replace(config, formats=assignment, fisher=fisher), table
