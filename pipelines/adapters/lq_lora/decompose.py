"""LQ-LoRA's decomposition W ~ Q + L1 L2 (the paper's iterative algorithm) and the empirical Fisher that weights it.

    Q <- 0;  repeat: L1, L2 <- SVD_r(W - Q);  Q <- quantize(W - L1 L2);  stop when ||W - (Q + L1 L2)|| rises

As HanGuo97/lq-lora's `lowrank_quantized_sparse_decomposition` (models/lq_utils.py): at most 100 iterations,
randomised SVD (`torch.svd_lowrank` with r + 10 columns), L1 = U sqrt(S), L2 = sqrt(S) V^T. With a Fisher
matrix F (one number per weight) the error is ||sqrt(F) * (W - Q - L1 L2)||_F and the SVD is the official
"two-sided" weighted one: rows scaled by sqrt(mean_j F_ij), columns by sqrt(mean_i F_ij), the factors unscaled
afterwards (models/factorizations_utils.py, `weighted_svd_decomposition`).

Choices left open, each a parameter:
- `return_best`: the official loop stops at the first iteration whose error rose and returns that iteration's
  (worse) factors, which its own TODO calls slightly worse; `return_best=True` (ours) returns the best
  iteration, `False` the official one.
- `torch.svd_lowrank` needs r + oversampling <= min(d_out, d_in); a small matrix gets fewer extra columns.
- A row or column whose mean Fisher is zero would be divided by zero in the weighted SVD; its weight is
  raised to the smallest positive one of the matrix (to 1 if the whole matrix is zero).
- `fisher_information` sums squared gradients over the batches it is given, as the official code sums them
  over single examples: pass one example a batch for the empirical Fisher of the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipelines.adapters.lq_lora.quant import QuantFormat, quantize_dequantize

WEIGHTINGS = ("two-sided", "row", "col", "none")


@dataclass
class Decomposition:
    """L1 (d_out x r), L2 (r x d_in), Q (dequantised, fp32) and its stored form; the error of each iteration."""

    L1: torch.Tensor
    L2: torch.Tensor
    Q: torch.Tensor
    stored: dict[str, torch.Tensor]
    errors: list[float] = field(default_factory=list)
    best_iteration: int = 0

    @property
    def error(self) -> float:
        return self.errors[self.best_iteration]


def low_rank(matrix: torch.Tensor, rank: int, *, randomized: bool = True, oversampling: int = 10) -> tuple[
        torch.Tensor, torch.Tensor]:
    """(L1, L2) with L1 @ L2 the rank-`rank` SVD approximation of `matrix`, the singular values split evenly."""
    if randomized:
        columns = min(rank + oversampling, *matrix.shape)
        U, S, V = torch.svd_lowrank(matrix, q=columns)
        Vt = V.mH
    else:
        U, S, Vt = torch.linalg.svd(matrix, full_matrices=False)
    root = S[:rank].sqrt()
    return U[:, :rank] * root[None, :], Vt[:rank] * root[:, None]


def _fisher_weights(fisher: torch.Tensor, weighting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The row and column weights of the weighted SVD (ones where `weighting` leaves a side unweighted)."""

    def positive(w: torch.Tensor) -> torch.Tensor:
        floor = w[w > 0].min() if bool((w > 0).any()) else torch.ones((), dtype=w.dtype, device=w.device)
        return torch.where(w > 0, w, floor)

    rows = positive(fisher.mean(dim=1, keepdim=True).sqrt())
    cols = positive(fisher.mean(dim=0, keepdim=True).sqrt())
    if weighting in ("col", "none"):
        rows = torch.ones_like(rows)
    if weighting in ("row", "none"):
        cols = torch.ones_like(cols)
    return rows, cols


def weighted_low_rank(matrix: torch.Tensor, rank: int, fisher: torch.Tensor | None, weighting: str = "two-sided",
                      **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if fisher is None:
        return low_rank(matrix, rank, **options)
    rows, cols = _fisher_weights(fisher, weighting)
    L1, L2 = low_rank(rows * matrix * cols, rank, **options)
    return L1 / rows, L2 / cols


def lq_decompose(weight: torch.Tensor, rank: int, fmt: QuantFormat, *, fisher: torch.Tensor | None = None,
                 num_iterations: int = 100, num_oversampling: int = 10, randomized: bool = True,
                 weighting: str = "two-sided", return_best: bool = True, backend: str = "auto") -> Decomposition:
    """W ~ Q + L1 L2 by alternating a rank-`rank` SVD of W - Q and quantising W - L1 L2 in `fmt`.

    `rank=0` is plain quantisation (one iteration, L1 and L2 empty). The (Fisher-weighted) Frobenius error of
    every iteration is in `errors`; the loop stops after the first iteration that raised it.
    """
    W = weight.detach().float()
    F_ = None if fisher is None else fisher.detach().float().to(W.device)
    root = None if F_ is None else F_.sqrt()

    def error_of(approx: torch.Tensor) -> float:
        residual = W - approx
        return float(torch.linalg.norm(residual if root is None else root * residual))

    if rank == 0:
        Q, stored = quantize_dequantize(W, fmt, backend)
        empty = W.new_zeros(W.shape[0], 0), W.new_zeros(0, W.shape[1])
        return Decomposition(*empty, Q, stored, [error_of(Q)])
    Q = torch.zeros_like(W)
    best: Decomposition | None = None
    errors: list[float] = []
    for iteration in range(num_iterations):
        L1, L2 = weighted_low_rank(W - Q, rank, F_, weighting, randomized=randomized, oversampling=num_oversampling)
        Q, stored = quantize_dequantize(W - L1 @ L2, fmt, backend)
        errors.append(error_of(Q + L1 @ L2))
        rose = iteration > 0 and errors[-1] > errors[-2]
        if best is None or not rose or not return_best:
            best = Decomposition(L1, L2, Q, stored, best_iteration=iteration)
        if rose:
            break
    best.errors = errors
    return best


def fisher_information(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batches: Iterable[Any],
                       modules: Any) -> dict[str, torch.Tensor]:
    """The empirical Fisher of the weights of `modules` (original names, or an adapter config whose targets they
    are): the sum over `batches` of the squared gradient of `loss_fn(model, batch)`, one number per weight.

    The model runs in train mode, as in the official code; its mode, `requires_grad` flags and `.grad` fields
    are given back afterwards.
    """
    from pipelines.adapters.core import AdapterConfig, module_slots, target_names

    slots = {slot.name: slot for slot in module_slots(model)}
    names = target_names(model, modules) if isinstance(modules, AdapterConfig) else list(modules)
    missing = [n for n in names if n not in slots or not hasattr(slots[n].original, "weight")]
    if missing:
        raise ValueError(f"the model has no module {missing[0]!r} with a weight")
    weights = {n: slots[n].original.weight for n in names}
    saved = {id(p): (p, p.requires_grad, p.grad) for p in model.parameters()}
    fisher = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    was_training = model.training
    model.train()
    try:
        for p, _, _ in saved.values():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        for batch in batches:
            for w in weights.values():
                w.grad = None
            loss_fn(model, batch).backward()
            for n, w in weights.items():
                if w.grad is not None:
                    fisher[n] += w.grad.detach().float() ** 2
    finally:
        model.train(was_training)
        for p, flag, grad in saved.values():
            p.requires_grad_(flag)
            p.grad = grad
    return fisher
