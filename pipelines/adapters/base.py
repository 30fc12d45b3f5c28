"""What every adapter layer shares: a frozen base module, a name, merge/unmerge, and putting layers into a model.

An adapter layer wraps one module of a model (its `base_layer`, usually an `nn.Linear`) and stands in its place.
Its forward adds the adapter's `delta(x)` to the base output (or, for methods that are not additive, replaces
`forward` altogether). Several named adapters live on one module by nesting: a second adapter wraps the first
one's layer, so its `base_layer` is another adapter layer and the original module sits innermost.

Merging writes `get_delta_weight()` into the innermost base weight on purpose; unmerging restores the exact
weight that was there before (a saved copy, not a subtraction, so a bf16 or fp8 base comes back bit for bit).
Nested merges are undone last-in first-out (`pipelines.adapters.core.unmerge` keeps the order).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

_MERGE_ORDER = itertools.count(1)


class AdapterLayer(nn.Module):
    """Base class: wraps `base_layer` (kept frozen) and adds the subclass's `delta(x)` to its output.

    `adapter_name` names the adapter this layer belongs to; `active` says whether it takes part in the forward
    pass (`set_active`); `disabled` switches it off temporarily (`disabled()`); `merged` says its update is in
    the base weight.
    """

    # Subclasses that wrap other modules than Linear layers (a feed-forward block, a whole transformer block)
    # set this to False and check their base themselves.
    wraps_linear = True

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default") -> None:
        super().__init__()
        if self.wraps_linear and (not hasattr(base_layer, "in_features") or not hasattr(base_layer, "out_features")):
            raise TypeError(f"adapters wrap Linear layers, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.adapter_name = adapter_name
        self.active = True
        self.merged = False
        self.disabled = False
        self.merge_order = 0
        self.adapter_config = None  # the AdapterConfig it was added with (add_adapter sets it)
        self.saved_requires_grad: list[nn.Parameter] | None = None
        self._weight_before_merge: torch.Tensor | None = None

    # -- shapes and the module underneath ------------------------------------------------------------------

    @property
    def in_features(self) -> int:
        return int(self.base_layer.in_features)

    @property
    def out_features(self) -> int:
        return int(self.base_layer.out_features)

    def original_module(self) -> nn.Module:
        """The model's own module underneath every adapter layer stacked here."""
        module = self.base_layer
        while isinstance(module, AdapterLayer):
            module = module.base_layer
        return module

    def replace_base(self, module: nn.Module) -> None:
        """Put `module` underneath this layer (used when an adapter between them is removed)."""
        self.base_layer = module

    def detach_from_model(self) -> None:
        """Called when the layer is taken out of the model: remove hooks or model-level state it installed."""

    # -- the update ----------------------------------------------------------------------------------------

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def get_delta_weight(self) -> torch.Tensor:
        """The update to the base weight, shape (out_features, in_features), in fp32."""
        raise NotImplementedError

    def export_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Standard LoRA factors (A, B) with every scale folded into B, so that B @ A is the update at scale 1."""
        raise NotImplementedError

    @property
    def applies(self) -> bool:
        """Whether the forward pass adds this adapter (active, not disabled, not already in the weight)."""
        return self.active and not self.disabled and not self.merged

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if not self.applies:
            return out
        return out + self.delta(x).to(out.dtype)

    # -- state ---------------------------------------------------------------------------------------------

    def adapter_named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """This adapter's own parameters and persistent buffers (not those of the modules underneath)."""
        below = {id(t) for t in itertools.chain(self.base_layer.parameters(), self.base_layer.buffers())}
        seen = set()
        for name, tensor in itertools.chain(self.named_parameters(), self.named_buffers()):
            if id(tensor) in below or id(tensor) in seen or name.startswith("base_layer."):
                continue
            if not isinstance(tensor, nn.Parameter) and not self._buffer_is_persistent(name):
                continue
            seen.add(id(tensor))
            yield name, tensor

    def _buffer_is_persistent(self, name: str) -> bool:
        owner_name, _, leaf = name.rpartition(".")
        owner = self.get_submodule(owner_name) if owner_name else self
        return leaf not in owner._non_persistent_buffers_set

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [t for _, t in self.adapter_named_tensors() if isinstance(t, nn.Parameter)]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach() for name, t in self.adapter_named_tensors()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.adapter_named_tensors())
        check_state_fits(own, state)
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value.to(own[name].dtype))

    # -- merging -------------------------------------------------------------------------------------------

    def _weight_module(self) -> nn.Module:
        module = self.original_module()
        if not hasattr(module, "weight"):
            raise TypeError(f"{type(module).__name__} has no weight to merge into")
        return module

    @torch.no_grad()
    def merge(self) -> None:
        """Write the update into the base weight (forward then skips the adapter branch)."""
        if self.merged:
            return
        weight = self._weight_module().weight
        self._weight_before_merge = weight.data.clone()
        merged = weight.data.float() + self.get_delta_weight().to(weight.device)
        weight.data = merged.to(weight.dtype)
        self.merged = True
        self.merge_order = next(_MERGE_ORDER)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put back the exact base weight saved by `merge`."""
        if not self.merged:
            return
        self._weight_module().weight.data = self._weight_before_merge
        self._weight_before_merge = None
        self.merged = False
        self.merge_order = 0


def check_state_fits(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Refuse a state that lacks or adds a tensor, or whose shapes differ, before anything is copied."""
    if set(state) != set(own):
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        what = f"lacks {missing[0]!r}" if missing else f"has an unexpected {extra[0]!r}"
        raise ValueError(f"adapter state does not fit this layer: it {what}")
    for name, value in state.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise ValueError(f"adapter tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(own[name].shape)}")


def inject_adapters(root: nn.Module, names: Iterable[str],
                    make: Callable[[nn.Module], AdapterLayer]) -> dict[str, AdapterLayer]:
    """Replace each named Linear under `root` by `make(linear)`; return {name: layer}.

    The low-level form used by the training recipes: one adapter per module. `pipelines.adapters.add_adapter`
    is the general verb (targets by suffix or pattern, named adapters, several per module).
    """
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
