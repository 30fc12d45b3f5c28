"""SplitFlux training speed and memory: Block Studio's recipe, each lever on and off, against a diffusers-style
Flux LoRA loop.

The reference loop is what `train_dreambooth_lora_flux.py` runs for one fixed prompt without `--cache_latents`:
the prompt is embedded once and the text encoders leave the GPU, the image is encoded by the VAE every step, a
PEFT LoRA (same rank, Gaussian init) sits on `attn.to_q/k/v` of every block, double and single, and the whole
transformer runs forward and backward; same precision, AdamW, seed, guidance 1, gradient checkpointing on a
GPU (the script's README advises it for memory). Block Studio's configurations run the real training loop:
latents and both prompts cached, double blocks without autograd, the style prompt as a second text stream.
`quantize_base=fp8` and `=nf4` are measured as levers too (nf4 needs bitsandbytes and CUDA).
See bench/harness.py for the configurations, timing, memory and floor, and bench/README.md for the commands.

    python bench/bench_splitflux.py --model flux-random --resolution 1024 --levers all        # on a CUDA GPU
    OMP_NUM_THREADS=1 python bench/bench_splitflux.py --model tiny-flux --compile-backend aot_eager   # CPU check
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

ROOT = harness.ROOT
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v")


def _image(resolution: int):
    from pipelines.images import center_crop_square, load_image

    return center_crop_square(load_image(ROOT / "assets" / "examples" / "cat.jpg"), resolution)


def _text_length(model: str) -> int:
    from pipelines.models import resolve_model
    from pipelines.splitflux import TINY_TEXT_LENGTH

    return TINY_TEXT_LENGTH if resolve_model(model).tiny else 512


def _settings(args, quantize_base: str = "none"):
    from pipelines.splitflux import SplitFluxSettings

    return SplitFluxSettings(token="[c1]", style_token="[s1]", rank=args.rank, content_rank=args.rank * 3 // 4,
                             resolution=args.resolution, max_sequence_length=_text_length(args.model),
                             target_modules=TARGETS, quantize_base=quantize_base)


def run_config(args, lever: str, value) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from pipelines.splitflux import SplitFluxRecipe, default_train_config, load_flux_pipeline
    from pipelines.training import resolve_levers, train

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quantize = value if lever == "quantize_base" else "none"
    # fp8 casts on the CPU before the transformer moves (so its bf16 copy never has to fit on the GPU).
    pipe = load_flux_pipeline(args.model, quantize_base=quantize, device="cpu" if quantize == "fp8" else device,
                              dtype=torch.bfloat16 if device.type == "cuda" else None)
    rss_loaded = harness.rss_mb()
    overrides = {} if lever in ("blockstudio", "reference", "quantize_base") else {lever: value}
    config = default_train_config(steps=args.warmup + args.steps, checkpoint_every=0, use_8bit_adam=False,
                                  compile_backend=args.compile_backend, **overrides)
    clock = harness.StepClock(args.warmup)
    recipe = None
    if lever == "reference":
        trainable = run_reference(args, pipe, config, clock)
    else:
        recipe = SplitFluxRecipe(pipe, _image(args.resolution), _settings(args, quantize))
        with tempfile.TemporaryDirectory() as work:
            train(recipe, config, work, on_progress=clock)
        trainable = sum(p.numel() for p in recipe.trainable_parameters())
    return {"configuration": lever if lever in ("blockstudio", "reference") else f"{lever}={value}",
            "steps_per_s": 1 / clock.seconds_per_step(), "rss_loaded_mb": rss_loaded, "trainable_params": trainable,
            "levers": resolve_levers(config, device), "device": str(device),
            "gradient_checkpointing_used": getattr(recipe, "checkpointing", None)}


def run_reference(args, pipe, config, clock) -> int:
    """The diffusers Flux LoRA script's step; returns the trainable-parameter count."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from pipelines.images import to_pixels
    from pipelines.splitflux import _latent_image_ids, _pack
    from pipelines.training import resolve_mixed_precision, weight_dtype_for

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mixed = resolve_mixed_precision(None, device)
    dtype = weight_dtype_for(mixed)
    accelerator = Accelerator(mixed_precision=mixed, cpu=device.type == "cpu")
    with torch.no_grad():
        pipe.text_encoder.to(device)
        pipe.text_encoder_2.to(device)
        prompt_embeds, pooled, text_ids = pipe.encode_prompt("A [c1] object", prompt_2=None, device=device,
                                                             max_sequence_length=_text_length(args.model))
    if device.type == "cuda":
        pipe.text_encoder.to("cpu")
        pipe.text_encoder_2.to("cpu")
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    transformer.to(device, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                           target_modules=list(TARGETS)))
    cast_training_params(transformer, torch.float32)
    if device.type == "cuda":
        transformer.enable_gradient_checkpointing()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-4)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    vae = pipe.vae.to(device, dtype=torch.float32)
    pixels = to_pixels(_image(args.resolution)).to(device)
    generator = torch.Generator().manual_seed(0)
    transformer.train()
    for _ in range(config.steps):
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample()
            latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device)
        index = (torch.rand((1,), generator=generator) * len(scheduler.timesteps)).long()
        sigma = scheduler.sigmas[index].to(device).view(-1, 1, 1, 1)
        timestep = scheduler.timesteps[index].to(device) / 1000
        noisy = (1 - sigma) * latents + sigma * noise
        img_ids = _latent_image_ids(latents.shape[-2] // 2, latents.shape[-1] // 2, device, dtype)
        guidance = torch.full((1,), 1.0, device=device) if transformer.config.guidance_embeds else None
        prediction = transformer(hidden_states=_pack(noisy).to(dtype), timestep=timestep, guidance=guidance,
                                 pooled_projections=pooled.to(dtype), encoder_hidden_states=prompt_embeds.to(dtype),
                                 txt_ids=text_ids.to(dtype), img_ids=img_ids, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), _pack(noise - latents).float())
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock()
    return sum(p.numel() for p in params)


def step_cost(args, defaults):
    from pipelines.splitflux.cost import splitflux_step_cost

    return splitflux_step_cost(args.model, args.resolution, settings=_settings(args),
                               text_length=_text_length(args.model))


def extra_flips(cuda: bool) -> dict[str, list]:
    import importlib.util

    bases = ["fp8"] + (["nf4"] if cuda and importlib.util.find_spec("bitsandbytes") is not None else [])
    return {"quantize_base": bases}


if __name__ == "__main__":
    parser = harness.base_parser(__doc__.splitlines()[0], "tiny-flux")
    raise SystemExit(harness.main("bench_splitflux", parser, run_config, step_cost, extra_flips))
