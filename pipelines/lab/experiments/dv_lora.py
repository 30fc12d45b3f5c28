"""DV-LoRA (EndoDAC) on a shifted domain: phase 1 trains the matrices, phase 2 only the scaling vectors.

EndoDAC adapts a depth model pre-trained on natural images to endoscopic video: LoRA with trainable vectors u
and v on the MLP layers of every ViT block, trained first as a LoRA (A and B, 20,000 steps) and then through the
vectors alone. Here the tiny ViT, pre-trained on upright handwritten digits, gets a linear head on those digits
(the source domain) and then meets the same digits as an endoscope might show them: a warm colour cast, a dim
vignette and a bright specular spot (or another shift of the lab's data). The head stays as trained on the
source; only the adapter learns the new domain. Phase 1 trains A and B, phase 2 only u and v, each phase with its
own trainable-parameter count. Beside it: LoRA at the same rank for the same number of steps, and a VeRA-like
adapter with the phase-2 parameter count from the start (the DV-LoRA layer with A and B random and frozen, u at
0.1 and v at 0, as VeRA initialises its vectors; VeRA also shares A and B across layers, which this does not).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace

import torch
from matplotlib.figure import Figure

from pipelines.adapters import (
    DVLoRAConfig,
    LoRAConfig,
    adapter_state_dict,
    add_adapter,
    count_parameters,
    load_adapter_state_dict,
    set_phase,
    trainable_parameters,
)
from pipelines.lab import Experiment, LabResult, LabSettings, Progress, register_experiment
from pipelines.lab.data import SHIFTS, LabData, digits, shifted_digits
from pipelines.lab.experiments._merging import merge_round_trip
from pipelines.lab.models import ImageClassifier, load_backbone, mlp_targets
from pipelines.lab.plots import bar_plot, line_plot
from pipelines.lab.training import accuracy, classification_loss, fit, seeded

ENDOSCOPE = "endoscope"


@dataclass
class DVLoRASettings(LabSettings):
    shift: str = field(default=ENDOSCOPE, metadata={
        "help": "the target domain: 'endoscope' (colour cast, vignette, specular spot) or one of the lab's "
                "digit shifts", "label": "Target domain", "choices": (ENDOSCOPE, *SHIFTS)})
    rank: int = field(default=4, metadata={"help": "rank of DV-LoRA and of the LoRA baseline (EndoDAC: 4)",
                                           "label": "Rank", "min": 1, "max": 64})
    probe_steps: int = field(default=100, metadata={
        "help": "steps training the linear head on the source digits (frozen ViT)", "label": "Head steps",
        "min": 1, "max": 5000})
    phase1_steps: int = field(default=120, metadata={
        "help": "phase 1: steps training A and B (EndoDAC's warm_up_step)", "label": "Phase 1 steps",
        "min": 1, "max": 5000})
    phase2_steps: int = field(default=120, metadata={
        "help": "phase 2: steps training only the vectors u and v", "label": "Phase 2 steps", "min": 1, "max": 5000})
    learning_rate: float = field(default=3e-3, metadata={
        "help": "AdamW learning rate, the same in both phases as in EndoDAC", "label": "Learning rate",
        "min": 1e-6, "max": 1.0})
    batch_size: int = field(default=32, metadata={"help": "images per step", "label": "Batch size",
                                                  "min": 1, "max": 1024})
    eval_every: int = field(default=20, metadata={
        "help": "steps between two accuracy measurements for the curves", "label": "Evaluate every",
        "min": 1, "max": 5000})
    baselines: bool = field(default=True, metadata={
        "help": "also train LoRA and the VeRA-like adapter for the same number of steps", "label": "Baselines"})

    @classmethod
    def quick(cls) -> DVLoRASettings:
        return cls(probe_steps=25, phase1_steps=30, phase2_steps=20, eval_every=10, baselines=False)


def endoscope_view(data: LabData, cast: tuple[float, float, float] = (1.0, 0.55, 0.4), vignette: float = 0.9,
                   spot: float = 0.8) -> LabData:
    """The images as through an endoscope: tinted strokes on a warm background, dark corners, a specular spot."""
    size = data.inputs.shape[-1]
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    tint = torch.tensor(cast).view(1, 3, 1, 1)
    dim = (1 - vignette * (xs**2 + ys**2) / 2).clamp(0, 1)
    highlight = spot * torch.exp(-((xs - 0.45) ** 2 + (ys + 0.45) ** 2) / 0.02)
    images = (0.25 + 0.75 * data.inputs) * tint * dim + highlight
    return replace(data, inputs=images.clamp(0, 1).contiguous(), name="digits-endoscope")


def target_domain(split: str, shift: str, seed: int) -> LabData:
    if shift == ENDOSCOPE:
        return endoscope_view(digits(split))
    return shifted_digits(split, shift, seed=seed)


def _curve_recorder(model, test: LabData, every: int, curve: list[tuple[int, float]], offset: int = 0):
    def record(step: int, loss: float) -> None:
        if step % every == 0:
            curve.append((offset + step, accuracy(model, test)))
    return record


def _train(model, name: str, steps: int, settings: DVLoRASettings, train: LabData, test: LabData,
           progress: Progress, curve: list, offset: int = 0, seed: int = 0, message: str = "") -> None:
    fit(model, trainable_parameters(model, name), classification_loss, train, steps, settings.learning_rate,
        progress, batch_size=settings.batch_size, seed=seed, message=message,
        on_step=_curve_recorder(model, test, settings.eval_every, curve, offset))


def _vera_like(model, name: str, seed: int) -> None:
    """Random frozen A and B, u at 0.1 and v at 0 (VeRA's d_initial and b init), then phase 2 (vectors only)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in adapter_state_dict(model, name).items():
        if key.endswith("lora_B"):  # Kaiming-uniform over its fan-in r, as VeRA draws B
            bound = 1 / math.sqrt(value.shape[1])
            state[key] = (2 * torch.rand(value.shape, generator=generator) - 1) * bound
        elif key.endswith("lora_u"):
            state[key] = torch.full_like(value, 0.1)
        elif key.endswith("lora_v"):
            state[key] = torch.zeros_like(value)
        else:
            state[key] = value
    load_adapter_state_dict(model, state, name)
    set_phase(model, name, 2)


def run(settings: DVLoRASettings, progress: Progress) -> LabResult:
    progress.update(0.0, "loading the ViT and the digits")
    vit = load_backbone("vit", settings.model_id)
    source_train, source_test = digits("train"), digits("test")
    train, test = target_domain("train", settings.shift, settings.seed), target_domain("test", settings.shift,
                                                                                       settings.seed)
    with seeded(settings.seed):
        source = ImageClassifier(vit, source_test.num_labels)
    source.vit.requires_grad_(False)
    fit(source, source.head.parameters(), classification_loss, source_train, settings.probe_steps,
        settings.learning_rate, progress.span(0.0, 0.15), batch_size=settings.batch_size, seed=settings.seed,
        message="training the head on the source digits")
    source.head.requires_grad_(False)
    source_accuracy, unadapted = accuracy(source, source_test), accuracy(source, test)
    targets = mlp_targets(vit)
    total = settings.phase1_steps + settings.phase2_steps
    share = 0.45 if settings.baselines else 0.85

    # DV-LoRA: phase 1 (A, B), then phase 2 (u, v), on one adapter.
    model = copy.deepcopy(source)
    with seeded(settings.seed + 1):
        add_adapter(model, DVLoRAConfig(rank=settings.rank, warmup_steps=settings.phase1_steps,
                                        target_modules=targets), name="dv")
    curves: dict[str, list[tuple[int, float]]] = {"DV-LoRA": [(0, unadapted)]}
    phase1_params = count_parameters(model, "dv")
    _train(model, "dv", settings.phase1_steps, settings, train, test, progress.span(0.15, 0.15 + share / 2),
           curves["DV-LoRA"], seed=settings.seed, message="DV-LoRA phase 1 (A, B)")
    phase1_accuracy = accuracy(model, test)
    set_phase(model, "dv", 2)
    phase2_params = count_parameters(model, "dv")
    _train(model, "dv", settings.phase2_steps, settings, train, test, progress.span(0.15 + share / 2, 0.15 + share),
           curves["DV-LoRA"], offset=settings.phase1_steps, seed=settings.seed + 1,
           message="DV-LoRA phase 2 (u, v)")
    phase2_accuracy = accuracy(model, test)
    model.eval()
    merge_difference, _ = merge_round_trip(model, lambda: model(test.inputs))

    rows = [
        {"adapter": "none (head trained on the source)", "trainable parameters": 0,
         "target accuracy": round(unadapted, 4)},
        {"adapter": f"DV-LoRA phase 1 (A, B), {settings.phase1_steps} steps", "trainable parameters": phase1_params,
         "target accuracy": round(phase1_accuracy, 4)},
        {"adapter": f"DV-LoRA phase 2 (u, v), {settings.phase2_steps} more", "trainable parameters": phase2_params,
         "target accuracy": round(phase2_accuracy, 4)},
    ]
    metrics = {"source_accuracy": source_accuracy, "unadapted_accuracy": unadapted,
               "phase1_accuracy": phase1_accuracy, "phase2_accuracy": phase2_accuracy,
               "phase1_parameters": float(phase1_params), "phase2_parameters": float(phase2_params),
               "merge_max_difference": merge_difference}
    bars = {"DV-LoRA phase 1": (phase1_params, phase1_accuracy), "DV-LoRA phase 2": (phase2_params, phase2_accuracy)}

    if settings.baselines:
        lora = copy.deepcopy(source)
        with seeded(settings.seed + 1):
            add_adapter(lora, LoRAConfig(rank=settings.rank, scale=1.0, target_modules=targets), name="lora")
        curves[f"LoRA r={settings.rank}"] = [(0, unadapted)]
        _train(lora, "lora", total, settings, train, test, progress.span(0.6, 0.8), curves[f"LoRA r={settings.rank}"],
               seed=settings.seed, message="LoRA")
        vera = copy.deepcopy(source)
        with seeded(settings.seed + 1):
            add_adapter(vera, DVLoRAConfig(rank=settings.rank, target_modules=targets), name="vera")
        _vera_like(vera, "vera", settings.seed + 2)
        curves["VeRA-like (vectors only)"] = [(0, unadapted)]
        _train(vera, "vera", total, settings, train, test, progress.span(0.8, 0.99), curves["VeRA-like (vectors only)"],
               seed=settings.seed, message="VeRA-like")
        for label, name, adapted in ((f"LoRA r={settings.rank}", "lora", lora),
                                     ("VeRA-like (vectors only)", "vera", vera)):
            params, score = count_parameters(adapted, name), accuracy(adapted, test)
            rows.append({"adapter": f"{label}, {total} steps", "trainable parameters": params,
                         "target accuracy": round(score, 4)})
            metrics[f"{name}_accuracy"], metrics[f"{name}_parameters"] = score, float(params)
            bars[label] = (params, score)

    figures = {
        "examples": _examples(source_test, test),
        "accuracy_during_training": _accuracy_figure(curves, settings, unadapted, source_accuracy),
        "trainable_parameters": bar_plot(list(bars), [p for p, _ in bars.values()], logy=True,
                                         title="Trainable parameters", xlabel="", ylabel="parameters"),
        "target_accuracy": bar_plot(list(bars), [a for _, a in bars.values()],
                                    title="Target-domain test accuracy at the end of each phase or run",
                                    xlabel="", ylabel="accuracy"),
    }
    summary = (
        f"The head trained on the source digits scores {source_accuracy:.1%} there and {unadapted:.1%} on the "
        f"**{settings.shift}** domain. DV-LoRA (rank {settings.rank} on {', '.join(targets)}) trains "
        f"{phase1_params:,} parameters in phase 1 and reaches {phase1_accuracy:.1%}; phase 2 trains only the "
        f"{phase2_params:,} vector entries ({phase1_params / phase2_params:.1f} times fewer) and ends at "
        f"{phase2_accuracy:.1%}."
    )
    if settings.baselines:
        summary += (f" In the same {total} steps LoRA ({int(metrics['lora_parameters']):,} parameters) reaches "
                    f"{metrics['lora_accuracy']:.1%}, and the VeRA-like adapter with the phase-2 budget from the "
                    f"start {metrics['vera_accuracy']:.1%}.")
    summary += f" Merged into the weights, DV-LoRA changes the logits by at most {merge_difference:.1e}."
    return LabResult(method="dv-lora", summary=summary, metrics=metrics, tables={"adapters": rows},
                     figures=figures, settings=settings.to_dict())


def _accuracy_figure(curves, settings: DVLoRASettings, unadapted: float, source_accuracy: float) -> Figure:
    figure = line_plot({label: ([s for s, _ in c], [a for _, a in c]) for label, c in curves.items()},
                       hlines={"no adapter": unadapted, "source domain (no shift)": source_accuracy},
                       ylim=(0.0, 1.02), markers=False, title="Target-domain accuracy while training",
                       xlabel="step", ylabel="test accuracy")
    axes = figure.axes[0]
    axes.axvline(settings.phase1_steps, color="grey", linestyle=":")
    axes.text(settings.phase1_steps, 0.03, " phase 2: u, v only", color="grey", fontsize="small")
    return figure


def _examples(source: LabData, target: LabData, count: int = 6) -> Figure:
    """The first test images in both domains, source on top."""
    figure = Figure(figsize=(1.2 * count, 2.8), dpi=100, layout="constrained")
    figure.suptitle("Source domain (top) and target domain (bottom)")
    grid = figure.subplots(2, count)
    for row, data in enumerate((source, target)):
        for column in range(count):
            axes = grid[row][column]
            axes.imshow(data.inputs[column].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            axes.set_axis_off()
            if row == 0:
                axes.set_title(str(int(data.labels[column])), fontsize="small")
    return figure


register_experiment(Experiment(
    method="dv-lora", settings_cls=DVLoRASettings, run=run,
    description="A tiny ViT with a head trained on upright digits meets them through an endoscope (colour cast, "
                "vignette, specular spot). DV-LoRA trains A and B in phase 1, then only the vectors u and v. Look "
                "at the trainable parameters per phase, the accuracy curve across the phase switch, and LoRA and "
                "a VeRA-like adapter trained as long.",
))
