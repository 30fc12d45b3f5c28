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

import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.blora.settings import (
    ADAPTER_NAME,
    ADAPTER_TYPES,
    BLOCKS,
    COMPOSITION,
    CONTENT_BLOCK,
    PROJECTIONS,
    STYLE_BLOCK,
    BLoRASettings,
    TrainRequest,
    default_train_config,
    train_config,
)
from pipelines.errors import InvalidAdapter, InvalidSetting
from pipelines.images import to_pixels
from pipelines.recipes import (
    Exported,
    ImportSpec,
    PartSpec,
    RecipeSpec,
    SampleSpec,
    register_recipe,
    train_package,
)
from pipelines.training import (
    CachedLatents,
    TrainConfig,
    gradient_checkpointing_for,
    make_optimizer,
    resolve_levers,
    weight_dtype_for,
)

__all__ = ["ADAPTER_NAME", "ADAPTER_TYPES", "BLOCKS", "COMPOSITION", "CONTENT_BLOCK", "PROJECTIONS", "SPEC",
           "STYLE_BLOCK", "BLoRARecipe", "BLoRASettings", "TrainRequest", "add_blora_adapter", "checkpointing_units",
           "default_train_config", "prepare_request", "rank_adapter_config", "split_by_block", "target_modules",
           "train_blora", "train_config"]


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
        from pipelines.blora.cost import blora_step_cost

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

    def export(self) -> Exported:
        """The package's weights: each block's half a part of its own. A rank adapter is written as the plain
        LoRA it amounts to (DyLoRA at its largest rank, SoRA pruned), its trained factors kept beside it."""
        full = self.adapter_state_dict()
        trained, adapter = {}, None
        if self.settings.adapter != "lora":
            from pipelines.rank_export import adapter_info, group_by_module, lora_state, part_ranks

            trained = {self.settings.adapter: full}
            modules = group_by_module(full)
            full = lora_state(self.adapter_config, modules)
        parts = split_by_block(full, self.settings.blocks)
        if trained:
            if not all(parts.values()):
                raise ValueError("every gate of one block went to zero: train with fewer steps or a lower threshold")
            ranks = part_ranks(parts)
            adapter = adapter_info(self.adapter_config, modules, max(ranks.values()))
        else:
            ranks = {role: self.settings.rank for role in parts}
        facts = {"prompt": self.settings.prompt, "blocks": dict(self.settings.blocks), "ranks": ranks,
                 "rank": adapter["rank"] if adapter else self.settings.rank,
                 "target_modules": list(self.settings.projections)}
        if adapter:
            facts["adapter"] = adapter
        return Exported(full=full, parts=parts, facts=facts, extra_files=trained)

    def remove_adapter(self) -> None:
        """Take the training adapter out of the UNet, leaving the base model as it was loaded."""
        self.unet.disable_gradient_checkpointing()
        if self.settings.adapter != "lora":
            from pipelines.adapters import adapter_names, remove_adapter

            if ADAPTER_NAME in adapter_names(self.unet):
                remove_adapter(self.unet, ADAPTER_NAME)
            return
        if ADAPTER_NAME in (getattr(self.unet, "peft_config", None) or {}):
            self.unet.delete_adapters(ADAPTER_NAME)
        if not getattr(self.unet, "peft_config", None):
            self.unet.unload_lora()  # also drop PEFT's empty wrappers

    remove_adapters = remove_adapter  # the name `pipelines.recipes.train_package` calls


# -- end to end: one image in, one package out ----------------------------------------------------------


def settings_for(request: TrainRequest, model) -> BLoRASettings:
    """The run's settings (its token comes from the image, later); the resolution the model's unless asked."""
    resolution = request.resolution or model.resolution
    if resolution % 8:
        raise InvalidSetting(f"resolution must be a multiple of 8 between 64 and 4096, not {resolution}")
    return BLoRASettings(rank=request.rank, resolution=resolution, adapter=request.adapter)


def job_fields(request: TrainRequest, settings: BLoRASettings) -> dict:
    """What must not change between a run and its resumption, beyond what every recipe records."""
    job = {"rank": settings.rank, "resolution": settings.resolution}
    if settings.adapter != "lora":  # (not in a LoRA run's job, whose unfinished runs stay resumable as they were)
        job["adapter"] = settings.adapter
    return job


def prepare_request(request: TrainRequest):
    """Validate every input before any model is loaded (`pipelines.recipes.prepare_run`)."""
    from pipelines.recipes import prepare_run

    return prepare_run(SPEC, request)


def train_blora(request: TrainRequest, *, on_progress=None, on_sample=None, cancel=None, pipe=None):
    """Train a B-LoRA from one image and write its package to `request.out`. Returns the package path.

    `on_sample(step, image)` receives a preview every `sample_every` steps. Raises `TrainingCancelled` if
    `cancel` is set; the last checkpoint stays in `<out>.partial` for `resume=True`.
    """
    return train_package(SPEC, request, on_progress=on_progress, on_sample=on_sample, cancel=cancel, pipe=pipe)


def import_parts(canonical: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A LoRA made elsewhere as B-LoRA's parts; weights outside its two blocks are refused."""
    outside = sorted({key.rsplit(".lora_", 1)[0] for key in canonical
                      if not any(key.startswith(b + ".") for b in BLOCKS.values())})
    if outside:
        raise InvalidAdapter(f"not a B-LoRA: it has weights outside {CONTENT_BLOCK} and {STYLE_BLOCK}, "
                             f"e.g. {outside[0]}")
    return {role: state for role, state in split_by_block(canonical).items() if state}


def rank_split(state: dict[str, torch.Tensor], info) -> dict[str, dict[str, torch.Tensor]]:
    """A package's whole adapter split into its parts again, by the blocks adapter.json records."""
    return split_by_block(state, info.blocks or None)


def _make_recipe(pipe, crop: Image.Image, settings: BLoRASettings) -> BLoRARecipe:
    return BLoRARecipe(pipe, crop, settings)


SPEC = register_recipe(RecipeSpec(
    key="b-lora",
    command="blora",
    name="B-LoRA",
    label="B-LoRA · SDXL",
    arch="sdxl",
    blurb="Content and style LoRA on two attention blocks of SDXL's first up-block (Frenkel et al., 2024).",
    cli_help="B-LoRA on SDXL",
    settings=TrainRequest,
    train=train_blora,
    settings_for=settings_for,
    make_recipe=_make_recipe,
    train_config=train_config,
    job_fields=job_fields,
    parts=(PartSpec("content", "the content (subject) alone"), PartSpec("style", "the style alone")),
    composition=COMPOSITION,
    samples=(SampleSpec("full", ("content", "style"), "A {token}", "content + style"),
             SampleSpec("content", ("content",), "A {token}", "content"),
             SampleSpec("style", ("style",), "A cat in {style_token} style", "style")),
    preview_prompt="A {token}",
    subject="[c]",
    token_format="[v{number}]",
    token_hint="automatic, e.g. [v42]",
    adapters=ADAPTER_TYPES,
    importer=ImportSpec(
        layouts="the official repository's files, the lora-library Hub models, diffusers' --use_blora output "
                "(PEFT or diffusers keys) and kohya files with diffusers or SGM block names",
        split=import_parts, blocks=dict(BLOCKS)),
    split=rank_split,
))
