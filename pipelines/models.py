"""The model registry: short names, Hub ids and local folders, resolved to a diffusers folder and loaded.

`sdxl`, `flux-dev` and `flux-schnell` load by Hub id; `tiny-sdxl` and `tiny-flux` are built locally from
configs (see `pipelines/tiny.py`) and are the offline default. `sdxl-random` and `flux-random` are the real
architectures at full size with random weights, built locally for benchmarks (`pipelines/fullsize.py`); the
studio never offers them. Any other Hub id or local diffusers folder works if its architecture is one the
recipes know.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.errors import ModelNotAvailable

log = logging.getLogger(__name__)

# Building torch modules is not thread-safe in this stack. diffusers' `from_pretrained`, PEFT's adapter
# loading and accelerate's `init_empty_weights` build models on the meta device by replacing
# `torch.nn.Module.register_parameter` for the whole process while they run. A module built by another thread
# in that window gets meta tensors ("Cannot copy out of meta tensor"), and when two such windows overlap the
# one that exits last puts back the other's replacement, so every later load in the process builds meta
# tensors. Every place that builds modules or loads weights (pipelines, adapters, model skeletons, the tiny
# models) therefore holds this one process-wide lock. It is held only while modules are built and weights
# read, never while a model runs, so a generation waits at most for one load, and a training step never waits.
_BUILD_LOCK = threading.RLock()
_building = threading.local()
_REGISTER_PARAMETER = torch.nn.Module.__dict__["register_parameter"]


@contextlib.contextmanager
def building_modules() -> Iterator[None]:
    """Hold the process-wide lock for building modules or loading weights (see `_BUILD_LOCK`)."""
    with _BUILD_LOCK:
        _building.depth = getattr(_building, "depth", 0) + 1
        try:
            yield
        finally:
            _building.depth -= 1
            # A patch left behind by code that built modules outside this lock would break every later load;
            # the outermost holder, with no load running anywhere, puts the original back.
            if _building.depth == 0 and torch.nn.Module.__dict__["register_parameter"] is not _REGISTER_PARAMETER:
                log.warning("torch.nn.Module.register_parameter was left patched by a model load; restored")
                torch.nn.Module.register_parameter = _REGISTER_PARAMETER


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str  # a key of ARCHITECTURES
    repo_id: str | None  # Hub id; None for tiny models
    resolution: int  # training and default generation size
    steps: int  # default inference steps (the reference pipeline's own default)
    guidance: float  # default guidance scale
    tiny: bool = False
    description: str = ""
    fast: int | None = None  # fewer inference steps for a quicker look ("fast"); None: the same as `steps`
    random_weights: bool = False  # full-size architecture with random weights: benchmarks only, never offered

    @property
    def fast_steps(self) -> int:
        return self.fast or self.steps

    def inference_steps(self, fast: bool = False) -> int:
        """The default number of inference steps, or the "fast" one."""
        return self.fast_steps if fast else self.steps


@dataclass(frozen=True)
class Architecture:
    """What the code needs to know of a model architecture, whatever recipe trains on it: which component carries
    the adapters, the pipeline class, the dtype it runs in, and how kohya tools and the Hub name it."""

    name: str  # "sdxl", "flux"
    label: str  # "SDXL", "Flux": as a sentence names it
    article: str  # "an" or "a", before the label
    denoiser: str  # the pipeline component adapters go on: "unet" or "transformer"
    denoiser_class: str  # its diffusers class, built empty from its config for checks
    pipeline: str  # the diffusers pipeline class
    dtype: str  # the torch dtype it generates in on a GPU
    default_model: str  # the registry model of full size, whose settings an unknown folder or Hub id takes
    tiny_model: str  # the offline stand-in
    license: str  # the Hub license of an adapter for it
    hub_tag: str
    kohya_base_version: str  # ss_base_model_version
    modelspec_architecture: str
    modelspec_implementation: str
    kohya_network_module: str | None = None  # sd-scripts' network module, where its files name one

    @property
    def a_label(self) -> str:
        return f"{self.article} {self.label}"


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("sdxl", "SDXL", "an", "unet", "UNet2DConditionModel", "StableDiffusionXLPipeline", "float16",
                     "sdxl", "tiny-sdxl", "openrail++", "stable-diffusion-xl", "sdxl_base_v1-0",
                     "stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models",
                     kohya_network_module="networks.lora"),
        Architecture("flux", "Flux", "a", "transformer", "FluxTransformer2DModel", "FluxPipeline", "bfloat16",
                     "flux-dev", "tiny-flux", "other", "flux", "flux1", "flux-1-dev/lora",
                     "https://github.com/black-forest-labs/flux"),
    )
}


def architecture(name: str) -> Architecture:
    """The architecture `name` (one line naming the known ones if there is none of that name)."""
    if name not in ARCHITECTURES:
        raise ModelNotAvailable(f"unknown architecture {name!r}; Block Studio knows {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        # 50 steps: StableDiffusionXLPipeline's default, which the official B-LoRA inference uses.
        ModelSpec("sdxl", "sdxl", "stabilityai/stable-diffusion-xl-base-1.0", 1024, 50, 5.0, fast=30,
                  description="Stable Diffusion XL base 1.0"),
        ModelSpec("flux-dev", "flux", "black-forest-labs/FLUX.1-dev", 1024, 28, 3.5,
                  description="FLUX.1 [dev]"),
        ModelSpec("flux-schnell", "flux", "black-forest-labs/FLUX.1-schnell", 1024, 4, 0.0,
                  description="FLUX.1 [schnell]"),
        ModelSpec("tiny-sdxl", "sdxl", None, 64, 4, 5.0, tiny=True,
                  description="random-weight SDXL topology for tests and offline trials"),
        ModelSpec("tiny-flux", "flux", None, 64, 4, 3.5, tiny=True,
                  description="random-weight Flux topology for tests and offline trials"),
        ModelSpec("sdxl-random", "sdxl", None, 1024, 50, 5.0, fast=30, random_weights=True,
                  description="SDXL-base 1.0 at full size, random weights (benchmarks)"),
        ModelSpec("flux-random", "flux", None, 1024, 28, 3.5, random_weights=True,
                  description="FLUX.1 [dev] at full size, random weights (benchmarks)"),
    )
}

PIPELINE_ARCH = {
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "FluxPipeline": "flux",
}


def _arch_of_folder(folder: Path) -> str:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelNotAvailable(f"{folder} is not a diffusers model folder (no model_index.json)")
    class_name = json.loads(index.read_text()).get("_class_name", "")
    if class_name not in PIPELINE_ARCH:
        raise ModelNotAvailable(
            f"{folder}: pipeline {class_name or 'unknown'} is not supported; use an SDXL or Flux model"
        )
    return PIPELINE_ARCH[class_name]


def resolve_model(name: str) -> ModelSpec:
    """Turn a registry name, local folder or Hub id into a ModelSpec (no download)."""
    if name in REGISTRY:
        return REGISTRY[name]
    path = Path(name).expanduser()
    if path.is_dir():
        arch = _arch_of_folder(path)
        base = REGISTRY[architecture(arch).default_model]
        return ModelSpec(str(path.resolve()), arch, None, base.resolution, base.steps, base.guidance, fast=base.fast)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        lowered = name.lower()
        arch = "flux" if "flux" in lowered else "sdxl"
        base = REGISTRY[architecture(arch).default_model]
        return ModelSpec(name, arch, name, base.resolution, base.steps, base.guidance, fast=base.fast)
    raise ModelNotAvailable(
        f"unknown model {name!r}: use one of {', '.join(REGISTRY)}, a Hub id (owner/name) or a local diffusers folder"
    )


def model_path(name: str) -> Path:
    """A local diffusers folder for `name`, building tiny and random-weight models and using the Hub cache for the rest."""
    spec = resolve_model(name)
    if spec.tiny:
        from pipelines.tiny import tiny_model_path

        with building_modules():  # a first use builds the model from its config
            return tiny_model_path(spec.name)
    if spec.random_weights:
        from pipelines.fullsize import fullsize_model_path

        with building_modules():  # a first use builds the model from its config (minutes at full size)
            return fullsize_model_path(spec.name)
    if spec.repo_id is None:
        return Path(spec.name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    patterns = ["*.json", "*.txt", "*.model", "*.safetensors", "*.fp16.safetensors"]
    try:
        folder = snapshot_download(spec.repo_id, allow_patterns=patterns, local_files_only=offline)
    except LocalEntryNotFoundError:
        raise ModelNotAvailable(_offline_message(spec)) from None
    except Exception as exc:  # network errors vary by transport; all mean "not reachable"
        try:
            folder = snapshot_download(spec.repo_id, allow_patterns=patterns, local_files_only=True)
        except Exception:
            raise ModelNotAvailable(f"{_offline_message(spec)} ({type(exc).__name__})") from None
    return Path(folder)


def _offline_message(spec: ModelSpec) -> str:
    tiny = architecture(spec.arch).tiny_model
    return (
        f"model {spec.name} ({spec.repo_id}) is not in the local Hugging Face cache and the Hub cannot be "
        f"reached; download it once with network access, or use --model {tiny} to try the workflow offline"
    )


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device, arch: str) -> torch.dtype:
    if device.type == "cuda":
        return getattr(torch, architecture(arch).dtype)
    return torch.float32


def _dtype_kwarg() -> str:
    # diffusers renamed `torch_dtype` to `dtype` (0.40); older releases only know the former.
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype"


def load_pipeline(name: str, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
    """Load the diffusers pipeline for `name` on `device` (default: the best available)."""
    from diffusers import DiffusionPipeline

    spec = resolve_model(name)
    folder = model_path(name)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device, spec.arch)
    with building_modules():
        pipe = DiffusionPipeline.from_pretrained(folder, **{_dtype_kwarg(): dtype})
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
    pipe.blockstudio_model = spec  # which registry entry this pipeline came from
    return pipe
