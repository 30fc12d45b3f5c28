"""The adapter verbs, the same for every method, on any PyTorch model; and the registry of methods.

    names = add_adapter(model, DyLoRAConfig(rank=8, target_modules=["query", "value"]), name="task")
    set_active(model, ["task"])          # which adapters take part in the forward pass
    with disabled(model): ...            # the base model, bit for bit
    merge(model); unmerge(model)         # unmerge restores the base weights exactly
    save_adapter(model, "out/task", "task"); load_adapter(other_model, "out/task")
    remove_adapter(model, "task")        # the original modules come back

A method is a config dataclass (a subclass of `AdapterConfig` naming its layer class) and a layer class (a
subclass of `AdapterLayer`), registered with `register_method`. Methods whose adapters are not one layer per
module (a router across layers, a model-level mode switch) override `AdapterConfig.inject`.

Modules are named as in the model before any adapter was added: a module `encoder.layer.0.attention.query` keeps
that name when one or several adapters wrap it, and every key of an adapter's state dict starts with it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.adapters.base import AdapterLayer, check_state_fits
from pipelines.errors import InvalidAdapter
from pipelines.storage import atomic_file

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "blockstudio-adapter"
FORMAT_VERSION = 1
MAX_CONFIG_BYTES = 1 << 20
_ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_RESTORING = contextvars.ContextVar("blockstudio_adapter_restoring", default=False)


def restoring_state() -> bool:
    """True while `load_adapter` builds the layers whose tensors the saved state is about to overwrite: a method
    whose initialisation is costly (a decomposition of every weight) may skip it then."""
    return _RESTORING.get()


class AdapterError(InvalidAdapter):
    """A config, name or adapter file that does not fit the model; the model is left as it was."""


# -- configs ------------------------------------------------------------------------------------------------


@dataclass
class AdapterConfig:
    """What every method's config shares: which modules to adapt.

    `target_modules`: a list of names matched as suffixes at a dot boundary (`"query"` matches
    `encoder.layer.0.attention.self.query`), or one string used as a regular expression that must match a
    module's whole name. `exclude_modules` takes the same forms and wins over `target_modules`.
    Both are keyword-only, so a method's own fields keep their positions. Subclasses set `method` (the
    registry name) and `layer_cls`.
    """

    method: ClassVar[str] = ""
    layer_cls: ClassVar[type[AdapterLayer] | None] = None

    target_modules: list[str] | str | None = field(default=None, kw_only=True,
                                                   metadata={"help": "module suffixes, or a regex"})
    exclude_modules: list[str] | str | None = field(default=None, kw_only=True,
                                                    metadata={"help": "modules to leave alone"})

    def __post_init__(self) -> None:
        for label in ("target_modules", "exclude_modules"):
            setattr(self, label, check_module_pattern(label, getattr(self, label)))
        self.validate()

    def validate(self) -> None:
        """Check the method's own fields; raise AdapterError naming the field and its allowed range."""

    # -- targets ---------------------------------------------------------------------------------------

    def matches(self, name: str) -> bool:
        return _matches(self.target_modules, name) and not (
            self.exclude_modules is not None and _matches(self.exclude_modules, name))

    def accepts(self, module: nn.Module) -> bool:
        """Whether this method can wrap `module` (Linear-like layers by default)."""
        layer_cls = self.layer_cls
        if layer_cls is not None and not layer_cls.wraps_linear:
            return True
        return hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight")

    def make_layer(self, base: nn.Module, name: str, module: str = "") -> AdapterLayer:
        """The adapter layer for one module; `name` is the adapter's name, `module` the module's original name."""
        if self.layer_cls is None:
            raise NotImplementedError(f"{type(self).__name__} names no layer class")
        return self.layer_cls(base, self, adapter_name=name)

    def inject(self, model: nn.Module, name: str, modules: list[str]) -> list[str]:
        """Wrap each of `modules` (original names) with this method's layer. Override for model-level methods."""
        slots = {slot.name: slot for slot in module_slots(model)}
        layers = [(slots[m], self.make_layer(slots[m].occupant, name, m)) for m in modules]
        for slot, layer in layers:
            layer.train(slot.occupant.training)  # dropout and the like follow the mode of the model it joins
            slot.put(layer)
        return modules

    # -- files -----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise AdapterError(f"{cls.method} config has an unknown field {unknown[0]!r}")
        return cls(**data)


def check_module_pattern(label: str, value: Any) -> list[str] | str | None:
    """A field naming modules: a list of names (a tuple becomes a list), one regular expression, or None."""
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise AdapterError(f"{label} {value!r} is not a valid regular expression ({exc})") from None
    elif value is not None and (not isinstance(value, list) or not all(isinstance(v, str) and v for v in value)):
        raise AdapterError(f"{label} must be a list of module names or one regular expression")
    return value


def is_integer(value: object) -> bool:
    """An int and not a bool (for validating config fields)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite int or float and not a bool (for validating config fields)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def exact_targets(modules: Iterable[str]) -> str:
    """A `target_modules` pattern naming exactly `modules` (original module names) and nothing else."""
    return "|".join(re.escape(m) for m in modules)


def _matches(pattern: list[str] | str | None, name: str) -> bool:
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


# -- where modules sit -------------------------------------------------------------------------------------


@dataclass
class Slot:
    """One module of the model under its original name: the parent holding it, and what sits there now."""

    name: str
    parent: nn.Module
    attr: str

    @property
    def occupant(self) -> nn.Module:
        return getattr(self.parent, self.attr)

    @property
    def original(self) -> nn.Module:
        module = self.occupant
        return module.original_module() if isinstance(module, AdapterLayer) else module

    def stack(self) -> list[AdapterLayer]:
        """The adapter layers on this module, outermost first."""
        layers, module = [], self.occupant
        while isinstance(module, AdapterLayer):
            layers.append(module)
            module = module.base_layer
        return layers

    def put(self, module: nn.Module) -> None:
        setattr(self.parent, self.attr, module)


def module_slots(model: nn.Module) -> Iterator[Slot]:
    """Every submodule under its original name, looking through adapter layers (not into their own parts)."""

    def walk(module: nn.Module, prefix: str) -> Iterator[Slot]:
        # Not named_children(): it skips a module seen before, and a module shared by several places (tied
        # layers) is one slot per place here.
        for attr, child in module._modules.items():
            if child is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            slot = Slot(name, module, attr)
            yield slot
            yield from walk(slot.original, name)

    yield from walk(model, "")


def layers_of(model: nn.Module, name: str | None = None) -> dict[str, list[AdapterLayer]]:
    """{original module name: its adapter layers, outermost first}, only those of adapter `name` if given."""
    found: dict[str, list[AdapterLayer]] = {}
    for slot in module_slots(model):
        stack = [layer for layer in slot.stack() if name is None or layer.adapter_name == name]
        if stack:
            found[slot.name] = stack
    return found


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters in `model`, in the order they were first found."""
    names: dict[str, None] = {}
    for stack in layers_of(model).values():
        for layer in reversed(stack):
            names.setdefault(layer.adapter_name, None)
    return list(names)


def _single_layers(model: nn.Module, name: str) -> dict[str, AdapterLayer]:
    layers = {module: stack[0] for module, stack in layers_of(model, name).items()}
    if not layers:
        raise AdapterError(f"the model has no adapter named {name!r} (it has: {', '.join(adapter_names(model)) or 'none'})")
    return layers


def method_layers(model: nn.Module, name: str, layer_cls: type[AdapterLayer], title: str) -> dict[str, Any]:
    """{module: layer} of adapter `name`, which must be a `title` adapter (for a method's own model-level steps)."""
    layers = _single_layers(model, name)
    if not all(isinstance(layer, layer_cls) for layer in layers.values()):
        raise AdapterError(f"adapter {name!r} is not a {title} adapter")
    return layers


# -- the registry -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its config class and what the lab says of it."""

    name: str
    config_cls: type[AdapterConfig]
    title: str
    paper: str  # authors, title, venue, arXiv id
    property: str  # the one thing a demo of it shows
    identity_at_init: bool = True  # a new adapter leaves the model's outputs unchanged
    mergeable: bool = True  # merge() folds it into the base weights exactly
    studio: bool = False  # one of the studio's own training layers rather than a lab method
    requires: tuple[str, ...] = ()  # optional packages it needs

    def available(self) -> tuple[bool, str]:
        """Whether the method can run here, and if not, why."""
        import importlib.util

        for package in self.requires:
            if importlib.util.find_spec(package) is None:
                return False, f"{self.title} needs the {package} package (pip install {package})"
        return True, ""


METHODS: dict[str, MethodInfo] = {}


def register_method(name: str, config_cls: type[AdapterConfig], *, title: str, paper: str, property: str,
                    **options: Any) -> MethodInfo:
    """Add a method to `METHODS`. Called once where the method is defined."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise ValueError(f"method names are lower-case words joined by '-', not {name!r}")
    if config_cls.method != name:
        raise ValueError(f"{config_cls.__name__}.method is {config_cls.method!r}, not {name!r}")
    if name in METHODS and METHODS[name].config_cls is not config_cls:
        raise ValueError(f"a method named {name!r} is registered already")
    info = MethodInfo(name=name, config_cls=config_cls, title=title, paper=paper, property=property, **options)
    METHODS[name] = info
    return info


def method_of(config: AdapterConfig) -> MethodInfo:
    info = METHODS.get(type(config).method)
    if info is None or info.config_cls is not type(config):
        raise AdapterError(f"{type(config).__name__} is not a registered adapter method")
    return info


# -- the verbs ----------------------------------------------------------------------------------------------


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not _ADAPTER_NAME_RE.fullmatch(name):
        raise AdapterError(f"adapter name {name!r} must be 1-64 letters, digits, '-' or '_', starting with a "
                           "letter or digit")
    return name


def target_names(model: nn.Module, config: AdapterConfig) -> list[str]:
    """The original names of the modules `config` adapts in `model`; an error naming the config if none."""
    if config.target_modules is None:
        raise AdapterError(f"{config.method} config names no target_modules")
    names = [slot.name for slot in module_slots(model) if config.matches(slot.name)]
    if not names:
        example = next((s.name for s in module_slots(model) if hasattr(s.original, "in_features")), None)
        hint = f" (module names look like {example!r})" if example else ""
        raise AdapterError(f"target_modules {config.target_modules!r} names no module of this model{hint}")
    slots = {slot.name: slot for slot in module_slots(model)}
    for name in names:
        if not config.accepts(slots[name].original):
            raise AdapterError(f"{config.method} cannot adapt {name} ({type(slots[name].original).__name__})")
    return names


@contextlib.contextmanager
def _all_or_nothing(model: nn.Module) -> Iterator[None]:
    """Undo everything a failed add or load did: wrappers out, requires_grad flags back."""
    before_names = set(adapter_names(model))
    flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
    try:
        yield
    except BaseException:
        for added in set(adapter_names(model)) - before_names:
            _remove(model, added)
        for p, flag in flags.values():
            p.requires_grad_(flag)
        raise


def add_adapter(model: nn.Module, config: AdapterConfig, name: str = "default", *,
                freeze_base: bool = True) -> list[str]:
    """Wrap the modules `config.target_modules` names with the config's method; return their names.

    With `freeze_base` (the default) every parameter of the model that is not an adapter's stops requiring
    gradients, as PEFT's `get_peft_model` does; `remove_adapter` gives the flags back. On any error the model
    is left exactly as it was.
    """
    method_of(config)
    check_adapter_name(name)
    if name in adapter_names(model):
        raise AdapterError(f"the model has an adapter named {name!r} already; remove it or choose another name")
    if any(layer.merged for stack in layers_of(model).values() for layer in stack):
        raise AdapterError("unmerge the model's adapters before adding another")
    modules = target_names(model, config)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    with _all_or_nothing(model):
        wrapped = config.inject(model, name, modules)
        for layer in [s[0] for s in layers_of(model, name).values()]:
            layer.adapter_config = config
            layer.saved_requires_grad = None
        # The layers froze the modules they wrap; with freeze_base the rest of the model follows. Whatever was
        # trainable before and is frozen now is remembered, for remove_adapter to give back.
        adapters = {id(p) for p in trainable_parameters(model)}
        frozen = [p for p in model.parameters()
                  if id(p) not in adapters and flags.get(id(p)) and (freeze_base or not p.requires_grad)]
        for p in frozen:
            p.requires_grad_(False)
        next(iter(layers_of(model, name).values()))[0].saved_requires_grad = frozen
    return wrapped


def set_active(model: nn.Module, names: str | Iterable[str]) -> None:
    """Make exactly the adapters `names` take part in the forward pass (the others stay in the model)."""
    wanted = [names] if isinstance(names, str) else list(names)
    present = adapter_names(model)
    for name in wanted:
        if name not in present:
            raise AdapterError(f"the model has no adapter named {name!r} (it has: {', '.join(present) or 'none'})")
    stacks = layers_of(model).values()
    if any(layer.merged for stack in stacks for layer in stack):
        raise AdapterError("unmerge the model before changing its active adapters")
    for stack in stacks:
        for layer in stack:
            layer.active = layer.adapter_name in wanted


def active_adapters(model: nn.Module) -> list[str]:
    return [n for n in adapter_names(model)
            if any(layer.active for stack in layers_of(model, n).values() for layer in stack)]


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, the model computes exactly what it computed before any adapter was added."""
    merged = _merged_in_order(model)
    for layer in reversed(merged):
        layer.unmerge()
    layers = [layer for stack in layers_of(model).values() for layer in stack]
    flags = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, flags, strict=True):
            layer.disabled = flag
        for layer in merged:
            layer.merge()


def _merged_in_order(model: nn.Module) -> list[AdapterLayer]:
    merged = [layer for stack in layers_of(model).values() for layer in stack if layer.merged]
    return sorted(merged, key=lambda layer: layer.merge_order)


def merge(model: nn.Module, names: str | Iterable[str] | None = None) -> None:
    """Fold the active adapters (or `names`) into the base weights; forward then skips their branches."""
    wanted = None if names is None else ([names] if isinstance(names, str) else list(names))
    for name in wanted or active_adapters(model):
        stacks = layers_of(model, name)
        if not stacks:
            raise AdapterError(f"the model has no adapter named {name!r}")
        config = next(iter(stacks.values()))[0].adapter_config
        info = METHODS.get(config.method) if config is not None else None
        if info is not None and not info.mergeable:
            raise AdapterError(f"{info.title} adapters cannot be merged into the weights ({info.property})")
        for stack in stacks.values():
            for layer in reversed(stack):
                layer.merge()


def unmerge(model: nn.Module) -> None:
    """Put back the exact base weights, undoing merges newest first."""
    for layer in reversed(_merged_in_order(model)):
        layer.unmerge()


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """{"<module>.<tensor>": tensor} of adapter `name`, keyed by the modules' original names."""
    state = {}
    for module, layer in _single_layers(model, name).items():
        for key, tensor in layer.adapter_state_dict().items():
            state[f"{module}.{key}"] = tensor
    return state


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], name: str = "default") -> None:
    """Copy `state` into adapter `name`; every key, shape and value is checked before anything changes."""
    layers = _single_layers(model, name)
    own = {f"{m}.{k}": t for m, layer in layers.items() for k, t in layer.adapter_named_tensors()}
    try:
        check_state_fits(own, state)
    except ValueError as exc:
        raise AdapterError(str(exc).replace("this layer", f"adapter {name!r}")) from None
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise AdapterError(f"adapter tensor {key!r} holds NaN or infinite values")
        if value.dtype == torch.bool or (not value.is_floating_point() and own[key].is_floating_point()):
            raise AdapterError(f"adapter tensor {key!r} is {value.dtype}, expected floating point")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(device=own[key].device, dtype=own[key].dtype))


def adapter_config(model: nn.Module, name: str = "default") -> AdapterConfig:
    layer = next(iter(_single_layers(model, name).values()))
    if layer.adapter_config is None:
        raise AdapterError(f"adapter {name!r} was put in by hand and has no config; add it with add_adapter")
    return layer.adapter_config


def save_adapter(model: nn.Module, folder: str | Path, name: str = "default") -> Path:
    """Write adapter `name` to `folder`: `adapter_model.safetensors` and `adapter_config.json` naming its method."""
    folder = Path(folder)
    config = adapter_config(model, name)
    state = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(model, name).items()}
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "method": config.method, "name": name,
            "modules": sorted(_single_layers(model, name)), "config": config.to_dict()}
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / WEIGHTS_NAME) as tmp:
        save_file(state, tmp, metadata={"format": FORMAT, "method": config.method})
    with atomic_file(folder / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder


def read_config_json(folder: str | Path, hint: str = "save adapters with save_adapter") -> tuple[Path, Any]:
    """The path and parsed JSON of `folder`'s adapter_config.json (a real file of bounded size), or one line."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file() or path.is_symlink():
        raise AdapterError(f"{folder} holds no {CONFIG_NAME}; {hint}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(f"{path} is too large to be an adapter config")
    try:
        return path, json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise AdapterError(f"{path} is not valid JSON") from None


def read_adapter_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of `folder`'s adapter_model.safetensors (a real file), or one line."""
    weights = Path(folder) / WEIGHTS_NAME
    if not weights.is_file() or weights.is_symlink():
        raise AdapterError(f"{folder} holds no {WEIGHTS_NAME}")
    try:
        return load_file(weights)
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise AdapterError(f"{weights} is not a readable safetensors file ({type(exc).__name__})") from None


def read_adapter_config(folder: str | Path) -> tuple[AdapterConfig, dict[str, Any]]:
    """The config an adapter folder was saved with, checked; and the file's other facts (name, modules)."""
    path, meta = read_config_json(folder)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterError(f"{path} is not a Block Studio adapter config")
    if not isinstance(meta.get("version"), int) or meta["version"] > FORMAT_VERSION:
        raise AdapterError(f"{path} was written by a newer Block Studio (format {meta.get('version')}); upgrade")
    method = meta.get("method")
    if method not in METHODS:
        raise AdapterError(f"{path} is a {method!r} adapter, a method this version does not know "
                           f"(known: {', '.join(sorted(METHODS))})")
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("modules"), list):
        raise AdapterError(f"{path} lacks its config or module list")
    try:
        config = METHODS[method].config_cls.from_dict(meta["config"])
    except TypeError as exc:
        raise AdapterError(f"{path}: {exc}") from None
    return config, meta


def load_adapter(model: nn.Module, folder: str | Path, name: str | None = None, *,
                 freeze_base: bool = True) -> str:
    """Add the adapter saved in `folder` to `model` (under its saved name, or `name`); return the name used.

    The saved config names the method, so no other hint is needed. Keys, shapes and values are checked; on
    any mismatch the model is left exactly as it was.
    """
    folder = Path(folder)
    config, meta = read_adapter_config(folder)
    name = check_adapter_name(name or meta.get("name") or "default")
    state = read_adapter_weights(folder)
    modules = [m for m in meta["modules"] if isinstance(m, str)]
    exact = dataclasses.replace(config, target_modules=exact_targets(modules), exclude_modules=None)
    found = target_names(model, exact)
    if sorted(found) != sorted(modules):
        missing = sorted(set(modules) - set(found))
        raise AdapterError(f"the adapter in {folder} adapts {missing[0] if missing else found[0]}, which this model "
                           "does not have in the same place")
    with _all_or_nothing(model):
        token = _RESTORING.set(True)
        try:
            add_adapter(model, exact, name, freeze_base=freeze_base)
        finally:
            _RESTORING.reset(token)
        for layer in [s[0] for s in layers_of(model, name).values()]:
            layer.adapter_config = config
        load_adapter_state_dict(model, state, name)
    return name


def _remove(model: nn.Module, name: str) -> None:
    for slot in module_slots(model):
        above: AdapterLayer | None = None
        module = slot.occupant
        while isinstance(module, AdapterLayer):
            below = module.base_layer
            if module.adapter_name == name:
                restore = getattr(module, "saved_requires_grad", None)
                module.unmerge()
                module.detach_from_model()
                if above is None:
                    slot.put(below)
                else:
                    above.replace_base(below)
                for p in restore or []:
                    p.requires_grad_(True)
            else:
                above = module
            module = below


def remove_adapter(model: nn.Module, name: str = "default") -> None:
    """Take adapter `name` out; the modules it wrapped come back as they were (merges undone first)."""
    if name not in adapter_names(model):
        raise AdapterError(f"the model has no adapter named {name!r}")
    merged = _merged_in_order(model)
    for layer in reversed(merged):
        layer.unmerge()
    _remove(model, name)
    for layer in merged:
        if layer.adapter_name != name:
            layer.merge()


def replace_adapter(model: nn.Module, name: str, config: AdapterConfig, state: dict[str, torch.Tensor]) -> None:
    """Put an adapter of `config` holding `state` where adapter `name` is, under the same name and activity."""
    active = active_adapters(model)
    adapter_ids = {id(p) for p in trainable_parameters(model)}
    freeze = not any(p.requires_grad for p in model.parameters() if id(p) not in adapter_ids)
    remove_adapter(model, name)
    add_adapter(model, config, name, freeze_base=freeze)
    load_adapter_state_dict(model, state, name)
    if name not in active:
        set_active(model, active)


def trainable_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The parameters of adapter `name` (or of every adapter), each once."""
    seen, params = set(), []
    for stack in layers_of(model, name).values():
        for layer in stack:
            for p in layer.adapter_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


def count_parameters(model: nn.Module, name: str | None = None) -> int:
    return sum(p.numel() for p in trainable_parameters(model, name))


def map_layers(model: nn.Module, name: str, fn: Callable[[str, AdapterLayer], Any]) -> dict[str, Any]:
    """Call `fn(module_name, layer)` on each layer of adapter `name`; return their results by module."""
    return {module: fn(module, layer) for module, layer in _single_layers(model, name).items()}
