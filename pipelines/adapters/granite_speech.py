"""Granite-speech's speech-mode LoRA: on when the model is given audio features, off otherwise.

Saon et al., "Granite-speech: open-source speech-aware LLMs with strong English ASR capabilities" (arXiv
2505.08699); the reference implementation is transformers' `GraniteSpeechForConditionalGeneration`
(`models/granite_speech/modeling_granite_speech.py`). A speech LLM there is a Conformer encoder (CTC-trained, with
self-conditioning from its middle layer), a windowed Q-Former projector whose outputs replace the `<|audio|>`
tokens, and the text LLM with a LoRA. In speech mode the encoder, the projector and the LoRA are used; in text
mode the underlying LLM is called as it is, without the LoRA, so every text ability of the base model is kept
exactly. Transformers switches PEFT's adapters on or off in `generate`, by whether `input_features` were passed.

Here the switch belongs to the adapter: `add_adapter(model, SpeechLoRAConfig(target_modules=[...]))` puts LoRA
branches on the named layers of the LLM and a forward pre-hook on `model` (the module whose `forward` receives
the audio features, e.g. a whole speech LLM). Each call of `model` with the features argument set (not None)
runs in speech mode; each call without runs in text mode, where every wrapped layer returns its base layer's
output untouched, bit for bit. Outside calls of `model` the layers rest in text mode, so calling the LLM
directly always gives the base LLM. A call that continues a cached sequence (a non-empty `cache` /
`past_key_values` argument) without features keeps the mode of the call that started it: `generate` passes the
features to the first forward only, and decodes the rest of a speech prompt in speech mode, as transformers'
`generate` keeps the adapter on for the whole call.

Defaults and where they come from:
- rank 64: vLLM serves the released granite-speech-3.3 checkpoints with `--max-lora-rank 64`; the LoRA's own
  config (alpha, dropout, targets) was not found in what could be read, nor the paper's section on it.
- alpha = rank (factor 1), dropout 0: choices, each a field.
- the LoRA is PEFT's (A Kaiming-uniform, B zero), so a new adapter changes nothing in either mode.
Choices left open, each a field: `features_argument` (the keyword carrying the audio; transformers' name by
default), `keep_mode_while_decoding` (the cache rule above). A batch is in one mode per call, as in transformers
(mixed speech and text batches would need per-row adapters). The adapter does not merge: a merged LoRA would be in
the text mode too.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from pipelines.adapters._peft_lora import PeftLoRALinear
from pipelines.adapters.base import AdapterLayer
from pipelines.adapters.core import AdapterConfig, AdapterError, adapter_names, layers_of, register_method
from pipelines.adapters.fields import check_int, check_number

_ARGUMENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_CACHE_ARGUMENTS = ("cache", "past_key_values")


@dataclass
class SpeechLoRAConfig(AdapterConfig):
    """A LoRA on the LLM's layers that acts only in speech mode (calls of the model given audio features)."""

    method = "granite-speech"

    rank: int = field(default=64, metadata={"help": "LoRA rank r (granite-speech-3.3 is served with rank 64)"})
    alpha: float | None = field(default=None, metadata={
        "help": "the update is multiplied by alpha / r; None means alpha = r (factor 1)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch's input"})
    features_argument: str = field(default="input_features", metadata={
        "help": "the argument of the model's forward that carries the audio features (speech mode when set)"})
    keep_mode_while_decoding: bool = field(default=True, metadata={
        "help": "a call without features that continues a cached sequence keeps the mode that sequence began in"})

    def validate(self) -> None:
        check_int("Granite-speech", "rank", self.rank)
        if self.alpha is not None:
            check_number("Granite-speech", "alpha", self.alpha, 0.0, low_open=True)
        check_number("Granite-speech", "dropout", self.dropout, 0.0, 1.0, high_open=True)
        if not isinstance(self.features_argument, str) or not _ARGUMENT_RE.fullmatch(self.features_argument):
            raise AdapterError(f"Granite-speech features_argument must be a Python argument name, not "
                               f"{self.features_argument!r}")
        if not isinstance(self.keep_mode_while_decoding, bool):
            raise AdapterError("Granite-speech keep_mode_while_decoding must be true or false")

    @property
    def scale_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def inject(self, model: nn.Module, name: str, modules: list[str]) -> list[str]:
        position = _argument_position(model, self.features_argument)
        wrapped = super().inject(model, name, modules)
        layers = [layer for stack in layers_of(model, name).values() for layer in stack]
        switch = ModeSwitch(layers, self.features_argument, position, self.keep_mode_while_decoding)
        handles = (model.register_forward_pre_hook(switch.before, with_kwargs=True),
                   model.register_forward_hook(switch.after, always_call=True))
        for layer in layers:
            layer.switch, layer.hooks = switch, handles
        return wrapped


def _argument_position(model: nn.Module, argument: str) -> int | None:
    """Where `argument` sits among `model.forward`'s positional parameters (None: keyword only); an error if the
    forward cannot take it at all."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    names = [p.name for p in parameters]
    if argument in names:
        parameter = parameters[names.index(argument)]
        if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            return names.index(argument)
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    raise AdapterError(f"{type(model).__name__}.forward takes no argument {argument!r}; add the speech adapter to "
                       f"the model that receives the audio features, or set features_argument to its name")


def _continues_cache(kwargs: dict[str, Any]) -> bool:
    for key in _CACHE_ARGUMENTS:
        cache = kwargs.get(key)
        if cache is None:
            continue
        length = getattr(cache, "get_seq_length", None)
        if callable(length):
            return int(length()) > 0
        if isinstance(cache, (tuple, list)):
            return len(cache) > 0
        return True
    return False


class ModeSwitch:
    """The hooks on the model: speech mode for a call given audio features, text mode otherwise and between calls."""

    def __init__(self, layers: list[SpeechLoRALinear], argument: str, position: int | None,
                 keep_while_decoding: bool) -> None:
        self.layers = layers
        self.argument = argument
        self.position = position
        self.keep_while_decoding = keep_while_decoding
        self.sequence_speech = False  # the mode of the sequence the last call began
        self.forced: bool | None = None

    def features_given(self, args: tuple, kwargs: dict[str, Any]) -> bool:
        if self.argument in kwargs:
            return kwargs[self.argument] is not None
        return self.position is not None and len(args) > self.position and args[self.position] is not None

    def before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self.forced is not None:
            speech = self.forced
        elif self.features_given(args, kwargs):
            speech = True
        elif self.keep_while_decoding and _continues_cache(kwargs):
            speech = self.sequence_speech
        else:
            speech = False
        self.sequence_speech = speech
        for layer in self.layers:
            layer.speech = speech

    def after(self, module: nn.Module, args: tuple, output: Any) -> None:
        for layer in self.layers:
            layer.speech = False


class SpeechLoRALinear(PeftLoRALinear):
    """A LoRA branch that adds its update only while the model runs in speech mode."""

    def __init__(self, base_layer: nn.Module, config: SpeechLoRAConfig | None = None,
                 adapter_name: str = "default") -> None:
        config = config or SpeechLoRAConfig()
        super().__init__(base_layer, config.rank, config.scale_alpha, config.dropout, adapter_name)
        self.speech = False
        self.switch: ModeSwitch | None = None
        self.hooks: tuple = ()

    @property
    def applies(self) -> bool:
        return self.speech and super().applies

    def detach_from_model(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks = ()
        self.switch = None
        self.speech = False


SpeechLoRAConfig.layer_cls = SpeechLoRALinear


def _switch_of(model: nn.Module, name: str | None) -> ModeSwitch:
    names = [n for n in adapter_names(model)
             if any(isinstance(layer, SpeechLoRALinear) for stack in layers_of(model, n).values() for layer in stack)]
    if name is None:
        if len(names) != 1:
            raise AdapterError(f"the model has {len(names) or 'no'} speech adapters; name the one to switch")
        name = names[0]
    elif name not in names:
        raise AdapterError(f"the model has no speech adapter named {name!r}")
    layer = next(iter(layers_of(model, name).values()))[0]
    if layer.switch is None:
        raise AdapterError(f"speech adapter {name!r} has no mode switch; add it with add_adapter")
    return layer.switch


@contextlib.contextmanager
def forced_mode(model: nn.Module, speech: bool, name: str | None = None) -> Iterator[nn.Module]:
    """Inside, every call of `model` runs in speech mode (`speech=True`) or text mode, whatever its arguments:
    to train the LoRA on inputs the hook cannot see, or to show what the LoRA would do to text prompts."""
    if not isinstance(speech, bool):
        raise AdapterError("forced_mode takes speech=True or speech=False")
    switch = _switch_of(model, name)
    before = switch.forced
    switch.forced = speech
    try:
        yield model
    finally:
        switch.forced = before


def speech_layers(model: nn.Module, name: str | None = None) -> list[AdapterLayer]:
    """The speech adapter's layers (of adapter `name`, or of the model's only speech adapter)."""
    return list(_switch_of(model, name).layers)


register_method(
    "granite-speech", SpeechLoRAConfig, title="Granite-speech (speech-mode LoRA)", mergeable=False,
    paper="Saon et al., Granite-speech: open-source speech-aware LLMs with strong English ASR capabilities, "
          "2025 (arXiv 2505.08699)",
    property="a LoRA active only when audio features are given: the text mode is the base LLM bit for bit",
)
