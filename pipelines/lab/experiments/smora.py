"""SMoRA on four character tasks at once: which of the r ranks each task's tokens switch on.

The tiny Llama learns copy, reverse, sort and add-mod-10 from one mixed training set with SMoRA on its attention
and feed-forward projections: one LoRA of rank r per layer whose router activates k ranks per token, balanced by
the non-trained bias. The rank-activation map shows, for the layer whose routing differs most between tasks, the
share of each task's tokens that activate each rank: ranks every task uses (shared knowledge) beside ranks one
task uses more than others. How much the tasks differ is measured against a noise floor, the difference between
two halves of the same task's test set. The same run without the bias update (u = 0) shows what the bias does to
the rank loads, and one LoRA of rank k (as many active numbers per token) is the baseline for accuracy.

The official bias update rate is 1e-5, far too small to move the bias in a few hundred steps; the default here
is 1e-3 (a setting).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from pipelines.adapters import (
    LoRAConfig,
    SMoRAConfig,
    add_adapter,
    count_parameters,
    smora_rank_activations,
    smora_rank_bias,
    trainable_parameters,
)
from pipelines.lab import Experiment, LabResult, LabSettingsError, Progress, register_experiment
from pipelines.lab.experiments._tasks import (
    MultiTaskSettings,
    accuracy_report,
    language_model,
    mixed_tasks,
    spread,
    task_accuracies,
    task_tests,
    trailing_mean,
)
from pipelines.lab.models import attention_targets, mlp_targets
from pipelines.lab.plots import bar_plot, heatmap, line_plot
from pipelines.lab.training import fit, lm_loss, seeded

NAME = "smora"


@dataclass
class SMoRASettings(MultiTaskSettings):
    rank: int = field(default=16, metadata={"help": "r, the ranks (experts) of each layer's LoRA",
                                            "label": "Rank r", "min": 2, "max": 64})
    activate_r: int = field(default=4, metadata={"help": "k, the ranks each token activates (at most r)",
                                                 "label": "Active ranks k", "min": 1, "max": 64})
    bias_update_rate: float = field(default=1e-3, metadata={
        "help": "u, the balancing bias's step (official 1e-5: too small to move in a short run)",
        "label": "Bias update rate u", "min": 0.0, "max": 1.0})
    steps: int = field(default=250, metadata={"help": "training steps per variant", "label": "Steps",
                                              "min": 1, "max": 5000})

    @classmethod
    def quick(cls) -> SMoRASettings:
        return cls(steps=40, train_per_task=48, test_per_task=32, batch_size=16, bias_update_rate=5e-3)

    def validate(self) -> None:
        super().validate()
        if self.activate_r > self.rank:
            raise LabSettingsError(f"activate_r must be at most the rank ({self.rank}), not {self.activate_r}")


@torch.no_grad()
def activation_shares(model: nn.Module, data, k: int) -> dict[str, torch.Tensor]:
    """{module: each rank's share of the activations on `data`'s real tokens} (each sums to one)."""
    model.eval()
    model(input_ids=data.input_ids, attention_mask=data.attention_mask)
    return {m: v / k for m, v in smora_rank_activations(model, NAME, data.attention_mask).items()}


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def run(settings: SMoRASettings, progress: Progress) -> LabResult:
    progress.update(0.0, "loading the language model")
    base, tokenizer = language_model(settings.model_id)
    tasks = list(settings.tasks)
    train = mixed_tasks(tasks, "train", settings.train_per_task, settings.seed, tokenizer)
    tests = task_tests(tasks, settings.test_per_task, settings.seed, tokenizer)
    targets = attention_targets(base, ("q", "v")) + mlp_targets(base)
    k = settings.activate_r

    def new_smora(rate: float) -> nn.Module:
        model = copy.deepcopy(base)
        with seeded(settings.seed + 1):
            add_adapter(model, SMoRAConfig(rank=settings.rank, activate_r=k, alpha=2.0 * k, bias_update_rate=rate,
                                           target_modules=targets), NAME)
        return model

    def train_smora(rate: float, span: Progress) -> tuple[nn.Module, list[float]]:
        model = new_smora(rate)
        imbalance: list[float] = []

        def loss(m: nn.Module, batch) -> torch.Tensor:
            value = lm_loss(m, batch)
            loads = smora_rank_activations(m, NAME, batch.attention_mask).values()
            imbalance.append(_mean([spread(v) for v in loads]))
            return value

        fit(model, trainable_parameters(model, NAME), loss, train, settings.steps, settings.learning_rate, span,
            batch_size=settings.batch_size, seed=settings.seed,
            message=f"SMoRA {'with' if rate else 'without'} the bias update")
        model.eval()
        return model, imbalance

    smora, imbalance_with = train_smora(settings.bias_update_rate, progress.span(0.02, 0.4))
    frozen, imbalance_without = train_smora(0.0, progress.span(0.4, 0.78))
    lora = copy.deepcopy(base)
    with seeded(settings.seed + 1):
        add_adapter(lora, LoRAConfig(rank=k, scale=2.0, target_modules=targets), NAME)
    fit(lora, trainable_parameters(lora, NAME), lm_loss, train, settings.steps, settings.learning_rate,
        progress.span(0.78, 0.96), batch_size=settings.batch_size, seed=settings.seed,
        message=f"LoRA rank {k} (as many active numbers per token)")
    lora.eval()

    progress.update(0.96, "reading which ranks each task activates")
    shares = {task: activation_shares(smora, tests[task], k) for task in tasks}
    untrained = new_smora(settings.bias_update_rate)  # the same router before training: random, input-dependent
    at_start = {task: activation_shares(untrained, tests[task], k) for task in tasks}
    halves = {task: (activation_shares(smora, tests[task].take(slice(0, len(tests[task]) // 2)), k),
                     activation_shares(smora, tests[task].take(slice(len(tests[task]) // 2, None)), k))
              for task in tasks}
    modules = list(shares[tasks[0]])
    pairs = [(a, b) for i, a in enumerate(tasks) for b in tasks[i + 1:]]
    between = {m: _mean([total_variation(shares[a][m], shares[b][m]) for a, b in pairs]) for m in modules}
    between_at_start = {m: _mean([total_variation(at_start[a][m], at_start[b][m]) for a, b in pairs])
                        for m in modules}
    within = {m: _mean([total_variation(*(half[m] for half in halves[t])) for t in tasks]) for m in modules}
    shown = max(modules, key=lambda m: between[m] - within[m])
    everything = mixed_tasks(tasks, "test", settings.test_per_task, settings.seed, tokenizer)
    overall = {key: activation_shares(model, everything, k) for key, model in (("with", smora), ("without", frozen))}
    load_cv = {key: _mean([spread(v) for v in overall[key].values()])
               for key in overall}

    variants = {"base": ("base model", base), "smora": (f"SMoRA r={settings.rank}, k={k}", smora),
                "frozen": ("SMoRA, bias not updated", frozen), "lora": (f"LoRA r={k}", lora)}
    accuracy_metrics, rows, accuracy_figure = accuracy_report(
        {key: label for key, (label, _) in variants.items()},
        {key: task_accuracies(model, tests) for key, (_, model) in variants.items()}, tasks)
    bias = smora_rank_bias(smora, NAME)
    metrics: dict[str, float] = {
        "task_distance": _mean(list(between.values())), "within_task_distance": _mean(list(within.values())),
        "task_distance_at_start": _mean(list(between_at_start.values())),
        "task_distance_shown": between[shown], "within_task_distance_shown": within[shown],
        "load_cv_with_bias": load_cv["with"], "load_cv_without_bias": load_cv["without"],
        "largest_bias": max(float(b.abs().max()) for b in bias.values()),
        "parameters_smora": float(count_parameters(smora, NAME)),
        "parameters_lora": float(count_parameters(lora, NAME)), **accuracy_metrics,
    }

    ranks = [str(i) for i in range(settings.rank)]
    short = _label(shown)
    figures = {
        "rank_activation_per_task": heatmap(
            [shares[task][shown].tolist() for task in tasks], title=f"Rank activations per task ({short})",
            xlabel="rank (expert)", ylabel="task", row_labels=tasks, col_labels=ranks,
            colorbar_label="share of the task's activations", annotate=settings.rank <= 8),
        "task_specificity": bar_plot(
            [_label(m) for m in modules],
            {"between tasks": [between[m] for m in modules],
             "between tasks, before training": [between_at_start[m] for m in modules],
             "two halves of one task": [within[m] for m in modules]},
            title="How differently the tasks use the ranks (total variation)", xlabel="layer",
            ylabel="mean distance of activation shares", annotate=False),
        "rank_load": bar_plot(
            ranks, {"bias updated": overall["with"][shown].tolist(),
                    "bias not updated": overall["without"][shown].tolist()},
            title=f"Each rank's share of all activations ({short})", xlabel="rank", ylabel="share", annotate=False),
        "load_imbalance_during_training": line_plot(
            {"bias updated": trailing_mean(imbalance_with), "bias not updated": trailing_mean(imbalance_without)},
            markers=False,
            title="How uneven the rank loads are in each training batch", xlabel="training step",
            ylabel="coefficient of variation of the rank loads"),
        "accuracy_per_task": accuracy_figure,
    }
    for row, (key, (_, model)) in zip(rows, variants.items(), strict=True):
        row["trainable parameters"] = 0 if key == "base" else int(count_parameters(model, NAME))
    summary = (
        f"With r = {settings.rank} ranks and k = {k} active per token, the {len(tasks)} tasks switch on different "
        f"ranks: "
        f"the activation shares of two tasks differ by {metrics['task_distance']:.3f} (total variation, mean over "
        f"layers and task pairs) against {metrics['within_task_distance']:.3f} between two halves of one task "
        f"and {metrics['task_distance_at_start']:.3f} for the untrained router (random, but input-dependent); "
        f"in {short} {between[shown]:.3f} against {within[shown]:.3f}. The balancing bias (u = "
        f"{settings.bias_update_rate:g}) reaches {metrics['largest_bias']:.3f}; the rank loads' coefficient of "
        f"variation is {load_cv['with']:.3f} with it and {load_cv['without']:.3f} without. Mean token accuracy: "
        f"base {metrics['mean_accuracy_base']:.3f}, SMoRA {metrics['mean_accuracy_smora']:.3f} (without the bias "
        f"update {metrics['mean_accuracy_frozen']:.3f}), LoRA r={k} {metrics['mean_accuracy_lora']:.3f}."
    )
    return LabResult(method="smora", summary=summary, metrics=metrics, tables={"variants": rows}, figures=figures,
                     settings=settings.to_dict())


def _label(module: str) -> str:
    """A short name for a module on an axis: "model.layers.1.mlp.up_proj" -> "L1 up"."""
    for long, short in (("model.layers.", "L"), (".self_attn.", " "), (".mlp.", " "), ("_proj", "")):
        module = module.replace(long, short)
    return module


register_experiment(Experiment(
    method="smora", settings_cls=SMoRASettings, run=run,
    description="The tiny Llama learns four character tasks at once with SMoRA: each layer's LoRA has r ranks and "
                "a router switches k of them on per token. Look at the rank-activation map (which ranks each task "
                "uses), how much more the tasks differ than two halves of one task, the rank loads with and "
                "without the balancing bias, and the accuracy against a LoRA of rank k.",
))
