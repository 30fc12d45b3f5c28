"""SoRA: gates between the down and up projections go to zero under an L1 penalty and a proximal threshold;
the ranks they switch off are pruned into a smaller plain LoRA that gives the same outputs.

A pre-trained tiny encoder learns a new text classification task with SoRA on its query and value projections
(and a new head). The factors and head train with AdamW, the gates with SoRA's own optimiser (an Adam step, then
the proximal step of the L1 norm with threshold xi), while the sparsifying schedule raises xi in stages over the
second half of the run. The live ranks of every layer are counted after each step. The trained adapter is then
pruned: its zero-gate ranks dropped and the gates folded into B, and the largest change of any logit is
measured. Beside it, a LoRA of the pruned shape trained from scratch, and a LoRA at r_max.

Choices of this demo (settings where they matter): the official script trains a full run at the first xi and
then 15 epochs per later stage; here the first half of the steps uses the first xi and the stages share the
second half. The gates' gradient is not clipped with the other parameters' (the official trainer clips all).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from pipelines.adapters import (
    LoRAConfig,
    SoRAConfig,
    count_parameters,
    export_pruned,
    factor_parameters,
    gate_optimizer,
    live_ranks,
    prune,
    sparsity_loss,
    trainable_parameters,
)
from pipelines.lab import Experiment, LabResult, LabSettings, LabSettingsError, Progress, register_experiment
from pipelines.lab.experiments import _text_task as text
from pipelines.lab.experiments._text_task import ADAPTER, TextTaskRuns
from pipelines.lab.plots import bar_plot, line_plot
from pipelines.lab.training import accuracy, classification_loss


@dataclass
class SoRASettings(LabSettings):
    task: str = text.task_field()
    max_rank: int = field(default=8, metadata={
        "help": "r_max, every layer's rank before the gates prune it (the paper's scripts: 8)",
        "label": "Largest rank", "min": 1, "max": 32})
    alpha: float = field(default=8.0, metadata={
        "help": "the update is scaled by alpha / r_max", "label": "Alpha", "min": 0.01, "max": 1024})
    l1_weight: float = field(default=0.1, metadata={
        "help": "eta: the loss adds eta * ||g||_1 / |g| (the no-schedule script uses 10)", "label": "L1 weight",
        "min": 0.0, "max": 1000})
    threshold: float = field(default=5e-4, metadata={
        "help": "xi at the start: after each gate step, gates within it shrink to zero", "label": "Threshold",
        "min": 0.0, "max": 1.0})
    schedule: str = field(default="linear", metadata={
        "help": "how xi rises over the second half of the run (the paper's sparsifying scheduler)",
        "label": "Schedule", "choices": ("none", "linear", "log_linear", "exp_linear")})
    max_threshold: float = field(default=1e-2, metadata={
        "help": "the last xi of the schedule", "label": "Last threshold", "min": 0.0, "max": 1.0})
    schedule_stages: int = field(default=5, metadata={
        "help": "how many xi values the schedule steps through", "label": "Stages", "min": 1, "max": 50})
    proximal: str = field(default="official", metadata={
        "help": "official: the released code's in-place steps (a gate below 2 xi goes to zero); soft: the "
                "textbook soft threshold", "label": "Proximal step", "choices": ("official", "soft")})
    steps: int = text.steps_field(300)
    learning_rate: float = text.learning_rate_field(" of factors, head and (as the official default) gates")
    batch_size: int = text.batch_size_field()
    train_examples: int = text.examples_field("train")
    test_examples: int = text.examples_field("test")

    @classmethod
    def quick(cls) -> SoRASettings:
        return cls(max_rank=4, steps=100, train_examples=256, test_examples=256)

    def validate(self) -> None:
        super().validate()
        if self.schedule == "exp_linear" and (self.threshold <= 0 or self.max_threshold <= 0):
            raise LabSettingsError("threshold: the exp_linear schedule needs a threshold and last threshold above 0")


def run(settings: SoRASettings, progress: Progress) -> LabResult:
    task = TextTaskRuns(settings, progress)
    test, targets = task.test, task.targets

    config = SoRAConfig(rank=settings.max_rank, alpha=settings.alpha, l1_weight=settings.l1_weight,
                        threshold=settings.threshold, proximal=settings.proximal, schedule=settings.schedule,
                        max_threshold=settings.max_threshold, schedule_stages=settings.schedule_stages,
                        target_modules=targets)
    untrained_accuracy = accuracy(task.classifier_with(config), test)

    # SoRA: factors and head with fit's AdamW, gates with SoRA's optimiser after every step.
    sora = task.classifier_with(config)
    first_phase = settings.steps // 2
    stage_steps = max(1, (settings.steps - first_phase) // max(1, settings.schedule_stages - 1))
    gates = gate_optimizer(sora.encoder, ADAPTER, lr=settings.learning_rate, schedule_start=first_phase,
                           stage_steps=stage_steps)
    names = list(live_ranks(sora.encoder, ADAPTER))
    history = {name: [settings.max_rank] for name in names}
    thresholds = [gates.threshold_of(gates.param_groups[0])]

    def gate_step(step: int, loss: float) -> None:
        gates.step()
        gates.zero_grad(set_to_none=True)
        for name, count in live_ranks(sora.encoder, ADAPTER).items():
            history[name].append(count)
        thresholds.append(gates.threshold_of(gates.param_groups[0]))

    def sora_loss(model, batch):
        return classification_loss(model, batch) + sparsity_loss(model.encoder, ADAPTER)

    task.fit(progress.span(0.02, 0.5), sora, "SoRA", factor_parameters(sora.encoder, ADAPTER), sora_loss, gate_step)
    sora_accuracy = accuracy(sora, test)
    final = live_ranks(sora.encoder, ADAPTER)

    # Pruning: a plain LoRA of the live ranks, gates folded into B; it must give the same logits.
    progress.update(0.5, "pruning the zero gates")
    pruned = copy.deepcopy(sora)
    sora_parameters = count_parameters(sora.encoder, ADAPTER)
    lora_config, _ = export_pruned(sora.encoder, ADAPTER)
    prune(pruned.encoder, ADAPTER)
    with torch.no_grad():
        sora.eval()
        pruned.eval()
        difference = float((pruned(test.inputs, test.attention_mask)
                            - sora(test.inputs, test.attention_mask)).abs().max())
    pruned_accuracy = accuracy(pruned, test)
    pruned_parameters = count_parameters(pruned.encoder, ADAPTER)

    # LoRA of the pruned shape trained from scratch, and LoRA at r_max.
    same_shape = task.classifier_with(lora_config)
    task.fit(progress.span(0.52, 0.75), same_shape, "LoRA of the pruned shape",
             trainable_parameters(same_shape.encoder, ADAPTER))
    full = task.classifier_with(LoRAConfig(rank=settings.max_rank, scale=settings.alpha / settings.max_rank,
                                           target_modules=targets))
    task.fit(progress.span(0.75, 0.98), full, f"LoRA rank {settings.max_rank}",
             trainable_parameters(full.encoder, ADAPTER))
    same_shape_accuracy, full_accuracy = accuracy(same_shape, test), accuracy(full, test)
    full_parameters = count_parameters(full.encoder, ADAPTER)

    start_total, end_total = settings.max_rank * len(names), sum(final.values())
    steps = list(range(0, settings.steps + 1))
    short = {name: _short_name(name) for name in names}
    figures = {
        "live_ranks": line_plot(
            {short[name]: (steps, history[name]) for name in names}, markers=False,
            title=f"Live ranks per layer during training (r_max {settings.max_rank})", xlabel="step",
            ylabel="non-zero gates"),
        "threshold": line_plot(
            {"xi": (steps, thresholds)}, markers=False, title="Proximal threshold xi (sparsifying schedule)",
            xlabel="step", ylabel="xi"),
        "accuracy": bar_plot(
            ["untrained", f"SoRA (r_max {settings.max_rank})", "SoRA pruned", "LoRA, pruned shape",
             f"LoRA rank {settings.max_rank}"],
            [untrained_accuracy, sora_accuracy, pruned_accuracy, same_shape_accuracy, full_accuracy],
            title=f"Test accuracy ({settings.task})", xlabel="adapter", ylabel="test accuracy"),
    }
    metrics = {"untrained_accuracy": untrained_accuracy, "sora_accuracy": sora_accuracy,
               "pruned_accuracy": pruned_accuracy, "pruned_max_difference": difference,
               "lora_pruned_shape_accuracy": same_shape_accuracy, "lora_full_accuracy": full_accuracy,
               "live_ranks_start": float(start_total), "live_ranks_end": float(end_total),
               "sora_parameters": float(sora_parameters), "pruned_parameters": float(pruned_parameters),
               "lora_full_parameters": float(full_parameters)}
    summary = (
        f"On **{settings.task}**, SoRA's gates switched off {start_total - end_total} of its {start_total} ranks "
        f"({', '.join(f'{short[n]}: {final[n]}' for n in names)} left) while the threshold rose from "
        f"{thresholds[0]:.1e} to {thresholds[-1]:.1e}. It scores {sora_accuracy:.1%}; pruned to a plain LoRA of "
        f"{pruned_parameters:,} parameters (from {sora_parameters:,}) it gives the same logits to within "
        f"{difference:.1e} ({pruned_accuracy:.1%}). A LoRA of the pruned shape trained from scratch scores "
        f"{same_shape_accuracy:.1%}, a LoRA of rank {settings.max_rank} ({full_parameters:,} parameters) "
        f"{full_accuracy:.1%}, the untrained adapter {untrained_accuracy:.1%}."
    )
    return LabResult(
        method="sora", summary=summary, metrics=metrics,
        tables={"layers": [{"layer": name, "live ranks": final[name], "of": settings.max_rank} for name in names],
                "adapters": [
                    {"adapter": "SoRA", "parameters": sora_parameters, "test accuracy": round(sora_accuracy, 4)},
                    {"adapter": "SoRA pruned", "parameters": pruned_parameters,
                     "test accuracy": round(pruned_accuracy, 4)},
                    {"adapter": "LoRA, pruned shape", "parameters": pruned_parameters,
                     "test accuracy": round(same_shape_accuracy, 4)},
                    {"adapter": f"LoRA rank {settings.max_rank}", "parameters": full_parameters,
                     "test accuracy": round(full_accuracy, 4)}],
                "runs": task.run_rows()},
        figures=figures, settings=settings.to_dict())


def _short_name(module: str) -> str:
    """`encoder.layer.1.attention.self.query` -> `layer 1 query`."""
    parts = module.split(".")
    index = next((p for p in parts if p.isdigit()), "")
    return f"layer {index} {parts[-1]}".strip()


register_experiment(Experiment(
    method="sora", settings_cls=SoRASettings, run=run,
    description="Trains SoRA on a tiny pre-trained text encoder while its threshold rises, counting each "
                "layer's live ranks, then prunes the zero gates into a plain LoRA. Look at the live ranks "
                "falling, the pruned adapter's identical outputs, and its accuracy beside LoRAs of its shape and "
                "of full rank.",
))
