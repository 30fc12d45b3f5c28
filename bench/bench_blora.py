"""B-LoRA training speed and memory: Block Studio's recipe, each lever on and off, against a reference-style loop.

The reference loop does per step what diffusers' advanced SDXL DreamBooth script does with `--use_blora` and
its defaults (no `--cache_latents`, frozen text encoders): the prompt is embedded once and the text encoders
leave the GPU, the image is encoded by the VAE (kept on the GPU) every step, then the UNet's forward and
backward with the same PEFT LoRA; same precision, optimizer (AdamW), rank and seed, gradient checkpointing on
a GPU as the script's README advises for memory. Block Studio's configurations run the real training loop.
See bench/harness.py for the configurations, timing, memory and floor, and bench/README.md for the commands.

    python bench/bench_blora.py --model sdxl-random --resolution 1024 --levers all     # on a CUDA GPU
    OMP_NUM_THREADS=1 python bench/bench_blora.py --model tiny-sdxl --compile-backend aot_eager   # CPU check
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

ROOT = harness.ROOT


def _image(resolution: int):
    from pipelines.images import center_crop_square, load_image

    return center_crop_square(load_image(ROOT / "assets" / "examples" / "cat.jpg"), resolution)


def run_config(args, lever: str, value) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from pipelines.blora import BLoRARecipe, BLoRASettings, default_train_config
    from pipelines.models import load_pipeline
    from pipelines.training import resolve_levers, train

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.model, device=device)
    rss_loaded = harness.rss_mb()
    settings = BLoRASettings(token="[v1]", rank=args.rank, resolution=args.resolution)
    overrides = {} if lever in ("blockstudio", "reference") else {lever: value}
    config = default_train_config(steps=args.warmup + args.steps, checkpoint_every=0,
                                  compile_backend=args.compile_backend, **overrides)
    recipe = BLoRARecipe(pipe, _image(args.resolution), settings)
    clock = harness.StepClock(args.warmup)
    if lever == "reference":
        run_reference(args, pipe, recipe, config, clock)
    else:
        with tempfile.TemporaryDirectory() as work:
            train(recipe, config, work, on_progress=clock)
    return {"configuration": lever if not overrides else f"{lever}={value}",
            "steps_per_s": 1 / clock.seconds_per_step(), "rss_loaded_mb": rss_loaded,
            "levers": {k: v for k, v in resolve_levers(config, device).items()},
            "gradient_checkpointing_used": getattr(recipe, "checkpointing", None), "device": str(device)}


def run_reference(args, pipe, recipe, config, clock) -> None:
    """The reference script's step: VAE encode every step, the UNet forward and backward, AdamW."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator

    from pipelines.images import to_pixels
    from pipelines.training import resolve_mixed_precision, weight_dtype_for

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mixed = resolve_mixed_precision(None, device)
    accelerator = Accelerator(mixed_precision=mixed, cpu=device.type == "cpu")
    config.gradient_checkpointing = False  # the script's own settings follow
    config.channels_last = False
    recipe.setup(accelerator, config)
    unet = recipe.unet
    if device.type == "cuda":
        unet.enable_gradient_checkpointing()
    params = recipe.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    vae = pipe.vae.to(device, dtype=torch.float32)
    pixels = to_pixels(recipe.image).to(device)
    weight_dtype = weight_dtype_for(mixed)
    generator = torch.Generator("cpu").manual_seed(0)
    unet.train()
    for _ in range(config.steps):
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device)
        t = torch.randint(0, 1000, (1,), generator=generator).to(device)
        noisy = recipe.noise_scheduler.add_noise(latents, noise, t)
        prediction = unet(noisy.to(weight_dtype), t, encoder_hidden_states=recipe.prompt_embeds,
                          added_cond_kwargs={"text_embeds": recipe.pooled, "time_ids": recipe.time_ids},
                          return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), noise.float())
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock()


def step_cost(args, defaults):
    from pipelines.blora.cost import blora_step_cost

    return blora_step_cost(args.model, args.resolution, rank=args.rank,
                           optimizer="adamw8bit" if defaults["use_8bit_adam"] else "adamw")


if __name__ == "__main__":
    parser = harness.base_parser(__doc__.splitlines()[0], "tiny-sdxl")
    raise SystemExit(harness.main("bench_blora", parser, run_config, step_cost, lambda cuda: {}))
