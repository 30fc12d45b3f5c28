"""B-LoRA on SDXL: content and style LoRA on two attention blocks of the first up-block, from one image.

Frenkel et al., "Implicit Style-Content Separation using B-LoRA" (ECCV 2024). LoRA is trained jointly on
`up_blocks.0.attentions.0` (content) and `up_blocks.0.attentions.1` (style), on `to_q/to_k/to_v/to_out.0` of
both self- and cross-attention in every transformer layer, with the prompt `A [v]`, rank 64, AdamW at 5e-5
and 1000 steps. After training, each block's half is an adapter of its own.

The two blocks carry PEFT's LoRA by default, as the official recipe. With `adapter="dylora"` or `"sora"` they
carry the rank adapters of `pipelines.adapters` instead: DyLoRA trains every rank from 1 to `rank` at once (a
rank drawn per step from the run's generator), SoRA gates its ranks and prunes the zero gates. Both start at
scale 1 at full rank (alpha = rank), as the LoRA does; their packages keep the trained factors, so
`pipelines.rank_export` can write them again at another rank.

The recipe below is data (blocks, projections, defaults) plus the functions the shared training loop calls.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.images import to_pixels
from pipelines.training import (
    CachedLatents,
    RunRequest,
    TrainConfig,
    gradient_checkpointing_for,
    loop_options,
    make_optimizer,
    resolve_levers,
    weight_dtype_for,
)

CONTENT_BLOCK = "up_blocks.0.attentions.0"
STYLE_BLOCK = "up_blocks.0.attentions.1"
BLOCKS = {"content": CONTENT_BLOCK, "style": STYLE_BLOCK}
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER_NAME = "blora"
ADAPTER_TYPES = ("lora", "dylora", "sora")
# Which part each use loads (adapter.json's `composition`): the content block's half for the subject, the style
# block's half for the style (the paper's Sec. 4.3).
COMPOSITION = {
    "name": "B-LoRA",
    "uses": {"mix": "content", "content": "content", "reembed": "content", "style": "style"},
    "optional": [],
}


@dataclass
class BLoRASettings:
    """Everything that defines a B-LoRA training run beyond the loop's own settings."""

    token: str = "[v]"
    prompt_template: str = "A {token}"
    rank: int = 64
    resolution: int = 1024
    projections: tuple[str, ...] = PROJECTIONS
    blocks: dict[str, str] = field(default_factory=lambda: dict(BLOCKS))
    adapter: str = "lora"  # lora (PEFT, the official recipe), dylora or sora (pipelines.adapters)

    @property
    def prompt(self) -> str:
        return self.prompt_template.format(token=self.token)


def default_train_config(**overrides: Any) -> TrainConfig:
    """The official recipe: AdamW at 5e-5 (weight decay 1e-4, clip 1.0), 1000 steps, seed 0."""
    config = TrainConfig(steps=1000, learning_rate=5e-5, weight_decay=1e-4, max_grad_norm=1.0, seed=0)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def target_modules(unet: torch.nn.Module, blocks: dict[str, str] | None = None,
                   projections: tuple[str, ...] = PROJECTIONS) -> list[str]:
    """Full names of the Linear layers B-LoRA trains: every attention projection inside the given blocks."""
    blocks = blocks or BLOCKS
    prefixes = tuple(b + "." for b in blocks.values())
    names = []
    for name, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear) or not name.startswith(prefixes):
            continue
        if re.fullmatch(r".*\.attn[12]\.(" + "|".join(re.escape(p) for p in projections) + r")", name):
            names.append(name)
    if not names:
        raise ValueError(f"no attention projections found in blocks {sorted(blocks.values())}")
    return names


def add_blora_adapter(unet: torch.nn.Module, settings: BLoRASettings, seed: int) -> list[str]:
    """Put the B-LoRA adapter on `unet` (any device, meta included); return the adapted module names.

    Gaussian init and lora_alpha == r: down ~ N(0, 1/r), up = 0, scale 1, as the official code. The init draws
    from `seed` on the CPU, so a run is reproducible from its seed alone.
    """
    from peft import LoraConfig

    from pipelines.models import building_modules

    names = target_modules(unet, settings.blocks, settings.projections)
    with torch.random.fork_rng(devices=[]), building_modules():
        torch.manual_seed(seed)
        unet.add_adapter(
            LoraConfig(r=settings.rank, lora_alpha=settings.rank, init_lora_weights="gaussian", target_modules=names),
            adapter_name=ADAPTER_NAME,
        )
    return names


# The modules diffusers checkpoints one by one inside the up-blocks: each resnet, each transformer layer.
_UP_BLOCK_UNITS = re.compile(r"\d+\.(resnets\.\d+|attentions\.\d+\.transformer_blocks\.\d+)")


def checkpointing_units(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules gradient checkpointing recomputes: those of the up-blocks, where B-LoRA's backward pass runs
    (from `up_blocks.0` to the output; the down-blocks and the mid-block get no gradient)."""
    return [m for name, m in unet.up_blocks.named_modules() if _UP_BLOCK_UNITS.fullmatch(name)]


def enable_backward_checkpointing(unet: torch.nn.Module) -> None:
    """Gradient checkpointing on the up-blocks only: the blocks before them keep no activations anyway, since
    nothing there needs a gradient, so checkpointing them would only add work."""
    unet.enable_gradient_checkpointing()
    for name, module in unet.named_modules():
        if hasattr(module, "gradient_checkpointing") and not name.startswith("up_blocks."):
            module.gradient_checkpointing = False


def rank_adapter_config(adapter: str, rank: int, module_names: list[str]):
    """The DyLoRA (ranks 1..rank) or SoRA (r_max = rank) config for B-LoRA's modules, at scale 1 at full rank."""
    from pipelines.adapters import DyLoRAConfig, SoRAConfig
    from pipelines.adapters.core import exact_targets

    targets = exact_targets(module_names)
    if adapter == "dylora":
        return DyLoRAConfig(rank=rank, min_rank=1, alpha=float(rank), target_modules=targets)
    if adapter == "sora":
        return SoRAConfig(rank=rank, alpha=float(rank), target_modules=targets)
    raise ValueError(f"adapter must be one of {', '.join(ADAPTER_TYPES)}, not {adapter!r}")


def split_by_block(state_dict: dict[str, torch.Tensor], blocks: dict[str, str] | None = None
                   ) -> dict[str, dict[str, torch.Tensor]]:
    """Split an adapter state dict into {"content": ..., "style": ...} by block name."""
    blocks = blocks or BLOCKS
    parts: dict[str, dict[str, torch.Tensor]] = {role: {} for role in blocks}
    for key, value in state_dict.items():
        for role, block in blocks.items():
            if f"{block}." in key:
                parts[role][key] = value
                break
    return parts


class BLoRARecipe:
    """Trains one B-LoRA on an SDXL pipeline's UNet from a single (already cropped) image."""

    def __init__(self, pipe, image: Image.Image, settings: BLoRASettings) -> None:
        self.pipe = pipe
        self.unet = pipe.unet
        self.image = image
        self.settings = settings
        self.module_names: list[str] = []
        self.adapter_config = None  # the rank adapter's config (DyLoRA, SoRA); None for PEFT's LoRA

    # -- loop interface -----------------------------------------------------------------------------

    def setup(self, accelerator, config: TrainConfig) -> None:
        from diffusers import DDPMScheduler
        from diffusers.training_utils import cast_training_params

        device = accelerator.device
        weight_dtype = weight_dtype_for(accelerator.mixed_precision)
        self.device = device
        pipe = self.pipe
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(device)

        self.latents = CachedLatents(pipe.vae, to_pixels(self.image), device)

        # Embed the prompt once; the text encoders are frozen and not needed again during training.
        with torch.no_grad():
            pipe.text_encoder.to(device)
            pipe.text_encoder_2.to(device)
            prompt_embeds, _, pooled, _ = pipe.encode_prompt(
                self.settings.prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        self.prompt_embeds = prompt_embeds.to(weight_dtype)
        self.pooled = pooled.to(weight_dtype)
        res = self.settings.resolution
        self.time_ids = torch.tensor([[res, res, 0, 0, res, res]], device=device, dtype=weight_dtype)
        if device.type != "cpu":
            pipe.vae.to("cpu")
            pipe.text_encoder.to("cpu")
            pipe.text_encoder_2.to("cpu")

        unet = self.unet
        unet.requires_grad_(False)
        unet.to(device, dtype=weight_dtype)
        if self.settings.adapter != "lora":
            self._add_rank_adapter(config.seed)
        elif ADAPTER_NAME not in getattr(unet, "peft_config", {}):
            self.module_names = add_blora_adapter(unet, self.settings, config.seed)
        if self.settings.adapter == "lora":
            unet.set_adapter(ADAPTER_NAME)
        cast_training_params(unet, torch.float32)
        levers = resolve_levers(config, device)
        if levers["channels_last"]:
            unet.to(memory_format=torch.channels_last)
        self.checkpointing = gradient_checkpointing_for(
            config.gradient_checkpointing, device, lambda: self.step_cost(levers).memory_bytes(False))
        if self.checkpointing:
            enable_backward_checkpointing(unet)

    def step_cost(self, levers: dict):
        """The cost model's view of one step of this run (`pipelines/cost.py`)."""
        from pipelines.cost import blora_step_cost

        return blora_step_cost(resolution=self.settings.resolution, rank=self.settings.rank,
                               optimizer="adamw8bit" if levers["use_8bit_adam"] else "adamw",
                               unet_config=self.unet.config)

    def _add_rank_adapter(self, seed: int) -> None:
        from pipelines.adapters import adapter_names, add_adapter, remove_adapter

        if ADAPTER_NAME in adapter_names(self.unet):  # left by a run that stopped before cleaning up
            remove_adapter(self.unet, ADAPTER_NAME)
        self.module_names = target_modules(self.unet, self.settings.blocks, self.settings.projections)
        self.adapter_config = rank_adapter_config(self.settings.adapter, self.settings.rank, self.module_names)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            add_adapter(self.unet, self.adapter_config, ADAPTER_NAME)

    def make_optimizer(self, params: list[torch.nn.Parameter], config: TrainConfig, device: torch.device):
        """The loop's AdamW; for SoRA one `SparseAdamW` whose gate group takes the proximal step."""
        if self.settings.adapter != "sora":
            return make_optimizer(params, config, device)
        from pipelines.adapters import sora_optimizer

        return sora_optimizer(self.unet, ADAPTER_NAME, lr=config.learning_rate,
                              betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                              weight_decay=config.weight_decay)

    def trainable_module(self) -> torch.nn.Module:
        return self.unet

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def loss(self, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        device = self.device
        if self.settings.adapter == "dylora":
            from pipelines.adapters import sample_rank

            sample_rank(self.unet, ADAPTER_NAME, generator)
        latents = self.latents.sample(generator)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        num_train = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_train, (latents.shape[0],), generator=generator).to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        unet_dtype = self.prompt_embeds.dtype
        prediction = self.unet(
            noisy.to(unet_dtype),
            timesteps,
            encoder_hidden_states=self.prompt_embeds,
            added_cond_kwargs={"text_embeds": self.pooled, "time_ids": self.time_ids},
            return_dict=False,
        )[0]
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        loss = F.mse_loss(prediction.float(), target.float())
        if self.settings.adapter != "sora":
            return loss, {"mse": float(loss.detach())}
        from pipelines.adapters import sparsity_loss

        penalty = sparsity_loss(self.unet, ADAPTER_NAME)
        return loss + penalty, {"mse": float(loss.detach()), "l1": float(penalty.detach())}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained adapter, fp32: PEFT's LoRA in PEFT key format without a prefix (`...to_q.lora_A.weight`),
        a rank adapter keyed as `pipelines.adapters` names it (`...to_q.lora_A`, `...to_q.lora_gate`)."""
        if self.settings.adapter != "lora":
            from pipelines.adapters import adapter_state_dict

            state = adapter_state_dict(self.unet, ADAPTER_NAME)
        else:
            from peft import get_peft_model_state_dict

            state = get_peft_model_state_dict(self.unet, adapter_name=ADAPTER_NAME)
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

    def load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        if self.settings.adapter != "lora":
            from pipelines.adapters import load_adapter_state_dict

            load_adapter_state_dict(self.unet, state_dict, ADAPTER_NAME)
            return
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.unet, state_dict, adapter_name=ADAPTER_NAME)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"checkpoint does not fit this model: unexpected keys such as {unexpected[0]}")

    # -- after training -----------------------------------------------------------------------------

    def remove_adapter(self) -> None:
        """Take the training adapter out of the UNet, leaving the base model as it was loaded."""
        self.unet.disable_gradient_checkpointing()
        if self.settings.adapter != "lora":
            from pipelines.adapters import adapter_names, remove_adapter

            if ADAPTER_NAME in adapter_names(self.unet):
                remove_adapter(self.unet, ADAPTER_NAME)
            return
        self.unet.delete_adapters(ADAPTER_NAME)
        if not getattr(self.unet, "peft_config", None):
            self.unet.unload_lora()  # also drop PEFT's empty wrappers


# -- end to end: one image in, one package out ----------------------------------------------------------


@dataclass
class TrainRequest(RunRequest):
    """Everything `train_blora` needs; the CLI and the app both build one of these."""

    model: str = "sdxl"
    learning_rate: float = 5e-5  # resolution None: 1024 for SDXL, 64 for tiny-sdxl; token None: e.g. [v42]
    adapter: str = "lora"  # lora, dylora (every rank 1..rank in one run) or sora (gated ranks, pruned)


def prepare_request(request: TrainRequest):
    """Validate every input before any model is loaded; return (spec, cropped image, token, out, work dir)."""
    import hashlib

    from pipelines.images import center_crop_square, load_image
    from pipelines.models import resolve_model
    from pipelines.package import check_name, check_token, token_for_image
    from pipelines.storage import check_writable_target
    from pipelines.training import check_resume, check_run_request, work_dir_for

    check_run_request(request)
    spec = resolve_model(request.model)
    if spec.arch != "sdxl":
        raise ValueError(f"B-LoRA needs an SDXL model; {request.model} is {spec.arch.upper()} (use SplitFlux for Flux)")
    out = check_writable_target(request.out, force=request.force)
    check_name(out.name)
    check_resume(work_dir_for(out), request.resume)
    if request.adapter not in ADAPTER_TYPES:
        raise ValueError(f"adapter must be one of {', '.join(ADAPTER_TYPES)}, not {request.adapter!r}")
    if request.adapter == "sora" and request.use_8bit_adam:
        raise ValueError("SoRA trains with its own optimiser (the gates' proximal step); leave 8-bit Adam off")
    resolution = request.resolution or spec.resolution
    if resolution % 8 or resolution < 64 or resolution > 4096:
        raise ValueError(f"resolution must be a multiple of 8 between 64 and 4096, not {resolution}")
    image = load_image(request.image)
    crop = center_crop_square(image, resolution)
    token = check_token(request.token) if request.token else token_for_image(crop)
    work = work_dir_for(out)
    fingerprint = hashlib.sha256(crop.tobytes()).hexdigest()
    return spec, crop, token, out, work, resolution, fingerprint


def train_blora(request: TrainRequest, *, on_progress=None, on_sample=None, cancel=None, pipe=None) -> Path:
    """Train a B-LoRA from one image and write its package to `request.out`. Returns the package path.

    `on_sample(step, image)` receives a preview every `sample_every` steps. Raises `TrainingCancelled` if
    `cancel` is set; the last checkpoint stays in `<out>.partial` for `resume=True`.
    """
    import shutil

    from pipelines.generation import preview_image, sample_with_parts
    from pipelines.models import load_pipeline
    from pipelines.package import PackageContents, write_package
    from pipelines.training import discard_if_unused, prepare_work_dir, train

    spec, crop, token, out, work, resolution, fingerprint = prepare_request(request)
    settings = BLoRASettings(token=token, rank=request.rank, resolution=resolution, adapter=request.adapter)
    job = {"method": "b-lora", "image_sha256": fingerprint, "token": token, "rank": request.rank,
           "resolution": resolution, "model": spec.name, "seed": request.seed}
    if request.adapter != "lora":  # (not in a LoRA run's job, whose unfinished runs stay resumable as they were)
        job["adapter"] = request.adapter

    config = default_train_config(
        steps=request.steps, learning_rate=request.learning_rate, seed=request.seed,
        checkpoint_every=request.checkpoint_every, sample_every=request.sample_every, **loop_options(request),
    )
    if pipe is None:
        pipe = load_pipeline(request.model)
    prepare_work_dir(work, job, resume=request.resume, restart=request.restart)
    recipe = BLoRARecipe(pipe, crop, settings)
    sample_steps = request.sample_steps or spec.fast_steps  # previews and samples: the "fast" steps

    def preview(step: int) -> None:
        if on_sample is not None:
            on_sample(step, preview_image(pipe, settings.prompt, resolution, sample_steps, request.seed, spec))

    with discard_if_unused(work):
        try:
            result = train(recipe, config, work, resume=request.resume, on_progress=on_progress,
                           on_sample=preview if on_sample else None, cancel=cancel,
                           max_steps_this_call=request.max_steps_this_call)
        except BaseException:
            if request.adapter != "lora":  # the next run on this pipeline needs the bare UNet
                recipe.remove_adapter()
            raise
    full = recipe.adapter_state_dict()
    trained, adapter = {}, None
    if request.adapter != "lora":
        from pipelines.rank_export import adapter_info, group_by_module, lora_state, part_ranks

        trained = {request.adapter: full}
        modules = group_by_module(full)
        full = lora_state(recipe.adapter_config, modules)
    recipe.remove_adapter()
    parts = split_by_block(full, settings.blocks)
    if trained:
        if not all(parts.values()):
            raise ValueError("every gate of one block went to zero: train with fewer steps or a lower threshold")
        ranks = part_ranks(parts)
        adapter = adapter_info(recipe.adapter_config, modules, max(ranks.values()))
    samples = {"input": crop}
    sample_prompts = {}
    if request.samples:
        for stem, (active, prompt) in {
            "full": (("content", "style"), f"A {token}"),
            "content": (("content",), f"A {token}"),
            "style": (("style",), f"A cat in {token} style"),
        }.items():
            samples[stem] = sample_with_parts(pipe, {r: parts[r] for r in active}, prompt, resolution,
                                              sample_steps, request.seed, spec)
            sample_prompts[stem] = prompt
    if adapter is None:
        ranks = {role: request.rank for role in parts}
    info = {
        "method": "b-lora",
        "base_model": spec.name if spec.repo_id or spec.tiny else Path(spec.name).name,
        "base_model_id": spec.repo_id or ("" if spec.tiny else Path(spec.name).name),
        "arch": "sdxl",
        "token": token,
        "prompt": settings.prompt,
        "blocks": settings.blocks,
        "composition": COMPOSITION,
        "ranks": ranks,
        "rank": adapter["rank"] if adapter else request.rank,
        "target_modules": list(settings.projections),
        "steps": result.steps,
        "learning_rate": request.learning_rate,
        "seed": request.seed,
        "resolution": resolution,
        "image_sha256": fingerprint,
        "sample_prompts": sample_prompts,
        "final_loss": result.loss_history[-1] if result.loss_history else None,
    }
    if adapter:
        info["adapter"] = adapter
    contents = PackageContents(name=out.name, info=info, full=full, parts=parts, samples=samples,
                               loss_history=result.loss_history, extra_files=trained)
    write_package(out, contents, replace=request.force)
    if not request.keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)
    return out
