"""X-LoRA: frozen LoRA experts mixed per token by a classifier on the model's hidden states; PEFT's implementation
behind the registry, so every verb works on it.

Buehler and Buehler, "X-LoRA: Mixture of Low-Rank Adapter Experts, a Flexible Framework for Large Language Models
with Applications in Protein Mechanics and Molecular Design" (arXiv 2402.07148); PEFT's `XLoraConfig` and
`peft.tuners.xlora` (PEFT 0.21).

    pass 1 (no gradients): the model with every expert's input scaled by `scaling_pass_value` -> last hidden H
    lambda = softmax(f(H) / T)      f: PEFT's XLoraClassifier, (batch, seq, layers, experts)
    pass 2, each adapted layer l:  y = W x + sum_j global_scaling_weight * s_j B_j A_j dropout_j(lambda_{l,j} x)
Only the classifier trains unless `use_trainable_adapters`.

What is PEFT's here: each adapted layer holds PEFT's `lora.Linear` with one LoRA per expert ("0", "1", ... as PEFT
names them), and its forward is PEFT's `XLoraLinearLayer.forward` (the per-token scaled sum, `top_k_lora`,
`enable_softmax_topk`, `global_scaling_weight`); the scalings come from PEFT's `XLoraClassifier` (depth, size,
dropout, layer-wise scalings, temperature, softmax). What is this module's: the two passes, made by a forward
pre-hook on the model the adapter was added to, as PEFT's `XLoraModel._enable_peft_forward_hooks` makes them
(the scaling pass with every expert's input multiplied by `scaling_pass_value`, the classifier on its last
hidden state, then the real pass). tests/test_adapter_xlora.py checks the result against PEFT's own
`XLoraModel` through `get_peft_model`.

Why not PEFT's `XLoraModel` itself: it builds its own `LoraModel` over the model and replaces the modules in place,
which would bypass the verbs (named adapters, stacking, `disabled`, remove); and in PEFT 0.21 it runs on the lab's
tiny Llama offline only if (1) `model.config.use_cache` is False (else "`use_cache` must be False"), (2) the keys
of `adapters` are "0", "1", ...: it loads the experts under those index names but activates the given keys, so any
other names fail with a KeyError in `disable_adapter_layers` (a fix, huggingface/peft#3421, was not merged), (3) it
is called through `PeftModel.forward` (a bare `XLoraModel.forward` skips the classifier and adds the experts
unscaled), (4) the experts are PEFT LoRA folders of a model whose backbone sits under `.model` (its key rewriting
assumes it; a BERT classifier's keys do not fit, huggingface/peft#2132).
Here any expert names work, `use_cache` is switched off for both passes of each call (the model's config is not
changed; generate with `use_cache=False`), and experts come from this package's LoRA folders (`save_adapter`) or
PEFT's (`save_pretrained`).

Choices of this implementation (PEFT's defaults otherwise, as fields):
- `XLoRAConfig.from_adapters({name: folder})` reads the experts' shapes; all experts must adapt the same modules.
- A saved X-LoRA adapter holds the experts' weights and the classifier; its config keeps the expert names but not
  their folders (PEFT: "only the keys matter during loading"). An expert given with an empty folder starts as
  PEFT starts a LoRA (A Kaiming-uniform, B zero).
- `hidden_size=None` reads the model's `config.hidden_size` (PEFT falls back to 4096 with a warning).
- `top_k_lora` above the number of experts is refused (PEFT's `topk` would fail inside the forward pass).
- One X-LoRA adapter per model: the scaling pass of one would run the other's layers without scalings.
- It cannot be merged: the scalings depend on the token.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.adapters.base import AdapterLayer
from pipelines.adapters.core import (
    CONFIG_NAME,
    AdapterConfig,
    AdapterError,
    check_adapter_name,
    layers_of,
    module_slots,
    read_adapter_config,
    read_adapter_weights,
    read_config_json,
    register_method,
)
from pipelines.adapters.fields import check_choice, check_int, check_number

PEFT_PREFIX = "base_model.model."


@dataclass
class XLoRAConfig(AdapterConfig):
    """PEFT's `XLoraConfig` fields with its defaults, and the experts' LoRA shapes (filled by `from_adapters`)."""

    method = "xlora"

    adapters: dict[str, str] = field(default_factory=dict, metadata={
        "help": "expert name -> folder of a saved LoRA (this package's or PEFT's); '' starts the expert fresh"})
    expert_ranks: list[int] = field(default_factory=list, metadata={"help": "each expert's rank r"})
    expert_scales: list[float] | None = field(default=None, metadata={
        "help": "each expert's factor lora_alpha / r (None: 1 each)"})
    expert_dropouts: list[float] | None = field(default=None, metadata={
        "help": "each expert's lora_dropout (None: 0 each)"})
    hidden_size: int | None = field(default=None, metadata={
        "help": "the model's hidden size (None: model.config.hidden_size)"})
    enable_softmax: bool = field(default=True, metadata={"help": "softmax over the classifier's outputs (True)"})
    enable_softmax_topk: bool = field(default=False, metadata={
        "help": "softmax over the top_k_lora kept scalings (False)"})
    softmax_temperature: float = field(default=1.0, metadata={"help": "T of the softmax (1)"})
    layerwise_scalings: bool = field(default=False, metadata={
        "help": "one scaling per adapted layer and expert (False: the same for every layer)"})
    top_k_lora: int | None = field(default=None, metadata={"help": "keep the k largest scalings per token (None: all)"})
    xlora_depth: int = field(default=1, metadata={"help": "layers of the classifier (1: one Linear)"})
    xlora_size: int = field(default=2048, metadata={"help": "hidden width of a deeper classifier (2048)"})
    xlora_dropout_p: float = field(default=0.2, metadata={"help": "dropout in a deeper classifier (0.2)"})
    use_trainable_adapters: bool = field(default=False, metadata={"help": "train the experts too (False)"})
    scaling_pass_value: float = field(default=0.0, metadata={
        "help": "the scaling every expert gets in the scaling pass (0: the base model's hidden states)"})
    global_scaling_weight: float = field(default=1.0, metadata={"help": "factor on every expert's output (1)"})

    def validate(self) -> None:
        if not isinstance(self.adapters, dict) or not self.adapters:
            raise AdapterError("X-LoRA adapters must map one or more expert names to LoRA folders")
        for name, folder in self.adapters.items():
            check_adapter_name(name)
            if not isinstance(folder, str):
                raise AdapterError(f"X-LoRA adapters[{name!r}] must be a folder name, not {folder!r}")
        n = len(self.adapters)
        for label in ("expert_ranks", "expert_scales", "expert_dropouts"):
            value = getattr(self, label)
            if isinstance(value, tuple):
                value = list(value)
                setattr(self, label, value)
            if (value is not None or label == "expert_ranks") and (not isinstance(value, list) or len(value) != n):
                raise AdapterError(f"X-LoRA {label} must list one value per expert ({n}); make the config with "
                                   "XLoRAConfig.from_adapters to read them from the experts' folders")
        for rank in self.expert_ranks:
            check_int("X-LoRA", "expert_ranks", rank)
        for scale in self.expert_scales or []:
            check_number("X-LoRA", "expert_scales", scale, -math.inf)
        for dropout in self.expert_dropouts or []:
            check_number("X-LoRA", "expert_dropouts", dropout, 0.0, 1.0, high_open=True)
        if self.hidden_size is not None:
            check_int("X-LoRA", "hidden_size", self.hidden_size)
        for label in ("enable_softmax", "enable_softmax_topk", "layerwise_scalings", "use_trainable_adapters"):
            check_choice("X-LoRA", label, getattr(self, label), (True, False))
        check_number("X-LoRA", "softmax_temperature", self.softmax_temperature, 0.0, low_open=True)
        if self.top_k_lora is not None:
            if isinstance(self.top_k_lora, int) and not isinstance(self.top_k_lora, bool) and self.top_k_lora > n:
                raise AdapterError(f"X-LoRA top_k_lora must be at most the number of experts ({n}), "
                                   f"not {self.top_k_lora}")
            check_int("X-LoRA", "top_k_lora", self.top_k_lora)
        check_int("X-LoRA", "xlora_depth", self.xlora_depth)
        check_int("X-LoRA", "xlora_size", self.xlora_size)
        check_number("X-LoRA", "xlora_dropout_p", self.xlora_dropout_p, 0.0, 1.0, high_open=True)
        check_number("X-LoRA", "scaling_pass_value", self.scaling_pass_value, -math.inf)
        check_number("X-LoRA", "global_scaling_weight", self.global_scaling_weight, -math.inf)

    @classmethod
    def from_adapters(cls, adapters: dict[str, str | Path], **options: Any) -> XLoRAConfig:
        """A config for the LoRA experts saved in `adapters` ({name: folder}, in the classifier's order): their
        ranks, factors and dropouts, and `target_modules` the modules they adapt (the same for every expert)."""
        if not isinstance(adapters, dict) or not adapters:
            raise AdapterError("X-LoRA adapters must map one or more expert names to LoRA folders")
        shapes = {name: read_expert(folder, with_weights=False) for name, folder in adapters.items()}
        first, modules = next(iter(shapes)), next(iter(shapes.values())).modules
        for name, expert in shapes.items():
            if expert.modules != modules:
                other = sorted(set(expert.modules) ^ set(modules))[0]
                raise AdapterError(f"X-LoRA experts must adapt the same modules: {name!r} and {first!r} differ at "
                                   f"{other}")
        options.setdefault("target_modules", "|".join(re.escape(m) for m in modules))
        return cls(adapters={name: str(folder) for name, folder in adapters.items()},
                   expert_ranks=[e.rank for e in shapes.values()], expert_scales=[e.scale for e in shapes.values()],
                   expert_dropouts=[e.dropout for e in shapes.values()], **options)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["adapters"] = {name: "" for name in self.adapters}  # a saved X-LoRA carries its experts' weights
        return data

    def peft_config(self, hidden_size: int):
        """PEFT's own `XLoraConfig` with these settings (its `adapters` keys are PEFT's index names)."""
        from peft import XLoraConfig as PeftXLoraConfig

        return PeftXLoraConfig(
            hidden_size=hidden_size, adapters={str(i): folder for i, folder in enumerate(self.adapters.values())},
            enable_softmax=self.enable_softmax, enable_softmax_topk=self.enable_softmax_topk,
            softmax_temperature=self.softmax_temperature, layerwise_scalings=self.layerwise_scalings,
            top_k_lora=self.top_k_lora, xlora_depth=self.xlora_depth, xlora_size=self.xlora_size,
            xlora_dropout_p=self.xlora_dropout_p, use_trainable_adapters=self.use_trainable_adapters,
            scaling_pass_value=self.scaling_pass_value, global_scaling_weight=self.global_scaling_weight)

    def expert_shape(self, index: int) -> tuple[int, float, float]:
        """(rank, factor, dropout) of expert `index`."""
        return (self.expert_ranks[index], 1.0 if self.expert_scales is None else float(self.expert_scales[index]),
                0.0 if self.expert_dropouts is None else float(self.expert_dropouts[index]))

    # -- putting it into a model ---------------------------------------------------------------------------

    def inject(self, model: nn.Module, name: str, modules: list[str]) -> list[str]:
        self.validate()
        if any(isinstance(layer, XLoRALinear) for stack in layers_of(model).values() for layer in stack):
            raise AdapterError("the model has an X-LoRA adapter already; remove it before adding another")
        hidden_size = self.hidden_size or getattr(getattr(model, "config", None), "hidden_size", None)
        parameters = _forward_parameters(model)
        takes_hidden = "output_hidden_states" in parameters or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        if not isinstance(hidden_size, int) or not takes_hidden or not {"input_ids", "inputs_embeds"} & set(parameters):
            raise AdapterError(f"X-LoRA needs a transformers model (input_ids, output_hidden_states and "
                               f"config.hidden_size), not {type(model).__name__}")
        model_hidden = getattr(getattr(model, "config", None), "hidden_size", hidden_size)
        if hidden_size != model_hidden:
            raise AdapterError(f"X-LoRA hidden_size {hidden_size} differs from the model's {model_hidden}")
        experts = [read_expert(folder) if folder else None for folder in self.adapters.values()]
        for expert_name, expert in zip(self.adapters, experts, strict=True):
            if expert is not None and sorted(expert.modules) != sorted(modules):
                missing = sorted(set(modules) ^ set(expert.modules))[0]
                raise AdapterError(f"X-LoRA expert {expert_name!r} does not adapt the same modules as "
                                   f"target_modules (they differ at {missing})")
        from peft.tuners.xlora.classifier import XLoraClassifier

        peft_config = self.peft_config(hidden_size)
        routing = Routing(model=model, peft_config=peft_config)
        slots = {slot.name: slot for slot in module_slots(model)}
        layers = []
        for number, module in enumerate(modules):
            layer = XLoRALinear(slots[module].occupant, self, adapter_name=name, layer_number=number, routing=routing)
            for index, expert in enumerate(experts):
                if expert is not None:
                    layer.load_expert(index, *expert.weights[module])
            layers.append(layer)
        owner = layers[0]
        device = owner.original_module().weight.device
        owner.classifier = XLoraClassifier(model, peft_config, len(self.adapters), len(modules), device)
        routing.classifier = owner.classifier
        for module, layer in zip(modules, layers, strict=True):
            layer.train(slots[module].occupant.training)
            slots[module].put(layer)
        owner.attach(model)
        return modules


def _forward_parameters(model: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {}


# -- the experts' folders ----------------------------------------------------------------------------------


@dataclass
class Expert:
    """A LoRA read from a folder: its shape and, when asked, its weights {module: (A, B)}."""

    rank: int
    scale: float
    dropout: float
    modules: list[str]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)


def read_expert(folder: str | Path, with_weights: bool = True) -> Expert:
    """A LoRA saved by `save_adapter` (method "lora") or by PEFT's `save_pretrained` (plain LoRA, safetensors)."""
    folder = Path(folder)
    _, meta = read_config_json(folder, "X-LoRA experts are saved LoRA adapters")
    if isinstance(meta, dict) and meta.get("peft_type") is not None:
        expert = _peft_expert(folder, meta)
    else:
        config, meta = read_adapter_config(folder)
        if config.method != "lora":
            raise AdapterError(f"X-LoRA experts are LoRA adapters; {folder} holds a {config.method!r} adapter")
        expert = Expert(rank=config.rank, scale=float(config.scale), dropout=0.0, modules=list(meta["modules"]))
    if with_weights:
        state = read_adapter_weights(folder)
        prefix, suffix = (PEFT_PREFIX, ".weight") if meta.get("peft_type") is not None else ("", "")
        for module in expert.modules:
            keys = [f"{prefix}{module}.lora_{part}{suffix}" for part in "AB"]
            if any(key not in state for key in keys):
                raise AdapterError(f"{folder} lacks the LoRA weights of {module}")
            expert.weights[module] = (state[keys[0]], state[keys[1]])
    return expert


def _peft_expert(folder: Path, meta: dict[str, Any]) -> Expert:
    if meta.get("peft_type") != "LORA":
        raise AdapterError(f"X-LoRA experts are LoRA adapters; {folder} holds a PEFT {meta.get('peft_type')!r} adapter")
    unsupported = [key for key in ("use_dora", "lora_bias", "rank_pattern", "alpha_pattern", "layer_replication",
                                   "use_qalora", "target_parameters", "trainable_token_indices") if meta.get(key)]
    if unsupported:
        raise AdapterError(f"X-LoRA takes plain PEFT LoRA experts; {folder} uses {unsupported[0]}")
    rank, alpha = meta.get("r"), meta.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or not isinstance(alpha, (int, float)):
        raise AdapterError(f"{folder / CONFIG_NAME} lacks a valid r and lora_alpha")
    scale = alpha / rank ** 0.5 if meta.get("use_rslora") else alpha / rank
    state = read_adapter_weights(folder)
    modules = sorted(key[len(PEFT_PREFIX):-len(".lora_A.weight")] for key in state
                     if key.startswith(PEFT_PREFIX) and key.endswith(".lora_A.weight"))
    if not modules:
        raise AdapterError(f"{folder} holds no LoRA weights under {PEFT_PREFIX!r}")
    dropout = meta.get("lora_dropout", 0.0)
    return Expert(rank=rank, scale=float(scale), dropout=float(dropout or 0.0), modules=modules)


# -- the layer and the two passes ----------------------------------------------------------------------------


class Routing:
    """What the layers of one X-LoRA adapter share: the model it was added to, PEFT's config and classifier, and
    the scalings of the pass under way (PEFT's `XLoraLayer` reads `.disabled` on its model object)."""

    def __init__(self, model: nn.Module, peft_config: Any) -> None:
        self.model = model
        self.peft_config = peft_config
        self.classifier: nn.Module | None = None
        self.scalings: torch.Tensor | None = None
        self.latest: torch.Tensor | None = None
        self.disabled = False  # this package's own `disabled()` switches the layers off before PEFT's forward


class XLoRALinear(AdapterLayer):
    """One adapted Linear: PEFT's `lora.Linear` holding every expert, run by PEFT's `XLoraLinearLayer.forward`
    with the scalings of the current pass. The first layer of an adapter also holds the classifier."""

    def __init__(self, base_layer: nn.Module, config: XLoRAConfig, adapter_name: str = "default", *,
                 layer_number: int, routing: Routing) -> None:
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLoraLinear
        from peft.tuners.xlora.layer import XLoraLinearLayer

        super().__init__(base_layer, adapter_name)
        del self._modules["base_layer"]  # PEFT's layer registers the base module; it is held once, there
        self.config = config
        self.routing = routing
        names = [str(i) for i in range(len(config.adapters))]
        for index, name in enumerate(names):
            rank, scale, dropout = config.expert_shape(index)
            lora_config = LoraConfig(r=rank, lora_alpha=scale * rank, lora_dropout=dropout)
            if index == 0:
                self.lora = PeftLoraLinear(base_layer, name, config=lora_config, r=rank, lora_alpha=scale * rank)
            else:
                self.lora.update_layer(name, rank, lora_alpha=scale * rank, config=lora_config)
        self.lora.set_adapter(names)
        for part in (self.lora.lora_A, self.lora.lora_B):
            part.requires_grad_(config.use_trainable_adapters)
        self.xlora = XLoraLinearLayer(model=self.routing, target=self.lora, target_forward=self.lora.forward,
                                      layer_number=layer_number, config=self.routing.peft_config)
        self.layer_number = layer_number
        self.classifier: nn.Module | None = None

    @property
    def base_layer(self) -> nn.Module:
        return self.lora.base_layer

    def replace_base(self, module: nn.Module) -> None:
        self.lora.base_layer = module

    @torch.no_grad()
    def load_expert(self, index: int, down: torch.Tensor, up: torch.Tensor) -> None:
        """Copy one expert's factors A (r, in) and B (out, r) in, their shapes checked."""
        for part, value in ((self.lora.lora_A[str(index)].weight, down), (self.lora.lora_B[str(index)].weight, up)):
            if tuple(value.shape) != tuple(part.shape):
                name = list(self.config.adapters)[index]
                raise AdapterError(f"X-LoRA expert {name!r} has a factor of shape {tuple(value.shape)} where "
                                   f"{tuple(part.shape)} fits")
            part.copy_(value.to(part))

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The classifier, and the experts only when they train (`use_trainable_adapters`)."""
        if self.config.use_trainable_adapters:
            return super().adapter_parameters()
        return [] if self.classifier is None else list(self.classifier.parameters())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.applies:
            return self.base_layer(x, *args, **kwargs)
        return self.xlora.forward(x, *args, scalings=self.routing.scalings, **kwargs)

    # -- the model-level passes (on the adapter's first layer) ---------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Run the scaling pass before every forward pass of `model` (bound methods: a deep copy of the model
        rebinds them to its own copy of this layer)."""
        model.register_forward_pre_hook(self._scaling_pass, with_kwargs=True)
        model.register_forward_hook(self._clear_scalings, always_call=True)

    def detach_from_model(self) -> None:
        model = self.routing.model
        for hooks in (model._forward_pre_hooks, model._forward_hooks):
            for key, hook in list(hooks.items()):
                if getattr(hook, "__self__", None) is self:
                    del hooks[key]
                    for extra in (model._forward_pre_hooks_with_kwargs, model._forward_hooks_with_kwargs,
                                  model._forward_hooks_always_called):
                        extra.pop(key, None)
        self.routing.scalings = None

    def _scaling_pass(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        routing = self.routing
        routing.scalings = None
        if not self.applies or routing.classifier is None:
            return None
        parameters = _forward_parameters(model)
        try:
            named = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
        except TypeError:
            named = kwargs
        inputs = {"input_ids": named.get("input_ids"), "inputs_embeds": named.get("inputs_embeds")}
        kwargs = dict(kwargs)
        if "use_cache" in parameters:
            kwargs["use_cache"] = False
        routing.scalings = routing.classifier.make_dummy_scalings(**inputs)
        try:
            with torch.no_grad():
                base = model.forward(*args, **{**kwargs, "output_hidden_states": True, "return_dict": True})
        finally:
            routing.scalings = None
        scalings = routing.classifier(base, **inputs)
        routing.scalings, routing.latest = scalings, scalings.detach()
        return args, kwargs

    def _clear_scalings(self, model: nn.Module, args: tuple, output: Any) -> None:
        self.routing.scalings = None


XLoRAConfig.layer_cls = XLoRALinear


def _owner(model: nn.Module, name: str) -> XLoRALinear:
    layers = [stack[0] for stack in layers_of(model, name).values() if isinstance(stack[0], XLoRALinear)]
    owner = next((layer for layer in layers if layer.classifier is not None), None)
    if owner is None:
        raise AdapterError(f"the model has no X-LoRA adapter named {name!r}")
    return owner


def xlora_scalings(model: nn.Module, name: str = "default") -> torch.Tensor:
    """The scalings of the last forward pass, (batch, seq, adapted layers, experts), as PEFT's
    `get_latest_scalings` (after `top_k_lora` and `enable_softmax_topk`, which each layer applies, not included)."""
    latest = _owner(model, name).routing.latest
    if latest is None:
        raise AdapterError(f"X-LoRA adapter {name!r} has not run yet; call the model first")
    return latest


def xlora_experts(model: nn.Module, name: str = "default") -> list[str]:
    """The expert names of an X-LoRA adapter, in the order of the scalings' last dimension."""
    return list(_owner(model, name).config.adapters)


register_method(
    "xlora", XLoRAConfig, title="X-LoRA", mergeable=False, identity_at_init=False, requires=("peft",),
    paper="Buehler and Buehler, X-LoRA: Mixture of Low-Rank Adapter Experts, a Flexible Framework for Large "
          "Language Models with Applications in Protein Mechanics and Molecular Design (arXiv 2402.07148); "
          "PEFT's XLoraConfig",
    property="frozen LoRA experts mixed per token by a classifier that reads the model's own hidden states",
)
