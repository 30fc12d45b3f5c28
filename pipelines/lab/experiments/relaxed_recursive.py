"""Relaxed Recursive Transformers: quality against parameter count as the per-depth LoRA rank grows.

The pre-trained tiny Llama's layers are tied into one block looped `loops` times, the block initialised from
the original layers (Average by default, the paper's best for relaxed models), and every depth gets a LoRA
starting at the truncated SVD of its residual. Rank 0 is the fully recursive model; the full rank (64 here)
starts as the original layers' weights again. Each model is measured at conversion and after a brief
uptraining of the shared block and the LoRA (and, as the paper trains "all model parameters", the embeddings
and head) on the pre-training mix, by its language-modelling loss on held-out sequences. The original model
uptrained for as many steps is the reference, as the paper's uptrained full-size model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from pipelines.adapters import (
    RelaxedRecursiveConfig,
    add_adapter,
    disabled,
    repeated_layers,
    tied_parameter_count,
    trainable_parameters,
)
from pipelines.adapters.relaxed_recursive import INITS
from pipelines.lab import Experiment, LabResult, LabSettings, LabSettingsError, Progress, register_experiment
from pipelines.lab.experiments._lm_corpus import Corpus, corpus, next_token_loss, perplexity
from pipelines.lab.models import load_backbone
from pipelines.lab.plots import line_plot
from pipelines.lab.training import fit, seeded


@dataclass
class RelaxedRecursiveSettings(LabSettings):
    ranks: tuple[int, ...] = field(default=(0, 1, 2, 4, 8, 16, 64), metadata={
        "help": "LoRA ranks per depth, one model each (0: fully recursive; 64 is full rank on the tiny model)",
        "label": "Ranks", "min": 0, "max": 4096})
    loops: int = field(default=2, metadata={
        "help": "B: how many times the shared block runs (the tiny model has 2 layers, so 2 loops of 1)",
        "label": "Loops", "min": 2, "max": 64})
    init: str = field(default="average", metadata={
        "help": "how the shared block starts from the original layers", "label": "Block init",
        "choices": INITS})
    relax_vectors: bool = field(default=False, metadata={
        "help": "give each depth its own norm weights as well (then full rank is exactly the original); the "
                "paper ties them", "label": "Per-depth norms"})
    steps: int = field(default=120, metadata={"help": "uptraining steps per model", "label": "Uptraining steps",
                                              "min": 0, "max": 5000})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate of the uptraining",
                                                         "label": "Learning rate", "min": 1e-6, "max": 1.0})
    batch_size: int = field(default=32, metadata={"help": "sequences per step", "label": "Batch size",
                                                  "min": 1, "max": 1024})
    train_sequences: int = field(default=1920, metadata={
        "help": "sequences of the pre-training mix the uptraining draws from", "label": "Training sequences",
        "min": 16, "max": 100000})
    eval_sequences: int = field(default=256, metadata={
        "help": "held-out sequences the loss is measured on", "label": "Held-out sequences", "min": 16,
        "max": 20000})

    @classmethod
    def quick(cls) -> RelaxedRecursiveSettings:
        return cls(ranks=(0, 4, 64), steps=25, eval_sequences=96)

    def validate(self) -> None:
        super().validate()
        if len(set(self.ranks)) != len(self.ranks):
            raise LabSettingsError(f"ranks must not repeat a rank, not {', '.join(map(str, self.ranks))}")


def held_out_loss(model: nn.Module, data: Corpus) -> float:
    """Mean next-token cross-entropy per real token of `data`."""
    return math.log(perplexity(model, data))


def _outside_layers(model: nn.Module, layer_names: list[str]) -> list[nn.Parameter]:
    """The model's parameters outside the tied layers (embeddings, final norm, head)."""
    inside = {id(p) for name in layer_names for p in model.get_submodule(name).parameters()}
    return [p for p in model.parameters() if id(p) not in inside]


def run(settings: RelaxedRecursiveSettings, progress: Progress) -> LabResult:
    progress.update(0.0, "loading the language model and its data")
    original, tokenizer = load_backbone("causal_lm", settings.model_id)
    layer_names = repeated_layers(original)
    if len(layer_names) % settings.loops:
        raise LabSettingsError(f"loops must divide the model's {len(layer_names)} layers, not {settings.loops}")
    train = corpus("train", settings.train_sequences, settings.seed, tokenizer)
    test = corpus("test", settings.eval_sequences, settings.seed, tokenizer)
    original_params = sum(p.numel() for p in original.parameters())
    original_loss = held_out_loss(original, test)

    runs = len(settings.ranks) + (1 if settings.steps else 0)
    span = 1.0 / runs
    rows, curves = [], {}
    init_loss, up_loss, params = {}, {}, {}
    full_rank_gap = math.nan
    for i, rank in enumerate(settings.ranks):
        model = copy.deepcopy(original)
        with seeded(settings.seed + 1):
            add_adapter(model, RelaxedRecursiveConfig(loops=settings.loops, rank=rank, init=settings.init,
                                                      relax_vectors=settings.relax_vectors,
                                                      target_modules=layer_names), name="rrt")
        params[rank] = tied_parameter_count(model, "rrt")
        init_loss[rank] = held_out_loss(model, test)
        if rank >= _full_rank(original, layer_names[0]):
            with torch.no_grad():
                ids = test.input_ids[:32]
                relaxed = model(input_ids=ids).logits
                with disabled(model):
                    full_rank_gap = float((relaxed - model(input_ids=ids).logits).abs().max())
        curves[f"r={rank}"] = _uptrain(model, trainable_parameters(model, "rrt") + _outside_layers(model, layer_names),
                                       settings, train, progress.span(i * span, (i + 1) * span), f"rank {rank}")
        up_loss[rank] = held_out_loss(model, test) if settings.steps else init_loss[rank]
        rows.append({"rank": rank, "parameters": params[rank],
                     "share of the original": round(params[rank] / original_params, 3),
                     "loss at conversion": round(init_loss[rank], 4), "loss after uptraining": round(up_loss[rank], 4)})
    reference_loss = original_loss
    if settings.steps:
        reference = copy.deepcopy(original)
        curves["original"] = _uptrain(reference, list(reference.parameters()), settings, train,
                                      progress.span(1.0 - span, 1.0), "original model")
        reference_loss = held_out_loss(reference, test)
    rows.append({"rank": "original (untied)", "parameters": original_params, "share of the original": 1.0,
                 "loss at conversion": round(original_loss, 4), "loss after uptraining": round(reference_loss, 4)})

    ranks = list(settings.ranks)
    metrics = {"original_parameters": float(original_params), "original_loss": original_loss,
               "original_uptrained_loss": reference_loss}
    for rank in ranks:
        metrics[f"parameters_r{rank}"] = float(params[rank])
        metrics[f"loss_at_conversion_r{rank}"] = init_loss[rank]
        metrics[f"loss_after_uptraining_r{rank}"] = up_loss[rank]
    if not math.isnan(full_rank_gap):
        metrics["full_rank_max_logit_difference"] = full_rank_gap
    figures = {
        "quality_vs_parameters": _quality_figure(ranks, params, init_loss, up_loss, original_params, original_loss,
                                                 reference_loss, settings),
        "loss_by_rank": line_plot({"at conversion (SVD init)": [init_loss[r] for r in ranks],
                                   "after uptraining": [up_loss[r] for r in ranks]},
                                  x=ranks, hlines={"original model": original_loss},
                                  title="Held-out loss by LoRA rank per depth", xlabel="LoRA rank (0: recursive)",
                                  ylabel="loss per token"),
    }
    if settings.steps:
        figures["uptraining"] = line_plot({k: _smooth(v) for k, v in curves.items()}, markers=False,
                                          title="Uptraining loss (moving average of 10 steps)", xlabel="step",
                                          ylabel="training loss")
    low, high = ranks[0], ranks[-1]
    summary = (
        f"The tiny Llama ({len(layer_names)} layers, {original_params:,} parameters, held-out loss "
        f"{original_loss:.3f}) tied into one block looped {settings.loops} times ({settings.init} init). "
        f"At rank {low} the relaxed model needs {params[low]:,} parameters "
        f"({params[low] / original_params:.0%} of the original) and starts at loss {init_loss[low]:.3f}; at rank "
        f"{high}, {params[high]:,} parameters, it starts at {init_loss[high]:.3f}."
    )
    if settings.steps:
        summary += (f" After {settings.steps} uptraining steps: {up_loss[low]:.3f} at rank {low}, {up_loss[high]:.3f} "
                    f"at rank {high}, and {reference_loss:.3f} for the original model uptrained as long.")
    if not math.isnan(full_rank_gap):
        summary += (f" At full rank and before uptraining the logits differ from the original's by at most "
                    f"{full_rank_gap:.2g}" + (" (the tied norm weights)." if not settings.relax_vectors else "."))
    return LabResult(method="relaxed-recursive", summary=summary, metrics=metrics, tables={"models": rows},
                     figures=figures, settings=settings.to_dict())


def _full_rank(model: nn.Module, layer: str) -> int:
    return max(min(m.weight.shape) for m in model.get_submodule(layer).modules() if isinstance(m, nn.Linear))


def _uptrain(model, params, settings: RelaxedRecursiveSettings, train: Corpus, progress: Progress,
             label: str) -> list[float]:
    if not settings.steps:
        progress.update(1.0, f"{label}: no uptraining")
        return []
    return fit(model, params, next_token_loss, train, settings.steps, settings.learning_rate, progress,
               batch_size=settings.batch_size, seed=settings.seed, message=f"uptraining, {label}")


def _smooth(values: list[float], window: int = 10) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def _quality_figure(ranks, params, init_loss, up_loss, original_params, original_loss, reference_loss, settings):
    series = {"at conversion (SVD init)": ([params[r] for r in ranks], [init_loss[r] for r in ranks])}
    hlines = {"original model": original_loss}
    if settings.steps:
        series["after uptraining"] = ([params[r] for r in ranks], [up_loss[r] for r in ranks])
        hlines["original, uptrained as long"] = reference_loss
    figure = line_plot(series, hlines=hlines, title="Quality against size: from fully recursive to the original",
                       xlabel="parameters of the relaxed model", ylabel="held-out loss per token")
    axes = figure.axes[0]
    axes.axvline(original_params, color="grey", linestyle=":")
    axes.text(original_params, axes.get_ylim()[1], " original size", color="grey", fontsize="small", va="top")
    last = "after uptraining" if settings.steps else "at conversion (SVD init)"
    for rank, x, y in zip(ranks, *series[last], strict=True):
        axes.annotate(f"r={rank}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
    return figure


register_experiment(Experiment(
    method="relaxed-recursive", settings_cls=RelaxedRecursiveSettings, run=run,
    description="The tiny Llama's layers tied into one looped block with a LoRA per depth, initialised by the "
                "truncated SVD of each layer's residual, at several ranks, then briefly uptrained. Look at the "
                "held-out loss against the parameter count: rank 0 is the fully recursive model, the full rank "
                "starts at the original, and uptraining closes part of the gap.",
))
