"""What both training benchmarks share: configurations in subprocesses, levers on and off, the floor, the file.

A benchmark names its recipe's configurations: `reference` (a reference-style loop), `blockstudio` (the recipe
with every lever at its default for the hardware) and one per lever switched away from that default
(`lever=value`). Each configuration runs in its own process, so its peak memory is its own, for `--repeats`
rounds in alternation, keeping its fastest run. The driver computes the cost model's step (FLOPs, memory) once,
the floor time on the GPU at hand (datasheet rates from `pipelines/cost.py`, and on CUDA the rates measured on
the card), and reports each configuration's steps/s, peak memory, ratio to `blockstudio` and to `reference`,
and fraction of the floor (floor / measured step time). The results file records the exact command.
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
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock:
    """Times steps after `warmup`: call it once per finished step (it synchronises the GPU first)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.stamps: list[float] = []
        self.started = time.perf_counter()

    def __call__(self, *_: object) -> None:
        import torch

        sync()
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == self.warmup and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def seconds_per_step(self) -> float:
        timed = self.stamps[self.warmup - 1:] if self.warmup else [self.started, *self.stamps]
        return (timed[-1] - timed[0]) / (len(timed) - 1)


def lever_flips(defaults: dict, cuda: bool, extra: dict[str, list]) -> list[tuple[str, object]]:
    """Every lever switched away from its default here, one at a time (CUDA-only values only on CUDA)."""
    import importlib.util

    flips: list[tuple[str, object]] = []
    flips.append(("mixed_precision", "no" if defaults["mixed_precision"] != "no" else "bf16"))
    flips.append(("attention", "math"))
    if cuda:
        flips += [("attention", "flash"), ("attention", "efficient")]
    if importlib.util.find_spec("xformers") is not None:
        flips.append(("attention", "xformers"))
    flips += [("gradient_checkpointing", True), ("gradient_checkpointing", False)]
    for lever in ("compile_blocks", "fused_adam", "tf32", "channels_last"):
        flips.append((lever, not defaults[lever]))
    if cuda and importlib.util.find_spec("bitsandbytes") is not None:
        flips.append(("use_8bit_adam", not defaults["use_8bit_adam"]))
    for lever, values in extra.items():
        flips += [(lever, value) for value in values]
    return flips


def parse_value(text: str):
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def base_parser(description: str, default_model: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=default_model)
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's (1024 at full size)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per configuration; fastest kept")
    parser.add_argument("--levers", default="all",
                        help="'all', 'none', or a comma list of lever names (or lever=value) to switch one by one")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend for compile_blocks")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per configuration")
    parser.add_argument("--out", default=None, help="results file (default: bench/results/<name>.json)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a single configuration (worker)
    return parser


def main(name: str, parser: argparse.ArgumentParser, run_config: Callable, step_cost: Callable,
         extra_flips: Callable[[bool], dict[str, list]], argv: list[str] | None = None) -> int:
    """Parse, run every configuration in its own process (or one, as the worker), write and print the results."""
    import torch

    from pipelines.models import resolve_model

    args = parser.parse_args(argv)
    spec = resolve_model(args.model)
    args.resolution = args.resolution or spec.resolution
    if args.one:
        torch.set_num_threads(args.threads)
        lever, _, value = args.one.partition("=")
        result = run_config(args, lever, parse_value(value) if value else None)
        result["peak_rss_mb"] = peak_rss_mb()
        if torch.cuda.is_available():
            result["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        print("RESULT " + json.dumps(result))
        return 0

    from pipelines.training import TrainConfig, resolve_levers

    cuda = torch.cuda.is_available()
    if spec.random_weights and not cuda:
        print(f"{args.model} is full size: run it on a CUDA GPU (tiny-sdxl / tiny-flux run here)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    defaults = resolve_levers(TrainConfig(), device)
    flips = lever_flips(defaults, cuda, extra_flips(cuda))
    if args.levers == "none":
        flips = []
    elif args.levers != "all":
        wanted = [w.strip() for w in args.levers.split(",") if w.strip()]
        flips = [(lever, value) for lever, value in flips
                 if lever in wanted or f"{lever}={str(value).lower()}" in [w.lower() for w in wanted]]
    configs = ["reference", "blockstudio", *[f"{lever}={str(value).lower()}" for lever, value in flips]]
    given = list(argv if argv is not None else sys.argv[1:])
    command = " ".join(["python", f"bench/{name}.py", shlex.join(given)]).strip()

    runs: dict[str, list[dict]] = {config: [] for config in configs}
    for _ in range(args.repeats):
        for config in configs:
            worker_args = [*given, "--one", "blockstudio" if config == "blockstudio" else config]
            proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), *worker_args],
                                  capture_output=True, text=True, cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT),
                                       "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                runs[config].append({"error": tail[:300]})
                print(f"{config}: failed: {tail[:200]}", file=sys.stderr)
                continue
            runs[config].append(json.loads(lines[-1][len("RESULT "):]))
    results = {}
    for config, found in runs.items():
        ok = [r for r in found if "error" not in r]
        results[config] = (dict(max(ok, key=lambda r: r["steps_per_s"]), all_steps_per_s=[r["steps_per_s"] for r in ok])
                           if ok else found[-1])

    cost = step_cost(args, defaults)
    machine = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if cuda else None}
    floors = floor_rates(machine["gpu"])
    memory_key = "cuda_peak_allocated_mb" if cuda else "peak_rss_mb"
    base = results.get("blockstudio", {})
    ref = results.get("reference", {})
    for result in results.values():
        if "error" in result:
            continue
        seconds = 1 / result["steps_per_s"]
        result["seconds_per_step"] = seconds
        result["peak_mb"] = result[memory_key]
        if "steps_per_s" in base:
            result["speed_vs_blockstudio"] = result["steps_per_s"] / base["steps_per_s"]
            result["memory_vs_blockstudio"] = result["peak_mb"] / base[memory_key]
        if "steps_per_s" in ref:
            result["speed_vs_reference"] = result["steps_per_s"] / ref["steps_per_s"]
            result["memory_vs_reference"] = result["peak_mb"] / ref[memory_key]
        for source, rates in floors.items():
            floor = cost.floor(rates["bf16_tflops"], rates["bandwidth_gbs"])
            result[f"fraction_of_floor_{source}"] = floor["floor_s"] / seconds
    report = {
        "command": command,
        "label": ("GPU: " + machine["gpu"]) if cuda else "CPU, tiny model: shows that the benchmark works; "
                                                           "speed and memory that matter come from a GPU run",
        "machine": machine,
        "model": args.model,
        "settings": {"resolution": args.resolution, "rank": args.rank, "batch_size": 1, "timed_steps": args.steps,
                     "warmup_steps": args.warmup, "repeats": args.repeats, "compile_backend": args.compile_backend,
                     "defaults_here": defaults},
        "memory_method": ("torch.cuda.max_memory_allocated after the warm-up steps" if cuda else
                          "peak resident set of the configuration's process (ru_maxrss)"),
        "cost_model": cost.to_dict(),
        "floor": {source: {**rates, **cost.floor(rates["bf16_tflops"], rates["bandwidth_gbs"])}
                  for source, rates in floors.items()},
        "results": results,
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / default_results_name(name, args.model, machine)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_table(report, memory_key, out)
    return 0


def floor_rates(gpu_name: str | None) -> dict[str, dict[str, float]]:
    """The rates the floor is computed at: the datasheet's for a known GPU and the measured ones on CUDA."""
    from pipelines.cost import gpu_spec, measure_ceilings

    rates = {}
    if gpu_name:
        spec = gpu_spec(gpu_name)
        if spec is not None:
            rates["datasheet"] = {"bf16_tflops": spec.bf16_tflops, "bandwidth_gbs": spec.bandwidth_gbs,
                                  "gpu": spec.name, "note": spec.note}
        rates["measured"] = measure_ceilings("cuda")
    return rates


def default_results_name(name: str, model: str, machine: dict) -> str:
    where = machine["gpu"] or "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in where.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return f"{name.removeprefix('bench_')}_{model}_{slug}.json"


def print_table(report: dict, memory_key: str, out: Path) -> None:
    print(report["command"])
    print(report["label"])
    cost = report["cost_model"]
    print(f"cost model: {_flops(cost['flops'])}/step (forward {_flops(cost['forward_flops'])}, "
          f"backward {_flops(cost['backward_flops'])}), {cost['trainable_params'] / 1e6:.2f} M trainable, "
          f"memory {cost['memory_bytes'] / 2**30:.2f} GiB ({cost['memory_bytes_checkpointing'] / 2**30:.2f} "
          f"with checkpointing)")
    for source, floor in report["floor"].items():
        print(f"floor ({source}): {floor['floor_s'] * 1000:.3f} ms/step, {floor['bound']}-bound")
    if not report["floor"]:
        print("floor: no GPU here, so no floor (fraction-of-floor columns are GPU-only)")
    header = f"{'configuration':32s} {'steps/s':>9s} {'peak MB':>10s} {'vs ours':>8s} {'vs ref':>8s}"
    sources = list(report["floor"])
    header += "".join(f" {'floor ' + s[:4]:>10s}" for s in sources)
    print(header)
    for config, r in report["results"].items():
        if "error" in r:
            print(f"{config:32s} failed: {r['error'][:80]}")
            continue
        line = (f"{config:32s} {r['steps_per_s']:9.3f} {r['peak_mb']:10.1f} {r.get('speed_vs_blockstudio', 0):7.2f}x "
                f"{r.get('speed_vs_reference', 0):7.2f}x")
        line += "".join(f" {r.get(f'fraction_of_floor_{s}', 0):10.3f}" for s in sources)
        print(line)
    print(f"written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


def _flops(value: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:.3f} {unit}"
    return f"{value:.0f} FLOP"
