"""Generation with content and style adapters in a warm pipeline.

`StudioPipeline` loads a base model once and keeps two adapter slots, `content` and `style`, plus one slot per
optional part asked for beside a choice (`content_boundary` for a package's optional `boundary` part). Pointing
a slot at another package replaces only that adapter (PEFT hotswap where enabled, else delete and load); the
base weights are never reloaded. The calls it makes are the plain diffusers ones, so the same call in diffusers
with the package's files (`load_lora_weights`, `set_adapters`, a CPU generator) gives the same image.

Which part a slot loads by default is the package's own record (`AdapterPackage.part_for`): the content part
mixing uses (its recipe's composition says which), the one for new prompts, the style part.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from pipelines import checks, formats
from pipelines.errors import BlockStudioError, InvalidAdapter
from pipelines.models import architecture, building_modules, load_pipeline, resolve_model
from pipelines.package import AdapterPackage

_PLACEHOLDER = re.compile(r"\[(c|s)\]", re.IGNORECASE)
MIN_SCALE, MAX_SCALE = -2.0, 3.0  # beyond these an adapter's delta swamps the base model
MAX_STEPS = 150
MAX_SIDE = 2048
MAX_IMAGES = 8


def check_sampling(*, seed: object = 0, steps: object = None, guidance: object = None, width: object = None,
                   height: object = None, num_images: object = 1) -> dict:
    """Sampling settings as plain numbers, refusing NaN, infinities, bools and values out of range.

    None means the model's default (steps, guidance, size).
    """
    values = {
        "seed": checks.seed(seed),
        "steps": None if steps is None else checks.whole_number(steps, "steps", 1, MAX_STEPS),
        "guidance": None if guidance is None else checks.real_number(guidance, "guidance", 0.0, 30.0),
        "num_images": checks.whole_number(num_images, "number of images", 1, MAX_IMAGES),
    }
    for label, value in (("width", width), ("height", height)):
        side = None if value is None else checks.whole_number(value, label, 64, MAX_SIDE)
        if side is not None and side % 8:
            raise checks.InvalidSetting(f"{label} must be a multiple of 8 between 64 and {MAX_SIDE}, not {side}")
        values[label] = side
    return values


def expand_prompt(prompt: str, content_token: str | None, style_token: str | None) -> str:
    """Replace `[c]` and `[s]` with the adapters' trigger tokens; refuse a placeholder with no adapter."""

    def repl(match: re.Match) -> str:
        kind = match.group(1).lower()
        token = content_token if kind == "c" else style_token
        if token is None:
            role = "content" if kind == "c" else "style"
            raise BlockStudioError(f"the prompt uses [{kind}] but no {role} adapter was given")
        return token

    return _PLACEHOLDER.sub(repl, prompt)


def default_prompt(has_content: bool, has_style: bool, method: str | None = None) -> str:
    """A prompt for what was chosen, in the words of the package's recipe (`[c]`, `[c] object`, ...)."""
    from pipelines.recipes import prompt_for, recipe_of

    recipe = recipe_of(method)
    return prompt_for(recipe.subject if recipe is not None else "[c]", has_content, has_style)


@dataclass
class AdapterChoice:
    """One slot's choice: which package, which of its parts, at which scale, and which optional parts beside it.

    Each part in `extras` (e.g. SplitFlux's `boundary`) is loaded as an adapter of its own at the same scale.
    """

    package: AdapterPackage
    part: str
    scale: float = 1.0
    extras: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.scale = checks.real_number(self.scale, f"{self.part} scale", MIN_SCALE, MAX_SCALE)
        # A missing part fails here, before any model is loaded, in one line naming the parts the package has.
        for part in (self.part, *self.extras):
            self.package.file(part)

    @classmethod
    def for_use(cls, package: AdapterPackage, use: str, scale: float = 1.0,
                extras: tuple[str, ...] = ()) -> AdapterChoice:
        """The part `package` records for `use` ("mix", "content", "reembed", "style")."""
        return cls(package, package.part_for(use), scale, tuple(extras))

    @property
    def file(self) -> Path:
        return self.package.file(self.part)

    def slots(self, slot: str) -> dict[str, AdapterChoice]:
        """{adapter name: choice} for this choice in `slot`: its part, then each extra part as `<slot>_<part>`."""
        out = {slot: self}
        for extra in self.extras:
            out[f"{slot}_{extra}"] = AdapterChoice(self.package, extra, self.scale)
        return out

    def label(self) -> str:
        """`<package>:<part>@<scale>`, with `+<extra>` for every extra part."""
        extras = "".join(f"+{e}" for e in self.extras)
        return f"{self.package.path.name}:{self.part}{extras}@{self.scale:g}"


class StudioPipeline:
    """A base pipeline kept warm, with `content` and `style` adapter slots that swap in place."""

    def __init__(self, model: str, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 hotswap_rank: int | None = None, pipe=None) -> None:
        self.model = model
        self.spec = resolve_model(model)
        self.pipe = pipe if pipe is not None else load_pipeline(model, device=device, dtype=dtype)
        self.base_loads = 0 if pipe is not None else 1
        self.adapter_loads = 0
        self.hotswaps = 0  # how many of the adapter loads replaced weights in place
        self.hotswap_rank = hotswap_rank
        self._targets: dict[str, frozenset[str]] = {}  # slot -> modules its adapter covers
        self._loaded: dict[str, tuple[str, float]] = {}  # slot -> (file, mtime) currently in the model
        self._module_names: list[str] | None = None
        if hotswap_rank is not None:
            self.pipe.enable_lora_hotswap(target_rank=hotswap_rank)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self._component())

    def _component(self) -> str:
        return architecture(self.spec.arch).denoiser

    def _check_package(self, choice: AdapterChoice) -> tuple[frozenset[str], int]:
        """Refuse a package that does not fit the model; return the modules it targets and its largest rank."""
        arch = choice.package.meta.arch
        if arch != self.spec.arch:
            raise InvalidAdapter(
                f"package {choice.package.name} is for {arch.upper()} but the model {self.model} is {self.spec.arch.upper()}"
            )
        tensors, _ = formats.read_safetensors(choice.file)
        if self._module_names is None:
            self._module_names = list(formats.linear_layers(self.denoiser))
        canonical = formats.normalize_lora(tensors, self._module_names, component=self._component())
        ranks = formats.validate_against(canonical, self.denoiser)
        return frozenset(ranks), max(ranks.values())

    def _set_slot(self, slot: str, choice: AdapterChoice | None) -> None:
        current = self._loaded.get(slot)
        if choice is None:
            if current is not None:
                self.pipe.delete_adapters(slot)
                del self._loaded[slot]
                self._targets.pop(slot, None)
            return
        file = choice.file
        key = (str(file.resolve()), file.stat().st_mtime)
        if current == key:
            return
        targets, rank = self._check_package(choice)
        # Load from the file itself (not the tensors read for checking) so that diffusers also sees the
        # file's PEFT metadata, exactly as a user's own `load_lora_weights(folder, weight_name=...)` does.
        source = dict(pretrained_model_name_or_path_or_dict=str(file.parent), weight_name=file.name)
        # Hotswap replaces weights in place, which only works for the same layers and a rank that fits the
        # padded size; any other swap deletes the slot's adapter and loads the new one.
        hotswap = (current is not None and self.hotswap_rank is not None and rank <= self.hotswap_rank
                   and self._targets.get(slot) == targets)
        with building_modules():
            if hotswap:
                self.pipe.load_lora_weights(**source, adapter_name=slot, hotswap=True)
                self.hotswaps += 1
            else:
                if current is not None:
                    self.pipe.delete_adapters(slot)
                self.pipe.load_lora_weights(**source, adapter_name=slot)
        self._loaded[slot] = key
        self._targets[slot] = targets
        self.adapter_loads += 1

    def set_adapters(self, content: AdapterChoice | None = None, style: AdapterChoice | None = None) -> None:
        """Put the chosen adapters in their slots (and their extra parts in theirs) and apply their scales."""
        wanted: dict[str, AdapterChoice] = {}
        for slot, choice in (("content", content), ("style", style)):
            if choice is not None:
                wanted.update(choice.slots(slot))
        for slot in [s for s in self._loaded if s not in wanted]:
            self._set_slot(slot, None)
        for slot, choice in wanted.items():
            self._set_slot(slot, choice)
        if wanted:
            self.pipe.set_adapters(list(wanted), adapter_weights=[c.scale for c in wanted.values()])

    def generate(
        self,
        prompt: str | None = None,
        *,
        content: AdapterChoice | None = None,
        style: AdapterChoice | None = None,
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        width: int | None = None,
        height: int | None = None,
        negative_prompt: str | None = None,
        num_images: int = 1,
        callback=None,
        fast: bool = False,
    ) -> list[Image.Image]:
        """Images for `prompt`; `steps` None means the model's default, or its "fast" steps with `fast=True`."""
        method = (content or style).package.method if (content or style) else None
        if prompt is None:
            prompt = default_prompt(content is not None, style is not None, method)
        text = expand_prompt(
            prompt, content.package.token if content else None, style.package.style_token if style else None
        )
        self.set_adapters(content, style)
        kwargs = dict(
            prompt=text,
            num_inference_steps=steps or self.spec.inference_steps(fast),
            guidance_scale=self.spec.guidance if guidance is None else guidance,
            width=width or self.spec.resolution,
            height=height or self.spec.resolution,
            generator=torch.Generator("cpu").manual_seed(seed),
            num_images_per_prompt=num_images,
        )
        if negative_prompt:
            kwargs["negative_prompt"] = negative_prompt
        if callback is not None:
            kwargs["callback_on_step_end"] = callback
        return self.pipe(**kwargs).images


# -- previews during and after training -----------------------------------------------------------------

_HELPERS = ("vae", "text_encoder", "text_encoder_2")


def _denoiser_of(pipe) -> torch.nn.Module:
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


def _call(pipe, prompt: str, resolution: int, steps: int, seed: int, guidance: float) -> Image.Image:
    """Run the pipeline with the text encoders and VAE on the denoiser's device, then put them back."""
    denoiser = _denoiser_of(pipe)
    device = denoiser.device
    homes = {name: getattr(pipe, name).device for name in _HELPERS if getattr(pipe, name, None) is not None}
    was_training = denoiser.training
    denoiser.eval()
    try:
        for name in homes:
            getattr(pipe, name).to(device)
        # Training leaves the denoiser in bf16/fp16 and the VAE in fp32 (for encoding), so dtypes meet at
        # several points of the pipeline; autocast reconciles them, as during the training forward.
        mixed = denoiser.dtype != torch.float32
        autocast = torch.autocast(device.type, dtype=denoiser.dtype) if mixed else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, width=resolution,
                        height=resolution, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    finally:
        for name, home in homes.items():
            getattr(pipe, name).to(home)
        denoiser.train(was_training)


def preview_image(pipe, prompt: str, resolution: int, steps: int, seed: int, spec) -> Image.Image:
    """An image from the adapter being trained (whatever adapters are active), without disturbing training."""
    return _call(pipe, prompt, resolution, steps, seed, spec.guidance)


def sample_with_parts(pipe, parts: dict[str, dict[str, torch.Tensor]], prompt: str, resolution: int,
                      steps: int, seed: int, spec) -> Image.Image:
    """Generate with the given canonical parts loaded as temporary named adapters, then remove them."""
    prefix = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    names = []
    try:
        with building_modules():
            for role, state in parts.items():
                name = f"sample_{role}"
                pipe.load_lora_weights(formats.to_diffusers(state, prefix), adapter_name=name)
                names.append(name)
        if names:
            pipe.set_adapters(names, adapter_weights=[1.0] * len(names))
        return _call(pipe, prompt, resolution, steps, seed, spec.guidance)
    finally:
        if names:
            pipe.delete_adapters(names)
