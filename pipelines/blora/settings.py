"""B-LoRA's settings: its blocks and projections, the request every run starts from (one set of defaults, one
`validate()`), and the resolved settings the recipe is built from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipelines.errors import InvalidSetting
from pipelines.package_info import Composition
from pipelines.settings import like, setting
from pipelines.training import RunRequest, TrainConfig, loop_options

CONTENT_BLOCK = "up_blocks.0.attentions.0"
STYLE_BLOCK = "up_blocks.0.attentions.1"
BLOCKS = {"content": CONTENT_BLOCK, "style": STYLE_BLOCK}
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER_NAME = "blora"
ADAPTER_TYPES = ("lora", "dylora", "sora")
# Which part each use loads (adapter.json's `composition`): the content block's half for the subject, the style
# block's half for the style (the paper's Sec. 4.3).
COMPOSITION = Composition("B-LoRA", {"mix": "content", "content": "content", "reembed": "content", "style": "style"})


@dataclass
class TrainRequest(RunRequest):
    """Everything `train_blora` needs; the CLI and the app both build one of these.

    `resolution` None is the model's size (1024 for SDXL, 64 for tiny-sdxl); `token` None a token derived from
    the image (e.g. `[v42]`).
    """

    model: str = like(RunRequest, "model", "sdxl")
    learning_rate: float = like(RunRequest, "learning_rate", 5e-5)
    mixed_precision: str | None = like(RunRequest, "mixed_precision", None, help=(
        "default: bf16 on a GPU that has it (else fp16), fp32 on a CPU; the official B-LoRA command trains in fp16"))
    use_8bit_adam: bool | None = like(RunRequest, "use_8bit_adam", None, help=(
        "8-bit optimizer state (default: on a GPU with bitsandbytes, as the official command)"))
    adapter: str = setting("lora", choices=ADAPTER_TYPES, help=(
        "lora (the official recipe); dylora: every rank 1..RANK in one run; sora: gated ranks, zero gates pruned "
        "(both export at another rank with `blockstudio export`)"))

    def validate(self) -> None:
        super().validate()
        if self.adapter == "sora" and self.use_8bit_adam:
            raise InvalidSetting("SoRA trains with its own optimiser (the gates' proximal step); leave 8-bit Adam off")


@dataclass
class BLoRASettings:
    """Everything that defines a B-LoRA training run beyond the loop's own settings."""

    token: str = "[v]"
    prompt_template: str = "A {token}"
    rank: int = TrainRequest.rank
    resolution: int = 1024
    projections: tuple[str, ...] = PROJECTIONS
    blocks: dict[str, str] = field(default_factory=lambda: dict(BLOCKS))
    adapter: str = TrainRequest.adapter  # lora (PEFT, the official recipe), dylora or sora (pipelines.adapters)

    @property
    def prompt(self) -> str:
        return self.prompt_template.format(token=self.token)


def default_train_config(**overrides: Any) -> TrainConfig:
    """The official recipe: AdamW at 5e-5 (weight decay 1e-4, clip 1.0), 1000 steps, seed 0."""
    config = TrainConfig(steps=TrainRequest.steps, learning_rate=TrainRequest.learning_rate, weight_decay=1e-4,
                         max_grad_norm=1.0, seed=TrainRequest.seed)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def train_config(request: TrainRequest) -> TrainConfig:
    """The loop's settings for a request."""
    return default_train_config(steps=request.steps, learning_rate=request.learning_rate, seed=request.seed,
                                checkpoint_every=request.checkpoint_every, sample_every=request.sample_every,
                                **loop_options(request))
