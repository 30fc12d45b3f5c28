"""MiSS on the paper's own toy: a small MLP pre-trained on a sine, adapted to a shifted target.

Kang et al. (arXiv 2409.15371, section 3.1 and appendix C): "a single-layer MLP ... pre-trained to fit some
sinusoidal functions using a constrained set of data points. Following this pre-training, the target function is
subtly altered", from sin(2 pi x) to sin(2 pi x) + 0.3 cos(3 pi x). The appendix gives the sizes (64 inputs, 64
hidden units, 64 outputs), 50 noisy training samples (noise 0.05) and 100 clean validation samples, learning rate
1e-3, 250 pre-training and 100 adaptation epochs, and the ranks that match the trainable parameters (LoRA 2, MiSS
4: 256 numbers per 64 x 64 layer). It leaves open what one sample is; here a sample is a window of the function:
the inputs are 64 points x = t + c (t a fixed grid over [-1, 1], c drawn from [-1, 1] per sample) and the outputs
are the function at those points. Each epoch is one full-batch AdamW step.

Adapters are added through the public verbs to both layers of the pre-trained MLP: LoRA (PEFT's lora_alpha 8),
MiSS balanced, "bat" and "mini" at the same number of trainable parameters, and full fine-tuning as the
reference. The paper's Figure-1 claim is that MiSS starts with a larger gradient than LoRA (B = 0 leaves LoRA's
first gradient small); the curves show how far each gets in the paper's budget. Finally each MiSS mode is merged
into the weights (outputs must not change) and unmerged (the weights must come back bit for bit).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.adapters import LoRAConfig, MissConfig, add_adapter, trainable_parameters
from pipelines.lab import Experiment, LabResult, LabSettings, LabSettingsError, Progress, register_experiment
from pipelines.lab.experiments._merging import merge_round_trip
from pipelines.lab.plots import bar_plot, line_plot
from pipelines.lab.training import fit, seeded

WIDTH = 64  # inputs, hidden units and outputs of the MLP (the paper's appendix C)
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
LAYERS = ["0", "2"]  # the two Linear layers of nn.Sequential(Linear, activation, Linear)


@dataclass
class MissToySettings(LabSettings):
    pretrain_epochs: int = field(default=250, metadata={
        "help": "full-batch steps fitting sin(2 pi x) (the paper: 250)", "label": "Pre-training epochs",
        "min": 1, "max": 5000})
    adapt_epochs: int = field(default=100, metadata={
        "help": "full-batch steps on the shifted target (the paper: 100)", "label": "Adaptation epochs",
        "min": 1, "max": 5000})
    learning_rate: float = field(default=1e-3, metadata={
        "help": "AdamW learning rate of pre-training and adaptation (the paper: 1e-3)", "label": "Learning rate",
        "min": 1e-6, "max": 1.0})
    train_samples: int = field(default=50, metadata={
        "help": "noisy training windows (the paper: 50)", "label": "Training samples", "min": 2, "max": 10000})
    valid_samples: int = field(default=100, metadata={
        "help": "clean validation windows (the paper: 100)", "label": "Validation samples", "min": 2, "max": 10000})
    noise: float = field(default=0.05, metadata={
        "help": "standard deviation of the noise on training targets (the paper: 0.05)", "label": "Noise",
        "min": 0.0, "max": 1.0})
    lora_rank: int = field(default=2, metadata={
        "help": "LoRA rank (the paper: 2, i.e. 256 numbers per 64 x 64 layer)", "label": "LoRA rank",
        "min": 1, "max": WIDTH})
    lora_alpha: float = field(default=4.0, metadata={
        "help": "LoRA's update is scaled by alpha / rank (alpha = 2 r, as the paper's LoRA runs)",
        "label": "LoRA alpha",
        "min": 0.01, "max": 1024})
    miss_rank: int = field(default=4, metadata={
        "help": "MiSS rank of the balanced and 'bat' modes (the paper: 4, 256 numbers per layer)",
        "label": "MiSS rank", "min": 1, "max": WIDTH})
    mini_rank: int = field(default=16, metadata={
        "help": "rank r of the 'mini' mode, whose block is r x mini_r", "label": "Mini rank", "min": 1, "max": WIDTH})
    mini_r: int = field(default=16, metadata={
        "help": "output width of the 'mini' block (16 x 16 = 256 numbers per layer)", "label": "Mini r",
        "min": 1, "max": WIDTH})
    activation: str = field(default="relu", metadata={
        "help": "the MLP's non-linearity (the paper does not say)", "label": "Activation",
        "choices": tuple(ACTIVATIONS)})
    repeats: int = field(default=3, metadata={
        "help": "runs with different seeds (data, pre-training, adapters); curves are averaged",
        "label": "Repeats", "min": 1, "max": 20})

    @classmethod
    def quick(cls) -> MissToySettings:
        return cls(pretrain_epochs=150, adapt_epochs=40, repeats=1)

    def validate(self) -> None:
        super().validate()
        for name in ("miss_rank", "mini_r"):
            if WIDTH % getattr(self, name):
                raise LabSettingsError(f"{name} must divide the MLP's width {WIDTH}, not {getattr(self, name)}")


GRID = torch.linspace(-1.0, 1.0, WIDTH)


def base_function(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * math.pi * x)


def shifted_function(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * math.pi * x) + 0.3 * torch.cos(3 * math.pi * x)


def windows(function, n: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` windows x = t + c of the function, and its values (plus Gaussian noise of std `noise`)."""
    generator = torch.Generator().manual_seed(seed)
    x = GRID + (2 * torch.rand(n, 1, generator=generator) - 1)
    y = function(x)
    if noise:
        y = y + noise * torch.randn(y.shape, generator=generator)
    return x, y


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    config: object | None  # an adapter config, or None for full fine-tuning


def variants(settings: MissToySettings) -> list[Variant]:
    return [
        Variant("lora", f"LoRA r={settings.lora_rank}",
                LoRAConfig(rank=settings.lora_rank, scale=settings.lora_alpha / settings.lora_rank,
                           target_modules=LAYERS)),
        Variant("miss", f"MiSS r={settings.miss_rank}", MissConfig(rank=settings.miss_rank, target_modules=LAYERS)),
        Variant("miss_bat", f"MiSS bat r={settings.miss_rank}",
                MissConfig(rank=settings.miss_rank, init_weights="bat", target_modules=LAYERS)),
        Variant("miss_mini", f"MiSS mini {settings.mini_rank}x{settings.mini_r}",
                MissConfig(rank=settings.mini_rank, mini_r=settings.mini_r, init_weights="mini",
                           target_modules=LAYERS)),
        Variant("full", "full fine-tuning", None),
    ]


def pretrain(settings: MissToySettings, seed: int, progress: Progress) -> nn.Module:
    with seeded(seed):
        model = nn.Sequential(nn.Linear(WIDTH, WIDTH), ACTIVATIONS[settings.activation](), nn.Linear(WIDTH, WIDTH))
    data = windows(base_function, settings.train_samples, settings.noise, seed)
    fit(model, model.parameters(), mse, lambda generator: data, settings.pretrain_epochs, settings.learning_rate,
        progress, max_grad_norm=None, seed=seed, message="pre-training on sin(2 pi x)")
    model.eval()
    return model


def gradient_norm(model: nn.Module, params: list[nn.Parameter], batch) -> float:
    grads = torch.autograd.grad(mse(model, batch), params)
    return float(torch.sqrt(sum(g.float().pow(2).sum() for g in grads)))


def adapt(base: nn.Module, variant: Variant, settings: MissToySettings, seed: int, progress: Progress) -> dict:
    """Train one variant on the shifted target; its parameter count, first gradient norm and validation curve."""
    model = copy.deepcopy(base)
    if variant.config is None:
        model.requires_grad_(True)
        params = list(model.parameters())
    else:
        with seeded(seed + 1):
            add_adapter(model, variant.config)
        params = trainable_parameters(model)
    train = windows(shifted_function, settings.train_samples, settings.noise, seed + 2)
    valid = windows(shifted_function, settings.valid_samples, 0.0, seed + 3)
    curve = []

    @torch.no_grad()
    def validate(step: int, loss: float) -> None:
        curve.append(float(mse(model, valid)))

    first_gradient = gradient_norm(model, params, train)
    fit(model, params, mse, lambda generator: train, settings.adapt_epochs, settings.learning_rate, progress,
        max_grad_norm=None, seed=seed, message=f"adapting {variant.label}", on_step=validate)
    model.eval()
    return {"model": model, "parameters": sum(p.numel() for p in params), "gradient": first_gradient,
            "curve": curve}


def run(settings: MissToySettings, progress: Progress) -> LabResult:
    chosen = variants(settings)
    curves: dict[str, list[list[float]]] = {v.key: [] for v in chosen}
    gradients: dict[str, list[float]] = {v.key: [] for v in chosen}
    parameters: dict[str, int] = {}
    before: list[float] = []
    trained: dict[str, nn.Module] = {}
    steps = settings.repeats * (1 + len(chosen))
    done = 0
    for repeat in range(settings.repeats):
        seed = settings.seed + 1000 * repeat
        base = pretrain(settings, seed, progress.span(done / steps, (done + 1) / steps))
        done += 1
        valid = windows(shifted_function, settings.valid_samples, 0.0, seed + 3)
        with torch.no_grad():
            before.append(float(mse(base, valid)))
        if repeat == 0:
            trained["base"] = base
        for variant in chosen:
            out = adapt(base, variant, settings, seed, progress.span(done / steps, (done + 1) / steps))
            done += 1
            curves[variant.key].append(out["curve"])
            gradients[variant.key].append(out["gradient"])
            parameters[variant.key] = out["parameters"]
            if repeat == 0:
                trained[variant.key] = out["model"]

    progress.update(0.99, "merging and unmerging each MiSS mode")
    probe = windows(shifted_function, settings.valid_samples, 0.0, settings.seed + 3)[0]
    checks = {v.key: merge_round_trip(trained[v.key], lambda model=trained[v.key]: model(probe))
              for v in chosen if v.key.startswith("miss")}

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    mean_curves = {v.key: [mean(step) for step in zip(*curves[v.key], strict=True)] for v in chosen}
    before_loss = mean(before)
    rows = []
    metrics: dict[str, float] = {"validation_loss_before": before_loss}
    for v in chosen:
        row = {"method": v.label, "trainable parameters": parameters[v.key],
               "initial gradient norm": round(mean(gradients[v.key]), 4),
               "validation loss after 10%": round(mean_curves[v.key][max(0, len(mean_curves[v.key]) // 10 - 1)], 5),
               "minimum validation loss": round(min(mean_curves[v.key]), 5)}
        metrics[f"parameters_{v.key}"] = float(parameters[v.key])
        metrics[f"initial_gradient_norm_{v.key}"] = mean(gradients[v.key])
        metrics[f"min_validation_loss_{v.key}"] = min(mean_curves[v.key])
        if v.key in checks:
            difference, exact = checks[v.key]
            row["merged output change"] = f"{difference:.1e}"
            row["unmerge restores weights"] = "exactly" if exact else "no"
            metrics[f"merge_max_difference_{v.key}"] = difference
            metrics[f"unmerge_exact_{v.key}"] = float(exact)
        rows.append(row)

    labels = {v.key: v.label for v in chosen}
    figures = {
        "validation_loss": line_plot(
            {labels[k]: c for k, c in mean_curves.items()}, hlines={"before adapting": before_loss}, logy=True,
            markers=False, title="Validation loss on the shifted target (mean over repeats)",
            xlabel="adaptation epoch", ylabel="mean squared error"),
        "initial_gradient_norm": bar_plot(
            [labels[v.key] for v in chosen], [mean(gradients[v.key]) for v in chosen], logy=True,
            title="Gradient norm of the trainable parameters at the first step", xlabel="",
            ylabel="gradient norm"),
        "fit": _fit_figure(trained, chosen),
        "merge": bar_plot(
            [labels[k] for k in checks], [max(d, 1e-12) for d, _ in checks.values()], logy=True,
            title="Largest output change when merged (unmerge restores the weights bit for bit)", xlabel="",
            ylabel="max |merged - unmerged|"),
    }
    lora, miss = metrics["initial_gradient_norm_lora"], metrics["initial_gradient_norm_miss"]
    best = min(chosen[:-1], key=lambda v: metrics[f"min_validation_loss_{v.key}"])
    summary = (
        f"At {parameters['lora']:,} trainable numbers each, MiSS starts with a gradient {miss / lora:.1f} times "
        f"LoRA's ({miss:.3f} against {lora:.3f}): LoRA's B starts at zero, so its first steps only turn A. "
        f"Before adapting, the pre-trained MLP scores {before_loss:.4f} on the shifted target; in "
        f"{settings.adapt_epochs} epochs "
        + ", ".join(f"{labels[v.key]} reaches {metrics[f'min_validation_loss_{v.key}']:.4f}" for v in chosen)
        + f". Among the adapters {best.label} gets lowest. Merged, each MiSS mode changes the outputs by at most "
        f"{max(d for d, _ in checks.values()):.1e}, and unmerging gives "
        + ("every weight back bit for bit." if all(e for _, e in checks.values()) else "NOT all weights back.")
    )
    return LabResult(method="miss", summary=summary, metrics=metrics, tables={"methods": rows},
                     figures=figures, settings=settings.to_dict())


@torch.no_grad()
def _fit_figure(trained: dict[str, nn.Module], chosen: list[Variant]):
    """The window at c = 0: the old and the new function, and what the base and the adapted MLPs predict."""
    x = GRID.unsqueeze(0)
    grid = GRID.tolist()
    series = {"target sin(2 pi x) + 0.3 cos(3 pi x)": (grid, shifted_function(GRID).tolist()),
              "pre-trained on sin(2 pi x)": (grid, trained["base"](x)[0].tolist())}
    for v in chosen:
        if v.key in ("lora", "miss", "full"):
            series[f"after {v.label}"] = (grid, trained[v.key](x)[0].tolist())
    return line_plot(series, markers=False, title="One window of the function (first repeat)", xlabel="x",
                     ylabel="y")


register_experiment(Experiment(
    method="miss", settings_cls=MissToySettings, run=run,
    description="The MiSS paper's toy: a small MLP pre-trained on sin(2 pi x) adapts to sin(2 pi x) + 0.3 "
                "cos(3 pi x) with LoRA and the three MiSS modes at the same number of trainable parameters, and "
                "with full fine-tuning. Look at the first-step gradient norms, the validation curves, and the "
                "merge check: merging changes no output and unmerging restores the weights exactly.",
))
