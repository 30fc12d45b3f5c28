"""ExPLoRA: extended self-supervised pre-training on a shifted domain, then a linear probe there.

The tiny ViT pre-trained on upright digits is the source model W_S. The target domain is the same digits under a
shift (turned by 45 degrees by default). ExPLoRA unfreezes the last block, puts LoRA on Q and V of the other blocks, and
trains them on the target images without their labels by DINO's self-distillation (two augmented views of each
image, a student and its exponential-moving-average teacher, each with a projection head; the centred,
sharpened teacher output is the student's target), scaled down: two global views (random resized crops and
brightness jitter of the 16x16 images), no local crops, a small head. Then the backbone is frozen and a linear
probe (a linear classifier on the [CLS] feature) is trained on the labelled target images, for the source model
and for the extended one: the gap is what the extended pre-training bought, for the trainable fraction shown. The
probe's features are standardised with the training features' statistics first (MAE's probe puts a BatchNorm
without affine before its linear layer). `objective="masked"` swaps DINO for masked-patch reconstruction (MAE's
loss, for backbones pre-trained that way).

Scaled-down choices (each a setting): the teacher's EMA momentum 0.99 (DINO: 0.996 rising to 1 over hundreds of
thousands of steps), teacher temperature 0.04 and student 0.1 (DINO's), centre momentum 0.9 (DINO's), head
out_dim 256 (DINO: 65536).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.adapters import (
    DinoHead,
    ExPLoRAConfig,
    add_adapter,
    count_parameters,
    dino_loss,
    ema_update,
    repeated_layers,
    trainable_parameters,
    update_center,
)
from pipelines.lab import Experiment, LabResult, LabSettings, Progress, register_experiment
from pipelines.lab.data import SHIFTS, LabData, digits, shifted_digits
from pipelines.lab.models import load_backbone
from pipelines.lab.plots import bar_plot, line_plot
from pipelines.lab.training import accuracy, classification_loss, fit, seeded

OBJECTIVES = ("dino", "masked")


@dataclass
class ExPLoRASettings(LabSettings):
    objective: str = field(default="dino", metadata={
        "help": "the self-supervised objective: DINO self-distillation (DinoV2's [CLS] loss) or masked-patch "
                "reconstruction (MAE's loss, SimMIM's masking by blanking patches)", "label": "Objective",
        "choices": OBJECTIVES})
    mask_ratio: float = field(default=0.75, metadata={"help": "masked reconstruction: share of patches hidden "
                                                              "(MAE: 0.75)", "label": "Mask ratio",
                                                      "min": 0.05, "max": 0.95})
    shift: str = field(default="rotation", metadata={"help": "the target domain: a shift of the digits",
                                                      "label": "Target domain", "choices": SHIFTS})
    unfrozen_blocks: tuple[int, ...] = field(default=(-1,), metadata={
        "help": "blocks trained in full (positions; -1 the last, as the paper's blk23 of ViT-L)",
        "label": "Unfrozen blocks"})
    rank: int = field(default=8, metadata={"help": "LoRA rank on Q and V of the other blocks (paper: 64 on ViT-L)",
                                           "label": "Rank", "min": 1, "max": 256})
    pretrain_steps: int = field(default=300, metadata={
        "help": "steps of extended self-supervised pre-training on the unlabelled target images",
        "label": "Pre-training steps", "min": 1, "max": 20000})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the pre-training",
                                                         "label": "Learning rate", "min": 1e-6, "max": 1.0})
    teacher_momentum: float = field(default=0.99, metadata={
        "help": "EMA momentum of the teacher (DINO: 0.996, for far longer runs)", "label": "Teacher momentum",
        "min": 0.0, "max": 1.0})
    teacher_temperature: float = field(default=0.04, metadata={"help": "DINO's teacher temperature",
                                                               "label": "Teacher temperature",
                                                               "min": 1e-3, "max": 10.0})
    student_temperature: float = field(default=0.1, metadata={"help": "DINO's student temperature",
                                                              "label": "Student temperature",
                                                              "min": 1e-3, "max": 10.0})
    center_momentum: float = field(default=0.9, metadata={"help": "momentum of the teacher's output centre",
                                                          "label": "Centre momentum", "min": 0.0, "max": 1.0})
    head_dim: int = field(default=256, metadata={"help": "prototypes of the DINO head", "label": "Head out_dim",
                                                 "min": 2, "max": 65536})
    probe_pooling: str = field(default="cls", metadata={
        "help": "the probe's feature: the [CLS] token (DINO) or the mean patch token (MAE's global pooling)",
        "label": "Probe feature", "choices": ("cls", "mean")})
    probe_steps: int = field(default=300, metadata={"help": "steps of the linear probe", "label": "Probe steps",
                                                    "min": 1, "max": 20000})
    probe_learning_rate: float = field(default=1e-2, metadata={
        "help": "AdamW learning rate of the linear probe", "label": "Probe learning rate", "min": 1e-6, "max": 1.0})
    batch_size: int = field(default=64, metadata={"help": "images per step", "label": "Batch size",
                                                  "min": 2, "max": 1024})

    @classmethod
    def quick(cls) -> ExPLoRASettings:
        return cls(pretrain_steps=80, probe_steps=150)


class LinearProbe(nn.Module):
    """A linear classifier on fixed features (the lab's classifiers take an attention mask they ignore here)."""

    def __init__(self, dim: int, num_labels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_labels)

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(features)


def cls_features(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return vit(pixel_values=images).last_hidden_state[:, 0]


def pooled_features(vit: nn.Module, images: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
    """The [CLS] token, or the mean of the patch tokens (MAE's global pooling for its linear probe)."""
    hidden = vit(pixel_values=images).last_hidden_state
    return hidden[:, 0] if pooling == "cls" else hidden[:, 1:].mean(1)


def augment(images: torch.Tensor, generator: torch.Generator, min_scale: float = 0.6) -> torch.Tensor:
    """A DINO-style global view, scaled down: a random resized crop (area share min_scale..1, shifted inside the
    image) and a random brightness factor."""
    n = images.shape[0]
    scale = (min_scale + (1 - min_scale) * torch.rand(n, generator=generator)).sqrt()
    shift = (1 - scale)[:, None] * (2 * torch.rand(n, 2, generator=generator) - 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = scale, scale, shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    brightness = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=generator)
    return (views * brightness).clamp(0, 1)


@torch.no_grad()
def _features(vit: nn.Module, data: LabData, pooling: str, batch_size: int = 512) -> LabData:
    was_training = vit.training
    vit.eval()
    try:
        feats = torch.cat([pooled_features(vit, data.inputs[i:i + batch_size], pooling)
                           for i in range(0, len(data), batch_size)])
    finally:
        vit.train(was_training)
    return replace(data, inputs=feats)


def linear_probe(vit: nn.Module, train: LabData, test: LabData, settings: ExPLoRASettings,
                 progress: Progress, message: str) -> float:
    """Test accuracy of a linear classifier trained on the frozen backbone's [CLS] features."""
    train_f, test_f = (_features(vit, data, settings.probe_pooling) for data in (train, test))
    # Standardised with the training features' statistics, as MAE's probe puts a BatchNorm without affine first.
    mean, std = train_f.inputs.mean(0), train_f.inputs.std(0).clamp_min(1e-6)
    train_f, test_f = (replace(f, inputs=(f.inputs - mean) / std) for f in (train_f, test_f))
    with seeded(settings.seed):
        probe = LinearProbe(train_f.inputs.shape[-1], train.num_labels)
    fit(probe, probe.parameters(), classification_loss, train_f, settings.probe_steps, settings.probe_learning_rate,
        progress, batch_size=settings.batch_size, seed=settings.seed, message=message)
    return accuracy(probe, test_f)


def extended_pretraining(vit: nn.Module, name: str, images: torch.Tensor, settings: ExPLoRASettings,
                         progress: Progress) -> list[float]:
    """DINO on `images` through adapter `name`'s parameters: the student's trainable set is the adapter and its
    head; the teacher is a copy that follows it by EMA."""
    dim = vit.config.hidden_size
    with seeded(settings.seed + 2):
        student_head = DinoHead(dim, out_dim=settings.head_dim, hidden_dim=4 * dim, bottleneck_dim=dim)
    student = nn.ModuleDict({"vit": vit, "head": student_head})
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    student_params = trainable_parameters(vit, name) + [p for p in student_head.parameters() if p.requires_grad]
    teacher_params = trainable_parameters(teacher["vit"], name) + [
        t for t, s in zip(teacher["head"].parameters(), student_head.parameters(), strict=True) if s.requires_grad]
    center = torch.zeros(1, settings.head_dim)
    n = images.shape[0]

    def draw(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        batch = images[torch.randint(n, (settings.batch_size,), generator=generator)]
        return augment(batch, generator), augment(batch, generator)

    def loss_fn(model: nn.ModuleDict, views: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        nonlocal center
        student_out = [model["head"](cls_features(model["vit"], v)) for v in views]
        with torch.no_grad():
            teacher_out = [teacher["head"](cls_features(teacher["vit"], v)) for v in views]
        loss = dino_loss(student_out, teacher_out, center, settings.student_temperature,
                         settings.teacher_temperature)
        center = update_center(center, teacher_out, settings.center_momentum)
        return loss

    def on_step(step: int, loss: float) -> None:
        ema_update(teacher_params, student_params, settings.teacher_momentum)

    # DINO trains with AdamW and weight decay 0.04 (rising to 0.4); the gradient clip is DINO's 3.0.
    return fit(student, student_params, loss_fn, draw, settings.pretrain_steps, settings.learning_rate, progress,
               batch_size=settings.batch_size, weight_decay=0.04, max_grad_norm=3.0, seed=settings.seed,
               message="extended pre-training (DINO)", on_step=on_step)


def masked_pretraining(vit: nn.Module, name: str, images: torch.Tensor, settings: ExPLoRASettings,
                       progress: Progress) -> list[float]:
    """Masked-patch reconstruction on `images` through adapter `name`'s parameters and a linear pixel decoder:
    a random `mask_ratio` of the patches is blanked, and the mean squared error on those patches' pixels (MAE's
    loss, without its per-patch normalisation) is the loss."""
    patch = int(vit.config.patch_size)
    with seeded(settings.seed + 2):
        decoder = nn.Linear(vit.config.hidden_size, images.shape[1] * patch * patch)
    model = nn.ModuleDict({"vit": vit, "decoder": decoder})
    n = images.shape[0]

    def draw(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        batch = images[torch.randint(n, (settings.batch_size,), generator=generator)]
        count = (batch.shape[-1] // patch) * (batch.shape[-2] // patch)
        return batch, torch.rand(batch.shape[0], count, generator=generator) < settings.mask_ratio

    def loss_fn(model: nn.ModuleDict, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, mask = batch
        patches = F.unfold(images, patch, stride=patch)  # (N, C * p * p, patches)
        hidden = F.fold(patches * ~mask[:, None, :], images.shape[-2:], patch, stride=patch)
        predicted = model["decoder"](model["vit"](pixel_values=hidden).last_hidden_state[:, 1:])
        error = (predicted - patches.transpose(1, 2)).pow(2).mean(-1)
        return (error * mask).sum() / mask.sum().clamp_min(1)

    return fit(model, trainable_parameters(vit, name) + list(decoder.parameters()), loss_fn, draw,
               settings.pretrain_steps, settings.learning_rate, progress, batch_size=settings.batch_size,
               weight_decay=0.05, seed=settings.seed, message="extended pre-training (masked patches)")


def run(settings: ExPLoRASettings, progress: Progress) -> LabResult:
    progress.update(0.0, "loading the ViT and the digits")
    source = load_backbone("vit", settings.model_id)
    source.eval()
    train, test = (shifted_digits(split, settings.shift, seed=settings.seed) for split in ("train", "test"))
    source_train, source_test = digits("train"), digits("test")

    vit = copy.deepcopy(source)
    blocks = repeated_layers(vit)
    with seeded(settings.seed + 1):
        add_adapter(vit, ExPLoRAConfig(unfrozen_blocks=list(settings.unfrozen_blocks), rank=settings.rank,
                                       target_modules=blocks), name="explora")
    source_on_source = linear_probe(source, source_train, source_test, settings, progress.span(0.0, 0.1),
                                    "linear probe: source model, upright digits")
    source_on_target = linear_probe(source, train, test, settings, progress.span(0.1, 0.2),
                                    "linear probe: source model, target domain")
    trainable = count_parameters(vit, "explora")
    total = sum(p.numel() for p in source.parameters())
    pretrain = extended_pretraining if settings.objective == "dino" else masked_pretraining
    losses = pretrain(vit, "explora", train.inputs, settings, progress.span(0.2, 0.85))
    vit.eval()
    explora_on_target = linear_probe(vit, train, test, settings, progress.span(0.85, 1.0),
                                     "linear probe: ExPLoRA model, target domain")

    metrics = {"source_probe_on_source": source_on_source, "source_probe_on_target": source_on_target,
               "explora_probe_on_target": explora_on_target, "trainable_parameters": float(trainable),
               "backbone_parameters": float(total), "trainable_fraction": trainable / total,
               "first_pretraining_loss": losses[0], "last_pretraining_loss": losses[-1]}
    rows = [
        {"backbone": "source (upright digits)", "probed on": "upright digits", "linear-probe accuracy":
            round(source_on_source, 4), "trainable in pre-training": "-"},
        {"backbone": "source (upright digits)", "probed on": f"{settings.shift} digits",
         "linear-probe accuracy": round(source_on_target, 4), "trainable in pre-training": "-"},
        {"backbone": f"ExPLoRA ({settings.pretrain_steps} DINO steps)", "probed on": f"{settings.shift} digits",
         "linear-probe accuracy": round(explora_on_target, 4),
         "trainable in pre-training": f"{trainable:,} ({trainable / total:.1%})"},
    ]
    unfrozen = ", ".join("last" if i == -1 else str(i) for i in settings.unfrozen_blocks)
    figures = {
        "linear_probe": bar_plot(["source model, upright digits", f"source model, {settings.shift}",
                                  f"ExPLoRA, {settings.shift}"], [source_on_source, source_on_target,
                                                                  explora_on_target],
                                 title="Linear-probe accuracy with and without extended pre-training",
                                 xlabel="", ylabel="test accuracy"),
        "trainable_fraction": bar_plot([f"ExPLoRA (block(s) {unfrozen} + LoRA r={settings.rank})",
                                        "full extended pre-training"], [trainable, total], logy=True,
                                       title="Parameters trained in the extended pre-training", xlabel="",
                                       ylabel="parameters"),
        "pretraining_loss": line_plot({"DINO loss": losses}, markers=False, title="Extended pre-training",
                                      xlabel="step", ylabel="loss"),
    }
    summary = (
        f"A linear probe on the source ViT reaches {source_on_source:.0%} on upright digits but "
        f"{source_on_target:.0%} on the digits under {settings.shift}. After {settings.pretrain_steps} steps of unlabelled "
        f"extended pre-training with ExPLoRA (block(s) {unfrozen} unfrozen, LoRA rank {settings.rank} on Q and V "
        f"elsewhere: {trainable:,} of {total:,} parameters, {trainable / total:.1%}), the same probe reaches "
        f"{explora_on_target:.0%} there."
    )
    return LabResult(method="explora", summary=summary, metrics=metrics, tables={"linear probes": rows},
                     figures=figures, settings=settings.to_dict())


register_experiment(Experiment(
    method="explora", settings_cls=ExPLoRASettings, run=run,
    description="The tiny ViT pre-trained on upright digits meets a shifted domain. ExPLoRA continues its "
                "pre-training on the unlabelled shifted images (DINO self-distillation) with one block unfrozen "
                "and LoRA on Q and V elsewhere. Look at the linear-probe accuracy on the shifted digits with and "
                "without the extended pre-training, and at the fraction of parameters it trained.",
))
