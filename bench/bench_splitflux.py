"""SplitFlux training speed and peak memory, against a plain diffusers-style Flux LoRA loop at the same settings.

Each configuration runs in its own subprocess so that peak memory is its own:
- `splitflux`: Block Studio's recipe through the shared training loop (cached latents and both prompts'
  embeddings, double blocks without autograd, the style prompt as a second text stream up to block 12);
- `diffusers_lora`: the loop `train_dreambooth_lora_flux.py` runs, written out here: a PEFT LoRA (same rank,
  Gaussian init) on the same target modules of *every* block, the prompt and the image encoded every step,
  AdamW, the full transformer forward and backward.

Memory: on CPU, the process's peak resident set size (`resource.getrusage(RUSAGE_SELF).ru_maxrss`), reported
whole and above the resident size after loading the model, before training is set up; on CUDA, `torch.cuda.max_memory_allocated`.
Speed: steps per second over the timed steps, after warm-up steps; the configurations alternate for
`--repeats` rounds and each keeps its fastest run. `--full-size` builds a random-weight
transformer with FLUX.1's full configuration (needs a CUDA GPU; text encoders and VAE stay small, sized to
fit it), in bf16 with gradient checkpointing for both configurations.

    python bench/bench_splitflux.py                       # tiny-flux on CPU -> bench/results/splitflux_tiny.json
    python bench/bench_splitflux.py --full-size           # full-size transformer on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v")
CONFIGS = ("splitflux", "diffusers_lora")


def _rss_mb() -> float:
    """Current resident set size in MB (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


# -- models -----------------------------------------------------------------------------------------------


def full_size_pipe(device, dtype, heads: int = 24):
    """FLUX.1-dev's transformer configuration with random weights; small text encoders and VAE that fit it."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from pipelines.models import model_path
    from pipelines.tiny import tiny_flux_components

    tiny = model_path("tiny-flux")
    tokenizer = CLIPTokenizer.from_pretrained(tiny / "tokenizer")
    from transformers import AutoTokenizer

    tokenizer_2 = AutoTokenizer.from_pretrained(tiny / "tokenizer_2")
    small = tiny_flux_components(0, t5_vocab_size=len(tokenizer_2))
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=768, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, bos_token_id=512,
                                        eos_token_id=513, pad_token_id=513, projection_dim=768))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=4096, d_kv=8, d_ff=64, num_layers=1,
                                 num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    with torch.device(device):
        transformer = FluxTransformer2DModel(guidance_embeds=True, num_attention_heads=heads,
                                             axes_dims_rope=(16, 56, 56)).to(dtype)
    pipe = FluxPipeline(scheduler=small["scheduler"], vae=small["vae"], text_encoder=clip, tokenizer=tokenizer,
                        text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load(args):
    import torch

    from pipelines.models import load_pipeline

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.full_size:
        return full_size_pipe(device, torch.bfloat16 if device.type == "cuda" else torch.float32, args.heads)
    return load_pipeline("tiny-flux", device=device)


def image(resolution: int):
    from pipelines.images import center_crop_square, load_image

    return center_crop_square(load_image(ROOT / "assets" / "examples" / "cat.jpg"), resolution)


# -- the two configurations -------------------------------------------------------------------------------


def run_splitflux(args, pipe) -> dict:
    import tempfile

    from pipelines.splitflux import SplitFluxRecipe, SplitFluxSettings, default_train_config
    from pipelines.training import train

    settings = SplitFluxSettings(token="[c1]", style_token="[s1]", rank=args.rank, resolution=args.resolution,
                                 max_sequence_length=args.text_length, target_modules=TARGETS)
    recipe = SplitFluxRecipe(pipe, image(args.resolution), settings)
    config = default_train_config(steps=args.warmup + args.steps, learning_rate=1e-4, checkpoint_every=0,
                                  mixed_precision=args.mixed_precision,
                                  gradient_checkpointing=args.gradient_checkpointing, use_8bit_adam=False)
    stamps: list[float] = []
    before = {}

    def on_progress(event) -> None:
        _sync()
        stamps.append(time.perf_counter())
        if event.step == 1:
            before.setdefault("params", sum(p.numel() for p in recipe.trainable_parameters()))

    rss_before = _rss_mb()
    with tempfile.TemporaryDirectory() as work:
        _sync()
        start = time.perf_counter()
        train(recipe, config, work, on_progress=on_progress)
    timed = stamps[args.warmup - 1:] if args.warmup else [start, *stamps]
    return {"steps_per_s": (len(timed) - 1) / (timed[-1] - timed[0]), "trainable_params": before["params"],
            "rss_before_training_mb": rss_before}


def run_diffusers_lora(args, pipe) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from pipelines.images import to_pixels
    from pipelines.splitflux import _latent_image_ids, _pack
    from pipelines.training import resolve_mixed_precision, weight_dtype_for

    device = pipe.transformer.device
    mixed = resolve_mixed_precision(args.mixed_precision, device)
    dtype = weight_dtype_for(mixed)
    rss_before = _rss_mb()
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    transformer.to(dtype=dtype)
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                       target_modules=list(TARGETS)))
    cast_training_params(transformer, torch.float32)
    checkpointing = args.gradient_checkpointing
    if checkpointing is None:
        checkpointing = device.type == "cuda"
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pixels = to_pixels(image(args.resolution)).to(device)
    vae = pipe.vae.to(torch.float32)
    prompt = "A [c1] object"
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else _NoContext()
    transformer.train()
    stamps = []
    for _ in range(args.warmup + args.steps):
        with torch.no_grad():
            prompt_embeds, pooled, text_ids = pipe.encode_prompt(prompt, prompt_2=None, device=device,
                                                                 max_sequence_length=args.text_length)
            latents = vae.encode(pixels).latent_dist.sample()
            latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device)
        index = (torch.rand((1,), generator=generator) * len(scheduler.timesteps)).long()
        sigma = scheduler.sigmas[index].to(device).view(-1, 1, 1, 1)
        timestep = scheduler.timesteps[index].to(device) / 1000
        noisy = (1 - sigma) * latents + sigma * noise
        img_ids = _latent_image_ids(latents.shape[-2] // 2, latents.shape[-1] // 2, device, dtype)
        guidance = torch.full((1,), 1.0, device=device) if transformer.config.guidance_embeds else None
        with autocast:
            prediction = transformer(hidden_states=_pack(noisy).to(dtype), timestep=timestep, guidance=guidance,
                                     pooled_projections=pooled.to(dtype), encoder_hidden_states=prompt_embeds.to(dtype),
                                     txt_ids=text_ids.to(dtype), img_ids=img_ids, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), _pack(noise - latents).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync()
        stamps.append(time.perf_counter())
    timed = stamps[args.warmup - 1:] if args.warmup else stamps
    return {"steps_per_s": (len(timed) - 1) / (timed[-1] - timed[0]),
            "trainable_params": sum(p.numel() for p in params), "rss_before_training_mb": rss_before}


class _NoContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    pipe = load(args)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = (run_splitflux if args.worker == "splitflux" else run_diffusers_lora)(args, pipe)
    result["peak_rss_mb"] = _peak_rss_mb()
    result["peak_rss_above_start_mb"] = result["peak_rss_mb"] - result["rss_before_training_mb"]
    if torch.cuda.is_available():
        result["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result))


# -- driver -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=None, help="default 64 (tiny) or 512 (full size)")
    parser.add_argument("--text-length", type=int, default=None, help="T5 tokens; default 32 (tiny) or 512")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per configuration")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration; the fastest is kept")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--full-size", action="store_true", help="FLUX.1's full transformer, random weights (GPU)")
    parser.add_argument("--heads", type=int, default=24, help=argparse.SUPPRESS)  # smaller: a CPU smoke test
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", choices=CONFIGS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (512 if args.full_size else 64)
    args.text_length = args.text_length or (512 if args.full_size else 32)
    if args.worker:
        worker(args)
        return 0

    import torch

    if args.full_size and not torch.cuda.is_available() and args.heads == 24:
        print("--full-size needs a CUDA GPU (FLUX.1's transformer is 12B parameters)", file=sys.stderr)
        return 2
    given = list(argv if argv is not None else sys.argv[1:])
    command = " ".join(["python bench/bench_splitflux.py", shlex.join(given)]).strip()
    runs: dict[str, list[dict]] = {config: [] for config in CONFIGS}
    # The configurations alternate, and each keeps its fastest run, so that load from other processes on
    # a shared machine distorts the ratio less.
    for _ in range(args.repeats):
        for config in CONFIGS:
            proc = subprocess.run([sys.executable, __file__, *given, "--worker", config], capture_output=True,
                                  text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{config} failed (exit {proc.returncode})")
            runs[config].append(json.loads(lines[-1][len("RESULT "):]))
    results = {config: dict(max(found, key=lambda r: r["steps_per_s"]),
                            all_steps_per_s=[r["steps_per_s"] for r in found])
               for config, found in runs.items()}
    split, plain = results["splitflux"], results["diffusers_lora"]
    memory_key = "cuda_peak_allocated_mb" if "cuda_peak_allocated_mb" in split else "peak_rss_mb"
    report = {
        "command": command,
        "model": "FLUX.1 full-size transformer, random weights" if args.full_size else "tiny-flux",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})",
        "threads": args.threads,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "settings": {"rank": args.rank, "resolution": args.resolution, "text_length": args.text_length,
                     "target_modules": list(TARGETS), "batch_size": 1, "learning_rate": 1e-4,
                     "timed_steps": args.steps, "warmup_steps": args.warmup, "repeats": args.repeats,
                     "mixed_precision": args.mixed_precision or "auto (fp32 on CPU, bf16 on GPU)",
                     "gradient_checkpointing": "auto (on for GPU)" if args.gradient_checkpointing is None
                     else args.gradient_checkpointing},
        "memory_method": ("torch.cuda.max_memory_allocated per configuration" if memory_key.startswith("cuda")
                          else "peak RSS per configuration subprocess (resource.getrusage(RUSAGE_SELF).ru_maxrss); "
                               "'above start' subtracts the RSS after loading the model, before training is set up"),
        "results": results,
        "splitflux_vs_diffusers": {
            "steps_per_s_ratio": split["steps_per_s"] / plain["steps_per_s"],
            "peak_memory_ratio": split[memory_key] / plain[memory_key],
            "peak_memory_above_start_ratio": split["peak_rss_above_start_mb"] / plain["peak_rss_above_start_mb"],
            "trainable_params_ratio": split["trainable_params"] / plain["trainable_params"],
        },
    }
    if not args.full_size:
        report["full_size"] = ("run separately with --full-size on a CUDA GPU" if torch.cuda.is_available()
                               else "not run: no CUDA GPU in this environment")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        "splitflux_full.json" if args.full_size else "splitflux_tiny.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(command)
    for config, result in results.items():
        print(f"{config:15s} {result['steps_per_s']:7.2f} steps/s  peak {result[memory_key]:8.1f} MB  "
              f"(+{result['peak_rss_above_start_mb']:.1f} MB above start)  {result['trainable_params']:,} params")
    ratio = report["splitflux_vs_diffusers"]
    print(f"splitflux / diffusers: {ratio['steps_per_s_ratio']:.2f}x steps/s, {ratio['peak_memory_ratio']:.2f}x "
          f"peak memory; written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
