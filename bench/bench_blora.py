"""B-LoRA training speed and memory: Block Studio's recipe against a reference-style loop, same run, same settings.

The reference loop does per step what diffusers' advanced SDXL DreamBooth script does with `--use_blora` and
its defaults (no `--cache_latents`, frozen text encoders): it encodes the image with the VAE every step and
keeps the VAE and text encoders on the device; the prompt is embedded once. Both loops use the same model,
image, rank, PEFT LoRA config, optimizer, precision and seed. Each configuration runs in its own process so
peak memory is its own: on CUDA `torch.cuda.max_memory_allocated`, on CPU the growth of the peak resident set
over the resident set right after the pipeline is loaded (`ru_maxrss`).

    python bench/bench_blora.py                       # tiny-sdxl on this machine's CPU
    python bench/bench_blora.py --model sdxl --steps 50 --resolution 1024   # on a GPU with the model cached
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(kind: str, model: str, steps: int, warmup: int, rank: int, resolution: int | None) -> dict:
    """Train `steps` steps with one implementation and return its timings and memory."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.nn.functional as F

    from pipelines.blora import BLoRARecipe, BLoRASettings, default_train_config
    from pipelines.images import center_crop_square, load_image
    from pipelines.models import load_pipeline, resolve_model
    from pipelines.training import make_optimizer, resolve_mixed_precision, weight_dtype_for

    spec = resolve_model(model)
    resolution = resolution or spec.resolution
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mixed = resolve_mixed_precision(None, device)
    weight_dtype = weight_dtype_for(mixed)
    pipe = load_pipeline(model, device=device)
    rss_loaded = _rss_mb()
    image = center_crop_square(load_image(ROOT / "assets" / "examples" / "cat.jpg"), resolution)
    settings = BLoRASettings(token="[v1]", rank=rank, resolution=resolution)
    config = default_train_config(steps=steps, checkpoint_every=0)

    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=mixed, cpu=device.type == "cpu")
    recipe = BLoRARecipe(pipe, image, settings)
    recipe.setup(accelerator, config)
    params = recipe.trainable_parameters()
    optimizer = make_optimizer(params, config, device)
    unet, optimizer = accelerator.prepare(recipe.unet, optimizer)
    generator = torch.Generator("cpu").manual_seed(0)

    if kind == "reference":
        # What the reference script keeps around and redoes every step.
        pipe.vae.to(device, dtype=torch.float32)
        pipe.text_encoder.to(device)
        pipe.text_encoder_2.to(device)
        from pipelines.images import to_pixels

        pixels = to_pixels(image).to(device)

        def loss_fn(gen):
            with torch.no_grad():
                latents = pipe.vae.encode(pixels).latent_dist.sample(generator=None)
            latents = latents * pipe.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=gen).to(device)
            t = torch.randint(0, 1000, (1,), generator=gen).to(device)
            noisy = recipe.noise_scheduler.add_noise(latents, noise, t)
            pred = unet(noisy.to(weight_dtype), t, encoder_hidden_states=recipe.prompt_embeds,
                        added_cond_kwargs={"text_embeds": recipe.pooled, "time_ids": recipe.time_ids},
                        return_dict=False)[0]
            return F.mse_loss(pred.float(), noise.float())
    else:
        def loss_fn(gen):
            return recipe.loss(gen)[0]

    def step():
        loss = loss_fn(generator)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        memory_kind = "cuda max_memory_allocated"
    else:
        peak = max(_peak_rss_mb() - rss_loaded, 0.0)
        memory_kind = "cpu peak RSS above the loaded pipeline (setup, warmup and training)"
    return {"kind": kind, "steps": steps, "seconds": seconds, "steps_per_s": steps / seconds, "peak_mb": peak,
            "memory": memory_kind, "device": str(device), "mixed_precision": mixed, "resolution": resolution}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-sdxl")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each implementation")
    parser.add_argument("--out", default=None, help="results file (default: bench/results/blora_<model>_<device>.json)")
    parser.add_argument("--one", choices=["blockstudio", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        print(json.dumps(run_one(args.one, args.model, args.steps, args.warmup, args.rank, args.resolution)))
        return

    runs = []
    for _ in range(args.repeats):
        for kind in ("reference", "blockstudio"):
            cmd = [sys.executable, __file__, "--one", kind, "--model", args.model, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--rank", str(args.rank)]
            if args.resolution:
                cmd += ["--resolution", str(args.resolution)]
            env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
            output = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            result = json.loads(output.strip().splitlines()[-1])
            print(json.dumps(result))
            runs.append(result)

    def best(kind, key, fn):
        return fn(r[key] for r in runs if r["kind"] == kind)

    summary = {
        "blockstudio_steps_per_s": best("blockstudio", "steps_per_s", max),
        "reference_steps_per_s": best("reference", "steps_per_s", max),
        "blockstudio_peak_mb": best("blockstudio", "peak_mb", min),
        "reference_peak_mb": best("reference", "peak_mb", min),
    }
    summary["speedup"] = summary["blockstudio_steps_per_s"] / summary["reference_steps_per_s"]
    summary["memory_ratio"] = (summary["blockstudio_peak_mb"] / summary["reference_peak_mb"]
                               if summary["reference_peak_mb"] else None)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"blora_{args.model}_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "python bench/bench_blora.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if device == "cuda" else None},
        "settings": {"model": args.model, "steps": args.steps, "warmup": args.warmup, "rank": args.rank,
                     "resolution": runs[0]["resolution"], "batch": 1, "repeats": args.repeats},
        "summary": summary,
        "runs": runs,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"speedup {summary['speedup']:.2f}x, memory ratio "
          f"{summary['memory_ratio'] if summary['memory_ratio'] is None else round(summary['memory_ratio'], 2)}"
          f" -> {out}")


if __name__ == "__main__":
    main()
