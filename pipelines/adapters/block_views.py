"""Helpers for methods that wrap whole transformer blocks rather than single Linear layers.

A block-level adapter (a tied block, an unfrozen copy of a block) stands in the block's place and runs its own
copy of it, while the model's block stays untouched underneath, so `disabled()` and `remove_adapter` give the
original back bit for bit. `block_view` makes that copy cheaply: the copy's parameters are the ones it is told
to use (shared tensors, or the original block's own frozen ones), and nothing else is duplicated but the module
objects themselves.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

from torch import nn

from pipelines.adapters.base import AdapterLayer
from pipelines.adapters.core import AdapterError


class BlockViewLayer(AdapterLayer):
    """Stands in for a whole block and runs `view` (its own copy of the block) while it applies, the block
    itself otherwise. Subclasses build `view` and set `title`; merging is refused."""

    wraps_linear = False
    title = "block"

    def forward(self, *args, **kwargs):
        if not self.applies:
            return self.base_layer(*args, **kwargs)
        return self.view(*args, **kwargs)

    def merge(self) -> None:
        raise AdapterError(f"{self.title} adapters cannot be merged into the weights")


def block_view(block: nn.Module, parameters: dict[str, nn.Parameter] | None = None) -> nn.Module:
    """A copy of `block`'s modules whose parameters are `parameters` (by name; the block's own where absent)
    and whose buffers are the block's own: the structure is new, the tensors are shared."""
    parameters = parameters or {}
    memo: dict[int, object] = {}
    for name, param in block.named_parameters(remove_duplicate=False):
        memo[id(param)] = parameters.get(name, param)
    for buffer in block.buffers():
        memo[id(buffer)] = buffer
    return copy.deepcopy(block, memo)


def linear_names(block: nn.Module, targets: Iterable[str] | None = None) -> list[str]:
    """Names (inside `block`) of its Linear-like modules, those ending in one of `targets` if given."""
    wanted = None if targets is None else list(targets)
    names = []
    for name, module in block.named_modules():
        if not (hasattr(module, "in_features") and hasattr(module, "out_features")
                and getattr(getattr(module, "weight", None), "ndim", 0) == 2):
            continue
        if wanted is None or any(name == t or name.endswith("." + t) for t in wanted):
            names.append(name)
    return names


def replace_module(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` at `name` inside `root` ("" replaces the root itself); return the new root."""
    if not name:
        return module
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)
    return root


def check_plain_block(name: str, block: nn.Module, method: str) -> None:
    """Refuse a block that already carries adapters: the copy would carry them too."""
    if isinstance(block, AdapterLayer) or any(isinstance(m, AdapterLayer) for m in block.modules()):
        raise AdapterError(f"{name} already carries an adapter; add the {method} adapter first, or remove the "
                           "other adapter")


def check_same_shape(blocks: dict[str, nn.Module], method: str) -> None:
    """All blocks must be of one class with the same parameter names and shapes (so they can share weights)."""
    (first_name, first), *rest = blocks.items()
    shapes = {n: tuple(p.shape) for n, p in first.named_parameters()}
    for name, block in rest:
        if type(block) is not type(first):
            raise AdapterError(f"{method}: {first_name} is a {type(first).__name__} but {name} is a "
                               f"{type(block).__name__}; only layers of one kind and shape can be tied")
        other = {n: tuple(p.shape) for n, p in block.named_parameters()}
        if other != shapes:
            differing = sorted(set(shapes) ^ set(other)) or sorted(n for n in shapes if shapes[n] != other[n])
            raise AdapterError(f"{method}: {first_name} and {name} differ in {differing[0]}; only layers of one "
                               "kind and shape can be tied")


def repeated_layers(model: nn.Module) -> list[str]:
    """The names of the model's stack of identical layers (the largest `nn.ModuleList` whose entries share one
    class and one set of parameter shapes), for `target_modules`: `model.layers.0`, `model.layers.1`, ...

    Raises `AdapterError` naming the model when it has no such list (a plain MLP of layers of other sizes).
    """
    best: tuple[int, list[str]] | None = None
    for list_name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        entries = {f"{list_name}.{i}" if list_name else str(i): child for i, child in enumerate(module)}
        try:
            check_same_shape(entries, "")
        except AdapterError:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size and (best is None or size > best[0]):
            best = (size, list(entries))
    if best is None:
        raise AdapterError(f"{type(model).__name__} has no list of identical layers to tie; name the layers in "
                           "target_modules")
    return best[1]

