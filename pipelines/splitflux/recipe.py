"""SplitFlux's recipe: the adapters on their blocks, what the training loop calls (setup, the two-prompt loss,
the complementary loss, sigma), and loading a Flux pipeline with a quantised base. The package docstring
(`pipelines/splitflux/__init__.py`) describes the method and every choice it leaves open."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.adapters import (
    AdapterLayer,
    LoRAConfig,
    LoRALinear,
    RankConstrainedConfig,
    RankConstrainedLinear,
    VisualGatedConfig,
    VisualGatedLoRALinear,
    complementary_loss,
    inject_adapters,
    remove_adapters,
)
from pipelines.images import to_pixels
from pipelines.models import building_modules
from pipelines.recipes import Exported
from pipelines.splitflux.export import export_parts, package_facts, sample_with_own_layers
from pipelines.splitflux.forward import _latent_image_ids, _pack, install_gates, split_forward
from pipelines.splitflux.settings import (
    ROLES,
    SINGLE_BLOCKS,
    QuantizationUnavailable,
    SplitFluxSettings,
    check_quantization,
)
from pipelines.training import (
    CachedLatents,
    TrainConfig,
    gradient_checkpointing_for,
    resolve_levers,
    weight_dtype_for,
)


def load_flux_pipeline(model: str, *, quantize_base: str = "none", device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None):
    """Load a Flux pipeline; with `quantize_base="nf4"` the transformer is loaded 4-bit through bitsandbytes."""
    from pipelines.models import load_pipeline

    check_quantization(quantize_base)
    if quantize_base == "fp8" and device is None:
        # Loaded on the CPU in bf16: the recipe casts the transformer to fp8 there and moves only that to the
        # GPU, so a 24 GB card never holds FLUX.1's 24 GB bf16 transformer.
        return load_pipeline(model, device="cpu", dtype=dtype or torch.bfloat16)
    if quantize_base != "nf4":
        return load_pipeline(model, device=device, dtype=dtype)
    from diffusers import BitsAndBytesConfig, DiffusionPipeline, FluxTransformer2DModel

    from pipelines.models import _dtype_kwarg, model_path, resolve_model

    spec = resolve_model(model)
    folder = model_path(model)
    dtype = dtype or torch.bfloat16
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    with building_modules():
        transformer = FluxTransformer2DModel.from_pretrained(
            folder, subfolder="transformer", quantization_config=quantization, **{_dtype_kwarg(): dtype}
        )
        pipe = DiffusionPipeline.from_pretrained(folder, transformer=transformer, **{_dtype_kwarg(): dtype})
        pipe.set_progress_bar_config(disable=True)
        pipe.to(torch.device(device) if device is not None else torch.device("cuda"))
    pipe.blockstudio_model = spec
    return pipe


# -- the recipe -----------------------------------------------------------------------------------------


def _kaiming_down_factors(layer: AdapterLayer) -> None:
    """PEFT's default LoRA init for the down factors (Kaiming-uniform, a = sqrt(5)); up factors stay zero."""
    import math

    with torch.no_grad():
        for name, param in layer.named_parameters(recurse=False):
            if name.startswith("lora_A"):
                torch.nn.init.kaiming_uniform_(param, a=math.sqrt(5))


class SplitFluxRecipe:
    """Trains SplitFlux adapters on a Flux pipeline's transformer from a single (already cropped) image."""

    def __init__(self, pipe, image: Image.Image, settings: SplitFluxSettings) -> None:
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.image = image
        self.settings = settings
        self.layers: dict[str, AdapterLayer] = {}
        self.roles: dict[str, str] = {}
        self._hooks: list[Any] = []
        self.checkpointing = False
        self.accelerator = None

    # -- adapters -------------------------------------------------------------------------------------

    def add_adapters(self, seed: int = 0) -> dict[str, AdapterLayer]:
        """Put the three kinds of adapter on their blocks and the gate hooks on the content blocks.

        The initial factors are drawn on the CPU from `seed` alone (the run's seed), whatever the device and
        whatever randomness came before.
        """
        s = self.settings
        transformer = self.transformer
        s.validate(len(transformer.single_transformer_blocks))
        if self.layers:
            # Set up again (a resumed or repeated setup): the base was frozen and cast, the adapters not.
            for param in self.trainable_parameters():
                param.data = param.data.float()
                param.requires_grad_(True)
            return self.layers
        names = s.module_names()
        makers = {
            "content": lambda base: VisualGatedLoRALinear(base, VisualGatedConfig(
                content_rank=s.content_rank, residual_rank=s.residual_rank, text_gate=s.text_gate)),
            "boundary": lambda base: RankConstrainedLinear(base, RankConstrainedConfig(rank=s.rank, alpha=s.rca_alpha)),
            "style": lambda base: LoRALinear(base, LoRAConfig(rank=s.rank, scale=1.0)),
        }
        with torch.random.fork_rng(devices=[]), building_modules():
            torch.manual_seed(seed)
            for role in ROLES:
                for name, layer in inject_adapters(transformer, names[role], makers[role]).items():
                    self.layers[name] = layer
                    self.roles[name] = role
                    if s.lora_init == "kaiming":
                        _kaiming_down_factors(layer)
        gated = {index: [self.layers[f"{SINGLE_BLOCKS}.{index}.{t}"] for t in s.target_modules]
                 for index in s.content_blocks}
        self._hooks = install_gates(transformer.single_transformer_blocks, gated, s.gate_source)
        return self.layers

    def remove_adapters(self) -> None:
        """Take every adapter and hook out, leaving the transformer as it was loaded (fp8 storage excepted)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        remove_adapters(self.transformer, list(self.layers))
        self.layers = {}
        self.roles = {}

    def gated_layers(self) -> list[VisualGatedLoRALinear]:
        return [layer for layer in self.layers.values() if isinstance(layer, VisualGatedLoRALinear)]

    # -- loop interface -------------------------------------------------------------------------------

    def setup(self, accelerator, config: TrainConfig) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        s = self.settings
        pipe = self.pipe
        device = accelerator.device
        self.accelerator = accelerator
        self.device = device
        weight_dtype = weight_dtype_for(accelerator.mixed_precision)
        quantized = bool(getattr(self.transformer, "is_quantized", False))
        if s.quantize_base == "nf4" and not quantized:
            raise QuantizationUnavailable("--quantize-base nf4 needs the pipeline loaded by load_flux_pipeline")

        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.timesteps = self.scheduler.timesteps.clone().float()
        self.sigmas = self.scheduler.sigmas.clone().float()

        # One image: encode it once (fp32 VAE) and keep its latent distribution, so every step still draws a
        # fresh latent sample as diffusers' Flux script does without --cache_latents.
        self.latents = CachedLatents(pipe.vae, to_pixels(self.image), device)

        # Both prompts embedded once; the text encoders are frozen and not needed again while training.
        with torch.no_grad():
            pipe.text_encoder.to(device)
            pipe.text_encoder_2.to(device)
            embeds, pooled = [], []
            for prompt in (s.content_prompt, s.style_prompt):
                prompt_embeds, pooled_embeds, text_ids = pipe.encode_prompt(
                    prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=1,
                    max_sequence_length=s.max_sequence_length,
                )
                embeds.append(prompt_embeds)
                pooled.append(pooled_embeds)
        self.prompt_embeds = torch.cat(embeds).to(weight_dtype)
        self.pooled = torch.cat(pooled).to(weight_dtype)
        self.txt_ids = text_ids.to(device=device, dtype=weight_dtype)
        if device.type != "cpu":
            pipe.vae.to("cpu")
            pipe.text_encoder.to("cpu")
            pipe.text_encoder_2.to("cpu")

        transformer = self.transformer
        transformer.requires_grad_(False)
        fp8 = s.quantize_base == "fp8"
        if fp8 and not getattr(transformer, "_blockstudio_fp8", False):
            # Weights stored in fp8 and cast up per layer for compute; the adapters below stay in fp32. Cast
            # where the weights are (a pipeline loaded on the CPU), so the bf16 transformer never has to fit on
            # the GPU: FLUX.1's is 24 GB, 12 GB in fp8.
            transformer.to(dtype=weight_dtype)
            transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=weight_dtype)
            transformer._blockstudio_fp8 = True
        if not quantized:
            transformer.to(device) if fp8 else transformer.to(device, dtype=weight_dtype)
        self.weight_dtype = weight_dtype
        latent_h, latent_w = self.latents.shape[-2:]
        self.img_ids = _latent_image_ids(latent_h // 2, latent_w // 2, device, weight_dtype)
        self.guidance_embeds = bool(transformer.config.guidance_embeds)

        self.add_adapters(config.seed)
        levers = resolve_levers(config, device)
        self.checkpointing = gradient_checkpointing_for(
            config.gradient_checkpointing, device, lambda: self.step_cost(levers).memory_bytes(False))

    def step_cost(self, levers: dict):
        """The cost model's view of one step of this run (`pipelines/cost.py`)."""
        from pipelines.splitflux.cost import splitflux_step_cost

        s = self.settings
        return splitflux_step_cost(resolution=s.resolution, settings=s, text_length=s.max_sequence_length,
                                   base="bf16" if s.quantize_base == "none" else s.quantize_base,
                                   optimizer="adamw8bit" if levers["use_8bit_adam"] else "adamw",
                                   transformer_config=self.transformer.config)

    def trainable_module(self) -> torch.nn.Module:
        return self.transformer

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for layer in self.layers.values() for p in layer.parameters(recurse=False)]

    def draw_sigma(self, generator: torch.Generator, image_tokens: int) -> torch.Tensor:
        """One step's noise level sigma in (0, 1], shape (1,), by `settings.timestep_sampling` (module docstring).

        Flow matching runs the transformer at timestep `1000 * sigma`, which the model's forward takes as sigma.
        """
        from diffusers.training_utils import compute_density_for_timestep_sampling

        sampling = self.settings.timestep_sampling
        scheme = "none" if sampling == "uniform" else "logit_normal"
        u = compute_density_for_timestep_sampling(scheme, 1, logit_mean=0.0, logit_std=1.0, generator=generator)
        if sampling == "flux_shift":
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            config = self.scheduler.config
            mu = calculate_shift(image_tokens, config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                 config.get("max_shift", 1.15))
            return self.scheduler.time_shift(mu, 1.0, u.clamp(min=1e-6)).float()
        count = len(self.timesteps)
        index = (u * count).long().clamp(max=count - 1)
        return self.sigmas[index]

    def sample_latents(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(packed noisy latents, packed flow-matching target, timestep in [0, 1]) for one step.

        noisy = (1 - sigma) x0 + sigma noise, target = noise - x0, timestep = sigma (diffusers' Flux script).
        """
        device = self.device
        latents = self.latents.sample(generator)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        sigma = self.draw_sigma(generator, latents.shape[-2] * latents.shape[-1] // 4).to(device)
        noisy = (1.0 - sigma.view(-1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1) * noise
        return _pack(noisy), _pack(noise - latents), sigma

    def loss(self, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        packed, target, timestep = self.sample_latents(generator)
        guidance = torch.full((1,), self.settings.guidance, device=self.device) if self.guidance_embeds else None
        autocast = self.accelerator.autocast() if self.accelerator is not None else contextlib.nullcontext()
        with autocast:
            prediction = self.predict(packed.to(self.weight_dtype), timestep, guidance)
        mse = F.mse_loss(prediction.float(), target.float())
        terms = {"mse": float(mse.detach())}
        loss = mse
        weight = self.settings.complementary_weight
        if weight > 0 and self.gated_layers():
            comp = self.complementary_loss()
            terms["complementary"] = float(comp.detach())
            loss = loss + weight * comp
        return loss, terms

    def complementary_loss(self) -> torch.Tensor:
        """The gated layers' complementary losses, summed (the paper) or averaged (`complementary_reduction`).

        With gradient checkpointing each layer's term is recomputed in backward instead of kept.
        """
        terms = []
        for layer in self.gated_layers():
            if self.checkpointing:
                from torch.utils.checkpoint import checkpoint

                terms.append(checkpoint(complementary_loss, layer.lora_A_content, layer.lora_B_content,
                                        layer.lora_A_residual, layer.lora_B_residual, use_reentrant=False))
            else:
                terms.append(layer.complementary_loss())
        stacked = torch.stack(terms)
        return stacked.sum() if self.settings.complementary_reduction == "sum" else stacked.mean()

    def predict(self, packed: torch.Tensor, timestep: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """The transformer's forward with SplitFlux's two prompts (`forward.split_forward`); packed prediction."""
        return split_forward(self.transformer, self.settings, packed, timestep, guidance,
                             prompt_embeds=self.prompt_embeds, pooled=self.pooled, txt_ids=self.txt_ids,
                             img_ids=self.img_ids, checkpointing=self.checkpointing)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Training state (raw factors, unscaled) as `<module>.<parameter>`, fp32, for checkpoints."""
        out = {}
        for name, layer in self.layers.items():
            for key, value in layer.adapter_state_dict().items():
                out[f"{name}.{key}"] = value.detach().float().cpu().contiguous()
        return out

    def load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state_dict.items():
            module, _, param = key.rpartition(".")
            if module not in self.layers:
                raise ValueError(f"checkpoint does not fit these adapters: unexpected key {key}")
            grouped.setdefault(module, {})[param] = value
        missing = sorted(set(self.layers) - set(grouped))
        if missing:
            raise ValueError(f"checkpoint does not fit these adapters: nothing for {missing[0]}")
        for module, state in grouped.items():
            self.layers[module].load_adapter_state_dict(state)

    # -- after training -------------------------------------------------------------------------------

    def export_parts(self) -> dict[str, dict[str, torch.Tensor]]:
        """{"content", "content_reembed", "boundary", "style"}: canonical standard-LoRA state dicts.

        What each holds is in the package docstring and `export.part_composition`; `boundary` is left out when
        there are no boundary blocks.
        """
        return export_parts(self.layers, self.roles, self.settings.export_gate)

    def export(self) -> Exported:
        """The package's weights (the parts, and all of them together) and what adapter.json records of them."""
        parts = self.export_parts()
        full = {k: v for part in ROLES for k, v in parts.get(part, {}).items()}
        return Exported(full=full, parts=parts, facts=package_facts(self.settings))

    def render_sample(self, pipe, parts: dict[str, dict[str, torch.Tensor]], prompt: str, resolution: int,
                      steps: int, seed: int, spec) -> Image.Image:
        """A sample with `parts` loaded: diffusers' LoRA layers, or ours on a transformer stored in fp8."""
        from pipelines.generation import sample_with_parts

        fp8 = getattr(pipe.transformer, "_blockstudio_fp8", False)
        return (sample_with_own_layers if fp8 else sample_with_parts)(pipe, parts, prompt, resolution, steps, seed,
                                                                      spec)
