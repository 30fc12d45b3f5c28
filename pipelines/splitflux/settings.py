"""SplitFlux's settings: block ranges, the request every run starts from (one set of defaults, one `validate()`
of its fields), the resolved settings the recipe is built from (`SplitFluxSettings.validate`: how the block
ranges and ranks fit together), and the loop's optimiser settings."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.errors import BlockStudioError
from pipelines.settings import check_fields, like, setting
from pipelines.training import RunRequest, TrainConfig, loop_options

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
FLUX_TEXT_LENGTH = 512  # FLUX.1's T5 tokens
TINY_TEXT_LENGTH = 32  # tiny-flux's
# The choices the paper leaves open (see the package docstring): setting -> what it decides.
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
class SplitFluxRequest(RunRequest):
    """Everything `train_splitflux` needs; the CLI and the app both build one of these. Defaults are the paper's.

    `resolution` None is the model's size (1024 for FLUX.1, 64 for tiny-flux); `token` and `style_token` None
    are derived from the image (e.g. `[c42]`, `[s42]`); `max_sequence_length` None is FLUX.1's 512 (32 on
    tiny-flux).
    """

    model: str = like(RunRequest, "model", "flux-dev")
    rank: int = like(RunRequest, "rank", 64, min=2)
    learning_rate: float = like(RunRequest, "learning_rate", 1e-4)
    use_8bit_adam: bool | None = like(RunRequest, "use_8bit_adam", False, help=(
        "8-bit optimizer state (off unless given: the paper's Adam keeps 32-bit state)"))
    style_token: str | None = setting(
        None, help="style trigger token (default: derived from the image, e.g. {style_token_example})")
    content_rank: int = setting(48, min=1, max=1024, label="content rank",
                                help="rank of the gated content branch; the residual branch gets RANK minus this")
    target_modules: str | Sequence[str] = setting(DEFAULT_TARGETS, help=(
        "single-block Linear layers to adapt (attn.to_q/k/v, proj_mlp, proj_out)"))
    content_blocks: str | Sequence[int] = setting("0-9", help="single blocks with the visual-gated LoRA")
    boundary_blocks: str | Sequence[int] = setting("10-11", help=(
        "single blocks with rank-constrained adaptation (or none)"))
    style_blocks: str | Sequence[int] = setting("12-37", help="single blocks with the style LoRA")
    rca_alpha: int = setting(2, min=1, max=1024, label="rca alpha",
                             help="boundary rank is RANK/alpha, its update times alpha")
    complementary_weight: float = setting(0.1, min=0.0, max=100.0, label="complementary weight", form=True,
                                          advanced=True, help="weight of the content branches' complementary loss")
    complementary_reduction: str = setting("sum", choices=COMPLEMENTARY_REDUCTIONS,
                                           label="complementary reduction", form=True, advanced=True,
                                           help="combine the gated layers' complementary losses by sum (the "
                                                "paper) or mean")
    lora_init: str = setting("gaussian", choices=LORA_INITS, label="LoRA init", form=True, advanced=True, help=(
        "initial down factors: N(0, 1/rank) (PEFT's gaussian) or Kaiming-uniform (PEFT's default)"))
    text_gate: float = setting(1.0, min=0.0, max=1.0, label="text gate", form=True, advanced=True,
                               help="gate of text tokens in the content blocks (0-1)")
    gate_source: str = setting("block_input", choices=GATE_SOURCES, label="gate source", form=True, advanced=True,
                               help="features whose norms gate image tokens")
    style_text: str = setting("stream", choices=STYLE_TEXT_CHOICES, label="style text routing", form=True,
                              advanced=True, help=("how the style prompt reaches the style blocks: a parallel text "
                                                   "stream, or its embedding"))
    export_gate: float | None = setting(None, min=0.0, max=1.0, label="export gate",
                                        help="fixed gate for content.safetensors (default: both branches at weight 1)")
    guidance: float = setting(1.0, min=0.0, max=100.0, label="training guidance", flag="--training-guidance",
                              help="guidance embedding value while training")
    max_sequence_length: int | None = setting(None, min=1, max=FLUX_TEXT_LENGTH, label="max sequence length",
                                              help="T5 tokens (default 512; 32 on tiny-flux)")
    timestep_sampling: str = setting("uniform", choices=TIMESTEP_SAMPLING, label="timestep sampling", form=True,
                                     advanced=True, help=("how sigma is drawn: uniform, sigmoid of a normal, or "
                                                          "that shifted by the image size (sd-scripts' flux_shift)"))
    quantize_base: str = setting("none", choices=QUANTIZE_CHOICES, label="quantize base", help=(
        "store the frozen transformer in fp8 (layerwise casting) or NF4 (bitsandbytes, CUDA)"))


@dataclass
class SplitFluxSettings:
    """Everything that defines a SplitFlux run beyond the loop's own settings, resolved: block ranges as indices,
    the run's tokens and sizes. Its defaults are the request's."""

    token: str = "[c]"
    style_token: str = "[s]"
    content_prompt_template: str = "A {token} object"
    style_prompt_template: str = "A {token} style"
    content_blocks: tuple[int, ...] = parse_blocks(SplitFluxRequest.content_blocks)
    boundary_blocks: tuple[int, ...] = parse_blocks(SplitFluxRequest.boundary_blocks)
    style_blocks: tuple[int, ...] = parse_blocks(SplitFluxRequest.style_blocks)
    rank: int = SplitFluxRequest.rank  # style rank; content branches sum to it; the boundary gets rank / rca_alpha
    content_rank: int = SplitFluxRequest.content_rank  # the residual branch gets rank - content_rank
    rca_alpha: int = SplitFluxRequest.rca_alpha
    target_modules: tuple[str, ...] = parse_targets(SplitFluxRequest.target_modules)
    complementary_weight: float = SplitFluxRequest.complementary_weight
    text_gate: float = SplitFluxRequest.text_gate
    gate_source: str = SplitFluxRequest.gate_source
    style_text: str = SplitFluxRequest.style_text
    export_gate: float | None = SplitFluxRequest.export_gate  # None: both content branches exported at weight 1
    resolution: int = 1024  # FLUX.1's; a request's None is the model's size
    max_sequence_length: int = FLUX_TEXT_LENGTH
    guidance: float = SplitFluxRequest.guidance
    timestep_sampling: str = SplitFluxRequest.timestep_sampling
    complementary_reduction: str = SplitFluxRequest.complementary_reduction
    lora_init: str = SplitFluxRequest.lora_init
    quantize_base: str = SplitFluxRequest.quantize_base
    use_8bit_adam: bool = False  # 8-bit optimiser state instead of the paper's 32-bit (a memory option)

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
        """Raise `BlockStudioError` with one line naming the first problem.

        Each value is checked against the request's metadata for it (`check_fields`); what is checked here is
        how they fit together and with the model's `num_single_blocks`.
        """
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
        check_fields(self, SplitFluxRequest)
        if not 1 <= self.content_rank < self.rank:
            raise BlockStudioError(
                f"content rank must be between 1 and rank - 1 ({self.rank - 1}) so the residual branch keeps a "
                f"rank, not {self.content_rank}"
            )
        if self.rank % self.rca_alpha:
            raise BlockStudioError(f"rca alpha must be a positive divisor of the rank {self.rank}, not {self.rca_alpha}")
        if self.resolution % 16:
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


def settings_for(request: SplitFluxRequest, model) -> SplitFluxSettings:
    """The run's settings from a request (its tokens come from the image, later), checked against the model."""
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
        resolution=request.resolution or model.resolution,
        max_sequence_length=request.max_sequence_length or (TINY_TEXT_LENGTH if model.tiny else FLUX_TEXT_LENGTH),
        guidance=request.guidance,
        timestep_sampling=request.timestep_sampling,
        complementary_reduction=request.complementary_reduction,
        lora_init=request.lora_init,
        quantize_base=request.quantize_base,
        use_8bit_adam=bool(request.use_8bit_adam),
    )
    settings.validate(_single_block_count(model))
    check_quantization(request.quantize_base)
    return settings


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


def job_fields(request: SplitFluxRequest, s: SplitFluxSettings) -> dict:
    """What must not change between a run and its resumption, beyond what every recipe records."""
    return {
        "style_token": s.style_token, "rank": s.rank, "content_rank": s.content_rank,
        "rca_alpha": s.rca_alpha, "blocks": {r: format_blocks(getattr(s, f"{r}_blocks")) for r in ROLES},
        "target_modules": list(s.target_modules), "complementary_weight": s.complementary_weight,
        "text_gate": s.text_gate, "gate_source": s.gate_source, "style_text": s.style_text,
        "resolution": s.resolution, "max_sequence_length": s.max_sequence_length, "guidance": s.guidance,
        "timestep_sampling": s.timestep_sampling, "quantize_base": s.quantize_base,
        "learning_rate": request.learning_rate, "complementary_reduction": s.complementary_reduction,
        "lora_init": s.lora_init, "optimizer": optimizer_name(bool(request.use_8bit_adam)),
    }


def optimizer_name(use_8bit_adam: bool) -> str:
    return "Adam, 8-bit state" if use_8bit_adam else "Adam, 32-bit state"


def default_train_config(**overrides: Any) -> TrainConfig:
    """The paper's optimiser: Adam at 1e-4 (AdamW with no weight decay), 1000 steps; clip 1.0 as diffusers."""
    config = TrainConfig(steps=SplitFluxRequest.steps, learning_rate=SplitFluxRequest.learning_rate, weight_decay=0.0,
                         max_grad_norm=1.0, seed=SplitFluxRequest.seed)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def train_config(request: SplitFluxRequest) -> TrainConfig:
    """The loop's settings for a request: the paper's Adam with 32-bit state unless 8-bit is asked for."""
    options = {**loop_options(request), "use_8bit_adam": bool(request.use_8bit_adam)}
    return default_train_config(
        steps=request.steps, learning_rate=request.learning_rate, seed=request.seed,
        checkpoint_every=request.checkpoint_every, sample_every=request.sample_every, **options,
    )


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
