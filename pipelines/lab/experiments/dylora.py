"""DyLoRA: one training run serves every rank of its range, where a LoRA needs one run per rank.

A pre-trained tiny encoder learns a new text classification task with an adapter on its query and value
projections (and a new head). DyLoRA is trained once over ranks 1..r_max (a rank drawn per step) and measured at
every rank of the range. Beside it: a LoRA trained separately at each compared rank (the search DyLoRA saves),
the LoRA of rank r_max cut to each smaller rank by the same truncation DyLoRA uses (its ranks were never asked
to work alone, so accuracy collapses as ranks are dropped), and the untrained adapter. The rank DyLoRA is cut to
is finally exported as a plain LoRA on a fresh copy of the model, which must give the same outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipelines.adapters import (
    DyLoRAConfig,
    LoRAConfig,
    adapter_state_dict,
    count_parameters,
    export_rank,
    load_adapter_state_dict,
    sample_rank,
    set_rank,
    trainable_parameters,
)
from pipelines.lab import Experiment, LabResult, LabSettings, LabSettingsError, Progress, register_experiment
from pipelines.lab.experiments import _text_task as text
from pipelines.lab.experiments._text_task import ADAPTER, TextTaskRuns
from pipelines.lab.models import TextClassifier
from pipelines.lab.plots import line_plot
from pipelines.lab.training import accuracy, classification_loss


@dataclass
class DyLoRASettings(LabSettings):
    task: str = text.task_field()
    max_rank: int = field(default=8, metadata={
        "help": "r_max: DyLoRA trains ranks 1..r_max in one run (the paper's GLUE runs: 8)", "label": "Largest rank",
        "min": 2, "max": 32})
    alpha: float = field(default=8.0, metadata={
        "help": "the update at rank b is scaled by alpha / b, for DyLoRA and the LoRAs alike", "label": "Alpha",
        "min": 0.01, "max": 1024})
    mode: str = field(default="frozen", metadata={
        "help": "frozen: each step trains only the sampled rank's row and column (the official code); updating: "
                "every rank up to it", "label": "DyLoRA mode", "choices": ("frozen", "updating")})
    fixed_ranks: tuple[int, ...] = field(default=(1, 2, 4, 8), metadata={
        "help": "ranks at which a LoRA is also trained on its own, for comparison (ranks above r_max are skipped)",
        "label": "Separate LoRA ranks", "min": 1, "max": 32})
    steps: int = text.steps_field(300, " (frozen mode trains one rank per step, so it needs a few hundred)")
    learning_rate: float = text.learning_rate_field()
    batch_size: int = text.batch_size_field()
    train_examples: int = text.examples_field("train")
    test_examples: int = text.examples_field("test")

    @classmethod
    def quick(cls) -> DyLoRASettings:
        return cls(max_rank=4, fixed_ranks=(4,), steps=120, train_examples=256, test_examples=256)

    def validate(self) -> None:
        super().validate()
        if len(set(self.fixed_ranks)) != len(self.fixed_ranks):
            raise LabSettingsError(f"fixed_ranks must not repeat a rank, not {', '.join(map(str, self.fixed_ranks))}")


def run(settings: DyLoRASettings, progress: Progress) -> LabResult:
    task = TextTaskRuns(settings, progress)
    test, targets, top = task.test, task.targets, settings.max_rank
    ranks = list(range(1, top + 1))
    fixed = sorted(r for r in settings.fixed_ranks if r <= top)
    lora_ranks = sorted(set(fixed) | {top})
    parts = 1 + len(lora_ranks)

    def part(i: int) -> Progress:
        return progress.span(0.02 + 0.9 * i / parts, 0.02 + 0.9 * (i + 1) / parts)

    def dylora_config() -> DyLoRAConfig:
        return DyLoRAConfig(rank=top, min_rank=1, alpha=settings.alpha, mode=settings.mode, target_modules=targets)

    untrained_accuracy = accuracy(task.classifier_with(dylora_config()), test)

    # DyLoRA: one run, a rank drawn per step from its own seeded generator.
    dylora = task.classifier_with(dylora_config())
    draws = torch.Generator().manual_seed(settings.seed + 2)

    def dylora_loss(model, batch):
        sample_rank(model.encoder, ADAPTER, draws)
        return classification_loss(model, batch)

    task.fit(part(0), dylora, "DyLoRA", trainable_parameters(dylora.encoder, ADAPTER), dylora_loss)
    dylora_accuracy = {}
    for rank in ranks:
        set_rank(dylora.encoder, rank, ADAPTER)
        dylora_accuracy[rank] = accuracy(dylora, test)

    # LoRA, trained once per compared rank.
    lora_accuracy, lora_models = {}, {}
    for i, rank in enumerate(lora_ranks, start=1):
        lora = task.classifier_with(LoRAConfig(rank=rank, scale=settings.alpha / rank, target_modules=targets))
        task.fit(part(i), lora, f"LoRA rank {rank}", trainable_parameters(lora.encoder, ADAPTER))
        lora_accuracy[rank] = accuracy(lora, test)
        lora_models[rank] = lora

    # The LoRA of rank r_max cut to each rank by DyLoRA's truncation: its factors in a DyLoRA adapter.
    progress.update(0.93, "cutting the rank r_max LoRA to smaller ranks")
    cut = task.classifier_with(dylora_config())
    load_adapter_state_dict(cut.encoder, adapter_state_dict(lora_models[top].encoder, ADAPTER), ADAPTER)
    cut.head.load_state_dict(lora_models[top].head.state_dict())
    truncated_accuracy = {}
    for rank in ranks:
        set_rank(cut.encoder, rank, ADAPTER)
        truncated_accuracy[rank] = accuracy(cut, test)

    progress.update(0.97, "exporting a DyLoRA rank as a plain LoRA")
    export_difference = _export_difference(dylora, task.classifier_with, test, fixed[0] if fixed else 1)

    parameters = {rank: count_parameters(task.classifier_with(LoRAConfig(rank=rank, target_modules=targets))
                                         .encoder) for rank in ranks}
    rows = [{"rank": rank, "DyLoRA accuracy": round(dylora_accuracy[rank], 4),
             "LoRA trained at this rank": round(lora_accuracy[rank], 4) if rank in lora_accuracy else None,
             f"LoRA rank {top} truncated": round(truncated_accuracy[rank], 4),
             "adapter parameters at this rank": parameters[rank]} for rank in ranks]
    metrics = {"untrained_accuracy": untrained_accuracy, "export_max_difference": export_difference,
               "dylora_min_accuracy": min(dylora_accuracy.values()),
               "truncated_min_accuracy": min(truncated_accuracy.values()),
               "lora_runs": float(len(lora_accuracy)), "dylora_runs": 1.0}
    for rank in ranks:
        metrics[f"dylora_accuracy_rank_{rank}"] = dylora_accuracy[rank]
        metrics[f"truncated_accuracy_rank_{rank}"] = truncated_accuracy[rank]
    for rank, value in lora_accuracy.items():
        metrics[f"lora_accuracy_rank_{rank}"] = value

    figures = {
        "accuracy_at_every_rank": line_plot(
            {"DyLoRA (one run, cut to each rank)": (ranks, [dylora_accuracy[r] for r in ranks]),
             "LoRA trained at that rank (one run each)": (sorted(lora_accuracy), [lora_accuracy[r] for r in
                                                                                   sorted(lora_accuracy)]),
             f"LoRA rank {top}, truncated": (ranks, [truncated_accuracy[r] for r in ranks])},
            hlines={"untrained adapter": untrained_accuracy}, ylim=(0.0, 1.02),
            title=f"Test accuracy at every rank ({settings.task})", xlabel="rank b", ylabel="test accuracy"),
        "training_loss": line_plot(
            dict(task.losses), title="Training loss per step", xlabel="step", ylabel="cross-entropy", logy=True,
            markers=False),
    }
    worst = min(dylora_accuracy, key=dylora_accuracy.get)
    summary = (
        f"On **{settings.task}**, one DyLoRA run ({settings.mode} mode, ranks 1-{top}) scores "
        + ", ".join(f"{dylora_accuracy[r]:.1%} at rank {r}" for r in ranks)
        + f" (lowest {dylora_accuracy[worst]:.1%} at rank {worst}; the untrained adapter scores "
        f"{untrained_accuracy:.1%}). LoRAs trained separately, one run per rank, score "
        + ", ".join(f"{lora_accuracy[r]:.1%} at rank {r}" for r in sorted(lora_accuracy))
        + f". The rank-{top} LoRA cut to fewer ranks falls to {truncated_accuracy[1]:.1%} at rank 1. "
        f"Rank {fixed[0] if fixed else 1} of DyLoRA exported as a plain LoRA changes the logits by at most "
        f"{export_difference:.1e}."
    )
    return LabResult(method="dylora", summary=summary, metrics=metrics,
                     tables={"accuracy by rank": rows, "runs": task.run_rows()},
                     figures=figures, settings=settings.to_dict())


@torch.no_grad()
def _export_difference(dylora: TextClassifier, classifier_with, test, rank: int) -> float:
    """The largest logit difference between DyLoRA at `rank` and its export as a plain LoRA on a fresh model."""
    set_rank(dylora.encoder, rank, ADAPTER)
    dylora.eval()
    expected = dylora(test.inputs, test.attention_mask)
    config, state = export_rank(dylora.encoder, ADAPTER, rank)
    plain = classifier_with(config)
    load_adapter_state_dict(plain.encoder, state, ADAPTER)
    plain.head.load_state_dict(dylora.head.state_dict())
    plain.eval()
    return float((plain(test.inputs, test.attention_mask) - expected).abs().max())


register_experiment(Experiment(
    method="dylora", settings_cls=DyLoRASettings, run=run,
    description="Trains DyLoRA once over ranks 1..r_max on a tiny pre-trained text encoder and measures it at "
                "every rank, beside a LoRA trained separately at each rank and the largest LoRA cut to smaller "
                "ranks. Look at DyLoRA holding up at small ranks from a single run, while the truncated LoRA "
                "collapses.",
))
