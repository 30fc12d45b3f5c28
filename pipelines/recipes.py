"""The training recipes: each registers one `RecipeSpec`, and the shared path from one image to one package.

A recipe is one package under `pipelines/` (`pipelines/blora/`, `pipelines/splitflux/`) whose `__init__` calls
`register_recipe(RecipeSpec(...))`. The spec says everything the rest of the studio needs to know of it:

- what it is: `key` (adapter.json's `method`, job records, the Train form), `command` (`blockstudio train
  <command>`), `name`, `label`, `arch` (a key of `pipelines.models.ARCHITECTURES`), `blurb`;
- its settings: `settings`, the request dataclass (a `RunRequest` subclass) whose fields carry one default
  each, their checks and their CLI and form metadata (`pipelines/settings.py`), and whose `validate()` is the
  one place a request is checked;
- its parts: `parts` (file stems, what each holds, which are optional), `composition` (which part mixing, the
  content alone, new prompts and a style load), `subject` (how prompts name the subject: `[c]`, `[c] object`),
  the token formats it derives from an image, `samples` and the `preview_prompt`;
- its functions: `train` (what `blockstudio train` and the jobs call), and the hooks `train_package` calls:
  `settings_for` (the recipe's resolved settings from a request), `job_fields`, `train_config`,
  `load_pipeline`, `make_recipe` (the loop's `Recipe`, which also exports its parts and removes its adapters);
- what else reads it: `adapters` (lora, dylora, sora), `extras` (request values the Train form derives from the
  rank), `card_notes` and `card_settings` (the model card), `importer` (`blockstudio import --method`) and
  `split` (writing a package again at another rank).

`train_package` is the one train-to-package path: validate, load the pipeline, prepare the work folder, train,
export the parts, remove the adapters, render the samples, write adapter.json and the package, clean up.
"""

from __future__ import annotations

import dataclasses
import importlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipelines.errors import BlockStudioError, InvalidSetting
from pipelines.package_info import USES, Composition
from pipelines.settings import SettingField, check_value, setting_fields

# The recipes that ship with Block Studio: the packages imported on first use of the registry.
BUILTIN_RECIPES = ("pipelines.blora", "pipelines.splitflux")


@dataclass(frozen=True)
class PartSpec:
    """One part of a recipe's packages: its file stem (`<name>.safetensors`) and what it holds."""

    name: str
    description: str
    optional: bool = False  # loaded only when asked for, beside the content part and at its scale


@dataclass(frozen=True)
class SampleSpec:
    """A sample image of a package: the parts loaded together (those a run did not make are left out), the
    prompt (`{token}` and `{style_token}` stand for the run's tokens) and the caption the Train tab shows."""

    stem: str
    parts: tuple[str, ...]
    prompt: str
    caption: str


@dataclass(frozen=True)
class ImportSpec:
    """What `blockstudio import --method <key>` accepts and how it makes a package of it.

    `split(canonical)` turns the file's canonical LoRA state into the recipe's parts, raising `InvalidAdapter`
    for weights the recipe does not train; `blocks` names each part's blocks for adapter.json.
    """

    layouts: str  # what files it reads, for the help
    split: Callable[[dict[str, torch.Tensor]], dict[str, dict[str, torch.Tensor]]]
    blocks: dict[str, str] = field(default_factory=dict)
    default_token: str = "[v]"


@dataclass
class Exported:
    """What a trained recipe hands back for its package: the whole adapter, its parts, the adapter.json facts
    only it knows (blocks, ranks, its own settings; `parts` entries it describes itself), and any files kept
    beside the parts (the trained factors of a rank adapter)."""

    full: dict[str, torch.Tensor]
    parts: dict[str, dict[str, torch.Tensor]]
    facts: dict[str, Any]
    extra_files: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class RecipeSpec:
    """Everything the studio knows of a training recipe (see the module docstring)."""

    key: str
    command: str
    name: str
    label: str
    arch: str
    blurb: str
    settings: type
    train: Callable[..., Path]
    settings_for: Callable[[Any, Any], Any]
    make_recipe: Callable[[Any, Any, Any], Any]
    train_config: Callable[[Any], Any]
    job_fields: Callable[[Any, Any], dict]
    parts: tuple[PartSpec, ...]
    composition: Composition
    samples: tuple[SampleSpec, ...] = ()
    preview_prompt: str = "A {token}"
    subject: str = "[c]"
    token_format: str = "[v{number}]"
    style_token_format: str | None = None  # a recipe that trains a style token of its own
    token_hint: str = "automatic"
    cli_help: str = ""
    load_pipeline: Callable[[Any, Any], Any] | None = None
    adapters: tuple[str, ...] = ("lora",)
    extras: Callable[[int, dict], dict] | None = None
    card_notes: Callable[[Any], list[str]] | None = None
    card_settings: tuple[str, ...] = ()
    importer: ImportSpec | None = None
    split: Callable[[dict[str, torch.Tensor], Any], dict[str, dict[str, torch.Tensor]]] | None = None
    module: str = ""  # the module that registered it (set by `register_recipe`)

    def __reduce__(self):
        # Sent to another process (a ZeroGPU call, a job worker) by name: the receiver looks it up, importing
        # the module that registers it if need be.
        return (recipe_by_key, (self.key, self.module))

    # -- what studio/methods.py offered before: the same verbs, read from the spec ---------------------

    @property
    def available(self) -> bool:
        return True  # a registered recipe was imported; one that could not be is in `UNAVAILABLE`

    def functions(self) -> tuple[type, Callable[..., Path]]:
        """The request dataclass and the train function."""
        return self.settings, self.train

    def build_request(self, **values: Any):
        """A request from the values its dataclass knows; the others (another recipe's) are left out."""
        known = {f.name for f in dataclasses.fields(self.settings)}
        return self.settings(**{k: v for k, v in values.items() if k in known})

    def extra_values(self, rank: int) -> dict[str, Any]:
        """The recipe's own request values for `rank` (raises ValueError when the rank does not suit it)."""
        return self.extras(rank, self.defaults()) if self.extras else {}

    def defaults(self) -> dict[str, Any]:
        """The request dataclass's own defaults (steps, rank, learning rate, ...)."""
        return {f.name: f.default for f in dataclasses.fields(self.settings)
                if f.default is not dataclasses.MISSING}

    def form_fields(self) -> list[SettingField]:
        """The recipe's own settings the Train form shows (metadata `form=True`)."""
        return [f for f in setting_fields(self.settings) if f.form]

    def form_values(self, values: dict[str, Any] | None) -> dict[str, Any]:
        """The form's values of this recipe's own settings, checked against their metadata (one line each);
        keys that are not its form settings are refused."""
        if values is None:
            return {}
        if not isinstance(values, dict):
            raise InvalidSetting(f"{self.name} settings must be given by name")
        fields = {f.name: f for f in self.form_fields()}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise InvalidSetting(f"{self.name} has no setting {unknown[0]!r} in the form")
        return {name: check_value(fields[name], value) for name, value in values.items()}

    # -- parts and prompts ------------------------------------------------------------------------------

    def part(self, name: str) -> PartSpec | None:
        return next((p for p in self.parts if p.name == name), None)

    def default_prompt(self, has_content: bool, has_style: bool) -> str:
        """A prompt for what was chosen, naming the subject as the recipe does (`subject`)."""
        return prompt_for(self.subject, has_content, has_style)

    def tokens(self, number: str, token: str | None, style_token: str | None) -> tuple[str, str | None]:
        """The run's token and style token: the ones asked for, else made from the image's number."""
        from pipelines.package import check_token

        token = check_token(token) if token else self.token_format.format(number=number)
        if self.style_token_format is None:
            return token, None
        return token, check_token(style_token) if style_token else self.style_token_format.format(number=number)


def prompt_for(subject: str, has_content: bool, has_style: bool) -> str:
    """A prompt for a content adapter, a style adapter or both: `A [c] in [s] style`, `A [c]`, `A cat in [s]
    style`; `subject` is how the prompt names the subject (`[c]`, `[c] object`)."""
    if has_content and has_style:
        return f"A {subject} in [s] style"
    if has_content:
        return f"A {subject}"
    if has_style:
        return "A cat in [s] style"
    return "A photo of a cat"


# -- the registry ----------------------------------------------------------------------------------------

RECIPES: dict[str, RecipeSpec] = {}
UNAVAILABLE: dict[str, str] = {}  # built-in recipe module -> why it could not be imported
_loaded = False


def register_recipe(spec: RecipeSpec) -> RecipeSpec:
    """Add a recipe (called by its package when imported); the same spec again is a no-op."""
    from pipelines.package import check_name

    if spec.arch not in _architectures():
        raise ValueError(f"recipe {spec.key}: unknown architecture {spec.arch!r}")
    for part in spec.parts:
        check_name(part.name)
    names = {p.name for p in spec.parts}
    missing = sorted({*spec.composition.uses.values(), *spec.composition.optional} - names)
    if missing or set(spec.composition.uses) - set(USES):
        raise ValueError(f"recipe {spec.key}: its composition names parts or uses it does not have "
                         f"({', '.join(missing) or ', '.join(sorted(set(spec.composition.uses) - set(USES)))})")
    for other in RECIPES.values():
        if other.key != spec.key and other.command == spec.command:
            raise ValueError(f"recipe {spec.key}: the command {spec.command!r} is {other.key}'s")
    if not spec.module:
        spec = dataclasses.replace(spec, module=spec.train.__module__)
    current = RECIPES.get(spec.key)
    if current is not None and current != spec:
        raise ValueError(f"a recipe {spec.key!r} is registered already (from {current.module})")
    RECIPES[spec.key] = spec
    # The built-in recipes first, in their order (the Train form's first method is the first of them).
    ordered = sorted(RECIPES.values(), key=lambda r: BUILTIN_RECIPES.index(r.module) if r.module in BUILTIN_RECIPES
                     else len(BUILTIN_RECIPES))
    RECIPES.clear()
    RECIPES.update((r.key, r) for r in ordered)
    return spec


def unregister_recipe(key: str) -> None:
    RECIPES.pop(key, None)


def _architectures() -> dict:
    from pipelines.models import ARCHITECTURES

    return ARCHITECTURES


def load_builtin() -> dict[str, RecipeSpec]:
    """Import the built-in recipes once (each registers itself); one that cannot be imported is noted in
    `UNAVAILABLE` instead of breaking the studio. Returns the registry."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_RECIPES:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                UNAVAILABLE[module] = str(exc)
    return RECIPES


def all_recipes() -> list[RecipeSpec]:
    return list(load_builtin().values())


def recipe_for(key: str) -> RecipeSpec:
    """The recipe registered as `key` (one line naming the others if there is none)."""
    recipes = load_builtin()
    if not isinstance(key, str) or key not in recipes:
        raise BlockStudioError(f"unknown method {key!r}: this build has no such training method; choose one of "
                               f"{', '.join(recipes)}")
    return recipes[key]


def recipe_of(method: str | None) -> RecipeSpec | None:
    """The recipe a package's `method` names, or None (a package of a recipe this build does not have)."""
    return load_builtin().get(method or "")


def recipe_by_key(key: str, module: str) -> RecipeSpec:
    """The recipe `key`, importing `module` (the one that registers it) first when this process lacks it: how a
    worker process finds a recipe registered outside the built-ins."""
    if key not in load_builtin() and module:
        importlib.import_module(module)
    return recipe_for(key)


# -- one image in, one package out -----------------------------------------------------------------------


@dataclass
class Run:
    """A request made ready to train: its model, package folder, crop, tokens and the recipe's settings."""

    model: Any  # the ModelSpec
    out: Path
    work: Path
    crop: Any
    fingerprint: str
    settings: Any  # the recipe's own settings (what `make_recipe` builds from), tokens filled in
    job: dict  # what must not change between the run and its resumption


def prepare_run(spec: RecipeSpec, request: Any) -> Run:
    """Check everything a request carries before any model is loaded; return what training needs."""
    import hashlib

    from pipelines.images import center_crop_square, load_image
    from pipelines.models import architecture, resolve_model
    from pipelines.package import check_name, image_number
    from pipelines.storage import check_writable_target
    from pipelines.training import check_resume, work_dir_for

    request.validate()
    model = resolve_model(request.model)
    if model.arch != spec.arch:
        others = [r.name for r in all_recipes() if r.arch == model.arch]
        hint = f" (use {' or '.join(others)} for {architecture(model.arch).label})" if others else ""
        raise InvalidSetting(f"{spec.name} needs {architecture(spec.arch).a_label} model; {request.model} is "
                             f"{model.arch.upper()}{hint}")
    out = check_writable_target(request.out, force=request.force)
    check_name(out.name)
    work = work_dir_for(out)
    check_resume(work, request.resume)
    settings = spec.settings_for(request, model)
    crop = center_crop_square(load_image(request.image), settings.resolution)
    token, style_token = spec.tokens(image_number(crop), request.token, getattr(request, "style_token", None))
    settings.token = token
    if style_token is not None:
        settings.style_token = style_token
    fingerprint = hashlib.sha256(crop.tobytes()).hexdigest()
    job = {"method": spec.key, "image_sha256": fingerprint, "token": token, "model": model.name,
           "seed": request.seed, **spec.job_fields(request, settings)}
    return Run(model, out, work, crop, fingerprint, settings, job)


def train_package(spec: RecipeSpec, request: Any, *, on_progress=None, on_sample=None, cancel=None,
                  pipe=None) -> Path:
    """Train `spec`'s adapters from one image and write their package to `request.out`. Returns its path.

    `on_sample(step, image)` receives a preview every `sample_every` steps. Raises `TrainingCancelled` if
    `cancel` is set; the last checkpoint stays in `<out>.partial` for `resume=True`. A `pipe` passed in is
    given back without adapters.
    """
    from pipelines.generation import preview_image, sample_with_parts
    from pipelines.package import PackageContents, write_package
    from pipelines.training import discard_if_unused, prepare_work_dir, train

    run = prepare_run(spec, request)
    settings, model = run.settings, run.model
    config = spec.train_config(request)
    if pipe is None:
        if spec.load_pipeline is not None:
            pipe = spec.load_pipeline(request, settings)
        else:
            from pipelines.models import load_pipeline

            pipe = load_pipeline(request.model)
    prepare_work_dir(run.work, run.job, resume=request.resume, restart=request.restart)
    recipe = spec.make_recipe(pipe, run.crop, settings)
    tokens = {"token": settings.token, "style_token": getattr(settings, "style_token", None) or settings.token}
    sample_steps = request.sample_steps or model.fast_steps
    resolution = settings.resolution

    def preview(step: int) -> None:
        on_sample(step, preview_image(pipe, spec.preview_prompt.format(**tokens), resolution, sample_steps,
                                      request.seed, model))

    try:
        with discard_if_unused(run.work):
            result = train(recipe, config, run.work, resume=request.resume, on_progress=on_progress,
                           on_sample=preview if on_sample else None, cancel=cancel,
                           max_steps_this_call=request.max_steps_this_call)
        exported = recipe.export()
    finally:
        recipe.remove_adapters()  # the pipeline goes back as it came, whatever happened
    samples, sample_prompts = {"input": run.crop}, {}
    if request.samples:
        render = getattr(recipe, "render_sample", None) or sample_with_parts
        for sample in spec.samples:
            prompt = sample.prompt.format(**tokens)
            active = {part: exported.parts[part] for part in sample.parts if part in exported.parts}
            samples[sample.stem] = render(pipe, active, prompt, resolution, sample_steps, request.seed, model)
            sample_prompts[sample.stem] = prompt
    info = package_info(spec, request, run, exported, steps=result.steps, sample_prompts=sample_prompts,
                        final_loss=result.loss_history[-1] if result.loss_history else None)
    contents = PackageContents(name=run.out.name, info=info, full=exported.full, parts=exported.parts,
                               samples=samples, loss_history=result.loss_history, extra_files=exported.extra_files)
    write_package(run.out, contents, replace=request.force)
    if not request.keep_checkpoints:
        shutil.rmtree(run.work, ignore_errors=True)
    return run.out


def package_info(spec: RecipeSpec, request: Any, run: Run, exported: Exported, *, steps: int,
                 sample_prompts: dict[str, str], final_loss: float | None):
    """adapter.json of a trained package: what every recipe records, then the recipe's own facts; every part
    the recipe does not describe itself gets its blocks, rank and the spec's description."""
    from pipelines.package import PackageInfo

    model, settings = run.model, run.settings
    facts = dict(exported.facts)
    parts = dict(facts.pop("parts", {}))
    blocks, ranks = facts.get("blocks", {}), facts.get("ranks", {})
    for name in exported.parts:
        if name not in parts and (described := spec.part(name)) is not None:
            parts[name] = {"blocks": blocks.get(name), "rank": ranks.get(name), "description": described.description}
    common = {
        "method": spec.key,
        "base_model": model.name if model.repo_id or model.tiny else Path(model.name).name,
        "base_model_id": model.repo_id or ("" if model.tiny else Path(model.name).name),
        "arch": spec.arch,
        "token": settings.token,
        "style_token": getattr(settings, "style_token", None),
        "composition": spec.composition.to_json(),
        "steps": steps,
        "learning_rate": request.learning_rate,
        "seed": request.seed,
        "resolution": settings.resolution,
        "image_sha256": run.fingerprint,
        "sample_prompts": sample_prompts,
        "final_loss": final_loss,
    }
    parts = {k: {kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v
             for k, v in parts.items()}
    return PackageInfo.from_dict({**common, **facts, "parts": parts})
