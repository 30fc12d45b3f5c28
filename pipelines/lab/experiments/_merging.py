"""The merge check the mergeable methods' experiments end with."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipelines.adapters import merge, unmerge


@torch.no_grad()
def merge_round_trip(adapted: nn.Module, outputs: Callable[[], torch.Tensor]) -> tuple[float, bool]:
    """Merge the adapters of `adapted` and unmerge them again: the largest change of `outputs()` while merged,
    and whether every weight of `adapted` came back bit for bit."""
    weights = {k: v.clone() for k, v in adapted.state_dict().items()}
    before = outputs()
    merge(adapted)
    difference = float((outputs() - before).abs().max())
    unmerge(adapted)
    exact = all(torch.equal(v, weights[k]) for k, v in adapted.state_dict().items())
    return difference, exact
