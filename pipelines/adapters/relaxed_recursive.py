"""Relaxed Recursive Transformers: a model's N layers tied into one block of K = N / B layers looped B times, with
a LoRA per depth that relaxes the tying.

    h_l = f(h_{l-1}; Phi'_{(l-1) mod K + 1}, dPhi'_l),    every tied matrix:  h = W' x + B_l A_l x
    init: W' from the original layers (Stepwise, Average or Lower);  B_l A_l = TruncSVD_r(W_l - W'_{k(l)})

Bae et al., "Relaxed Recursive Transformers: Effective Parameter Sharing with Layer-wise LoRA", ICLR 2025 (arXiv
2410.20672). There is no official code; this follows the paper's text (Sections 2.2-2.3, Appendices C and F)
and was checked against the third-party PyTorch code avramdj/rrt-lora (Average init, LoRA on all seven
projections of a Llama layer, B A with no scale factor, both W' and the LoRA trained).

- Looping is the paper's CYCLE strategy: depth l (0-based, in the order the layers have in the model) uses
  block position k = l mod K. `loops` is the paper's B, the number of looping blocks (2 in most of its runs).
- Every parameter of a layer is tied, "including the weights of the linear layers ... and the weights of the
  RMSNorm". The shared block starts from the original layers by `init`:
  "stepwise": position k takes one layer, selected "at specific intervals while keeping the first and last
  layer fixed" (Figure 2: layers 1, 3, 6 of six for K = 3), i.e. floor(k (N - 1) / (K - 1));
  `stepwise_rule="fixed-start"` is the appendix's other variant, layers 0, B, 2B, ... (K = 1 takes layer 0);
  "average": the mean of the layers tied to position k (the paper's best choice for relaxed models, default);
  "lower": the first K layers.
  `norm_init="first"` takes the vectors (norm weights and biases) from the first tied layer instead of
  averaging them: the appendix's Norm-choice, which it found about as good as Norm-avg.
- The LoRA of depth l sits on each tied Linear named by `lora_targets` (all of them by default, as the paper's
  "all of the shared, linear weight matrices") and starts from the truncated SVD of the residual W_l - W'_k:
  B = U_r S_r, A = V_r^T (`lora_init="svd"`). Where the residual is exactly zero (a layer the init copied,
  e.g. Stepwise's first loop) it gets "standard zero initialization: random Gaussian for matrix A and zero
  for B" (std 1/r, as the lab's LoRA); `lora_init="zero"` does that everywhere (the paper's ablation). A rank
  of 0 is the fully recursive model; a rank at or above min(d_out, d_in) is that matrix's full rank, and the
  SVD then reproduces W_l exactly.
- Uptraining trains "all model parameters": the shared block and every LoRA are this adapter's parameters
  (`trainable_parameters`); the embeddings and head are the model's own, the caller's choice to train.

Choices the paper leaves open, each a setting:
- `relax_vectors`: the paper ties the vectors LoRA cannot reach (norm weights, biases), so a full-rank relaxed
  model equals the original only where those were equal already. With `relax_vectors=True` every depth also
  gets an offset for each of them, initialised to (original - shared), and a full-rank model is exactly the
  original (a few hundred numbers per layer). Default False, as the paper.
- The SVD runs in float32; the LoRA factors are float32 (the shared block keeps the model's dtype).

Usage: `RelaxedRecursiveConfig(loops=2, rank=8, target_modules=repeated_layers(model))`; the adapter stands in
the layers' places and each runs its depth's view of the shared block. The original layers stay in the model
underneath (frozen), so `disabled()` gives the original model bit for bit and `remove_adapter` puts them back.
`tied_parameter_count(model, name)` counts what the relaxed model needs without them. Adapters added to a
layer's inner modules afterwards would wrap the originals (used only while disabled): add those first or not
at all. Merging is refused (the tying is the point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from pipelines.adapters.block_views import (
    BlockViewLayer,
    block_view,
    check_plain_block,
    check_same_shape,
    linear_names,
    repeated_layers,
    replace_module,
)
from pipelines.adapters.core import AdapterConfig, AdapterError, layers_of, module_slots, register_method
from pipelines.adapters.fields import check_choice, check_int
from pipelines.adapters.lora import init_down

INITS = ("stepwise", "average", "lower")
STEPWISE_RULES = ("fixed-ends", "fixed-start")
LORA_INITS = ("svd", "zero")
NORM_INITS = ("same", "first")

__all__ = ["RelaxedRecursiveConfig", "RelaxedRecursiveLayer", "repeated_layers", "tie_sources",
           "tied_parameter_count"]


@dataclass
class RelaxedRecursiveConfig(AdapterConfig):
    """`target_modules` names the layers to tie (all of them, e.g. `repeated_layers(model)`)."""

    method = "relaxed-recursive"

    loops: int = field(default=2, metadata={"help": "B: how many times the shared block runs (N / B unique layers)"})
    rank: int = field(default=512, metadata={
        "help": "LoRA rank per depth (0: fully recursive; min(d_out, d_in) or more: full rank); paper: 512"})
    init: str = field(default="average", metadata={
        "help": "shared block from the original layers: 'stepwise', 'average' (best relaxed) or 'lower'",
        "choices": list(INITS)})
    stepwise_rule: str = field(default="fixed-ends", metadata={
        "help": "Stepwise picks layers keeping the first and last ('fixed-ends') or every B-th from the first",
        "choices": list(STEPWISE_RULES)})
    lora_init: str = field(default="svd", metadata={
        "help": "'svd': truncated SVD of W_l - W' (paper); 'zero': Gaussian A, zero B", "choices": list(LORA_INITS)})
    norm_init: str = field(default="same", metadata={
        "help": "vectors (norm weights, biases) follow init ('same') or come from the first tied layer",
        "choices": list(NORM_INITS)})
    lora_targets: list[str] | None = field(default=None, metadata={
        "help": "Linear layers inside a layer that get a LoRA (suffixes); None: all of them"})
    relax_vectors: bool = field(default=False, metadata={
        "help": "also give each depth an offset for the tied vectors (norm weights, biases); paper: no"})

    def validate(self) -> None:
        check_int("Relaxed Recursive", "loops", self.loops, minimum=2)
        check_int("Relaxed Recursive", "rank", self.rank, minimum=0)
        check_choice("Relaxed Recursive", "init", self.init, INITS)
        check_choice("Relaxed Recursive", "stepwise_rule", self.stepwise_rule, STEPWISE_RULES)
        check_choice("Relaxed Recursive", "lora_init", self.lora_init, LORA_INITS)
        check_choice("Relaxed Recursive", "norm_init", self.norm_init, NORM_INITS)
        check_choice("Relaxed Recursive", "relax_vectors", self.relax_vectors, (True, False))
        if isinstance(self.lora_targets, tuple):
            self.lora_targets = list(self.lora_targets)
        if self.lora_targets is not None and (not isinstance(self.lora_targets, list) or not self.lora_targets
                                              or not all(isinstance(t, str) and t for t in self.lora_targets)):
            raise AdapterError("Relaxed Recursive lora_targets must be None or a list of module names")

    def accepts(self, module: nn.Module) -> bool:
        return True

    def inject(self, model: nn.Module, name: str, modules: list[str]) -> list[str]:
        slots = {slot.name: slot for slot in module_slots(model)}
        layers = {m: slots[m].occupant for m in modules}
        for module_name, layer in layers.items():
            check_plain_block(module_name, layer, "Relaxed Recursive")
        if len(layers) % self.loops or len(layers) < self.loops:
            raise AdapterError(f"cannot tie {len(layers)} layers into {self.loops} loops: the number of layers "
                               "must be a multiple of loops")
        check_same_shape(layers, "Relaxed Recursive")
        originals = list(layers.values())
        targets = linear_names(originals[0], self.lora_targets)
        if not targets and self.lora_targets is not None:
            raise AdapterError(f"lora_targets {self.lora_targets!r} names no Linear layer inside {modules[0]}")
        shared = _shared_block(originals, self, set(f"{t}.weight" if t else "weight" for t in targets))
        size = len(originals) // self.loops
        wrapped = []
        for depth, (module_name, original) in enumerate(layers.items()):
            layer = RelaxedRecursiveLayer(original, self, name, depth=depth, shared=shared[depth % size],
                                          owner=depth < size, lora_modules=targets)
            layer.train(original.training)
            wrapped.append((slots[module_name], layer))
        for slot, layer in wrapped:
            slot.put(layer)
        return modules


def tie_sources(num_layers: int, loops: int, init: str, stepwise_rule: str = "fixed-ends") -> list[list[int]]:
    """For each of the K = num_layers / loops block positions, the original layers its weights come from."""
    size = num_layers // loops
    if init == "average":
        return [list(range(k, num_layers, size)) for k in range(size)]
    if init == "lower":
        return [[k] for k in range(size)]
    if stepwise_rule == "fixed-start" or size == 1:
        return [[k * loops] for k in range(size)]
    return [[math.floor(k * (num_layers - 1) / (size - 1))] for k in range(size)]


def _shared_block(layers: list[nn.Module], config: RelaxedRecursiveConfig,
                  matrices: set[str]) -> list[dict[str, nn.Parameter]]:
    sources = tie_sources(len(layers), config.loops, config.init, config.stepwise_rule)
    params = [dict(layer.named_parameters()) for layer in layers]
    block = []
    for chosen in sources:
        position = {}
        for pname, first in params[chosen[0]].items():
            picked = chosen[:1] if (config.norm_init == "first" and first.ndim == 1) else chosen
            with torch.no_grad():
                value = torch.stack([params[i][pname].detach().float() for i in picked]).mean(0).to(first.dtype)
            position[pname] = nn.Parameter(value.clone(), requires_grad=True)
        block.append(position)
    return block


class _Offset(nn.Module):
    """A parametrization adding a per-depth offset (float32) to a tied vector."""

    def __init__(self, offset: torch.Tensor) -> None:
        super().__init__()
        self.offset = nn.Parameter(offset)

    def forward(self, tied: torch.Tensor) -> torch.Tensor:
        return (tied.float() + self.offset).to(tied.dtype)


class DepthLoRALinear(nn.Module):
    """A tied Linear at one depth: `linear` holds the shared W' (and bias), `lora_A`/`lora_B` this depth's B A."""

    def __init__(self, linear: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.lora_A = nn.Parameter(lora_A)
        self.lora_B = nn.Parameter(lora_B)

    @property
    def in_features(self) -> int:
        return int(self.linear.in_features)

    @property
    def out_features(self) -> int:
        return int(self.linear.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out + F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B.float() @ self.lora_A.float()


def svd_lora_init(residual: torch.Tensor, rank: int, lora_init: str = "svd") -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of rank min(rank, min(shape)) starting at TruncSVD_r(residual) (B = U_r S_r, A = V_r^T), or at
    Gaussian A (std 1/r) and zero B where the residual is zero or `lora_init` is "zero"."""
    residual = residual.detach().float().cpu()
    rank = min(rank, *residual.shape)
    if lora_init == "zero" or not bool(residual.any()):
        down = torch.empty(rank, residual.shape[1])
        init_down(down)
        return down, torch.zeros(residual.shape[0], rank)
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    return vh[:rank].clone(), (u[:, :rank] * s[:rank]).contiguous()


class RelaxedRecursiveLayer(BlockViewLayer):
    """Stands in for one original layer (depth `depth`) and runs `view`: the layer's structure over the shared
    block, with this depth's LoRA (and vector offsets). The shared tensors belong to the state of the first
    loop's layers only, so a saved adapter holds each of them once."""

    title = "Relaxed Recursive"

    def __init__(self, base_layer: nn.Module, config: RelaxedRecursiveConfig, adapter_name: str = "default", *,
                 depth: int = 0, shared: dict[str, nn.Parameter] | None = None, owner: bool = True,
                 lora_modules: list[str] | None = None) -> None:
        super().__init__(base_layer, adapter_name)
        self.config = config
        self.depth = depth
        self.owner = owner
        shared = shared if shared is not None else {
            n: nn.Parameter(p.detach().clone()) for n, p in base_layer.named_parameters()}
        self._shared_ids = {id(p) for p in shared.values()}
        original = dict(base_layer.named_parameters())
        view = block_view(base_layer, shared)
        device = next(iter(shared.values())).device
        if config.relax_vectors:
            for pname, tied in shared.items():
                if tied.ndim == 1:
                    module_name, _, leaf = pname.rpartition(".")
                    offset = (original[pname].detach().float() - tied.detach().float()).cpu()
                    parametrize.register_parametrization(view.get_submodule(module_name) if module_name else view,
                                                         leaf, _Offset(offset.to(device)), unsafe=True)
        if config.rank > 0:
            for module_name in lora_modules if lora_modules is not None else linear_names(base_layer):
                weight = f"{module_name}.weight" if module_name else "weight"
                down, up = svd_lora_init(original[weight] - shared[weight], config.rank, config.lora_init)
                linear = view.get_submodule(module_name) if module_name else view
                view = replace_module(view, module_name, DepthLoRALinear(linear, down.to(device), up.to(device)))
        self.view = view
        for p in self.adapter_parameters():
            p.requires_grad_(True)

    def adapter_named_tensors(self):
        for name, tensor in super().adapter_named_tensors():
            if self.owner or id(tensor) not in self._shared_ids:
                yield name, tensor


RelaxedRecursiveConfig.layer_cls = RelaxedRecursiveLayer


def tied_parameter_count(model: nn.Module, name: str) -> int:
    """Parameters the relaxed recursive model needs: the shared block, the LoRA (and offsets) of adapter `name`,
    and everything outside the tied layers; the original layers kept underneath for `remove_adapter` are not
    counted."""
    layers = [stack[0] for stack in layers_of(model, name).values()]
    if not layers or not all(isinstance(layer, RelaxedRecursiveLayer) for layer in layers):
        raise AdapterError(f"the model has no Relaxed Recursive adapter named {name!r}")
    originals = {id(p) for layer in layers for p in layer.original_module().parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in originals)


register_method(
    "relaxed-recursive", RelaxedRecursiveConfig, title="Relaxed Recursive Transformers",
    paper="Bae et al., Relaxed Recursive Transformers: Effective Parameter Sharing with Layer-wise LoRA, ICLR 2025 "
          "(arXiv 2410.20672)",
    property="the layers tied into one looped block, with a LoRA per depth: the rank moves the model between "
             "fully recursive and the original",
    identity_at_init=False, mergeable=False,
)
