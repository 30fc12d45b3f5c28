"""The single-image training loop shared by every recipe (`pipelines.recipes` lists them).

The loop knows nothing of SDXL or Flux. A recipe hands it the trainable parameters, a module to prepare with
`accelerate`, and a `loss(generator)` function; the loop owns the optimizer, mixed precision, progress events,
cancellation and checkpoints. All randomness of a step (noise, timesteps, latent samples) comes from one CPU
`torch.Generator` whose state is checkpointed with the weights and optimizer, so a resumed run finishes with
exactly the weights of an uninterrupted one.

Checkpoints are safetensors only (weights, optimizer tensors, generator state) plus JSON: nothing is pickled.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from pipelines.checks import MAX_SEED
from pipelines.errors import BlockStudioError, InvalidSetting
from pipelines.settings import check_fields, setting
from pipelines.storage import atomic_dir, write_json

MAX_STEPS = 100_000
MAX_LEARNING_RATE = 1.0
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
ATTENTION_CHOICES = ("sdpa", "flash", "efficient", "math", "xformers")


class TrainingCancelled(Exception):
    """Raised inside the loop when the cancel token is set; the last checkpoint is kept."""


class TrainingPaused(TrainingCancelled):
    """Raised when a call's share of steps (`max_steps_this_call`) is done: a checkpoint of the last step is
    written and `resume=True` continues to exactly the weights of an uninterrupted run."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"training paused at step {step} of {total}")
        self.step = step
        self.total = total


class TrainingDiverged(BlockStudioError):
    """The loss or the trained weights became NaN or infinite; nothing of the run is written as a package."""


class CorruptCheckpoint(BlockStudioError):
    """A checkpoint file that cannot be read back; the message names it and says how to start over."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path  # the damaged file (or checkpoint folder)


class CancelToken:
    """Thread-safe flag checked once per step. `cancel()` stops training before the next step starts."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass
class TrainConfig:
    steps: int = 1000
    learning_rate: float = 5e-5
    seed: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    checkpoint_every: int = 250
    checkpoints_to_keep: int = 1
    sample_every: int = 0  # 0: no previews during training
    # Speed and memory levers (see `LEVERS`). None means "decide from the hardware" (`resolve_levers`).
    mixed_precision: str | None = None
    gradient_checkpointing: bool | None = None
    use_8bit_adam: bool | None = None
    attention: str | None = None
    compile_blocks: bool | None = None
    fused_adam: bool | None = None
    tf32: bool | None = None
    channels_last: bool | None = None
    compile_backend: str = "inductor"  # torch.compile's backend for `compile_blocks`

    def to_dict(self) -> dict:
        return asdict(self)


_RANK_CHOICES = (4, 8, 16, 32, 64, 128)  # the Train form's rank list


@dataclass
class RunRequest:
    """What every recipe's end-to-end request shares: the image, the package folder, loop and memory options.

    Each field is a `setting` (`pipelines/settings.py`): its metadata is its CLI option, its Train-form control
    and its checks. A recipe subclasses it with its own defaults and fields (see `pipelines.recipes`), and
    `validate()` is the one place a request is checked before any model loads.
    """

    image: Any = setting(help="the one image to learn from (JPEG, PNG or WebP)", required=True)
    out: str | Path = setting(help="folder for the adapter package", required=True)
    model: str = setting("", help="")  # the recipe sets its default; the CLI's help names the architecture's models
    steps: int = setting(1000, min=1, max=MAX_STEPS, label="steps")
    rank: int = setting(64, min=1, max=1024, label="rank", form_label="LoRA rank", widget="dropdown",
                        form_choices=_RANK_CHOICES)
    learning_rate: float = setting(5e-5, min=0.0, max=MAX_LEARNING_RATE, above_min=True, label="learning rate",
                                   flag="--lr", help="learning rate")
    resolution: int | None = setting(None, min=64, max=4096, label="resolution",
                                     help="training size (default: the model's)")
    token: str | None = setting(None, help="trigger token (default: one derived from the image, e.g. {token_example})",
                                form_label="Trigger token")
    seed: int = setting(0, min=0, max=MAX_SEED, label="seed")
    checkpoint_every: int = setting(250, min=0, max=MAX_STEPS, label="checkpoint interval")
    sample_every: int = setting(0, min=0, max=MAX_STEPS, label="preview interval",
                                form_label="Preview every N steps",
                                help="write a preview to OUT.partial/samples every N steps (0: none)")
    samples: bool = setting(True, flag="--no-samples", invert=True, help="skip the preview images")
    sample_steps: int | None = setting(None, min=1, max=1000, label="sample steps")
    # The speed and memory levers (`LEVERS`); None: decided from the hardware.
    mixed_precision: str | None = setting(None, choices=MIXED_PRECISION_CHOICES, label="mixed precision",
                                          help="default: bf16 on a GPU that has it (else fp16), fp32 on a CPU")
    gradient_checkpointing: bool | None = setting(None)
    use_8bit_adam: bool | None = setting(None, help="8-bit optimizer state (bitsandbytes, on a CUDA GPU)")
    attention: str | None = setting(None, choices=ATTENTION_CHOICES,
                                    help="attention kernel (default sdpa: PyTorch picks flash where it can)")
    compile_blocks: bool | None = setting(None, help="torch.compile the repeated transformer blocks (default: on "
                                                     "a CUDA GPU)")
    fused_adam: bool | None = setting(None, help="AdamW's fused kernel (default: on a CUDA GPU)")
    tf32: bool | None = setting(None, help="TensorFloat-32 matrix products (default: on a CUDA GPU)")
    channels_last: bool | None = setting(None, help="channels-last memory format for the UNet (default: on a "
                                                    "CUDA GPU)")
    # Stop (with a checkpoint) after this many steps; a resumed call continues (ZeroGPU's chunks).
    max_steps_this_call: int | None = setting(None, flag=None)
    resume: bool = setting(False, help="continue the unfinished run in OUT.partial")
    restart: bool = setting(False, help="discard an unfinished run in OUT.partial")
    keep_checkpoints: bool = setting(False)
    force: bool = setting(False, help="replace an existing package (or a folder of other files) at --out")

    def validate(self) -> None:
        """Check every setting in place (numbers become plain ints and floats), before any model is loaded.

        Refuses bools, NaN, infinities, values out of range and unknown choices with one line each, and 8-bit
        Adam where it cannot run. A recipe's request adds its own checks after calling this.
        """
        check_run_request(self)


def check_run_request(request: RunRequest) -> None:
    """The checks every recipe's request gets: its settings' metadata, then what the loop needs."""
    check_fields(request)
    if request.resume and request.restart:
        raise InvalidSetting("--resume and --restart contradict each other; pass one of them")
    check_optimizer(request.use_8bit_adam)
    loop_options(request)  # the speed levers and the steps per call


def check_optimizer(use_8bit_adam: bool | None) -> None:
    """8-bit Adam only where it runs: a CUDA GPU with bitsandbytes."""
    if use_8bit_adam and not (torch.cuda.is_available() and _bitsandbytes_available()):
        raise InvalidSetting("8-bit Adam (--use-8bit-adam) needs a CUDA GPU and the bitsandbytes package; "
                             "leave it out on this machine")


class CachedLatents:
    """One image encoded once: its VAE latent distribution, from which every step draws a fresh sample.

    Drawing per step keeps the reference scripts' augmentation (they encode and sample every step) at none
    of the cost. The VAE encodes in fp32, since SDXL's overflows in fp16; its dtype is restored afterwards.
    """

    def __init__(self, vae: torch.nn.Module, pixels: torch.Tensor, device: torch.device) -> None:
        dtype = vae.dtype
        vae.to(device, dtype=torch.float32)
        with torch.no_grad():
            dist = vae.encode(pixels.to(device)).latent_dist
        vae.to(dtype=dtype)
        self.mean = dist.mean.detach()
        self.std = dist.std.detach()
        self.scaling_factor = vae.config.scaling_factor
        self.shift_factor = getattr(vae.config, "shift_factor", None) or 0.0

    @property
    def shape(self) -> torch.Size:
        return self.mean.shape

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """Scaled (and shifted) latents for one step; the noise comes from the run's CPU generator."""
        noise = torch.randn(self.mean.shape, generator=generator).to(self.mean.device)
        return (self.mean + self.std * noise - self.shift_factor) * self.scaling_factor


@dataclass
class ProgressEvent:
    step: int
    total_steps: int
    loss: float
    elapsed_s: float
    steps_per_s: float
    eta_s: float
    losses: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    steps: int
    loss_history: list[float]
    seconds: float
    resumed_from: int | None = None


class Recipe(Protocol):
    """What a recipe hands the loop. See `pipelines/blora/` for the reference implementation."""

    def setup(self, accelerator: Any, config: TrainConfig) -> None:
        """Move models to the device, choose dtypes, cache latents and text embeddings."""

    def trainable_module(self) -> torch.nn.Module:
        """The module that carries the adapters (prepared with accelerate)."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def loss(self, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """One step's loss, and its named terms for logging. All randomness from `generator`."""

    def adapter_state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None: ...

    # Optional: `make_optimizer(params, config, device)` for a recipe whose adapter needs its own optimiser
    # (SoRA's proximal gate step); without it the loop uses `make_optimizer` below.


def resolve_mixed_precision(requested: str | None, device: torch.device) -> str:
    if requested is not None:
        if requested not in ("no", "fp16", "bf16"):
            raise InvalidSetting(f"mixed precision must be 'no', 'fp16' or 'bf16', not {requested!r}")
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


# -- speed and memory levers ---------------------------------------------------------------------------

# Every lever is a TrainConfig field (and a RunRequest field, and a CLI flag). None lets `resolve_levers` pick
# what helps on the hardware; the benchmarks measure each one on and off (bench/README.md).
LEVERS = {
    "mixed_precision": "bf16 (fp16 without bf16) frozen base, fp32 adapters and optimizer; 'no' is fp32 throughout",
    "attention": "sdpa (PyTorch picks flash where it can), flash, efficient, math, or xformers",
    "gradient_checkpointing": "recompute activations in the backward pass, only on the blocks it goes through; "
                              "on a GPU, on when the cost model's memory estimate would not fit otherwise",
    "compile_blocks": "torch.compile of the repeated transformer blocks (regional compilation)",
    "fused_adam": "AdamW's fused kernel",
    "tf32": "TensorFloat-32 for the float32 matrix products that remain (adapters, losses)",
    "channels_last": "channels-last memory format for convolutional models (SDXL's UNet)",
    "use_8bit_adam": "8-bit AdamW state (bitsandbytes, CUDA)",
}


def resolve_levers(config: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Every lever's concrete value for `device`: the config's where it sets one, else what helps there.

    On a CUDA GPU: bf16 (fp16 without bf16), SDPA, compiled blocks, fused AdamW, TF32 and channels-last; on a CPU
    all off, fp32 and SDPA. Gradient checkpointing is left to the recipe (None), which knows its memory.
    """
    cuda = device.type == "cuda"
    attention = config.attention or "sdpa"
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, not {attention!r}")
    if attention == "efficient" and not cuda:
        raise ValueError("--attention efficient needs a CUDA GPU; use sdpa, flash or math here")
    if attention == "xformers" and not _module_available("xformers"):
        raise ValueError("--attention xformers needs the xformers package (pip install xformers)")
    use_8bit = config.use_8bit_adam
    if use_8bit is None:
        use_8bit = cuda and _bitsandbytes_available()

    def default(value: bool | None) -> bool:
        return cuda if value is None else bool(value)

    return {
        "mixed_precision": resolve_mixed_precision(config.mixed_precision, device),
        "attention": attention,
        "gradient_checkpointing": config.gradient_checkpointing,
        "compile_blocks": default(config.compile_blocks),
        "fused_adam": default(config.fused_adam) and not use_8bit,
        "tf32": default(config.tf32),
        "channels_last": default(config.channels_last),
        "use_8bit_adam": use_8bit,
    }


def loop_options(request: RunRequest) -> dict[str, Any]:
    """The TrainConfig fields a request sets (its levers), checked before any model is loaded."""
    options = {name: getattr(request, name) for name in LEVERS}
    for name in ("gradient_checkpointing", "use_8bit_adam", "compile_blocks", "fused_adam", "tf32", "channels_last"):
        if options[name] is not None and not isinstance(options[name], bool):
            raise InvalidSetting(f"{name.replace('_', ' ')} must be on, off or unset, not {options[name]!r}")
    if options["attention"] is not None and options["attention"] not in ATTENTION_CHOICES:
        raise InvalidSetting(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, not {options['attention']!r}")
    if options["mixed_precision"] is not None:
        resolve_mixed_precision(options["mixed_precision"], torch.device("cpu"))
    chunk = request.max_steps_this_call
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise InvalidSetting(f"steps per call must be a whole number of at least 1, not {chunk!r}")
    return options


def gradient_checkpointing_for(requested: bool | None, device: torch.device,
                               memory_without: Callable[[], int], headroom: float = 0.8) -> bool:
    """Checkpointing as asked, or on a CUDA GPU exactly when a step's estimated memory without it
    (`memory_without()`, bytes) exceeds `headroom` of the card's memory; never by default on a CPU."""
    if requested is not None:
        return bool(requested)
    if device.type != "cuda":
        return False
    total = torch.cuda.get_device_properties(device).total_memory
    return memory_without() > headroom * total


@contextlib.contextmanager
def attention_kernels(attention: str) -> Iterator[None]:
    """Restrict `F.scaled_dot_product_attention` to one kernel while a step runs ('sdpa': PyTorch chooses)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "math": SDPBackend.MATH}
    if attention not in backends:
        yield
        return
    with sdpa_kernel([backends[attention]]):
        yield


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """TensorFloat-32 for float32 matrix products and convolutions while training; restored afterwards."""
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def use_xformers(module: torch.nn.Module) -> None:
    """xformers' memory-efficient attention in a diffusers model."""
    if hasattr(module, "set_attention_backend"):
        try:
            module.set_attention_backend("xformers")
            return
        except (ValueError, NotImplementedError):
            pass
    module.enable_xformers_memory_efficient_attention()


def compile_repeated_blocks(module: torch.nn.Module, **options: Any) -> list[torch.nn.Module]:
    """Regional compilation: `torch.compile` each repeated transformer block of a diffusers model (its class's
    `_repeated_blocks`), so one compiled graph serves every block of a kind. Returns the compiled blocks."""
    kinds = set(getattr(module, "_repeated_blocks", ()) or ())
    blocks = [m for m in module.modules() if type(m).__name__ in kinds]
    for block in blocks:
        block.compile(**options)
    return blocks


def uncompile(blocks: list[torch.nn.Module]) -> None:
    """Back to eager for blocks compiled by `compile_repeated_blocks` (the pipeline goes on to generate)."""
    for block in blocks:
        block._compiled_call_impl = None


def _module_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig, device: torch.device):
    levers = resolve_levers(config, device)
    use_8bit = levers["use_8bit_adam"]
    kwargs = dict(
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )
    if use_8bit:
        if device.type != "cuda":
            raise InvalidSetting("8-bit Adam (--use-8bit-adam) needs a CUDA GPU; leave it out on this machine")
        check_optimizer(True)
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    if levers["fused_adam"]:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def _bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


# -- checkpoints ---------------------------------------------------------------------------------------


def _optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    folder: Path,
    step: int,
    recipe: Recipe,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    loss_history: list[float],
    config: TrainConfig,
) -> Path:
    target = folder / f"checkpoint-{step:06d}"
    weights = {k: v.detach().cpu().contiguous() for k, v in recipe.adapter_state_dict().items()}
    check_finite_weights(weights.values(), step, config)
    with atomic_dir(target) as staging:
        save_file(weights, staging / "adapter.safetensors")
        opt_tensors, opt_meta = _optimizer_to_tensors(optimizer)
        save_file(opt_tensors, staging / "optimizer.safetensors")
        save_file({"generator": generator.get_state()}, staging / "rng.safetensors")
        write_json(staging / "state.json", {
            "step": step, "loss_history": loss_history, "optimizer": opt_meta, "config": config.to_dict(),
        })
    return target


def check_finite_weights(weights, step: int, config: TrainConfig) -> None:
    """Stop a run whose weights became NaN or infinite: they are never checkpointed or written as a package."""
    if not all(bool(torch.isfinite(w).all()) for w in weights):
        raise TrainingDiverged(f"training diverged: the adapter's weights became NaN or infinite by step {step}; "
                               f"lower the learning rate ({config.learning_rate:g}) and start again")


CHECKPOINT_FILES = ("adapter.safetensors", "optimizer.safetensors", "rng.safetensors")


def verify_checkpoint(checkpoint: Path) -> dict:
    """Read a checkpoint's state.json and the headers of its tensor files (which also catch truncation).

    Raises `CorruptCheckpoint` naming the first file that cannot be read; returns the state.
    """
    from safetensors import safe_open

    def damaged(name: str, reason: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"the checkpoint {checkpoint / name} is damaged ({reason}); "
                                 "start over with --restart", checkpoint / name)

    try:
        state = json.loads((checkpoint / "state.json").read_text())
        int(state["step"]), list(state["loss_history"]), state["optimizer"]["param_groups"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise damaged("state.json", type(exc).__name__ if not str(exc) else str(exc).splitlines()[0][:120]) from None
    for name in CHECKPOINT_FILES:
        try:
            with safe_open(str(checkpoint / name), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own error type for truncated or garbled files
            raise damaged(name, str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__) from None
    return state


def latest_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.glob("checkpoint-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def _prune_checkpoints(folder: Path, keep: int) -> None:
    found = sorted(p for p in folder.glob("checkpoint-*") if p.is_dir())
    for old in found[: max(0, len(found) - max(keep, 1))]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    checkpoint: Path,
    recipe: Recipe,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> tuple[int, list[float]]:
    state = verify_checkpoint(checkpoint)
    try:
        recipe.load_adapter_state_dict(load_file(checkpoint / "adapter.safetensors"))
        _optimizer_from_tensors(optimizer, load_file(checkpoint / "optimizer.safetensors"), state["optimizer"])
        generator.set_state(load_file(checkpoint / "rng.safetensors")["generator"])
    except BlockStudioError:
        raise
    except Exception as exc:  # readable files whose contents do not fit this run
        raise CorruptCheckpoint(f"the checkpoint {checkpoint} cannot be loaded ({str(exc).splitlines()[0][:160]}); "
                                "start over with --restart", checkpoint) from None
    return int(state["step"]), list(state["loss_history"])


def work_dir_for(out: str | Path) -> Path:
    """Where an unfinished run keeps its checkpoints: `<out>.partial`, beside the package."""
    out = Path(out)
    return out.parent / f"{out.name}.partial"


def prepare_work_dir(work: Path, job: dict, *, resume: bool, restart: bool) -> None:
    """Create the run's work folder, refusing to silently discard or mismatch an unfinished run.

    `job` holds what must not change between a run and its resumption (image hash, token, rank, ...).
    """
    job_file = work / "job.json"
    if latest_checkpoint(work) is not None:
        if restart:
            shutil.rmtree(work)
        elif not resume:
            raise ValueError(
                f"an unfinished run exists in {work}; pass --resume to continue it or --restart to start over"
            )
        elif not isinstance(previous := _read_job_file(job_file), dict):
            raise CorruptCheckpoint(f"{job_file} is damaged; start over with --restart", job_file)
        elif {k: previous.get(k) for k in job} != job:
            changed = sorted(k for k in job if previous.get(k) != job[k])
            raise ValueError(f"cannot resume from {work}: the run used a different {', '.join(changed)}")
    work.mkdir(parents=True, exist_ok=True)
    write_json(job_file, job)


def _read_job_file(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return None


def check_resume(work: Path, resume: bool) -> None:
    """With `resume`, fail before any model is loaded if the checkpoint to resume from cannot be read."""
    checkpoint = latest_checkpoint(work) if resume else None
    if checkpoint is not None:
        verify_checkpoint(checkpoint)


@contextlib.contextmanager
def discard_if_unused(work: Path) -> Iterator[None]:
    """Remove the work folder if the run inside fails before writing any checkpoint."""
    try:
        yield
    except BaseException:
        if latest_checkpoint(work) is None:
            shutil.rmtree(work, ignore_errors=True)
        raise


# -- the loop ------------------------------------------------------------------------------------------


def _allow_new_precision(mixed_precision: str) -> None:
    """Let a single-process run choose its own mixed precision.

    accelerate keeps one process-wide state and refuses a second `Accelerator` with another precision, but a
    process that trains several adapters one after another (the app, the tests) must give each run the
    precision it asks for. Distributed launches keep theirs.
    """
    from accelerate.state import AcceleratorState, DistributedType

    shared = AcceleratorState._shared_state
    if not shared or shared.get("_mixed_precision") in (None, mixed_precision):
        return
    if shared.get("distributed_type", DistributedType.NO) != DistributedType.NO:
        return
    AcceleratorState._reset_state()


def train(
    recipe: Recipe,
    config: TrainConfig,
    work_dir: str | Path,
    *,
    resume: bool = False,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    on_checkpoint: Callable[[int, Path], None] | None = None,
    on_sample: Callable[[int], None] | None = None,
    cancel: CancelToken | None = None,
    accelerator: Any = None,
    max_steps_this_call: int | None = None,
) -> TrainResult:
    """Train `recipe` for `config.steps` steps, checkpointing into `work_dir`.

    With `resume=True`, training continues from the newest checkpoint in `work_dir` (or starts fresh if
    there is none). Cancelling raises `TrainingCancelled` after writing a checkpoint of the last finished step.
    With `max_steps_this_call`, at most that many steps run; if the run is not finished by then, a checkpoint
    is written and `TrainingPaused` is raised, so that a series of calls, each resuming, trains in chunks
    (a ZeroGPU Space's GPU exists only for the length of one call) to the weights of one uninterrupted run.
    """
    from accelerate import Accelerator

    if max_steps_this_call is not None and max_steps_this_call < 1:
        raise ValueError(f"steps per call must be at least 1, not {max_steps_this_call}")
    work_dir = Path(work_dir)
    if accelerator is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        mixed = resolve_mixed_precision(config.mixed_precision, torch.device(device_type))
        _allow_new_precision(mixed)
        accelerator = Accelerator(mixed_precision=mixed, cpu=device_type == "cpu")
    levers = resolve_levers(config, accelerator.device)
    recipe.setup(accelerator, config)
    module = recipe.trainable_module()
    if levers["attention"] == "xformers":
        use_xformers(module)
    compiled = compile_repeated_blocks(module, backend=config.compile_backend) if levers["compile_blocks"] else []
    try:
        with tf32_matmuls(levers["tf32"]), attention_kernels(levers["attention"]):
            return _train_steps(recipe, config, work_dir, module, accelerator, resume=resume, on_progress=on_progress,
                                on_checkpoint=on_checkpoint, on_sample=on_sample, cancel=cancel,
                                max_steps_this_call=max_steps_this_call)
    finally:
        uncompile(compiled)


def _train_steps(recipe: Recipe, config: TrainConfig, work_dir: Path, module: torch.nn.Module, accelerator: Any, *,
                 resume: bool, on_progress, on_checkpoint, on_sample, cancel: CancelToken | None,
                 max_steps_this_call: int | None) -> TrainResult:
    params = recipe.trainable_parameters()
    build_optimizer = getattr(recipe, "make_optimizer", make_optimizer)
    optimizer = build_optimizer(params, config, accelerator.device)
    module, optimizer = accelerator.prepare(module, optimizer)

    generator = torch.Generator("cpu").manual_seed(config.seed)
    start_step, loss_history, resumed_from = 0, [], None
    if resume:
        checkpoint = latest_checkpoint(work_dir)
        if checkpoint is not None:
            start_step, loss_history = load_checkpoint(checkpoint, recipe, optimizer, generator)
            resumed_from = start_step

    started = time.perf_counter()
    last_saved = start_step
    step = start_step
    stop_at = config.steps if max_steps_this_call is None else min(config.steps, start_step + max_steps_this_call)
    module.train()
    try:
        while step < config.steps:
            if cancel is not None and cancel.cancelled:
                raise TrainingCancelled(f"training cancelled at step {step}")
            if step >= stop_at:
                raise TrainingPaused(step, config.steps)
            with accelerator.accumulate(module):
                loss, terms = recipe.loss(generator)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"training diverged: the loss became {loss.item()} at step {step + 1}; lower the learning "
                        f"rate ({config.learning_rate:g}) and start again")
                accelerator.backward(loss)
                if config.max_grad_norm and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = float(loss.detach().item())
            loss_history.append(loss_value)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                path = save_checkpoint(work_dir, step, recipe, optimizer, generator, loss_history, config)
                _prune_checkpoints(work_dir, config.checkpoints_to_keep)
                last_saved = step
                if on_checkpoint is not None:
                    on_checkpoint(step, path)
            if on_sample is not None and config.sample_every and step % config.sample_every == 0:
                on_sample(step)
            if on_progress is not None:
                # Reported once the step's checkpoint and preview are done: they are part of what a step
                # costs, and the first step's speed would otherwise leave them out.
                elapsed = time.perf_counter() - started
                done = step - start_step
                rate = done / elapsed if elapsed > 0 else 0.0
                eta = (config.steps - step) / rate if rate > 0 else math.inf
                on_progress(ProgressEvent(step, config.steps, loss_value, elapsed, rate, eta, terms))
    except TrainingCancelled:
        if step > last_saved:
            save_checkpoint(work_dir, step, recipe, optimizer, generator, loss_history, config)
            _prune_checkpoints(work_dir, config.checkpoints_to_keep)
        raise
    check_finite_weights(params, step, config)
    return TrainResult(step, loss_history, time.perf_counter() - started, resumed_from)
