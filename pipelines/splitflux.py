"""SplitFlux on Flux: content and style adapters on the single-stream blocks, trained from one image.

Yang et al., "SplitFlux: Learning to Decouple Content and Style from a Single Image" (CVPR 2026). In FLUX.1 the
single-stream blocks carry content early and style later, so the 38 `single_transformer_blocks` are split
(diffusers indices; the paper counts all 57 blocks from 1, so its B20-29 are our 0-9):

- content blocks 0-9: visual-gated LoRA, a rank-48 content branch dW_cnt and a rank-16 residual branch dW_res
  mixed per image token by `sigmoid((||x|| - mu) / sigma)` (`pipelines/adapters/visual_gated.py`);
- boundary blocks 10-11: rank-constrained adaptation, rank r/alpha with its update times alpha
  (`pipelines/adapters/rca.py`);
- style blocks 12-37: a rank-64 LoRA dW_s;
- the 19 double-stream blocks and everything before single block 0 stay frozen and run without autograd.

Two prompts. The content path sees `A [c] object`, the style blocks `A [s] style`. Inside a single-stream
block the text tokens are the first part of the joint sequence, and every block updates them. So the style
prompt reaches the style blocks as a second text stream, as in the paper's prompt-replacement probe. With
`style_text="stream"` (the default) the style prompt runs through the same model beside the content prompt,
with the same noisy image, the same timestep and the adapters as they are, but without gradients. Entering the
first style block, the content stream's text tokens are replaced by the style stream's text tokens at that
point. From there on the joint sequence is [style text, content image] and the text evolves with it. The
timestep/pooled-CLIP vector stays the content prompt's, because the probe swaps token embeddings only. Both
streams share the frozen prefix in one batch. `style_text="embedding"` is the cheap approximation: it swaps in
the style prompt's `context_embedder` output and runs no second stream. Generation needs none of this: the
exported files are plain LoRAs, used with one prompt such as `A [c] object in [s] style`.

Loss: flow matching (noisy input `(1 - sigma) x0 + sigma noise`, target `noise - x0`) plus 0.1 times the
complementary loss between the two content branches, summed over the gated layers: the paper adds one term
per layer at weight 0.1 (`complementary_reduction="mean"` averages them instead, which makes each layer's term
as many times weaker as there are gated layers, 30 by default). Adam at 1e-4 with 32-bit state (AdamW without
weight decay, which is Adam), batch 1, 1000 steps; 8-bit optimizer state is an opt-in memory option
(`use_8bit_adam=True`). The adapters' initial factors are drawn from the run's seed.

Choices the paper leaves open, each a setting (`PAPER_SILENT` lists them; the package's adapter.json and model
card record their values):
- `text_gate` (1.0): the gate of the text tokens in the content blocks; 1.0 routes them through dW_cnt, the
  branch re-embedding loads.
- `gate_source` ("block_input"): the features whose norms gate the image tokens, the block's input (the
  residual stream) or each projection's own input (just after AdaLN's LayerNorm, which flattens the norms).
- `style_text` ("stream"): how the style prompt reaches the style blocks (above).
- `timestep_sampling` ("uniform"): sigma drawn uniformly from the scheduler's table, as diffusers'
  `weighting_scheme="none"`; "logit_normal" draws u = sigmoid(N(0, 1)); "flux_shift" draws u the same way and
  shifts it by the image's token count, `exp(mu) / (exp(mu) + 1/u - 1)` with mu from FLUX.1's scheduler config
  (sd-scripts' `--timestep_sampling flux_shift`). The draws use diffusers' `compute_density_for_timestep_sampling`.
- `guidance` (1.0): the guidance-embedding value while training, as diffusers' and sd-scripts' Flux LoRA
  examples train FLUX.1-dev.
- `max_sequence_length` (512): T5 tokens of both prompts (FLUX.1's length).
- `resolution` (1024): the training crop.
- `target_modules` (`attn.to_q,attn.to_k,attn.to_v`): what diffusers' Flux LoRA script adapts in a single
  block; it reproduces the paper's parameter counts exactly (as `proj_out` alone would).
- `lora_init` ("gaussian"): down factors N(0, 1/rank) and up factors zero, as PEFT's `init_lora_weights=
  "gaussian"`; "kaiming" is PEFT's default (Kaiming-uniform down factors).
- `export_gate` (None): the weights of dW_cnt and dW_res in the `content` part; None is the plain sum.

Exported parts (canonical PEFT state dicts, every scale folded into `lora_B`), after the paper's Figure 2:
- `content`: disentangled content, dW_cnt + dW_res on the content blocks as one rank-64 LoRA at weight 1 each.
- `content_reembed`: dW_cnt alone on the content blocks (rank 48). Re-embedding loads it, and so does mixing:
  the paper mixes the content branch of one image with the style of another.
- `boundary`: the boundary blocks with alpha multiplied in. The paper draws no adapter on them at inference,
  so no use loads this part unless asked (`--with-boundary`, the Mix tab's checkbox).
- `style`: the style blocks.
`COMPOSITION` says which part each use loads; adapter.json records it with the blocks, branches and scales of
every part. The parts touch disjoint blocks (the two content parts the same ones), so the content of one
package mixes with the style of another.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from pipelines import formats
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
    visual_gate,
)
from pipelines.checks import real_number, whole_number
from pipelines.errors import BlockStudioError
from pipelines.images import to_pixels
from pipelines.models import building_modules
from pipelines.training import (
    CachedLatents,
    RunRequest,
    TrainConfig,
    gradient_checkpointing_for,
    loop_options,
    resolve_levers,
    weight_dtype_for,
)

NUM_SINGLE_BLOCKS = 38
SINGLE_BLOCKS = "single_transformer_blocks"
DEFAULT_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v")
# Linear layers of a single-stream block that act on tokens (the gate needs tokens; `norm.linear` sees only
# the timestep embedding).
TOKEN_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
ROLES = ("content", "boundary", "style")
QUANTIZE_CHOICES = ("none", "fp8", "nf4")
STYLE_TEXT_CHOICES = ("stream", "embedding")
GATE_SOURCES = ("block_input", "layer_input")
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "flux_shift")
COMPLEMENTARY_REDUCTIONS = ("sum", "mean")
LORA_INITS = ("gaussian", "kaiming")
# Which part the content slot loads for each use of a package (the paper's Figure 2). `optional` parts are
# loaded only when asked for, beside the chosen content part and at its scale.
COMPOSITION = {
    "name": "paper",
    "uses": {"mix": "content_reembed", "content": "content", "reembed": "content_reembed", "style": "style"},
    "optional": ["boundary"],
}
# The choices the paper leaves open (see the module docstring): setting -> what it decides.
PAPER_SILENT = {
    "text_gate": "gate of the text tokens in the content blocks",
    "gate_source": "features whose norms gate the image tokens",
    "style_text": "how the style prompt reaches the style blocks",
    "timestep_sampling": "how training draws sigma",
    "guidance": "guidance-embedding value while training",
    "max_sequence_length": "T5 tokens of both prompts",
    "resolution": "training crop in pixels",
    "target_modules": "Linear layers adapted in each single block",
    "lora_init": "initial adapter factors",
    "export_gate": "weights of the two content branches in the content part (None: 1 and 1)",
}


class QuantizationUnavailable(BlockStudioError):
    """A quantized base was asked for where the installed libraries or hardware cannot provide it."""


# -- block ranges ---------------------------------------------------------------------------------------


MAX_BLOCK_INDEX = 1000  # far beyond FLUX.1's 38 single blocks; keeps a typo from building a huge range


def parse_blocks(value: str | Iterable[int] | None) -> tuple[int, ...]:
    """`"0-9"`, `"10,11"`, `"12-37"`, `"none"` or a sequence of ints -> sorted unique block indices."""
    if value is None:
        return ()
    if not isinstance(value, str):
        indices = [int(v) for v in value]
    else:
        text = value.strip().lower()
        if text in ("", "none"):
            return ()
        indices = []
        for part in text.split(","):
            part = part.strip()
            match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
            if match is None:
                raise BlockStudioError(f"block range {value!r} is not understood; use e.g. 0-9, 10,11 or none")
            start = int(match[1])
            end = int(match[2]) if match[2] is not None else start
            if end < start:
                raise BlockStudioError(f"block range {part!r} runs backwards")
            if end >= MAX_BLOCK_INDEX:
                raise BlockStudioError(f"block range {part!r} names blocks no Flux model has")
            indices.extend(range(start, end + 1))
    return tuple(sorted(set(indices)))


def format_blocks(blocks: Sequence[int]) -> str:
    """(0, 1, ..., 9) -> "0-9"; gaps become comma-separated runs; () -> "none"."""
    if not blocks:
        return "none"
    runs: list[list[int]] = []
    for index in sorted(blocks):
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


def parse_targets(value: str | Iterable[str]) -> tuple[str, ...]:
    names = [t.strip() for t in (value.split(",") if isinstance(value, str) else value) if t.strip()]
    if not names:
        raise BlockStudioError("target modules are empty; use e.g. attn.to_q,attn.to_k,attn.to_v")
    unknown = [n for n in names if n not in TOKEN_TARGETS]
    if unknown:
        raise BlockStudioError(
            f"target module {unknown[0]!r} is not a token-wise Linear of a Flux single-stream block; "
            f"choose from {', '.join(TOKEN_TARGETS)}"
        )
    return tuple(dict.fromkeys(names))


# -- settings -------------------------------------------------------------------------------------------


@dataclass
class SplitFluxSettings:
    """Everything that defines a SplitFlux run beyond the loop's own settings. Defaults are the paper's."""

    token: str = "[c]"
    style_token: str = "[s]"
    content_prompt_template: str = "A {token} object"
    style_prompt_template: str = "A {token} style"
    content_blocks: tuple[int, ...] = tuple(range(0, 10))
    boundary_blocks: tuple[int, ...] = (10, 11)
    style_blocks: tuple[int, ...] = tuple(range(12, 38))
    rank: int = 64  # style rank; content branches sum to it; the boundary gets rank / rca_alpha
    content_rank: int = 48  # the residual branch gets rank - content_rank
    rca_alpha: int = 2
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    complementary_weight: float = 0.1
    text_gate: float = 1.0
    gate_source: str = "block_input"
    style_text: str = "stream"
    export_gate: float | None = None  # None: both content branches exported at weight 1
    resolution: int = 1024
    max_sequence_length: int = 512
    guidance: float = 1.0
    timestep_sampling: str = "uniform"
    complementary_reduction: str = "sum"
    lora_init: str = "gaussian"
    quantize_base: str = "none"

    @property
    def content_prompt(self) -> str:
        return self.content_prompt_template.format(token=self.token)

    @property
    def style_prompt(self) -> str:
        return self.style_prompt_template.format(token=self.style_token)

    @property
    def residual_rank(self) -> int:
        return self.rank - self.content_rank

    @property
    def boundary_rank(self) -> int:
        return self.rank // self.rca_alpha

    @property
    def trained_blocks(self) -> tuple[int, ...]:
        return tuple(sorted(self.content_blocks + self.boundary_blocks + self.style_blocks))

    def roles(self) -> dict[int, str]:
        out = {}
        for role in ROLES:
            for index in getattr(self, f"{role}_blocks"):
                out[index] = role
        return out

    def validate(self, num_single_blocks: int = NUM_SINGLE_BLOCKS) -> None:
        """Raise `BlockStudioError` with one line naming the first problem."""
        for role in ROLES:
            blocks = getattr(self, f"{role}_blocks")
            bad = [b for b in blocks if not 0 <= b < num_single_blocks]
            if bad:
                raise BlockStudioError(
                    f"{role} block {bad[0]} does not exist; the model has single blocks 0-{num_single_blocks - 1}"
                )
        if not self.content_blocks:
            raise BlockStudioError("content blocks are empty; SplitFlux needs at least one (default 0-9)")
        if not self.style_blocks:
            raise BlockStudioError("style blocks are empty; SplitFlux needs at least one (default 12-37)")
        seen: dict[int, str] = {}
        for role in ROLES:
            for index in getattr(self, f"{role}_blocks"):
                if index in seen:
                    raise BlockStudioError(f"single block {index} is both a {seen[index]} and a {role} block")
                seen[index] = role
        if max(self.content_blocks + self.boundary_blocks) > min(self.style_blocks):
            raise BlockStudioError(
                "style blocks must come after the content and boundary blocks (the style prompt enters at the "
                "first style block)"
            )
        self.rank = whole_number(self.rank, "rank", 2, 1024)
        self.content_rank = whole_number(self.content_rank, "content rank", 1, 1024)
        self.rca_alpha = whole_number(self.rca_alpha, "rca alpha", 1, 1024)
        self.complementary_weight = real_number(self.complementary_weight, "complementary weight", 0.0, 100.0)
        self.text_gate = real_number(self.text_gate, "text gate", 0.0, 1.0)
        if self.export_gate is not None:
            self.export_gate = real_number(self.export_gate, "export gate", 0.0, 1.0)
        self.guidance = real_number(self.guidance, "training guidance", 0.0, 100.0)
        self.resolution = whole_number(self.resolution, "resolution", 64, 4096)
        self.max_sequence_length = whole_number(self.max_sequence_length, "max sequence length", 1, 512)
        if not 1 <= self.content_rank < self.rank:
            raise BlockStudioError(
                f"content rank must be between 1 and rank - 1 ({self.rank - 1}) so the residual branch keeps a "
                f"rank, not {self.content_rank}"
            )
        if self.rank % self.rca_alpha:
            raise BlockStudioError(f"rca alpha must be a positive divisor of the rank {self.rank}, not {self.rca_alpha}")
        for label, value, choices in (
            ("gate source", self.gate_source, GATE_SOURCES),
            ("style text routing", self.style_text, STYLE_TEXT_CHOICES),
            ("timestep sampling", self.timestep_sampling, TIMESTEP_SAMPLING),
            ("complementary reduction", self.complementary_reduction, COMPLEMENTARY_REDUCTIONS),
            ("LoRA init", self.lora_init, LORA_INITS),
            ("quantize base", self.quantize_base, QUANTIZE_CHOICES),
        ):
            if value not in choices:
                raise BlockStudioError(f"{label} must be one of {', '.join(choices)}, not {value!r}")
        if self.resolution % 16 or not 64 <= self.resolution <= 4096:
            raise BlockStudioError(
                f"resolution must be a multiple of 16 between 64 and 4096 for Flux, not {self.resolution}"
            )
        parse_targets(self.target_modules)

    def module_names(self) -> dict[str, list[str]]:
        """{role: full names of the Linear layers that role trains}, in block order."""
        return {
            role: [f"{SINGLE_BLOCKS}.{i}.{t}" for i in getattr(self, f"{role}_blocks") for t in self.target_modules]
            for role in ROLES
        }


def default_train_config(**overrides: Any) -> TrainConfig:
    """The paper's optimiser: Adam at 1e-4 (AdamW with no weight decay), 1000 steps; clip 1.0 as diffusers."""
    config = TrainConfig(steps=1000, learning_rate=1e-4, weight_decay=0.0, max_grad_norm=1.0, seed=0)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def check_quantization(mode: str) -> None:
    """Fail early, in one line, if `mode` cannot run here."""
    if mode == "none":
        return
    if mode == "fp8":
        if not hasattr(torch, "float8_e4m3fn"):
            raise QuantizationUnavailable("--quantize-base fp8 needs a PyTorch with float8 dtypes (2.1 or newer)")
        return
    if mode == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except Exception:
            raise QuantizationUnavailable(
                "--quantize-base nf4 needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU; "
                "use --quantize-base fp8 or none here"
            ) from None
        if not torch.cuda.is_available():
            raise QuantizationUnavailable("--quantize-base nf4 needs a CUDA GPU; use --quantize-base fp8 or none here")
        return
    raise QuantizationUnavailable(f"quantize base must be one of {', '.join(QUANTIZE_CHOICES)}, not {mode!r}")


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


def _block_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(image tokens, text tokens) entering a Flux single-stream block, called by keyword or by position."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
    return hidden, text


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
        for index in s.content_blocks:
            block = transformer.single_transformer_blocks[index]
            gated = [self.layers[f"{SINGLE_BLOCKS}.{index}.{t}"] for t in s.target_modules]
            self._hooks.append(block.register_forward_pre_hook(self._gate_hook(gated), with_kwargs=True))
            self._hooks.append(block.register_forward_hook(self._clear_hook(gated)))
        return self.layers

    def _gate_hook(self, layers: list[VisualGatedLoRALinear]):
        source = self.settings.gate_source

        def hook(module, args, kwargs):
            hidden, text = _block_inputs(args, kwargs)
            gate = visual_gate(hidden, layers[0].config.eps) if source == "block_input" else None
            for layer in layers:
                layer.set_token_layout(text.shape[1], image_gate=gate)

        return hook

    @staticmethod
    def _clear_hook(layers: list[VisualGatedLoRALinear]):
        def hook(module, args, output):
            for layer in layers:
                layer.clear_token_layout()

        return hook

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
        from pipelines.cost import splitflux_step_cost

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
        """The transformer's forward with SplitFlux's two prompts (see the module docstring); packed prediction.

        The embedders, the double-stream blocks and the single blocks before the first trained one run under
        `torch.no_grad()`, so no autograd graph exists before the first trained block.
        """
        s = self.settings
        t = self.transformer
        blocks = t.single_transformer_blocks
        streams = 2 if s.style_text == "stream" else 1
        first_trained = min(s.trained_blocks)
        style_entry = min(s.style_blocks)
        with torch.no_grad():
            hidden = t.x_embedder(packed.repeat(streams, 1, 1))
            steps = timestep.to(hidden.dtype).repeat(streams) * 1000
            pooled = self.pooled[:streams]
            if guidance is not None:
                temb = t.time_text_embed(steps, guidance.to(hidden.dtype).repeat(streams) * 1000, pooled)
            else:
                temb = t.time_text_embed(steps, pooled)
            text = t.context_embedder(self.prompt_embeds[:streams])
            rotary = t.pos_embed(torch.cat((self.txt_ids, self.img_ids), dim=0))
            for block in t.transformer_blocks:
                text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb,
                                     image_rotary_emb=rotary)
            for index in range(first_trained):
                text, hidden = blocks[index](hidden_states=hidden, encoder_hidden_states=text, temb=temb,
                                             image_rotary_emb=rotary)
        content_text, content_hidden, content_temb = text[:1], hidden[:1], temb[:1]
        style_text, style_hidden, style_temb = text[1:], hidden[1:], temb[1:]
        for index in range(first_trained, len(blocks)):
            if index == style_entry:
                if streams == 2:
                    content_text = style_text
                else:
                    with torch.no_grad():
                        content_text = t.context_embedder(self.prompt_embeds[1:2])
            block = blocks[index]
            if streams == 2 and index < style_entry:
                with torch.no_grad():
                    style_text, style_hidden = block(hidden_states=style_hidden, encoder_hidden_states=style_text,
                                                     temb=style_temb, image_rotary_emb=rotary)
            if self.checkpointing and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                content_text, content_hidden = checkpoint(block, content_hidden, content_text, content_temb, rotary,
                                                          use_reentrant=False)
            else:
                content_text, content_hidden = block(hidden_states=content_hidden, encoder_hidden_states=content_text,
                                                     temb=content_temb, image_rotary_emb=rotary)
        return t.proj_out(t.norm_out(content_hidden, content_temb))

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

        What each holds is in the module docstring and `part_composition`; `boundary` is left out when there are
        no boundary blocks.
        """
        parts: dict[str, dict[str, torch.Tensor]] = {"content": {}, "content_reembed": {}, "boundary": {}, "style": {}}

        def put(part: str, module: str, factors: tuple[torch.Tensor, torch.Tensor]) -> None:
            parts[part][f"{module}.lora_A.weight"] = factors[0].cpu().contiguous()
            parts[part][f"{module}.lora_B.weight"] = factors[1].cpu().contiguous()

        for name, layer in self.layers.items():
            role = self.roles[name]
            if role == "content":
                put("content", name, layer.export_lora(self.settings.export_gate))
                put("content_reembed", name, layer.export_content_branch())
            else:
                put(role, name, layer.export_lora())
        return {part: state for part, state in parts.items() if state}


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens, FluxPipeline's packing."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def _latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)


# -- end to end: one image in, one package out ----------------------------------------------------------


@dataclass
class SplitFluxRequest(RunRequest):
    """Everything `train_splitflux` needs; the CLI and the app both build one of these."""

    model: str = "flux-dev"
    content_rank: int = 48
    learning_rate: float = 1e-4
    resolution: int | None = None  # None: the model's native size (1024 for FLUX.1, 64 for tiny-flux)
    token: str | None = None  # content token; None: derived from the image, e.g. [c42]
    style_token: str | None = None  # None: derived from the image, e.g. [s42]
    target_modules: str | Sequence[str] = DEFAULT_TARGETS
    content_blocks: str | Sequence[int] = "0-9"
    boundary_blocks: str | Sequence[int] = "10-11"
    style_blocks: str | Sequence[int] = "12-37"
    rca_alpha: int = 2
    complementary_weight: float = 0.1
    text_gate: float = 1.0
    gate_source: str = "block_input"
    style_text: str = "stream"
    export_gate: float | None = None
    guidance: float = 1.0
    max_sequence_length: int | None = None  # None: 512 (FLUX.1's T5 length); 32 on tiny-flux
    timestep_sampling: str = "uniform"
    complementary_reduction: str = "sum"
    lora_init: str = "gaussian"
    quantize_base: str = "none"
    use_8bit_adam: bool | None = False  # the paper's Adam keeps 32-bit state; None means False here too


@dataclass
class PreparedRequest:
    spec: Any
    crop: Image.Image
    settings: SplitFluxSettings
    out: Path
    work: Path
    fingerprint: str


TINY_TEXT_LENGTH = 32


def prepare_request(request: SplitFluxRequest) -> PreparedRequest:
    """Validate every input before any model is loaded; return what training needs."""
    import hashlib

    from pipelines.images import center_crop_square, load_image
    from pipelines.models import resolve_model
    from pipelines.package import check_name, check_token, token_for_image
    from pipelines.storage import check_writable_target
    from pipelines.training import check_resume, check_run_request, work_dir_for

    check_run_request(request)
    spec = resolve_model(request.model)
    if spec.arch != "flux":
        raise BlockStudioError(
            f"SplitFlux needs a Flux model; {request.model} is {spec.arch.upper()} (use B-LoRA for SDXL)"
        )
    out = check_writable_target(request.out, force=request.force)
    check_name(out.name)
    check_resume(work_dir_for(out), request.resume)
    resolution = request.resolution or spec.resolution
    text_length = request.max_sequence_length or (TINY_TEXT_LENGTH if spec.tiny else 512)
    settings = SplitFluxSettings(
        content_blocks=parse_blocks(request.content_blocks),
        boundary_blocks=parse_blocks(request.boundary_blocks),
        style_blocks=parse_blocks(request.style_blocks),
        rank=request.rank,
        content_rank=request.content_rank,
        rca_alpha=request.rca_alpha,
        target_modules=parse_targets(request.target_modules),
        complementary_weight=request.complementary_weight,
        text_gate=request.text_gate,
        gate_source=request.gate_source,
        style_text=request.style_text,
        export_gate=request.export_gate,
        resolution=resolution,
        max_sequence_length=text_length,
        guidance=request.guidance,
        timestep_sampling=request.timestep_sampling,
        complementary_reduction=request.complementary_reduction,
        lora_init=request.lora_init,
        quantize_base=request.quantize_base,
    )
    settings.validate(_single_block_count(spec))
    check_quantization(request.quantize_base)
    image = load_image(request.image)
    crop = center_crop_square(image, resolution)
    number = token_for_image(crop)[2:-1]
    settings.token = check_token(request.token) if request.token else f"[c{number}]"
    settings.style_token = check_token(request.style_token) if request.style_token else f"[s{number}]"
    fingerprint = hashlib.sha256(crop.tobytes()).hexdigest()
    return PreparedRequest(spec, crop, settings, out, work_dir_for(out), fingerprint)


def _single_block_count(spec) -> int:
    """The number of single-stream blocks, read from a local config when there is one (else FLUX.1's 38)."""
    import json

    from pipelines.models import model_path

    folder = None
    if spec.tiny:
        folder = model_path(spec.name)
    elif spec.repo_id is None:
        folder = Path(spec.name)
    config = folder / "transformer" / "config.json" if folder is not None else None
    if config is not None and config.is_file():
        return int(json.loads(config.read_text()).get("num_single_layers", NUM_SINGLE_BLOCKS))
    return NUM_SINGLE_BLOCKS


def job_fields(prepared: PreparedRequest, request: SplitFluxRequest) -> dict:
    """What must not change between a run and its resumption."""
    s = prepared.settings
    return {
        "method": "splitflux", "image_sha256": prepared.fingerprint, "model": prepared.spec.name,
        "token": s.token, "style_token": s.style_token, "rank": s.rank, "content_rank": s.content_rank,
        "rca_alpha": s.rca_alpha, "blocks": {r: format_blocks(getattr(s, f"{r}_blocks")) for r in ROLES},
        "target_modules": list(s.target_modules), "complementary_weight": s.complementary_weight,
        "text_gate": s.text_gate, "gate_source": s.gate_source, "style_text": s.style_text,
        "resolution": s.resolution, "max_sequence_length": s.max_sequence_length, "guidance": s.guidance,
        "timestep_sampling": s.timestep_sampling, "quantize_base": s.quantize_base, "seed": request.seed,
        "learning_rate": request.learning_rate, "complementary_reduction": s.complementary_reduction,
        "lora_init": s.lora_init, "optimizer": optimizer_name(bool(request.use_8bit_adam)),
    }


def optimizer_name(use_8bit_adam: bool) -> str:
    return "Adam, 8-bit state" if use_8bit_adam else "Adam, 32-bit state"


def train_config(request: SplitFluxRequest) -> TrainConfig:
    """The loop's settings for a request: the paper's Adam with 32-bit state unless 8-bit is asked for."""
    options = {**loop_options(request), "use_8bit_adam": bool(request.use_8bit_adam)}
    return default_train_config(
        steps=request.steps, learning_rate=request.learning_rate, seed=request.seed,
        checkpoint_every=request.checkpoint_every, sample_every=request.sample_every, **options,
    )


def train_splitflux(request: SplitFluxRequest, *, on_progress=None, on_sample=None, cancel=None, pipe=None) -> Path:
    """Train SplitFlux adapters from one image and write their package to `request.out`. Returns its path.

    `on_sample(step, image)` receives a preview every `sample_every` steps. Raises `TrainingCancelled` if
    `cancel` is set; the last checkpoint stays in `<out>.partial` for `resume=True`. A `pipe` passed in is
    given back without adapters (with `quantize_base="fp8"` its transformer keeps fp8 storage).
    """
    import shutil

    from pipelines.generation import preview_image, sample_with_parts
    from pipelines.package import PackageContents, write_package
    from pipelines.training import discard_if_unused, prepare_work_dir, train

    prepared = prepare_request(request)
    spec, crop, settings, out, work = prepared.spec, prepared.crop, prepared.settings, prepared.out, prepared.work
    config = train_config(request)
    if pipe is None:
        pipe = load_flux_pipeline(request.model, quantize_base=settings.quantize_base)
    prepare_work_dir(work, job_fields(prepared, request), resume=request.resume, restart=request.restart)
    recipe = SplitFluxRecipe(pipe, crop, settings)
    sample_steps = request.sample_steps or spec.fast_steps
    ct, st = settings.token, settings.style_token
    mix_prompt = f"A {ct} object in {st} style"

    def preview(step: int) -> None:
        if on_sample is not None:
            on_sample(step, preview_image(pipe, mix_prompt, settings.resolution, sample_steps, request.seed, spec))

    try:
        with discard_if_unused(work):
            result = train(recipe, config, work, resume=request.resume, on_progress=on_progress,
                           on_sample=preview if on_sample else None, cancel=cancel,
                           max_steps_this_call=request.max_steps_this_call)
        parts = recipe.export_parts()
    finally:
        recipe.remove_adapters()
    full = {k: v for part in ("content", "boundary", "style") for k, v in parts.get(part, {}).items()}
    samples = {"input": crop}
    sample_prompts = {}
    uses = COMPOSITION["uses"]
    if request.samples:
        for stem, (active, prompt) in {
            "full": (tuple(p for p in ("content", "boundary", "style") if p in parts), mix_prompt),
            "mix": ((uses["mix"], "style"), mix_prompt),
            "content": (("content",), f"A {ct} object"),
            "content_reembed": (("content_reembed",), f"A {ct} object wearing a hat"),
            "style": (("style",), f"A cat in {st} style"),
        }.items():
            sample = sample_with_parts if not getattr(pipe.transformer, "_blockstudio_fp8", False) \
                else sample_with_own_layers
            samples[stem] = sample(pipe, {r: parts[r] for r in active}, prompt, settings.resolution,
                                   sample_steps, request.seed, spec)
            sample_prompts[stem] = prompt
    info = package_info(prepared, request, result.steps, sample_prompts,
                        result.loss_history[-1] if result.loss_history else None)
    contents = PackageContents(name=out.name, info=info, full=full, parts=parts, samples=samples,
                               loss_history=result.loss_history, prefix="transformer")
    write_package(out, contents, replace=request.force)
    if not request.keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)
    return out


def sample_with_own_layers(pipe, parts: dict[str, dict[str, torch.Tensor]], prompt: str, resolution: int,
                           steps: int, seed: int, spec) -> Image.Image:
    """`sample_with_parts` for a transformer stored in fp8: the parts as fp32 LoRA layers of our own.

    diffusers gives LoRA layers loaded into a layerwise-cast model the storage dtype (fp8), which cannot
    compute; these layers compute what the exported standard LoRA computes (`W x + B A x`) in fp32.
    """
    from pipelines.generation import preview_image

    transformer = pipe.transformer
    factors = {}
    for state in parts.values():
        for module, (a, b) in formats.lora_modules(state).items():
            factors[module] = (a, b)

    def make(base):
        return LoRALinear(base, LoRAConfig(rank=1))

    with building_modules():
        layers = inject_adapters(transformer, list(factors), make)
    try:
        for module, layer in layers.items():
            a, b = factors[module]
            device = layer.lora_A.device
            layer.lora_A = torch.nn.Parameter(a.float().to(device), requires_grad=False)
            layer.lora_B = torch.nn.Parameter(b.float().to(device), requires_grad=False)
        return preview_image(pipe, prompt, resolution, steps, seed, spec)
    finally:
        remove_adapters(transformer, list(layers))


def part_composition(s: SplitFluxSettings) -> dict[str, dict]:
    """adapter.json's `parts`: the blocks of every part, its branches with the scale folded into each, its rank.

    Branches: `content` is dW_cnt, `residual` dW_res, `rca` the boundary blocks' update (scale alpha), `style` dW_s.
    """
    def blocks(role: str) -> str:
        return f"{SINGLE_BLOCKS}.{format_blocks(getattr(s, f'{role}_blocks'))}"

    wc, wr = (1.0, 1.0) if s.export_gate is None else (float(s.export_gate), 1.0 - float(s.export_gate))
    parts = {
        "content": {"blocks": blocks("content"), "branches": {"content": wc, "residual": wr}, "rank": s.rank,
                    "description": "disentangled content: both content branches"},
        "content_reembed": {"blocks": blocks("content"), "branches": {"content": 1.0}, "rank": s.content_rank,
                            "description": "the content branch alone, for mixing and new prompts"},
        "boundary": {"blocks": blocks("boundary"), "branches": {"rca": float(s.rca_alpha)},
                     "rank": s.boundary_rank, "description": "the boundary blocks, loaded only when asked for"},
        "style": {"blocks": blocks("style"), "branches": {"style": 1.0}, "rank": s.rank,
                  "description": "the style blocks"},
        "full": {"blocks": f"{SINGLE_BLOCKS}.{format_blocks(s.trained_blocks)}",
                 "parts": ["content", "boundary", "style"], "description": "every trained block"},
    }
    if not s.boundary_blocks:
        del parts["boundary"]
        parts["full"]["parts"].remove("boundary")
    return parts


def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def package_info(prepared: PreparedRequest, request: SplitFluxRequest, steps: int, sample_prompts: dict,
                 final_loss: float | None) -> dict:
    """adapter.json of a SplitFlux package."""
    s, spec = prepared.settings, prepared.spec
    gate_export = ("both branches at weight 1" if s.export_gate is None
                   else f"g * content + (1 - g) * residual with g = {s.export_gate}")
    return {
        "method": "splitflux",
        "base_model": spec.name if spec.repo_id or spec.tiny else Path(spec.name).name,
        "base_model_id": spec.repo_id or ("" if spec.tiny else Path(spec.name).name),
        "arch": "flux",
        "token": s.token,
        "style_token": s.style_token,
        "prompt": s.content_prompt,
        "content_prompt": s.content_prompt,
        "style_prompt": s.style_prompt,
        "blocks": {role: f"{SINGLE_BLOCKS}.{format_blocks(getattr(s, f'{role}_blocks'))}" for role in ROLES},
        "ranks": {"content": s.rank, "content_reembed": s.content_rank, "residual": s.residual_rank,
                  "boundary": s.boundary_rank, "style": s.rank},
        "rank": s.rank,
        "content_rank": s.content_rank,
        "rca_alpha": s.rca_alpha,
        "rca": {"alpha": s.rca_alpha, "rank": s.boundary_rank, "alpha_baked_into_lora_B": True},
        "gate": {
            "rule": "sigmoid((||e_n|| - mu) / sigma), mu and sigma over each image's image tokens",
            "features": s.gate_source,
            "text_tokens": s.text_gate,
            "exported_content": gate_export,
        },
        "style_text": s.style_text,
        "composition": COMPOSITION,
        "parts": part_composition(s),
        "target_modules": list(s.target_modules),
        "complementary_weight": s.complementary_weight,
        "complementary_reduction": s.complementary_reduction,
        "optimizer": optimizer_name(bool(request.use_8bit_adam)),
        "lora_init": s.lora_init,
        "paper_silent": {name: {"value": _json_value(getattr(s, name)), "decides": decides}
                         for name, decides in PAPER_SILENT.items()},
        "steps": steps,
        "learning_rate": request.learning_rate,
        "seed": request.seed,
        "resolution": s.resolution,
        "max_sequence_length": s.max_sequence_length,
        "training_guidance": s.guidance,
        "timestep_sampling": s.timestep_sampling,
        "quantize_base": s.quantize_base,
        "image_sha256": prepared.fingerprint,
        "sample_prompts": sample_prompts,
        "final_loss": final_loss,
    }
