"""What every adapter layer shares: a frozen base `nn.Linear`, merge/unmerge, and putting layers into a model.

A layer adds `delta(x)` to the base layer's output. Merging writes `get_delta_weight()` into the base weight on
purpose; unmerging restores the exact weight that was there before (a saved copy, not a subtraction, so a
bf16 or fp8 base comes back bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


class AdapterLayer(nn.Module):
    """Base class: wraps `base_layer` (kept frozen) and adds the subclass's `delta(x)` to its output."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not hasattr(base_layer, "in_features") or not hasattr(base_layer, "out_features"):
            raise TypeError(f"adapters wrap Linear layers, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.merged = False
        self.disabled = False
        self._weight_before_merge: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return int(self.base_layer.in_features)

    @property
    def out_features(self) -> int:
        return int(self.base_layer.out_features)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def get_delta_weight(self) -> torch.Tensor:
        """The update to the base weight, shape (out_features, in_features), in fp32."""
        raise NotImplementedError

    def export_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Standard LoRA factors (A, B) with every scale folded into B, so that B @ A is the update at scale 1."""
        raise NotImplementedError

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters(recurse=False)}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters(recurse=False))
        if set(state) != set(own):
            missing = sorted(set(own) - set(state)) or sorted(set(state) - set(own))
            raise ValueError(f"adapter state does not fit this layer (e.g. {missing[0]!r})")
        with torch.no_grad():
            for name, value in state.items():
                if value.shape != own[name].shape:
                    raise ValueError(f"adapter tensor {name!r} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(own[name].shape)}")
                own[name].copy_(value.to(own[name].dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.merged or self.disabled:
            return out
        return out + self.delta(x).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Write the update into the base weight (forward then skips the adapter branch)."""
        if self.merged:
            return
        weight = self.base_layer.weight
        self._weight_before_merge = weight.data.clone()
        merged = weight.data.float() + self.get_delta_weight().to(weight.device)
        weight.data = merged.to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put back the exact base weight saved by `merge`."""
        if not self.merged:
            return
        self.base_layer.weight.data = self._weight_before_merge
        self._weight_before_merge = None
        self.merged = False


def inject_adapters(root: nn.Module, names: Iterable[str],
                    make: Callable[[nn.Module], AdapterLayer]) -> dict[str, AdapterLayer]:
    """Replace each named Linear under `root` by `make(linear)`; return {name: layer}."""
    layers = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        base = getattr(parent, child)
        if isinstance(base, AdapterLayer):
            raise ValueError(f"{name} already carries an adapter")
        layer = make(base)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def remove_adapters(root: nn.Module, names: Iterable[str] | None = None) -> None:
    """Put the original Linear layers back (unmerging first), leaving `root` as it was before injection."""
    for name, layer in list(adapter_layers(root).items()):
        if names is not None and name not in names:
            continue
        layer.unmerge()
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, layer.base_layer)


def adapter_layers(root: nn.Module) -> dict[str, AdapterLayer]:
    return {name: m for name, m in root.named_modules() if isinstance(m, AdapterLayer)}
